//! Running the chaos suite: the services, the fleet, the workload in flight, the faults on a
//! schedule, the humans' answers, and the storm check.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use agentfleet::domain::SessionId;
use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::services::{PrivateRabbit, PrivateRedis};
use super::workload::{self, FLAKY_TOOL, Kind, Planned};
use crate::fleet::{FleetOptions, TestFleet};
use crate::model_server::Faults;
use crate::tool_server::{Behaviour, ToolBehaviour, ToolServer, ToolServerConfig};

/// What to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Sessions in flight.
    pub sessions: usize,
    /// Worker processes.
    pub workers: usize,
    /// Steps in flight per worker.
    pub concurrency: u16,
    /// The workers' lease TTL.
    pub lease_ms: u64,
    /// SIGKILLs of a random worker (each one replaced at once).
    pub kills: usize,
    /// SIGSTOPs of a worker (each for `sigstop_s`, then SIGCONT).
    pub sigstops: usize,
    /// How long a stopped worker stays stopped.
    pub sigstop_s: u64,
    /// Restarts of the RabbitMQ node.
    pub broker_restarts: usize,
    /// `kill -9` and restarts of Redis.
    pub redis_restarts: usize,
    /// The share of model calls answered 529 during the storm.
    pub storm_rate: f64,
    /// How long the storm lasts.
    pub storm_s: u64,
    /// Time between two disruptive faults.
    pub fault_interval_ms: u64,
    /// The model's latency (and as much jitter again).
    pub model_latency_ms: u64,
    /// Malformed requests published to the requests queue (they must be dead-lettered).
    pub bad_inputs: usize,
    /// Seeds the workload and the choice of workers.
    pub seed: u64,
    /// The longest the sessions may take to end once submitted.
    pub timeout_s: u64,
    /// Use the machine's RabbitMQ (never restarted) instead of a private node.
    pub shared_broker: bool,
    /// The agents' `max_steps`.
    pub max_steps: u32,
    /// The janitor's `stall_after_s`: how long a session may stand still before its step is
    /// published again.
    pub stall_after_s: u64,
}

/// The suite's own Redis and (unless `--shared-broker`) RabbitMQ.
pub struct Services {
    /// The private Redis.
    pub redis: PrivateRedis,
    /// The private RabbitMQ node.
    pub rabbit: Option<PrivateRabbit>,
    /// Where their files are.
    pub dir: PathBuf,
}

impl Services {
    /// Starts them with their files under `dir`.
    pub async fn start(dir: &Path, shared_broker: bool) -> anyhow::Result<Self> {
        let redis = PrivateRedis::start(&dir.join("redis")).await.context("starting the private Redis")?;
        let rabbit = if shared_broker {
            None
        } else {
            Some(PrivateRabbit::start(&dir.join("rabbitmq")).await.context("starting the private RabbitMQ node")?)
        };
        Ok(Self { redis, rabbit, dir: dir.to_owned() })
    }

    /// The broker URL the fleet uses.
    pub fn amqp_url(&self) -> String {
        self.rabbit.as_ref().map_or_else(crate::fleet::amqp_url, PrivateRabbit::url)
    }

    /// Stops both.
    pub async fn stop(mut self) {
        if let Some(rabbit) = self.rabbit.as_mut()
            && let Err(e) = rabbit.stop().await
        {
            eprintln!("chaos: stopping the private RabbitMQ node: {e:#}");
        }
        self.redis.stop().await;
    }
}

/// How long a fleet may take to start.
const FLEET_START_TIMEOUT: Duration = Duration::from_secs(120);

/// A fleet and the tool server of its flaky tool.
pub struct Rig {
    /// The fleet.
    pub fleet: TestFleet,
    /// Serves [`FLAKY_TOOL`].
    pub flaky: ToolServer,
}

