//! Approvals fail closed, driven through the real engine over the in-memory store (as in
//! `engine.rs`), with the scripted model and tool servers in this process. No RabbitMQ, no Redis.
//!
//! Covered: a rule whose field is missing holds the call; a refund split into parts is held once
//! their sum passes a `sum(amount)` rule; a call whose tool's breaker is open falls back to a tool
//! that needs approval and is held instead of run.

use std::sync::Arc;
use std::time::Duration;

use agentfleet::domain::SessionStatus;
use agentfleet::guard::{Admission, Gate, Guard, Outcome, Pass, WaitFor};
use agentfleet::store::Snapshot;
use agentfleet_tests::engine_rig::EngineRig;
use async_trait::async_trait;

/// A guard whose breakers of these tools are open; everything else passes.
struct OpenBreakers(&'static [&'static str]);

#[async_trait]
impl Guard for OpenBreakers {
    async fn admit(&self, gate: &Gate<'_>, _: u64) -> Admission {
        let open = self.0.iter().any(|t| gate.breaker == format!("tool:{t}"));
        let wait = Admission::Wait { after: Duration::from_secs(30), why: WaitFor::Breaker };
        if open { wait } else { Admission::Pass(Pass::default()) }
    }
    async fn report(&self, _: &Gate<'_>, _: Pass, _: &Outcome<'_>, _: u64) {}
}

/// The tools and agents: `issue_refund` with a session-sum rule, `order_lookup` with a rule on a
/// field its calls never carry, and `kb` whose fallback `kb_manual` always needs approval.
fn config_text(model: &str, tools: &str) -> String {
    let http = |name: &str| format!(r#"{{ kind = "http", url = "{tools}/tools/{name}", timeout_ms = 5000 }}"#);
    let object = r#"{ type = "object" }"#;
    format!(
        r#"
[anthropic]
base_url = "{model}"

[tenant_defaults]
daily_cap_usd = 1000.0

[tools.issue_refund]
description = "Refund a customer."
input_schema = {{ type = "object", properties = {{ amount = {{ type = "number" }} }}, required = ["amount"] }}
handler = {refund}
approval_rule = "sum(amount) > 100"

[tools.order_lookup]
description = "Look an order up."
input_schema = {object}
handler = {lookup}
approval_rule = "amount > 100"

[tools.kb]
description = "Search the knowledge base."
input_schema = {object}
handler = {kb}
fallback = "kb_manual"

[tools.kb_manual]
description = "Ask a person to search."
input_schema = {object}
handler = {kb_manual}
requires_approval = true

[agents.refunds]
model = "claude-sonnet-4-5"
system_prompt = "You refund."
tools = ["issue_refund"]

[agents.lookups]
model = "claude-sonnet-4-5"
system_prompt = "You look up."
tools = ["order_lookup"]

[agents.searches]
model = "claude-sonnet-4-5"
system_prompt = "You search."
tools = ["kb", "kb_manual"]
"#,
        refund = http("issue_refund"),
        lookup = http("search_knowledge_base"),
        kb = http("search_knowledge_base"),
        kb_manual = http("search_knowledge_base"),
    )
}

async fn start(open: &'static [&'static str]) -> anyhow::Result<EngineRig> {
    EngineRig::start(config_text, Arc::new(OpenBreakers(open))).await
}

/// Creates a session of `agent` with `goal` and runs it until it publishes no next step.
async fn run(rig: &EngineRig, agent: &str, goal: &str) -> anyhow::Result<Snapshot> {
    let id = rig.session(agent, goal, None)?;
    rig.run(&id).await
}

fn calls(rig: &EngineRig, tool: &str) -> u64 {
    rig.tools.stats().by_tool.get(tool).copied().unwrap_or(0)
}

/// The approval request the session waits on.
fn request(s: &Snapshot) -> serde_json::Value {
    s.meta.escalation.as_deref().and_then(|e| serde_json::from_str(e).ok()).unwrap_or_default()
}

#[tokio::test]
async fn a_rule_whose_field_is_missing_holds_the_call() -> anyhow::Result<()> {
    let rig = start(&[]).await?;
    let s = run(&rig, "lookups", "[steps=2 tool=order_lookup] look it up").await?;
    assert_eq!(s.meta.status, SessionStatus::AwaitingApproval);
    let req = request(&s);
    assert_eq!(req["tool"], "order_lookup", "{req}");
    assert!(req["reason"].as_str().is_some_and(|r| r.contains("amount > 100")), "{req}");
    assert_eq!(rig.tools.stats().calls_total, 0, "nothing ran before approval");
    rig.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_refund_split_into_parts_is_held_once_the_sum_passes_the_rule() -> anyhow::Result<()> {
    let rig = start(&[]).await?;
    let s = run(&rig, "refunds", "[refund=40,50] two small refunds").await?;
    assert_eq!(s.meta.status, SessionStatus::Completed, "40 + 50 = 90 needs no approval");
    assert_eq!(calls(&rig, "issue_refund"), 2);

    let s = run(&rig, "refunds", "[refund=60,30,20] three small refunds").await?;
    assert_eq!(s.meta.status, SessionStatus::AwaitingApproval, "60 + 30 + 20 = 110 > 100");
    let req = request(&s);
    assert_eq!((req["tool"].as_str(), req["input"]["amount"].as_u64()), (Some("issue_refund"), Some(20)), "{req}");
    assert!(req["reason"].as_str().is_some_and(|r| r.contains("sum(amount) > 100")), "{req}");
    assert_eq!(calls(&rig, "issue_refund"), 4, "the first two parts ran, the third waits");
    rig.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_call_that_falls_back_to_a_tool_needing_approval_waits_instead_of_running() -> anyhow::Result<()> {
    let rig = start(&["kb"]).await?;
    let s = run(&rig, "searches", "[steps=2 tool=kb] search").await?;
    assert_eq!(s.meta.status, SessionStatus::AwaitingApproval);
    let req = request(&s);
    assert_eq!(req["tool"], "kb_manual", "the request names the fallback that would run: {req}");
    assert!(req["tool_use_id"].as_str().is_some_and(|id| !id.is_empty()), "{req}");
    assert_eq!(rig.tools.stats().calls_total, 0, "neither the tool nor its fallback ran");
    rig.stop().await;
    Ok(())
}
