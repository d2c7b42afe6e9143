//! Humans in the loop over HTTP: approvals (approve runs the tool once, reject tells the model
//! why), cancel at the step boundary, wait deadlines, listing and the escalations queue.

use std::time::Duration;

use agentfleet::domain::SessionId;
use agentfleet_tests::fleet::{FleetOptions, TestFleet, try_eventually};
use agentfleet_tests::model_server::Faults;
use serde_json::{Value, json};

const QUICK: &str = r#"
[agents.quick]
model = "claude-sonnet-4-5"
system_prompt = "You act fast."
tools = ["search_knowledge_base", "lookup_customer", "escalate_to_human", "issue_refund"]
human_wait = { deadline_s = 1, on_deadline = "fail" }
approval_wait = { deadline_s = 1, on_deadline = "reject" }

[agents.handover]
model = "claude-sonnet-4-5"
system_prompt = "You hand over."
tools = ["issue_refund"]
approval_wait = { deadline_s = 1, on_deadline = "escalate" }
"#;

async fn fleet() -> anyhow::Result<TestFleet> {
    TestFleet::start(FleetOptions { extra_config: QUICK.into(), ..Default::default() }).await
}

async fn post(fleet: &TestFleet, path: &str, body: Value) -> anyhow::Result<(u16, Value)> {
    let r = fleet.http.post(format!("{}{path}", fleet.api)).json(&body).send().await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await?))
}

async fn wait_status(fleet: &TestFleet, id: &SessionId, status: &str) -> anyhow::Result<Value> {
    fleet.wait_status(id, status).await
}

