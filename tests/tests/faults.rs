//! Fault tests: worker processes die by SIGKILL at random moments while sessions run.

use std::time::{Duration, Instant};

use agentfleet::domain::SessionId;
use agentfleet_tests::fleet::{FleetOptions, TestFleet, check_step_conversation, eventually};
use agentfleet_tests::model_server::Faults;
use futures::future::try_join_all;
use rand::Rng;

/// One in-flight step per worker, so one kill can interrupt at most one tool call: the bound this
/// test checks is "at most one repeated tool execution per kill".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_complete_while_workers_are_sigkilled() -> anyhow::Result<()> {
    let opts = FleetOptions { workers: 3, concurrency: 1, lease_ms: 2_000, ..Default::default() };
    let mut fleet = TestFleet::start(opts).await?;
    // Slow steps down so the kills land in every phase of a step, including in-flight tool calls.
    fleet.model.set_faults(Faults { latency_ms: 15, latency_jitter_ms: 10, ..Default::default() });
    fleet.tools.set_behaviour(agentfleet_tests::tool_server::Behaviour { latency_ms: 10, ..Default::default() })?;
    let goals: Vec<String> = (0..200).map(|i| format!("[steps=5] fault job {i}")).collect();
    let ids: Vec<SessionId> = try_join_all(goals.iter().map(|g| fleet.submit("support", g))).await?;

    let kills = kill_randomly_until_settled(&mut fleet, &ids, Duration::from_secs(240)).await?;
    let sessions = fleet.wait_settled(&ids, Duration::from_secs(120)).await?;

    for s in &sessions {
        assert_eq!(s["status"], "completed", "{s}");
        check_step_conversation(s, 5).map_err(|e| anyhow::anyhow!("{e}: {}", s["id"]))?;
    }
    let tools = fleet.tools.stats();
    let repeats = tools.repeats();
    println!("kills: {kills}, tool calls: {}, repeated tool executions: {repeats}", tools.calls_total);
    assert!(kills >= 5, "only {kills} kills happened");
    assert!(repeats <= kills as u64, "{repeats} repeated tool executions for {kills} kills");
    assert_eq!(tools.missing_key, 0, "every tool call carries an Idempotency-Key");
    // Every repeat is counted under one key: the same `<session>:<tool_use_id>` both times.
    assert_eq!(tools.calls_total, tools.by_key.len() as u64 + repeats);
    assert_eq!(tools.by_key.len(), 800, "4 tool calls per session, each under its own key");
    for key in tools.by_key.keys() {
        let (session, tool_use) = key.split_once(':').expect("key is <session>:<tool_use_id>");
        assert!(ids.iter().any(|id| id.as_str() == session) && tool_use.starts_with("toolu_"), "{key}");
    }
    assert_eq!(fleet.model.stats().invalid_total, 0, "{:?}", fleet.model.stats().invalid_reasons);
    fleet.cleanup().await
}

/// Kills a random live worker every 0.3–1.2 s and starts a replacement, until every session settles.
async fn kill_randomly_until_settled(
    fleet: &mut TestFleet,
    ids: &[SessionId],
    limit: Duration,
) -> anyhow::Result<usize> {
    let started = Instant::now();
    let mut kills = 0;
    loop {
        // Not a wait for anything: the random gap between kills is the fault schedule itself.
        let pause = rand::rng().random_range(300..1_200);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        if all_settled(fleet, ids).await? && kills >= 5 {
            return Ok(kills);
        }
        anyhow::ensure!(started.elapsed() < limit, "sessions did not settle within {limit:?} ({kills} kills)");
        let live = fleet.live_workers();
        let victim = live[rand::rng().random_range(0..live.len())];
        fleet.kill_worker(victim)?;
        fleet.spawn_worker()?;
        kills += 1;
    }
}

