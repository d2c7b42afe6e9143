//! Steps per second and the cost of a step, then the orchestration overhead at half that load.
//!
//! The run reads as its phases:
//! 1. **throughput**: a closed loop keeps `live` sessions going (a new one as one ends, as the
//!    reference does); after a warm-up, a timed window gives steps/s (the model server's answers)
//!    and CPU per step of every process. Redis and RabbitMQ counters are read when nothing moves,
//!    before the loop and after it drained, and divided by the steps of every session it ran;
//! 2. **overhead**: an open loop submits sessions at half the steps/s just measured, and the
//!    workers' `agentfleet_step_overhead_seconds` histogram over a window gives p50 and p99;
//! 3. **census**: a few sessions under Redis `MONITOR` give the round trips per step.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::census::Census;
use super::load::{Load, Shape};
use super::probe::{Delta, Snapshot, model_counters};
use super::{Bench, FleetSetup, WORKER, histogram, procfs, round};

/// What to run.
#[derive(Debug, Clone)]
pub struct StepsOptions {
    /// A name for the result (`3kb`, `10kb`).
    pub label: String,
    /// The fleet.
    pub setup: FleetSetup,
    /// The sessions.
    pub shape: Shape,
    /// Sessions kept live in the throughput phase.
    pub live: u64,
    /// Sessions being submitted at once, at most.
    pub submitters: usize,
    /// Time before the throughput window.
    pub warmup: Duration,
    /// The throughput window.
    pub window: Duration,
    /// The overhead window at half load (after a quarter of it as ramp); zero skips the phase.
    pub half_load: Duration,
    /// Sessions of the `MONITOR` census; zero skips it.
    pub census_sessions: u64,
    /// Longest wait for a drain.
    pub drain_timeout: Duration,
}

/// The figures of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepsResult {
    /// [`StepsOptions::label`].
    pub label: String,
    /// Mean steps per session.
    pub steps_per_session: u32,
    /// Whether session lengths were spread (`--vary`).
    pub vary: bool,
    /// Worker processes.
    pub workers: usize,
    /// Steps in flight per worker.
    pub concurrency: u16,
    /// Sessions kept live.
    pub live: u64,
    /// Steps per second over the throughput window.
    pub steps_per_s: f64,
    /// The throughput window, in seconds.
    pub window_s: f64,
    /// CPU µs per step of each process group over the window (`worker`, `redis-server`,
    /// `rabbitmq`, …, and `machine`: every core's busy time).
    pub cpu_us_per_step: BTreeMap<String, f64>,
    /// How busy the machine was over the window, in cores.
    pub machine_busy_cores: f64,
    /// Mean body bytes of a model request.
    pub avg_request_bytes: f64,
    /// Sessions and steps of the throughput phase, over which the counters below are divided.
    pub sessions: u64,
    /// Their steps.
    pub steps: u64,
    /// Redis commands per step, from `INFO commandstats` (a script's own calls included).
    pub redis_commands_per_step: f64,
    /// The same by command.
    pub redis_commands_by_command: BTreeMap<String, f64>,
    /// Bytes Redis read per step (`total_net_input_bytes`): every command and what it writes.
    pub redis_bytes_in_per_step: f64,
    /// Redis clients connected at the start (a figure above the fleet's own says someone else
    /// shared the server).
    pub redis_clients_at_start: u64,
    /// RabbitMQ messages per step by counter (`messages_received_total` = published,
    /// `messages_delivered_total`, …); empty when `rabbitmqctl` could not be read.
    pub rabbitmq_per_step: BTreeMap<String, f64>,
    /// The census: Redis round trips per step.
    pub redis_round_trips_per_step: Option<f64>,
    /// The census by command.
    pub redis_round_trips_by_command: BTreeMap<String, f64>,
    /// The census: commands per step run inside scripts.
    pub redis_script_commands_per_step: Option<f64>,
    /// The overhead phase.
    pub overhead: Option<Overhead>,
}

