//! A worker paused (SIGSTOP) past its lease while its model call is in flight, then resumed: another
//! worker finishes the session meanwhile, and the resumed worker writes nothing. The step's effects
//! happen once, and the session's usage is exactly what the model server billed, the paused worker's
//! call included, counted once.

use std::process::Command;
use std::time::Duration;

use agentfleet_tests::fleet::{FleetOptions, TestFleet, check_step_conversation, eventually, try_eventually};
use agentfleet_tests::model_server::Faults;

/// Sends `signal` to `pid` with kill(1).
fn signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status()?;
    anyhow::ensure!(status.success(), "kill -{signal} {pid} failed");
    Ok(())
}

/// Resumes the paused worker however the test ends, so no stopped process is left behind.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = signal(self.0, "CONT");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_resumed_after_its_lease_writes_nothing_and_its_call_is_counted_once() -> anyhow::Result<()> {
    let opts = FleetOptions { workers: 1, lease_ms: 1_500, ..Default::default() };
    let mut fleet = TestFleet::start(opts).await?;
    // Every model call takes a while, so the paused worker's call is in flight when it stops.
    fleet.model.set_faults(Faults { latency_ms: 1_000, ..Faults::default() });
    let id = fleet.submit("support", "[steps=3] paused past the lease").await?;
    let in_flight = || async { (fleet.model.stats().requests_total >= 1).then_some(()) };
    eventually("the first worker's model call", Duration::from_secs(20), in_flight).await;
    let paused = fleet.worker_pids()[0];
    signal(paused, "STOP")?;
    let resume = Resume(paused);

    // The paused worker's lease expires; the janitor re-publishes the stalled step to a new worker.
    let janitor = fleet.janitor(0).await?;
    fleet.spawn_worker()?;
    // The broker may hand a re-published copy to the paused worker (its connection lives until the
    // heartbeat times out); sweep until the new worker holds the lease of step 1 and waits on its own
    // model call: the moment a late write of the paused worker would pass a (step, phase) fence.
    let redis = fleet.redis().await?;
    let lease_key = format!("{}:{{{}}}:lease", fleet.config.redis.key_prefix, id.as_str());
    let new_worker = format!("{}-w1-", fleet.prefix);
    try_eventually("the new worker to call the model for step 1", Duration::from_secs(60), || async {
        janitor.sweep().await?;
        let holder: Option<String> = redis::cmd("GET").arg(&lease_key).query_async(&mut redis.clone()).await?;
        let held = holder.is_some_and(|h| h.starts_with("1|") && h.contains(&new_worker));
        // The paused worker's call (sent first, same latency) has been answered: its answer waits in
        // the paused worker's socket.
        let stats = fleet.model.stats();
        Ok((held && stats.requests_total >= 2 && stats.answered_total >= 1).then_some(()))
    })
    .await?;

    // Resumed: its call's answer was waiting in the socket. It must count the call and write nothing.
    drop(resume);
    let lost = || async { fleet.worker_counter("agentfleet_step_messages_total", "outcome=\"lease_lost\"").await };
    try_eventually("the resumed worker to stop its step", Duration::from_secs(30), || async {
        Ok((lost().await? >= 1).then_some(()))
    })
    .await?;
    let done = fleet.wait_settled(std::slice::from_ref(&id), Duration::from_secs(60)).await?;
    assert_eq!(done[0]["status"], "completed", "{}", done[0]);
    let billed = fleet.model.stats();
    let after = try_eventually("the paused call to be reconciled", Duration::from_secs(30), || async {
        let s = fleet.session(&id).await?;
        Ok((s["usage"]["unreconciled_calls"] == 0).then_some(s))
    })
    .await?;

    // Every step once, in order: the paused worker's reply to step 1 was not appended.
    check_step_conversation(&after, 3).map_err(anyhow::Error::msg)?;
    let trace = fleet.trace(&id).await?;
    let summary = &trace["summary"];
    for field in ["input_tokens", "output_tokens", "cost_micro_usd"] {
        // The worst case the second worker's claim counted was replaced by the paused call's answer.
        assert_eq!(summary[field], after["usage"][field], "trace totals equal the usage ({field}): {summary}");
    }
    let paused_id = format!("{}-w0-", fleet.prefix);
    let by_paused: Vec<&serde_json::Value> = trace["records"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["step"] == 1 && r["worker"].as_str().is_some_and(|w| w.starts_with(&paused_id)))
        .collect();
    // Once resumed it is a worker like any other and may run later steps; of step 1, the one it was
    // paused in, it recorded only the call it was billed for.
    assert!(
        by_paused.len() == 1 && by_paused[0]["action"] == "model_call" && by_paused[0]["success"] == true,
        "the paused worker recorded only its billed call of step 1: {by_paused:?}"
    );
    let usage = &after["usage"];
    assert_eq!(usage["model_calls"], billed.answered_total, "every answered call counted once: {usage}");
    assert_eq!(usage["input_tokens"], billed.billed_input_tokens, "input tokens as billed: {usage}");
    assert_eq!(usage["output_tokens"], billed.billed_output_tokens, "output tokens as billed: {usage}");
    assert!(billed.answered_total >= 4, "the paused worker's call was answered too ({})", billed.answered_total);
    let tools = fleet.tools.stats();
    assert!(tools.by_key.values().all(|&n| n == 1), "each tool call ran once: {:?}", tools.by_key);
    assert_eq!(tools.missing_key, 0);
    fleet.cleanup().await
}