impl Rig {
    /// Starts a fleet on `services`.
    pub async fn start(services: &Services, s: &Settings) -> anyhow::Result<Self> {
        let flaky = ToolServer::start(TcpListener::bind("127.0.0.1:0").await?, ToolServerConfig::default()).await?;
        let starting = TestFleet::start(FleetOptions {
            workers: s.workers,
            concurrency: s.concurrency,
            lease_ms: s.lease_ms,
            max_steps: s.max_steps,
            redis_url: services.redis.url(),
            amqp_url: services.amqp_url(),
            extra_config: workload::flaky_config(&flaky.base_url(), s.max_steps),
            dispatcher_config: format!("stall_after_s = {}", s.stall_after_s),
            // The dead-letter check counts the queue itself: the dispatcher leaves it alone.
            dead_letters_config: "store = false".into(),
            ..Default::default()
        });
        // The dispatcher waits for the broker patiently; a broker that never answers must not hang
        // the suite.
        let fleet = tokio::time::timeout(FLEET_START_TIMEOUT, starting).await.with_context(|| {
            format!(
                "the fleet did not start within {FLEET_START_TIMEOUT:?}: is the broker at {} up?",
                services.amqp_url()
            )
        })??;
        fleet.wait_ready(Duration::from_secs(60)).await?;
        Ok(Self { fleet, flaky })
    }
}

