//! The step engine's edge cases, fast: the in-memory step store and publisher, the real engine,
//! model client and tools, and the scripted model and tool servers in this process. No RabbitMQ,
//! no Redis: every test here runs in milliseconds.
//!
//! Covered: duplicate delivery, a stale step, a future step, a lease held by another worker, a
//! worker that lost its lease in the middle of a model call, every
//! ending (completed, failed, budget exhausted, awaiting a human, awaiting approval, paused at a
//! daily cap, and a cancel at the step boundary), a tool already in the ledger, and writes whose
//! outcome is unknown, applied or not.

use std::sync::Arc;
use std::time::Duration;

use agentfleet::domain::{Phase, SessionId, SessionStatus};
use agentfleet::guard::OpenGuard;
use agentfleet::llm::ToolOutcome;
use agentfleet::step::Disposition;
use agentfleet::store::Snapshot;
use agentfleet_tests::engine_rig::EngineRig;
use agentfleet_tests::fleet::{FleetOptions, config_text, eventually};
use agentfleet_tests::model_server::Faults;

/// Agents beyond the harness's `support`: a tiny daily cap that pauses, and one that escalates
/// when the model keeps failing.
const AGENTS: &str = r#"
[agents.capped]
model = "claude-sonnet-4-5"
system_prompt = "You are thrifty."
tools = ["search_knowledge_base"]
budget = { daily_cap_usd = 0.0001, on_daily_cap = "pause" }

[agents.careful]
model = "claude-sonnet-4-5"
system_prompt = "You ask for help."
tools = ["search_knowledge_base"]
on_model_failure = "escalate"
"#;

/// The engine over the harness's config and [`AGENTS`], admitting every call, with this many
/// model call attempts per step.
async fn start_with(max_model_attempts: u32) -> anyhow::Result<EngineRig> {
    let opts = FleetOptions { max_steps: 50, extra_config: AGENTS.into(), ..Default::default() };
    let config = |model: &str, tools: &str| config_text("engine", &opts, model, tools);
    EngineRig::start_with(config, Arc::new(OpenGuard), max_model_attempts).await
}

/// The engine over the harness's config and [`AGENTS`], admitting every call.
async fn start() -> anyhow::Result<EngineRig> {
    let opts = FleetOptions { max_steps: 50, extra_config: AGENTS.into(), ..Default::default() };
    EngineRig::start(|model, tools| config_text("engine", &opts, model, tools), Arc::new(OpenGuard)).await
}

fn roles(s: &Snapshot) -> Vec<String> {
    s.messages
        .iter()
        .map(|m| serde_json::from_str::<serde_json::Value>(m).map(|v| v["role"].as_str().unwrap_or("?").to_owned()))
        .collect::<Result<_, _>>()
        .unwrap_or_default()
}