async fn all_settled(fleet: &TestFleet, ids: &[SessionId]) -> anyhow::Result<bool> {
    for id in ids {
        if !agentfleet_tests::fleet::is_settled(&fleet.session(id).await?) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// SIGTERM drains: the worker stops taking messages, finishes its in-flight steps, exits 0, and
/// nothing it had started runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_steps() -> anyhow::Result<()> {
    let mut fleet = TestFleet::start(FleetOptions { workers: 1, concurrency: 8, ..Default::default() }).await?;
    fleet.model.set_faults(Faults { latency_ms: 150, ..Default::default() });
    let goals: Vec<String> = (0..20).map(|i| format!("[steps=4] drain job {i}")).collect();
    let ids: Vec<SessionId> = try_join_all(goals.iter().map(|g| fleet.submit("support", g))).await?;
    // SIGTERM once the worker has filled its 8 slots: those model calls are in flight (each takes 150 ms).
    eventually("8 model calls to reach the model server", Duration::from_secs(30), || async {
        (fleet.model.stats().valid_total >= 8).then_some(())
    })
    .await;
    let started = Instant::now();
    let status = fleet.stop_worker(0)?;
    assert!(status.success(), "the worker exited with {status}");
    assert!(started.elapsed() < Duration::from_secs(10), "draining took {:?}", started.elapsed());
    let calls_at_stop = fleet.model.stats().valid_total;
    assert!(calls_at_stop > 0 && calls_at_stop < 80, "{calls_at_stop} model calls when the worker stopped");
    fleet.spawn_worker()?;
    let sessions = fleet.wait_settled(&ids, Duration::from_secs(120)).await?;
    for s in &sessions {
        assert_eq!(s["status"], "completed", "{s}");
        check_step_conversation(s, 4).map_err(|e| anyhow::anyhow!("{e}: {}", s["id"]))?;
    }
    assert_eq!(fleet.model.stats().valid_total, 80, "no model call ran twice");
    assert_eq!(fleet.tools.stats().repeats(), 0, "no tool call ran twice");
    fleet.cleanup().await
}

/// A rolling update in miniature: SIGTERM to one of three workers while 100 sessions run. It stops
/// taking messages, finishes the steps it holds within its drain deadline and exits 0; the others
/// finish every session, and no model call or tool call happens twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_batch_drains_within_the_deadline() -> anyhow::Result<()> {
    let grace = Duration::from_secs(5);
    let opts =
        FleetOptions { workers: 3, concurrency: 8, shutdown_grace_ms: grace.as_millis() as u64, ..Default::default() };
    let mut fleet = TestFleet::start(opts).await?;
    fleet.model.set_faults(Faults { latency_ms: 100, latency_jitter_ms: 50, ..Default::default() });
    fleet.tools.set_behaviour(agentfleet_tests::tool_server::Behaviour { latency_ms: 10, ..Default::default() })?;
    let goals: Vec<String> = (0..100).map(|i| format!("[steps=5] rolling update job {i}")).collect();
    let ids: Vec<SessionId> = try_join_all(goals.iter().map(|g| fleet.submit("support", g))).await?;
    // Mid-way: a third of the 500 model calls made, every worker busy with its 8 slots.
    eventually("a third of the model calls", Duration::from_secs(120), || async {
        (fleet.model.stats().valid_total >= 160).then_some(())
    })
    .await;

    stop_within_deadline(&mut fleet, 0, grace)?;
    let calls_at_stop = fleet.model.stats().valid_total;
    assert!(calls_at_stop < 500, "every model call was made before the worker stopped ({calls_at_stop})");

    let sessions = fleet.wait_settled(&ids, Duration::from_secs(180)).await?;
    for s in &sessions {
        assert_eq!(s["status"], "completed", "{s}");
        check_step_conversation(s, 5).map_err(|e| anyhow::anyhow!("{e}: {}", s["id"]))?;
    }
    let tools = fleet.tools.stats();
    assert_eq!(fleet.model.stats().valid_total, 500, "no model call ran twice");
    assert_eq!(tools.repeats(), 0, "no tool call ran twice");
    assert_eq!(tools.by_key.len(), 400, "4 tool calls per session, each under its own key");
    fleet.cleanup().await
}

/// When the steps a worker holds outlast its drain deadline, it exits at the deadline anyway; their
/// deliveries stay unacked, the broker redelivers them, and another worker runs those steps once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_deadline_leaves_steps_to_other_workers() -> anyhow::Result<()> {
    let grace = Duration::from_millis(300);
    let opts =
        FleetOptions { workers: 2, concurrency: 4, shutdown_grace_ms: grace.as_millis() as u64, ..Default::default() };
    let mut fleet = TestFleet::start(opts).await?;
    // Model calls far longer than the deadline: whatever worker 0 holds at SIGTERM can't finish.
    fleet.model.set_faults(Faults { latency_ms: 2_000, ..Default::default() });
    let goals: Vec<String> = (0..16).map(|i| format!("[steps=3] deadline job {i}")).collect();
    let ids: Vec<SessionId> = try_join_all(goals.iter().map(|g| fleet.submit("support", g))).await?;
    eventually("both workers' slots to fill", Duration::from_secs(30), || async {
        (fleet.model.stats().valid_total >= 8).then_some(())
    })
    .await;

    stop_within_deadline(&mut fleet, 0, grace)?;

    let sessions = fleet.wait_settled(&ids, Duration::from_secs(180)).await?;
    for s in &sessions {
        assert_eq!(s["status"], "completed", "{s}");
        check_step_conversation(s, 3).map_err(|e| anyhow::anyhow!("{e}: {}", s["id"]))?;
    }
    // The abandoned model calls are made again (at most one per slot); the checkpoints are not.
    let calls = fleet.model.stats().valid_total;
    assert!((48..=52).contains(&calls), "{calls} model calls for 48 steps and 4 abandoned slots");
    // Tool calls take no time here, so the deadline found none in flight.
    assert_eq!(fleet.tools.stats().repeats(), 0, "no tool call ran twice");
    fleet.cleanup().await
}