/// The dispatcher's API, usable while the fault driver holds the fleet.
#[derive(Clone)]
pub struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    /// The API of `fleet`.
    pub fn of(fleet: &TestFleet) -> Self {
        Self { base: fleet.api.clone(), http: fleet.http.clone() }
    }

    /// Creates a session, retrying (with its idempotency key) while the fleet's services are down.
    pub async fn submit(&self, body: &Value, patience: Duration) -> anyhow::Result<SessionId> {
        let deadline = Instant::now() + patience;
        loop {
            let attempt = async {
                let r = self.http.post(format!("{}/v1/sessions", self.base)).json(body).send().await?;
                let status = r.status();
                let v: Value = r.json().await?;
                anyhow::ensure!(status == reqwest::StatusCode::ACCEPTED, "POST /v1/sessions answered {status}: {v}");
                Ok(SessionId::parse(v["id"].as_str().context("no id")?)?)
            };
            match attempt.await {
                Ok(id) => return Ok(id),
                Err(e) if Instant::now() > deadline => return Err(e.context("submitting a session")),
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// `GET /v1/sessions/{id}`.
    pub async fn session(&self, id: &SessionId) -> anyhow::Result<Value> {
        let r = self.http.get(format!("{}/v1/sessions/{id}", self.base)).send().await?;
        let status = r.status();
        let v: Value = r.json().await?;
        anyhow::ensure!(status.is_success(), "GET /v1/sessions/{id} answered {status}: {v}");
        Ok(v)
    }

    /// `POST {path}` with `body`; the status.
    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<u16> {
        let r = self.http.post(format!("{}{path}", self.base)).json(body).send().await?;
        Ok(r.status().as_u16())
    }
}

/// True when a session has ended and will never move again.
pub fn is_final(v: &Value) -> bool {
    matches!(v["status"].as_str(), Some("completed" | "failed" | "budget_exhausted" | "cancelled"))
}

/// The faults the driver injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill,
    Pause,
    Resume,
    BrokerRestart,
    RedisRestart,
    StormOn,
    StormOff,
    ToolOutageOn,
    ToolOutageOff,
}

/// What the fault driver did.
#[derive(Debug, Default, Clone)]
pub struct FaultLog {
    /// Workers SIGKILLed.
    pub kills: usize,
    /// Workers SIGSTOPped (and later resumed).
    pub pauses: usize,
    /// RabbitMQ restarts.
    pub broker_restarts: usize,
    /// Redis kill -9 and restarts.
    pub redis_restarts: usize,
    /// Seconds the model storm lasted.
    pub storm_s: f64,
    /// One line per fault, with its time since the start.
    pub lines: Vec<String>,
}

impl FaultLog {
    /// Crashes that can make a step's effect run again: worker kills, pauses past the lease, and
    /// Redis restarts (which may lose the last second of writes).
    pub fn crashes(&self) -> usize {
        self.kills + self.pauses + self.redis_restarts
    }
}

/// When each fault happens, from the start of the run.
fn schedule(s: &Settings) -> Vec<(Duration, Fault)> {
    let interval = Duration::from_millis(s.fault_interval_ms);
    let mut slots = vec![Fault::Kill; s.kills];
    // Spread the restarts between the kills.
    for (n, fault) in [(s.broker_restarts, Fault::BrokerRestart), (s.redis_restarts, Fault::RedisRestart)] {
        for k in 0..n {
            let at = ((k + 1) * (slots.len() + 1) / (n + 1)).min(slots.len());
            slots.insert(at, fault);
        }
    }
    let mut plan: Vec<(Duration, Fault)> =
        slots.into_iter().enumerate().map(|(j, f)| (interval * (j as u32 + 1), f)).collect();
    for k in 0..s.sigstops {
        let at = interval * (2 * k as u32 + 1) + interval / 2;
        plan.push((at, Fault::Pause));
        plan.push((at + Duration::from_secs(s.sigstop_s), Fault::Resume));
    }
    if s.storm_rate > 0.0 && s.storm_s > 0 {
        plan.push((interval / 2, Fault::StormOn));
        plan.push((interval / 2 + Duration::from_secs(s.storm_s), Fault::StormOff));
    }
    plan.push((interval * 2, Fault::ToolOutageOn));
    plan.push((interval * 2 + Duration::from_secs(10), Fault::ToolOutageOff));
    plan.sort_by_key(|(at, _)| *at);
    plan
}

/// How long the fault schedule lasts.
pub fn schedule_length(s: &Settings) -> Duration {
    schedule(s).last().map_or(Duration::ZERO, |(at, _)| *at)
}

/// The flaky tool's everyday behaviour: 30% of its calls fail.
fn flaky_behaviour(fail_rate: f64) -> Behaviour {
    let tool = ToolBehaviour { fail_rate, fail_status: 503, latency_ms: 20 };
    Behaviour { tools: BTreeMap::from([(FLAKY_TOOL.to_owned(), tool)]), ..Behaviour::default() }
}

/// The model's everyday faults: latency only.
fn calm(s: &Settings) -> Faults {
    Faults { latency_ms: s.model_latency_ms, latency_jitter_ms: s.model_latency_ms, ..Faults::default() }
}

/// Injects the faults of [`schedule`] into the rig and the services.
async fn drive_faults(
    rig: &mut Rig,
    services: &mut Services,
    s: &Settings,
    started: Instant,
) -> anyhow::Result<FaultLog> {
    let mut driver = FaultDriver {
        rng: StdRng::seed_from_u64(s.seed ^ 0x5eed),
        log: FaultLog::default(),
        paused: None,
        storm_from: None,
    };
    for (at, fault) in schedule(s) {
        tokio::time::sleep_until((started + at).into()).await;
        let t = started.elapsed().as_secs_f64();
        let line = driver.inject(fault, rig, services, s).await?;
        driver.log.lines.push(format!("{t:7.1} s  {line}"));
    }
    Ok(driver.log)
}

/// The fault driver's state between faults.
struct FaultDriver {
    rng: StdRng,
    log: FaultLog,
    /// The stopped worker: its index and pid.
    paused: Option<(usize, u32)>,
    storm_from: Option<Instant>,
}

impl FaultDriver {
    /// Injects one fault; says what it did.
    async fn inject(
        &mut self,
        fault: Fault,
        rig: &mut Rig,
        services: &mut Services,
        s: &Settings,
    ) -> anyhow::Result<String> {
        match fault {
            Fault::Kill => self.kill(rig),
            Fault::Pause => self.pause(rig, s.sigstop_s),
            Fault::Resume => self.resume(),
            Fault::BrokerRestart => self.restart_broker(services).await,
            Fault::RedisRestart => {
                let t0 = Instant::now();
                services.redis.kill_and_restart(Duration::from_secs(1)).await?;
                self.log.redis_restarts += 1;
                Ok(format!("Redis kill -9, restarted from its AOF (down {:.1} s)", t0.elapsed().as_secs_f64()))
            }
            Fault::StormOn => {
                rig.fleet.model.set_faults(Faults { rate_529: s.storm_rate, ..calm(s) });
                self.storm_from = Some(Instant::now());
                Ok(format!("model storm on: {:.0}% of calls answered 529", s.storm_rate * 100.0))
            }
            Fault::StormOff => {
                rig.fleet.model.set_faults(calm(s));
                self.log.storm_s = self.storm_from.map_or(0.0, |t| t.elapsed().as_secs_f64());
                Ok("model storm off".to_owned())
            }
            Fault::ToolOutageOn => {
                rig.flaky.set_behaviour(flaky_behaviour(1.0))?;
                Ok(format!("{FLAKY_TOOL} outage: every call fails with 503"))
            }
            Fault::ToolOutageOff => {
                rig.flaky.set_behaviour(flaky_behaviour(0.3))?;
                Ok(format!("{FLAKY_TOOL} back to 30% failures"))
            }
        }
    }

    /// A random running worker, other than the stopped one.
    fn pick(&mut self, rig: &Rig) -> Option<(usize, u32)> {
        let stopped = self.paused.map(|(i, _)| i);
        let live: Vec<usize> = rig.fleet.live_workers().into_iter().filter(|i| Some(*i) != stopped).collect();
        let i = *live.get(self.rng.random_range(0..live.len().max(1)))?;
        Some((i, rig.fleet.worker_pid(i)?))
    }

    /// SIGKILLs a random worker and starts another.
    fn kill(&mut self, rig: &mut Rig) -> anyhow::Result<String> {
        let Some((i, pid)) = self.pick(rig) else { return Ok("kill: no running worker to kill".to_owned()) };
        rig.fleet.kill_worker(i)?;
        let new = rig.fleet.spawn_worker()?;
        self.log.kills += 1;
        Ok(format!("SIGKILL worker {i} (pid {pid}); started worker {new}"))
    }

    /// SIGSTOPs a random worker, unless one is stopped already.
    fn pause(&mut self, rig: &Rig, for_s: u64) -> anyhow::Result<String> {
        let Some((i, pid)) = self.pick(rig).filter(|_| self.paused.is_none()) else {
            return Ok("SIGSTOP: no running worker to stop".to_owned());
        };
        signal(pid, nix::sys::signal::Signal::SIGSTOP)?;
        self.paused = Some((i, pid));
        self.log.pauses += 1;
        Ok(format!("SIGSTOP worker {i} (pid {pid}) for {for_s} s"))
    }

    /// SIGCONTs the stopped worker.
    fn resume(&mut self) -> anyhow::Result<String> {
        let Some((i, pid)) = self.paused.take() else { return Ok("SIGCONT: no worker was stopped".to_owned()) };
        signal(pid, nix::sys::signal::Signal::SIGCONT)?;
        Ok(format!("SIGCONT worker {i} (pid {pid})"))
    }

    /// Restarts the private RabbitMQ node; the machine's broker is never restarted.
    async fn restart_broker(&mut self, services: &mut Services) -> anyhow::Result<String> {
        let Some(rabbit) = services.rabbit.as_mut() else {
            return Ok("RabbitMQ restart skipped: --shared-broker (the machine's broker is never restarted)".to_owned());
        };
        let t0 = Instant::now();
        rabbit.restart(Duration::from_secs(2)).await?;
        self.log.broker_restarts += 1;
        Ok(format!("RabbitMQ node {} restarted (down {:.1} s)", rabbit.node(), t0.elapsed().as_secs_f64()))
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) -> anyhow::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).with_context(|| format!("{sig} to {pid}"))
}