/// Orchestration overhead per step (wall time minus model and tool time) at a paced load.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Overhead {
    /// The steps/s the sessions were paced for (half [`StepsResult::steps_per_s`]).
    pub target_steps_per_s: f64,
    /// The steps/s over the window.
    pub steps_per_s: f64,
    /// Steps in the histogram's window.
    pub steps: u64,
    /// Median, in ms.
    pub p50_ms: Option<f64>,
    /// 99th percentile, in ms.
    pub p99_ms: Option<f64>,
    /// CPU µs per worker step at that load.
    pub worker_cpu_us_per_step: f64,
    /// How busy the machine was over the window.
    pub busy: procfs::Busy,
}

/// The overhead histogram of the workers.
const OVERHEAD: &str = "agentfleet_step_overhead_seconds";

/// Runs the three phases on a fresh fleet.
pub async fn run(o: &StepsOptions) -> anyhow::Result<StepsResult> {
    let bench = Bench::start(&o.setup, o.shape.max_steps()).await?;
    let outcome = phases(&bench, o).await;
    bench.cleanup().await?;
    outcome
}

async fn phases(bench: &Bench, o: &StepsOptions) -> anyhow::Result<StepsResult> {
    let load = Load::new(&bench.fleet, o.shape).await?;
    let mut result = throughput(bench, &load, o).await?;
    if !o.half_load.is_zero() {
        result.overhead = Some(overhead(bench, &load, o, result.steps_per_s / 2.0).await?);
    }
    if o.census_sessions > 0 {
        census(bench, &load, o, &mut result).await?;
    }
    Ok(result)
}

/// Phase 1: the closed loop, the window inside it, and the counters around it.
async fn throughput(bench: &Bench, load: &Load, o: &StepsOptions) -> anyhow::Result<StepsResult> {
    let redis_url = &bench.fleet.config.redis.url;
    let before = Snapshot::take(redis_url, &bench.model_url, true).await?;
    let zcards_before = load.live().calls();
    let stop = CancellationToken::new();
    let looping = tokio::spawn({
        let (load, stop, live, parallel) = (load.clone(), stop.clone(), o.live, o.submitters);
        async move { load.closed_loop(live, parallel, stop).await }
    });
    let measured = async {
        tokio::time::sleep(o.warmup).await;
        let start = Mark::now(bench).await?;
        tokio::time::sleep(o.window).await;
        let end = Mark::now(bench).await?;
        anyhow::Ok((start, end))
    }
    .await;
    stop.cancel();
    looping.await??;
    let (start, end) = measured?;
    load.drain(o.drain_timeout).await?;
    let after = Snapshot::take(redis_url, &bench.model_url, false).await?;
    let own_zcards = load.live().calls() - zcards_before;
    let completed = load.check_completed(&bench.fleet).await?;
    let delta = before.until(&after);
    let mut r = StepsResult {
        label: o.label.clone(),
        steps_per_session: o.shape.steps,
        vary: o.shape.vary,
        workers: o.setup.workers,
        concurrency: o.setup.concurrency,
        live: o.live,
        redis_clients_at_start: before.redis_clients,
        ..Default::default()
    };
    start.fill(&end, &mut r);
    r.sessions = completed.sessions;
    per_step(&delta, completed.steps, own_zcards, &mut r);
    Ok(r)
}

/// Steps and CPU at one moment of a window.
struct Mark {
    at: Instant,
    answered: u64,
    cpu: BTreeMap<String, f64>,
}

impl Mark {
    async fn now(bench: &Bench) -> anyhow::Result<Self> {
        let answered = model_counters(&bench.model_url).await?.get("answered_total").copied().unwrap_or(0);
        Ok(Self { at: Instant::now(), answered, cpu: bench.cpu_groups().cpu() })
    }

    /// Steps from `self` to `end`, and the time between.
    fn until(&self, end: &Mark) -> (u64, f64) {
        (end.answered.saturating_sub(self.answered), end.at.duration_since(self.at).as_secs_f64())
    }

    /// The window's steps/s and CPU per step.
    fn fill(&self, end: &Mark, r: &mut StepsResult) {
        let (steps, secs) = self.until(end);
        r.window_s = round(secs, 2);
        r.steps_per_s = round(steps as f64 / secs, 0);
        let per_step = |used: f64| if steps > 0 { round(used * 1e6 / steps as f64, 0) } else { 0.0 };
        for (name, used) in &end.cpu {
            let used = used - self.cpu.get(name).copied().unwrap_or(0.0);
            r.cpu_us_per_step.insert(name.clone(), per_step(used));
            if name == procfs::MACHINE {
                r.machine_busy_cores = round(used / secs, 2);
            }
        }
    }
}