fn tool_results(s: &Value) -> Vec<Value> {
    s["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .filter(|b| b["type"] == "tool_result")
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_refund_waits_for_approval_and_runs_exactly_once() -> anyhow::Result<()> {
    let fleet = fleet().await?;
    let small = fleet.submit("support", "[refund=40] small").await?;
    let big = fleet.submit("support", "[refund=150] big").await?;
    let done = fleet.wait_settled(std::slice::from_ref(&small), Duration::from_secs(30)).await?;
    assert_eq!(done[0]["status"], "completed", "a refund under the rule needs no approval");
    let waiting = wait_status(&fleet, &big, "awaiting_approval").await?;
    assert_eq!(waiting["escalation"]["tool"], "issue_refund");
    assert_eq!(waiting["escalation"]["input"]["amount"], 150);
    assert_eq!(fleet.tools.stats().by_tool.get("issue_refund"), Some(&1), "only the small refund ran");
    let queue: Value = fleet.http.get(format!("{}/v1/escalations", fleet.api)).send().await?.json().await?;
    let listed = queue["escalations"]
        .as_array()
        .map(|a| a.iter().any(|e| e["session_id"] == big.as_str() && e["kind"] == "approval"));
    assert_eq!(listed, Some(true), "{queue}");
    let (code, _) = post(&fleet, &format!("/v1/sessions/{big}/reply"), json!({"text": "hi"})).await?;
    assert_eq!(code, 409, "a reply is not an approval");

    let (code, body) = post(&fleet, &format!("/v1/sessions/{big}/approve"), json!({"note": "ok by finance"})).await?;
    assert_eq!(code, 202, "{body}");
    let (code, _) = post(&fleet, &format!("/v1/sessions/{big}/approve"), json!({})).await?;
    assert_eq!(code, 409, "approving twice is refused");
    let done = fleet.wait_settled(std::slice::from_ref(&big), Duration::from_secs(30)).await?;
    assert_eq!(done[0]["status"], "completed", "{}", done[0]);
    assert_eq!(fleet.tools.stats().by_tool.get("issue_refund"), Some(&2), "the approved refund ran exactly once");
    let results = tool_results(&done[0]);
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["is_error"], false);
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_refund_tells_the_model_why_and_never_runs() -> anyhow::Result<()> {
    let fleet = fleet().await?;
    let id = fleet.submit("support", "[refund=500] too much").await?;
    wait_status(&fleet, &id, "awaiting_approval").await?;
    let (code, body) =
        post(&fleet, &format!("/v1/sessions/{id}/reject"), json!({"reason": "over the monthly limit"})).await?;
    assert_eq!(code, 202, "{body}");
    let done = fleet.wait_settled(std::slice::from_ref(&id), Duration::from_secs(30)).await?;
    assert_eq!(done[0]["status"], "completed");
    let results = tool_results(&done[0]);
    assert_eq!(results[0]["is_error"], true);
    assert!(results[0]["content"].as_str().is_some_and(|c| c.contains("over the monthly limit")), "{results:?}");
    assert!(
        done[0]["result"].as_str().is_some_and(|r| r.contains("over the monthly limit")),
        "the model saw the reason"
    );
    assert_eq!(fleet.tools.stats().by_tool.get("issue_refund"), None, "the rejected tool never ran");
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_session_at_the_next_step_boundary() -> anyhow::Result<()> {
    let fleet = fleet().await?;
    fleet.model.set_faults(Faults { latency_ms: 300, ..Default::default() });
    let id = fleet.submit("support", "[steps=20] long job").await?;
    wait_status(&fleet, &id, "running").await?;
    // Cancel mid-run, once a couple of steps are done (a step takes over 300 ms of model latency).
    try_eventually(&format!("session {id} to pass step 2"), Duration::from_secs(30), || async {
        let s = fleet.session(&id).await?;
        Ok(s["step"].as_u64().is_some_and(|step| step > 2).then_some(()))
    })
    .await?;
    let (code, body) = post(&fleet, &format!("/v1/sessions/{id}/cancel"), json!({})).await?;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["status"], "cancelling");
    let s = wait_status(&fleet, &id, "cancelled").await?;
    let messages = s["messages"].as_array().map_or(0, Vec::len);
    // The step in flight finished whole: the conversation ends with a complete tool round.
    assert_eq!(messages % 2, 1, "odd: goal + (assistant, tool results)*; {messages} messages");
    let step = s["step"].as_u64().unwrap_or_else(|| panic!("a cancelled session reports its step: {s}"));
    assert!(step < 20, "cancelled at step {step}, before the last of 20");
    let calls_then = fleet.model.stats().valid_total;
    // Negative check: nothing can be awaited for "no further call", so give one that would come
    // (the model server counts a call on arrival, before its 300 ms latency) 800 ms to show up.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(fleet.model.stats().valid_total, calls_then, "no model call after the cancel took effect");
    let (code, _) = post(&fleet, &format!("/v1/sessions/{id}/cancel"), json!({})).await?;
    assert_eq!(code, 409, "an ended session cannot be cancelled again");

    let waiting = fleet.submit("support", "I want a refund, let me talk to a human, ann@example.com").await?;
    wait_status(&fleet, &waiting, "awaiting_human").await?;
    let (code, body) = post(&fleet, &format!("/v1/sessions/{waiting}/cancel"), json!({})).await?;
    assert_eq!((code, body["status"].as_str()), (202, Some("cancelled")), "a waiting session stops at once");
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_reject_fail_or_hand_over_as_configured() -> anyhow::Result<()> {
    let fleet = fleet().await?;
    let rejected = fleet.submit("quick", "[refund=900] nobody answers").await?;
    let failed = fleet.submit("quick", "I want a refund, a human please, joe@example.com").await?;
    let handed = fleet.submit("handover", "[refund=300] needs a person").await?;
    // The approval deadline rejected the call: the model was told, and the session went on.
    let done = wait_status(&fleet, &rejected, "completed").await?;
    let results = tool_results(&done);
    assert!(results[0]["content"].as_str().is_some_and(|c| c.contains("not approved")), "{results:?}");
    let s = wait_status(&fleet, &failed, "failed").await?;
    assert!(s["error"].as_str().is_some_and(|e| e.contains("human reply before the deadline")), "{s}");
    let s = wait_status(&fleet, &handed, "awaiting_human").await?;
    assert_eq!(s["escalation"]["kind"], "approval_timeout", "{s}");
    let (code, _) = post(&fleet, &format!("/v1/sessions/{handed}/approve"), json!({})).await?;
    assert_eq!(code, 202, "a person can still approve the handed-over call");
    wait_status(&fleet, &handed, "completed").await?;
    assert_eq!(fleet.tools.stats().by_tool.get("issue_refund"), Some(&1));
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_list_by_filter_with_cursor_pages() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions { workers: 0, ..Default::default() }).await?;
    let mut ids = Vec::new();
    for i in 0..7 {
        let tenant = if i % 2 == 0 { "even" } else { "odd" };
        ids.push(fleet.submit_json(&json!({"agent": "support", "tenant": tenant, "input": format!("job {i}")})).await?);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{}/v1/sessions?tenant=even&limit=2", fleet.api);
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: Value = fleet.http.get(url).send().await?.json().await?;
        for s in page["sessions"].as_array().into_iter().flatten() {
            assert_eq!(s["tenant"], "even");
            assert_eq!(s["status"], "queued");
            seen.push(s["id"].as_str().unwrap_or_default().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = ids.iter().step_by(2).rev().map(|id| id.to_string()).collect();
    assert_eq!(seen, expected, "newest first, every even-tenant session exactly once");
    let bad = fleet.http.get(format!("{}/v1/sessions?status=sleeping", fleet.api)).send().await?;
    assert_eq!(bad.status(), 400);
    let none: Value =
        fleet.http.get(format!("{}/v1/sessions?status=completed", fleet.api)).send().await?.json().await?;
    assert_eq!(none["sessions"], json!([]));
    fleet.cleanup().await
}