#[tokio::test]
async fn a_session_runs_to_completion_step_by_step() -> anyhow::Result<()> {
    let rig = start().await?;
    let id = rig.session("support", "[steps=3] look things up", None)?;
    let s = rig.run(&id).await?;
    assert_eq!(s.meta.status, SessionStatus::Completed);
    assert_eq!((s.meta.step, s.meta.phase, s.meta.published), (3, Phase::Done, 3));
    assert_eq!(roles(&s), ["user", "assistant", "user", "assistant", "user", "assistant"]);
    assert_eq!(s.usage.model_calls, 3);
    assert_eq!(rig.model.stats().answered_total, 3);
    assert_eq!(rig.tools.stats().calls_total, 2);
    assert!(!s.active && s.lease.is_none() && s.open_reservations == 0);
    assert_eq!(rig.events(), ["session.completed"]);
    rig.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_duplicate_delivery_changes_nothing() -> anyhow::Result<()> {
    let rig = start().await?;
    let id = rig.session("support", "[steps=3] twice", None)?;
    assert_eq!(rig.deliver(&id, 1).await?, Disposition::Ack);
    let after_one = rig.snapshot(&id)?;
    assert_eq!((after_one.meta.step, after_one.meta.published), (2, 2));
    // The same message again: its successor is in the broker, so it is dropped.
    assert_eq!(rig.deliver(&id, 1).await?, Disposition::Ack);
    let again = rig.snapshot(&id)?;
    assert_eq!(again.messages, after_one.messages);
    assert_eq!(rig.model.stats().requests_total, 1, "the duplicate made no model call");
    assert_eq!(rig.tools.stats().calls_total, 1, "the duplicate ran no tool");
    assert_eq!(rig.published().len(), 1, "the duplicate published nothing");
    rig.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_stale_step_is_dropped_and_a_lost_successor_is_republished() -> anyhow::Result<()> {
    let rig = start().await?;
    let id = rig.session("support", "[steps=4] stale", None)?;
    rig.deliver(&id, 1).await?;
    rig.deliver(&id, 2).await?;
    assert_eq!(rig.snapshot(&id)?.meta.step, 3);
    // Step 1 again, long after: step 3 is known to be in the broker.
    rig.sent.sent().steps.clear();
    assert_eq!(rig.deliver(&id, 1).await?, Disposition::Ack);
    assert!(rig.published().is_empty(), "a stale step publishes nothing");
    // A worker that checkpointed step 3 but died before publishing step 4 left `published` at 3.
    rig.deliver(&id, 3).await?;
    rig.store.update(&id, |m| m.published = 3);
    rig.sent.sent().steps.clear();
    assert_eq!(rig.deliver(&id, 3).await?, Disposition::Ack);
    let republished: Vec<u32> = rig.published().iter().map(|(m, _)| m.step).collect();
    assert_eq!(republished, [4], "the lost successor is published again");
    assert_eq!(rig.snapshot(&id)?.meta.published, 4);
    assert_eq!(rig.model.stats().requests_total, 3, "no step ran twice");
    rig.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_future_step_is_dead_lettered_with_its_reason() -> anyhow::Result<()> {
    let rig = start().await?;
    let id = rig.session("support", "[steps=3] future", None)?;
    assert_eq!(rig.deliver(&id, 5).await?, Disposition::Ack);
    let dead = rig.sent.sent().dead.clone();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].starts_with("future_step: step 5 is ahead of the session (at 1)"), "{dead:?}");
    let unknown = SessionId::generate();
    rig.deliver(&unknown, 1).await?;
    assert!(rig.sent.sent().dead[1].starts_with("unknown_session"));
    rig.engine.handle(b"{not json", &rig.pool).await;
    assert!(rig.sent.sent().dead[2].starts_with("malformed"));
    assert_eq!(rig.model.stats().requests_total, 0);
    assert_eq!(rig.snapshot(&id)?.meta.step, 1);
    rig.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_lease_held_by_another_worker_makes_the_step_wait() -> anyhow::Result<()> {
    let rig = start().await?;
    let id = rig.session("support", "[steps=2] busy", None)?;
    rig.store.take_lease(&id, "1|other-worker|n", Duration::from_secs(30));
    assert_eq!(rig.deliver(&id, 1).await?, Disposition::Ack);
    let sent = rig.published();
    assert_eq!(sent.len(), 1);
    assert_eq!((sent[0].0.step, sent[0].1), (1, Some(Duration::from_secs(1))), "sent back through a delay tier");
    assert_eq!(rig.model.stats().requests_total, 0, "no model call while another worker holds the lease");
    assert_eq!(rig.snapshot(&id)?.lease.as_deref(), Some("1|other-worker|n"), "the holder keeps its lease");
    rig.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_lost_its_lease_mid_call_applies_nothing_twice() -> anyhow::Result<()> {
    let rig = Arc::new(start().await?);
    rig.model.set_faults(Faults { latency_ms: 300, ..Faults::default() });
    let id = rig.session("support", "[steps=3] two workers", None)?;
    // Worker A claims step 1 and waits on the model.
    let first = tokio::spawn({
        let (rig, id) = (rig.clone(), id.clone());
        async move { rig.deliver(&id, 1).await }
    });
    let soon = Duration::from_secs(5);
    eventually("worker A's model call", soon, || async { (rig.model.stats().requests_total >= 1).then_some(()) }).await;
    // A pauses past its lease: the lease expires and worker B runs the same step.
    rig.store.take_lease(&id, "1|worker-a|lost", Duration::from_millis(1));
    let expired = || async { rig.store.snapshot(&id).is_some_and(|s| s.lease.is_none()).then_some(()) };
    eventually("the lease to expire", soon, expired).await;
    assert_eq!(rig.deliver(&id, 1).await?, Disposition::Ack);
    assert_eq!(first.await??, Disposition::Ack);
    let s = rig.snapshot(&id)?;
    assert_eq!(roles(&s), ["user", "assistant", "user"], "one model checkpoint and one tool checkpoint");
    assert_eq!((s.meta.step, s.meta.phase), (2, Phase::Llm));
    let billed = rig.model.stats();
    assert_eq!(billed.answered_total, 2, "both workers called the model");
    assert_eq!(s.usage.model_calls, 2, "and both calls are counted, once each");
    assert_eq!(s.usage.unreconciled_calls, 0, "A's late answer replaced the worst case B's claim counted");
    assert_eq!(s.usage.input_tokens, billed.billed_input_tokens, "usage is what the model server billed");
    assert_eq!(s.usage.output_tokens, billed.billed_output_tokens);
    assert_eq!(rig.tools.stats().calls_total, 1, "the tool ran once");
    assert_eq!(rig.published().iter().filter(|(m, d)| m.step == 2 && d.is_none()).count(), 1, "step 2 published once");
    assert_eq!(s.trace.iter().filter(|r| r.contains("\"tool_call\"")).count(), 1, "A recorded no tool call");
    Ok(())
}

#[tokio::test]
async fn a_worker_without_the_lease_writes_nothing() -> anyhow::Result<()> {
    let rig = Arc::new(start().await?);
    rig.model.set_faults(Faults { latency_ms: 300, ..Faults::default() });
    let id = rig.session("support", "[steps=3] fenced", None)?;
    let first = tokio::spawn({
        let (rig, id) = (rig.clone(), id.clone());
        async move { rig.deliver(&id, 1).await }
    });
    let soon = Duration::from_secs(5);
    eventually("the model call", soon, || async { (rig.model.stats().requests_total >= 1).then_some(()) }).await;
    // Another worker holds the lease now; this one's reply must change nothing but the usage.
    rig.store.take_lease(&id, "1|worker-b|n", Duration::from_secs(60));
    let before = rig.snapshot(&id)?;
    assert_eq!(first.await??, Disposition::Ack);
    let after = rig.snapshot(&id)?;
    assert_eq!(after.messages, before.messages, "no message appended");
    assert_eq!((after.meta.step, after.meta.phase), (1, Phase::Llm), "the step did not move");
    assert!(after.ledger.is_empty(), "no tool result recorded");
    assert_eq!(rig.tools.stats().calls_total, 0, "no tool ran");
    assert_eq!(after.usage.model_calls, 1, "the billed call is counted");
    assert_eq!(after.lease.as_deref(), Some("1|worker-b|n"), "the holder keeps its lease");
    let copies: Vec<_> = rig.published().into_iter().filter(|(m, _)| m.step == 1).collect();
    assert_eq!(copies.len(), 1, "one delayed copy of the step, so some delivery runs it: {copies:?}");
    Ok(())
}

#[tokio::test]
async fn the_tries_of_a_step_are_the_sessions_not_the_messages() -> anyhow::Result<()> {
    let rig = start_with(3).await?;
    rig.model.set_faults(Faults { rate_500: 1.0, ..Faults::default() });
    let id = rig.session("support", "[steps=2] retried", None)?;
    // A forged message claims 1,000 tries already: it must not end the retries early.
    let forged =
        serde_json::to_vec(&agentfleet::domain::StepMessage { session_id: id.clone(), step: 1, attempt: 1000 })?;
    assert_eq!(rig.engine.handle(&forged, &rig.pool).await, Disposition::Ack);
    let s = rig.snapshot(&id)?;
    assert_eq!(s.meta.status, agentfleet::domain::SessionStatus::Running, "one failure of three allowed");
    assert_eq!(s.meta.attempt, 1, "the session counts the first try");
    let (retry, delay) = rig.published().pop().ok_or_else(|| anyhow::anyhow!("no retry"))?;
    assert_eq!((retry.step, retry.attempt), (1, 1), "the retry carries the session's count");
    assert!(delay.is_some(), "through a delay tier");
    assert_eq!(rig.deliver(&id, 1).await?, Disposition::Ack);
    assert_eq!(rig.snapshot(&id)?.meta.attempt, 2);
    assert_eq!(rig.deliver(&id, 1).await?, Disposition::Ack);
    let s = rig.snapshot(&id)?;
    assert_eq!(s.meta.status, agentfleet::domain::SessionStatus::Failed, "the third failure ends it");
    assert_eq!(rig.model.stats().requests_total, 3);
    rig.stop().await;
    Ok(())
}

/// A step's last tool result goes into the ledger with the tool checkpoint: when that write is lost,
/// nothing of the step is recorded, and the redelivery runs the call again (under the same
/// idempotency key). A result that is in the ledger, though, is never run again: it is what the
/// conversation gets.
#[tokio::test]
async fn a_tool_already_in_the_ledger_is_not_run_again() -> anyhow::Result<()> {
    let rig = start().await?;
    let id = rig.session("support", "[steps=2] ledger", None)?;
    rig.store.fail_next("commit_tools", false);
    assert_eq!(rig.deliver(&id, 1).await?, Disposition::Ack);
    let s = rig.snapshot(&id)?;
    assert_eq!((s.meta.step, s.meta.phase, s.ledger.len()), (1, Phase::Tools, 0), "the checkpoint was lost");
    assert_eq!(rig.tools.stats().calls_total, 1);
    // An earlier delivery recorded the call's result.
    let assistant: serde_json::Value = serde_json::from_str(&s.messages[1])?;
    let tool_use_id = assistant["content"]
        .as_array()
        .and_then(|blocks| blocks.iter().find(|b| b["type"] == "tool_use"))
        .and_then(|b| b["id"].as_str())
        .ok_or_else(|| anyhow::anyhow!("no tool_use in {assistant}"))?
        .to_owned();
    rig.store.put_ledger(&id, &tool_use_id, ToolOutcome::ok("recorded by an earlier delivery"));
    let (copy, _) = rig.published().pop().ok_or_else(|| anyhow::anyhow!("no copy"))?;
    rig.sent.sent().steps.clear();
    assert_eq!(copy.step, 1);
    assert_eq!(rig.deliver(&id, 1).await?, Disposition::Ack);
    let s = rig.snapshot(&id)?;
    assert_eq!(rig.tools.stats().calls_total, 1, "the tool did not run again");
    assert_eq!(rig.model.stats().requests_total, 1, "nor did the model");
    assert_eq!((s.meta.step, s.meta.phase), (2, Phase::Llm));
    let results: serde_json::Value = serde_json::from_str(&s.messages[2])?;
    assert_eq!(results["content"][0]["tool_use_id"], tool_use_id.as_str());
    assert_eq!(results["content"][0]["content"], "recorded by an earlier delivery", "the ledger's result is used");
    rig.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_write_applied_with_an_unknown_outcome_resumes_from_its_phase() -> anyhow::Result<()> {
    let rig = start().await?;
    let id = rig.session("support", "[steps=2] applied", None)?;
    rig.store.fail_next("commit_model", true);
    assert_eq!(rig.deliver(&id, 1).await?, Disposition::Ack);
    let s = rig.snapshot(&id)?;
    assert_eq!((s.meta.step, s.meta.phase), (1, Phase::Tools), "the model checkpoint applied");
    assert_eq!(rig.tools.stats().calls_total, 0, "the step stopped at the unknown outcome");
    let s = {
        let (copy, _) = rig.published().pop().ok_or_else(|| anyhow::anyhow!("no copy"))?;
        rig.sent.sent().steps.clear();
        rig.deliver(&copy.session_id, copy.step).await?;
        rig.snapshot(&id)?
    };
    assert_eq!((s.meta.step, s.meta.phase), (2, Phase::Llm));
    assert_eq!(rig.model.stats().requests_total, 1, "the model was not called again");
    assert_eq!(rig.tools.stats().calls_total, 1);
    assert_eq!(roles(&s), ["user", "assistant", "user"]);
    rig.stop().await;
    Ok(())
}

#[tokio::test]
async fn every_ending_settles_once_with_its_event() -> anyhow::Result<()> {
    let rig = start().await?;

    let refused = rig.session("support", "[stop=refusal] no", None)?;
    let s = rig.run(&refused).await?;
    assert_eq!(s.meta.status, SessionStatus::Failed);
    assert_eq!(s.meta.error.as_deref(), Some("the model refused to continue"));

    let long = rig.session("support", "[steps=10] too long", Some(2))?;
    let s = rig.run(&long).await?;
    assert_eq!(s.meta.status, SessionStatus::BudgetExhausted);
    assert!(s.meta.result.as_deref().is_some_and(|r| !r.is_empty()), "the summary is the result");
    assert_eq!(rig.model.stats().tool_choice_seen.get("none"), Some(&1), "one summary call");

    let human = rig.session("support", "I want a human, please. me@example.com", None)?;
    let s = rig.run(&human).await?;
    assert_eq!(s.meta.status, SessionStatus::AwaitingHuman);
    assert!(s.meta.escalation.as_deref().is_some_and(|e| e.contains("\"kind\":\"human\"")));
    assert!(s.waiting_until.is_some() && s.active, "a waiting session is indexed with its deadline");

    let refund = rig.session("support", "[refund=500] refund me", None)?;
    let s = rig.run(&refund).await?;
    assert_eq!(s.meta.status, SessionStatus::AwaitingApproval);
    assert!(s.meta.escalation.as_deref().is_some_and(|e| e.contains("issue_refund")));
    assert_eq!(rig.tools.stats().by_tool.get("issue_refund"), None, "nothing refunded before approval");

    let capped = rig.session("capped", "[steps=2] thrifty", None)?;
    assert_eq!(rig.deliver(&capped, 1).await?, Disposition::Ack);
    let s = rig.snapshot(&capped)?;
    assert_eq!(s.meta.status, SessionStatus::Paused);
    let (again, after) = rig.published().pop().ok_or_else(|| anyhow::anyhow!("no retry"))?;
    assert_eq!((again.step, after), (1, Some(Duration::from_secs(600))), "tried again after the cap's wait");
    rig.sent.sent().steps.clear();

    let cancelled = rig.session("support", "[steps=3] stop me", None)?;
    rig.deliver(&cancelled, 1).await?;
    rig.store.update(&cancelled, |m| m.cancel_requested = true);
    let s = rig.run_from(&cancelled, 2).await?;
    assert_eq!(s.meta.status, SessionStatus::Cancelled);
    assert!(!s.active);

    let events = rig.events();
    let count = |k: &str| events.iter().filter(|e| *e == k).count();
    for kind in [
        "session.failed",
        "session.budget_exhausted",
        "session.escalated",
        "session.awaiting_approval",
        "session.cancelled",
    ] {
        assert_eq!(count(kind), 1, "{kind} once in {events:?}");
    }
    assert_eq!(count("session.budget_alert"), 1, "the two-step budget crossed its alert threshold once");
    assert_eq!(events.len(), 6, "a pause announces nothing: {events:?}");
    rig.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_failing_model_escalates_when_the_agent_says_so() -> anyhow::Result<()> {
    let rig = start().await?;
    rig.model.set_faults(Faults { rate_500: 1.0, ..Faults::default() });
    let id = rig.session("careful", "[steps=2] the model is down", None)?;
    assert_eq!(rig.deliver(&id, 1).await?, Disposition::Ack);
    let s = rig.snapshot(&id)?;
    assert_eq!(s.meta.status, SessionStatus::AwaitingHuman);
    assert!(s.meta.escalation.as_deref().is_some_and(|e| e.contains("model_failure")));
    assert_eq!((s.usage.model_calls, s.usage.model_errors), (0, 1), "an API error is not billed");
    assert_eq!(rig.events(), ["session.escalated"]);
    rig.stop().await;
    Ok(())
}