/// Submits every planned session, spread over `window`; their ids, in plan order.
async fn submit_all(api: &Api, planned: &[Planned], window: Duration, ids: &Mutex<Vec<Option<SessionId>>>) {
    let started = Instant::now();
    let n = planned.len().max(1) as u32;
    futures::stream::iter(planned)
        .map(|p| async move {
            tokio::time::sleep_until((started + window * p.index as u32 / n).into()).await;
            let id = api.submit(&p.body, Duration::from_secs(180)).await;
            match id {
                Ok(id) => ids.lock().unwrap_or_else(PoisonError::into_inner)[p.index] = Some(id),
                Err(e) => eprintln!("chaos: session {} was never created: {e:#}", p.index),
            }
        })
        .buffer_unordered(16)
        .collect::<()>()
        .await;
}

/// Plays the humans: replies to escalating sessions and approves refunds, once each, until `stop`.
async fn humans(api: &Api, planned: &[Planned], ids: &Mutex<Vec<Option<SessionId>>>, stop: &CancellationToken) {
    let mut done: Vec<bool> = planned.iter().map(|p| !matches!(p.kind, Kind::Escalating | Kind::Approval)).collect();
    while !stop.is_cancelled() && done.iter().any(|d| !d) {
        for p in planned {
            if done[p.index] {
                continue;
            }
            let id = ids.lock().unwrap_or_else(PoisonError::into_inner)[p.index].clone();
            let Some(id) = id else { continue };
            let Ok(s) = api.session(&id).await else { continue };
            let answer = match (p.kind, s["status"].as_str()) {
                (Kind::Escalating, Some("awaiting_human")) => {
                    api.post(&format!("/v1/sessions/{id}/reply"), &json!({ "text": p.human_reply() })).await
                }
                (Kind::Approval, Some("awaiting_approval")) => {
                    api.post(&format!("/v1/sessions/{id}/approve"), &json!({ "note": "approved by the chaos suite" }))
                        .await
                }
                _ => {
                    // Ended without asking (a violation the checks report), or not asked yet.
                    done[p.index] = is_final(&s);
                    continue;
                }
            };
            done[p.index] = answer.is_ok_and(|code| code == 202);
        }
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    }
}