/// The counters' growth per step.
fn per_step(delta: &Delta, steps: u64, own_zcards: u64, r: &mut StepsResult) {
    r.steps = steps;
    let per = |n: f64| if steps > 0 { round(n / steps as f64, 3) } else { 0.0 };
    let calls = delta.redis_calls_without(&[("zcard", own_zcards)]);
    r.redis_commands_per_step = per(calls.values().sum::<u64>() as f64);
    r.redis_commands_by_command = calls.iter().map(|(c, n)| (c.clone(), per(*n as f64))).collect();
    r.redis_bytes_in_per_step = round(delta.redis_net_input_bytes as f64 / steps.max(1) as f64, 0);
    r.rabbitmq_per_step =
        delta.rabbitmq.iter().map(|(k, n)| (k.clone(), per(*n as f64))).filter(|(_, n)| *n != 0.0).collect();
    let requests = delta.model("requests_total");
    r.avg_request_bytes =
        if requests > 0 { round(delta.model("request_bytes_total") as f64 / requests as f64, 0) } else { 0.0 };
}

/// Phase 2: sessions paced to `steps_per_s`, and the overhead histogram over a window.
async fn overhead(bench: &Bench, load: &Load, o: &StepsOptions, steps_per_s: f64) -> anyhow::Result<Overhead> {
    let stop = CancellationToken::new();
    let pacing = tokio::spawn({
        let (load, stop, per_s) = (load.clone(), stop.clone(), steps_per_s / o.shape.mean_steps());
        async move { load.paced(per_s, stop).await }
    });
    let measured = async {
        tokio::time::sleep(o.half_load / 4).await;
        let (h0, m0) = (bench.worker_histogram(OVERHEAD).await?, Mark::now(bench).await?);
        tokio::time::sleep(o.half_load).await;
        let (h1, m1) = (bench.worker_histogram(OVERHEAD).await?, Mark::now(bench).await?);
        anyhow::Ok((histogram::since(&h0, &h1), m0, m1))
    }
    .await;
    stop.cancel();
    pacing.await??;
    let (window, m0, m1) = measured?;
    load.drain(o.drain_timeout).await?;
    load.check_completed(&bench.fleet).await?;
    let (steps, secs) = m0.until(&m1);
    let worker_cpu = m1.cpu.get(WORKER).copied().unwrap_or(0.0) - m0.cpu.get(WORKER).copied().unwrap_or(0.0);
    let ms = |q: f64| histogram::quantile(&window, q).map(|s| round(s * 1e3, 2));
    Ok(Overhead {
        target_steps_per_s: round(steps_per_s, 0),
        steps_per_s: round(steps as f64 / secs, 0),
        steps: histogram::count(&window),
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        worker_cpu_us_per_step: round(worker_cpu * 1e6 / steps.max(1) as f64, 0),
        busy: procfs::Busy::between(&m0.cpu, &m1.cpu, secs),
    })
}

/// Phase 3: a few sessions under `MONITOR`.
async fn census(bench: &Bench, load: &Load, o: &StepsOptions, r: &mut StepsResult) -> anyhow::Result<()> {
    let census = Census::start(&bench.fleet.config.redis.url, &bench.fleet.prefix).await?;
    let zcards_before = load.live().calls();
    load.all_at_once(o.census_sessions, o.submitters).await?;
    load.drain(o.drain_timeout).await?;
    let own_zcards = load.live().calls() - zcards_before;
    let mut seen = census.stop().await?;
    if let Some(n) = seen.round_trips.get_mut("zcard") {
        *n = n.saturating_sub(own_zcards);
    }
    seen.round_trips.retain(|_, n| *n > 0);
    let steps = load.check_completed(&bench.fleet).await?.steps.max(1) as f64;
    r.redis_round_trips_per_step = Some(round(seen.total_round_trips() as f64 / steps, 2));
    r.redis_round_trips_by_command =
        seen.round_trips.iter().map(|(c, n)| (c.clone(), round(*n as f64 / steps, 2))).collect();
    r.redis_script_commands_per_step = Some(round(seen.in_scripts.values().sum::<u64>() as f64 / steps, 2));
    Ok(())
}