/// A worker's probes: `/healthz` answers, `/readyz` is 200 while it consumes and 503 from the
/// moment SIGTERM starts the drain, while the steps it holds still run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_readiness_follows_consuming_and_drain() -> anyhow::Result<()> {
    let opts = FleetOptions { workers: 1, concurrency: 4, shutdown_grace_ms: 20_000, ..Default::default() };
    let mut fleet = TestFleet::start(opts).await?;
    let (health, ready) = (url(&fleet, "/healthz")?, url(&fleet, "/readyz")?);
    let status = |url: String| async move { reqwest::get(&url).await.map(|r| r.status().as_u16()).unwrap_or(0) };
    eventually("the worker to be ready", Duration::from_secs(30), || async {
        (status(ready.clone()).await == 200).then_some(())
    })
    .await;
    assert_eq!(status(health.clone()).await, 200);

    // Model calls of 3 s: the drain lasts that long, and the probes are read meanwhile.
    fleet.model.set_faults(Faults { latency_ms: 3_000, ..Default::default() });
    let goals: Vec<String> = (0..4).map(|i| format!("[steps=1] probe job {i}")).collect();
    let ids: Vec<SessionId> = try_join_all(goals.iter().map(|g| fleet.submit("support", g))).await?;
    eventually("4 model calls in flight", Duration::from_secs(30), || async {
        (fleet.model.stats().valid_total >= 4).then_some(())
    })
    .await;
    fleet.terminate_worker(0)?;
    eventually("/readyz to answer 503 while draining", Duration::from_secs(2), || async {
        (status(ready.clone()).await == 503).then_some(())
    })
    .await;
    assert_eq!(status(health.clone()).await, 200, "alive while it drains");
    assert!(fleet.worker_pid(0).is_some());
    let exit = fleet.wait_exit(0, Duration::from_secs(20)).await?;
    assert!(exit.success(), "{exit}");
    let sessions = fleet.wait_settled(&ids, Duration::from_secs(30)).await?;
    assert!(sessions.iter().all(|s| s["status"] == "completed"), "the drain finished the held steps");
    fleet.cleanup().await
}

/// The dispatcher at SIGTERM with `drain_delay_ms`: `/readyz` answers 503 `draining` at once, the
/// API keeps answering until the delay is over, then it stops taking connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatcher_drains_behind_a_failing_readiness_probe() -> anyhow::Result<()> {
    let opts = FleetOptions { workers: 0, dispatcher_config: "drain_delay_ms = 1500".into(), ..Default::default() };
    let fleet = TestFleet::start(opts).await?;
    let ready = format!("{}/readyz", fleet.ops);
    assert_eq!(reqwest::get(&ready).await?.status(), 200);
    let id = fleet.submit("support", "[steps=1] drain delay").await?;

    fleet.terminate_dispatcher();
    let body: serde_json::Value = eventually("/readyz to say draining", Duration::from_secs(2), || async {
        let r = reqwest::get(&ready).await.ok()?;
        (r.status() == 503).then_some(r.json().await.ok()?)
    })
    .await;
    assert_eq!(body["status"], "draining", "{body}");
    let during = fleet.session(&id).await?;
    assert_eq!(during["id"], id.as_str(), "the API still answers during the delay");
    eventually("the API to stop taking connections", Duration::from_secs(10), || async {
        fleet.http.get(format!("{}/v1/sessions/{id}", fleet.api)).send().await.is_err().then_some(())
    })
    .await;
    fleet.cleanup().await
}

fn url(fleet: &TestFleet, path: &str) -> anyhow::Result<String> {
    fleet.worker_ops_url(0, path).ok_or_else(|| anyhow::anyhow!("worker 0 has no operations listener"))
}

/// SIGTERMs worker `i` and checks that it exits 0 within its drain deadline `grace` (and 2 s for the
/// process to start and end).
fn stop_within_deadline(fleet: &mut TestFleet, i: usize, grace: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let status = fleet.stop_worker(i)?;
    let took = started.elapsed();
    anyhow::ensure!(status.success(), "the worker exited with {status}");
    anyhow::ensure!(
        took < grace + Duration::from_secs(2),
        "the worker took {took:?} to exit (drain deadline {grace:?})"
    );
    Ok(())
}