/// Waits until every session has ended (or `deadline`); the last view of each.
async fn wait_final(api: &Api, ids: &[Option<SessionId>], deadline: Instant) -> Vec<Option<Value>> {
    let mut last: Vec<Option<Value>> = vec![None; ids.len()];
    loop {
        let mut open = 0;
        for (i, id) in ids.iter().enumerate() {
            let Some(id) = id else { continue };
            if last[i].as_ref().is_some_and(is_final) {
                continue;
            }
            if let Ok(s) = api.session(id).await {
                last[i] = Some(s);
            }
            open += usize::from(!last[i].as_ref().is_some_and(is_final));
        }
        if open == 0 || Instant::now() > deadline {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Publishes `n` malformed requests (not JSON) to the requests queue: each must be dead-lettered.
async fn publish_bad_inputs(fleet: &TestFleet, n: usize) -> anyhow::Result<()> {
    use lapin::BasicProperties;
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    if n == 0 {
        return Ok(());
    }
    let (conn, ch) = fleet.amqp().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let queue = agentfleet::amqp::Topology::new(&fleet.config.amqp.prefix, 1).requests_queue();
    for i in 0..n {
        let props = BasicProperties::default()
            .with_user_id("guest".into())
            .with_content_type("application/json".into())
            .with_message_id(format!("chaos-bad-{i}").into());
        let opts = BasicPublishOptions { mandatory: true, ..Default::default() };
        let body = format!("not json at all {i}");
        ch.basic_publish("".into(), queue.as_str().into(), opts, body.as_bytes(), props).await?.await?;
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// What a chaos run leaves for the checks.
pub struct Outcome {
    /// The workload.
    pub planned: Vec<Planned>,
    /// Each session's id (none when it could not be created).
    pub ids: Vec<Option<SessionId>>,
    /// Each session's last view.
    pub sessions: Vec<Option<Value>>,
    /// When the first session was submitted, Unix ms.
    pub started_ms: u64,
    /// The faults injected.
    pub faults: FaultLog,
    /// From the first submission until every session ended.
    pub wall: Duration,
}

/// Runs the workload with the faults on the rig; returns what happened.
pub async fn run_chaos(rig: &mut Rig, services: &mut Services, s: &Settings) -> anyhow::Result<Outcome> {
    let planned = workload::plan(s.sessions, s.seed, s.max_steps);
    rig.fleet.model.set_faults(calm(s));
    rig.flaky.set_behaviour(flaky_behaviour(0.3))?;
    publish_bad_inputs(&rig.fleet, s.bad_inputs).await.context("publishing the malformed requests")?;
    let api = Api::of(&rig.fleet);
    let ids: Arc<Mutex<Vec<Option<SessionId>>>> = Arc::new(Mutex::new(vec![None; planned.len()]));
    // Submissions go on while the faults happen, so that sessions start, run and end throughout.
    let window = schedule_length(s).mul_f64(0.6);
    let started = Instant::now();
    let started_ms = agentfleet::telemetry::now_ms();
    let stop_humans = CancellationToken::new();
    let human_work = humans(&api, &planned, &ids, &stop_humans);
    let faults_and_wait = async {
        let run = async {
            let (log, ()) =
                tokio::join!(drive_faults(rig, services, s, started), submit_all(&api, &planned, window, &ids));
            let log = log?;
            let ids_now = ids.lock().unwrap_or_else(PoisonError::into_inner).clone();
            let deadline = Instant::now() + Duration::from_secs(s.timeout_s);
            let sessions = wait_final(&api, &ids_now, deadline).await;
            anyhow::Ok((log, ids_now, sessions))
        };
        let done = run.await;
        // Also when a fault could not be injected: the humans stop, and the error is reported.
        stop_humans.cancel();
        done
    };
    let (done, ()) = tokio::join!(faults_and_wait, human_work);
    let (faults, ids, sessions) = done?;
    Ok(Outcome { planned, ids, sessions, started_ms, faults, wall: started.elapsed() })
}

/// One storm run: `sessions` sessions of `steps` steps while `rate` of the model's answers are
/// 529; how long until every one ended, and how many completed.
pub async fn run_storm(
    rig: &Rig,
    sessions: usize,
    steps: u32,
    rate: f64,
    timeout: Duration,
) -> anyhow::Result<(Duration, usize)> {
    rig.fleet.model.set_faults(Faults { rate_529: rate, ..Faults::default() });
    let api = Api::of(&rig.fleet);
    let started = Instant::now();
    let bodies: Vec<Value> =
        (0..sessions).map(|i| json!({ "agent": "support", "input": format!("[steps={steps}] storm {i}") })).collect();
    let created: Vec<anyhow::Result<SessionId>> = futures::stream::iter(&bodies)
        .map(|b| api.submit(b, Duration::from_secs(30)))
        .buffer_unordered(64)
        .collect()
        .await;
    let ids: Vec<Option<SessionId>> = created.into_iter().map(Result::ok).collect();
    if ids.iter().any(Option::is_none) {
        bail!("some storm sessions could not be created");
    }
    let last = wait_final(&api, &ids, started + timeout).await;
    let took = started.elapsed();
    let completed = last.iter().flatten().filter(|s| s["status"] == "completed").count();
    Ok((took, completed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            sessions: 100,
            workers: 3,
            concurrency: 8,
            lease_ms: 5000,
            kills: 5,
            sigstops: 1,
            sigstop_s: 30,
            broker_restarts: 1,
            redis_restarts: 1,
            storm_rate: 0.3,
            storm_s: 15,
            fault_interval_ms: 4000,
            model_latency_ms: 100,
            bad_inputs: 3,
            seed: 1,
            timeout_s: 300,
            shared_broker: false,
            max_steps: 50,
            stall_after_s: 60,
        }
    }

    #[test]
    fn the_schedule_holds_every_fault_in_order() {
        let plan = schedule(&settings());
        let count = |f: Fault| plan.iter().filter(|(_, g)| *g == f).count();
        assert_eq!(count(Fault::Kill), 5);
        assert_eq!((count(Fault::Pause), count(Fault::Resume)), (1, 1));
        assert_eq!((count(Fault::BrokerRestart), count(Fault::RedisRestart)), (1, 1));
        assert_eq!((count(Fault::StormOn), count(Fault::StormOff)), (1, 1));
        assert!(plan.windows(2).all(|w| w[0].0 <= w[1].0), "sorted by time");
        let kills_before_restart =
            plan.iter().take_while(|(_, f)| *f != Fault::BrokerRestart).filter(|(_, f)| *f == Fault::Kill);
        assert!(kills_before_restart.count() >= 1, "restarts come between kills: {plan:?}");
    }
}
