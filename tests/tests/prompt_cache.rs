//! Prompt caching end to end: the request of a session's next step starts with the exact bytes of
//! the one before it, whichever worker process ran either, so the (scripted) API reads the prefix
//! from its cache; the money adds up with cache tokens included; and no budget or daily cap is
//! crossed when the cache misses.

use std::time::Duration;

use agentfleet::domain::SessionId;
use agentfleet_tests::fleet::{FleetOptions, TestFleet};
use agentfleet_tests::model_server::{Faults, RecordedRequest};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

/// A goal long enough to be cached on its own (the scripted server counts 4 bytes a token, and
/// claude-sonnet-4-5 caches prefixes from 1024 tokens).
fn long_goal(directive: &str) -> String {
    let filler = "My account history, for context: order 1041 shipped, order 1042 returned. ".repeat(80);
    format!("{directive} {filler}")
}

/// The marker the fleet inserts with the default 5-minute TTL.
const MARKER: &str = r#","cache_control":{"type":"ephemeral"}"#;

/// The parts of a request body whose bytes are compared.
#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    system: Option<&'a RawValue>,
    #[serde(borrow)]
    messages: Vec<&'a RawValue>,
    #[serde(borrow)]
    tools: Option<&'a RawValue>,
}

/// A recorded request's body with the cache markers left out, and how many there were.
fn unmarked(r: &RecordedRequest) -> (String, usize) {
    let text = String::from_utf8(r.body.clone()).expect("a request body is UTF-8");
    (text.replace(MARKER, ""), text.matches(MARKER).count())
}

/// Checks that `next` starts with `prev`'s bytes up to `prev`'s last breakpoint: the same tools and
/// system prompt, and `prev`'s messages, byte for byte, as the first of `next`'s.
fn assert_same_prefix(prev: &RecordedRequest, next: &RecordedRequest) {
    let ((a, a_marks), (b, b_marks)) = (unmarked(prev), unmarked(next));
    assert!(a_marks > 0 && b_marks > 0, "both requests carry breakpoints ({a_marks}, {b_marks})");
    let (a, b): (Body<'_>, Body<'_>) =
        (serde_json::from_str(&a).expect("json"), serde_json::from_str(&b).expect("json"));
    assert_eq!(a.tools.map(RawValue::get), b.tools.map(RawValue::get), "tool definitions");
    assert_eq!(a.system.map(RawValue::get), b.system.map(RawValue::get), "system prompt");
    assert!(b.messages.len() > a.messages.len(), "the next step sends more messages");
    for (i, (x, y)) in a.messages.iter().zip(&b.messages).enumerate() {
        assert_eq!(x.get(), y.get(), "message {i} differs between the two steps");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_steps_in_two_workers_send_the_same_prefix_and_read_it_from_the_cache() -> anyhow::Result<()> {
    let mut fleet = TestFleet::start(FleetOptions { record_model_requests: true, ..Default::default() }).await?;
    let goal = long_goal("I want a refund, let me talk to a human, ann@example.com.");
    let id = fleet.submit("support", &goal).await?;
    fleet.wait_status(&id, "awaiting_human").await?;
    // Every step so far ran in worker 0; the next runs in another process.
    fleet.stop_worker(0)?;
    let before = fleet.model.recorded(&goal);
    assert!(!before.is_empty(), "worker 0 made the calls up to the escalation");
    fleet.spawn_worker()?;
    let r = fleet.http.post(format!("{}/v1/sessions/{id}/reply", fleet.api)).json(&json!({"text": "Refund approved."}));
    assert_eq!(r.send().await?.status().as_u16(), 202);
    let after = agentfleet_tests::fleet::eventually("worker 1's first call", Duration::from_secs(30), || async {
        let all = fleet.model.recorded(&goal);
        (all.len() > before.len()).then_some(all)
    })
    .await;
    let (prev, next) = (&before[before.len() - 1], &after[before.len()]);
    assert_same_prefix(prev, next);
    assert!(prev.usage.cache_creation_input_tokens > 0, "the first worker's call wrote the prefix: {:?}", prev.usage);
    assert!(next.usage.cache_read_input_tokens > 0, "the second worker's call read it: {:?}", next.usage);
    // Steps within one worker share their prefixes too.
    for pair in before.windows(2) {
        assert_same_prefix(&pair[0], &pair[1]);
        assert!(pair[1].usage.cache_read_input_tokens > 0, "{:?}", pair[1].usage);
    }
    fleet.cleanup().await
}

fn n(v: &Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or_else(|| panic!("no {field} in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_equals_the_trace_and_the_api_bill_with_cache_tokens_included() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions { workers: 2, ..Default::default() }).await?;
    let goals: Vec<String> = (0..6).map(|i| long_goal(&format!("[steps=6] cached job {i}"))).collect();
    let mut ids = Vec::new();
    for g in &goals {
        ids.push(fleet.submit("support", g).await?);
    }
    let sessions = fleet.wait_settled(&ids, Duration::from_secs(60)).await?;
    let bills = fleet.model.bills_by_goal();
    for ((id, s), goal) in ids.iter().zip(&sessions).zip(&goals) {
        assert_eq!(s["status"], "completed", "{s}");
        let u = &s["usage"];
        assert!(n(u, "cache_read_input_tokens") > 0 && n(u, "cache_creation_input_tokens") > 0, "{u}");
        let b = &u["cost_breakdown"];
        let parts = ["input_micro_usd", "cache_write_micro_usd", "cache_read_micro_usd", "output_micro_usd"];
        assert_eq!(parts.iter().map(|p| n(b, p)).sum::<u64>(), n(u, "cost_micro_usd"), "{u}");
        assert_eq!(n(b, "unreconciled_micro_usd"), 0);
        assert!(n(b, "cache_read_micro_usd") > 0 && n(b, "cache_write_micro_usd") > 0, "{b}");
        // What the API billed is what the session counted.
        let bill = bills.get(goal.as_str()).expect("the server billed the goal");
        assert_eq!(
            (bill.input_tokens, bill.cache_creation_tokens, bill.cache_read_tokens),
            (n(u, "input_tokens"), n(u, "cache_creation_input_tokens"), n(u, "cache_read_input_tokens"))
        );
        // The trace adds up to the same money and tokens.
        let trace = fleet.trace(id).await?;
        let sum = &trace["summary"];
        assert_eq!(n(sum, "cost_micro_usd"), n(u, "cost_micro_usd"), "{trace}");
        assert_eq!(n(sum, "cache_read_input_tokens"), n(u, "cache_read_input_tokens"));
        assert_eq!(n(sum, "cache_creation_input_tokens"), n(u, "cache_creation_input_tokens"));
        let records = trace["records"].as_array().expect("records");
        let parts_sum: u64 = records
            .iter()
            .filter_map(|r| r.get("cost_parts"))
            .map(|p| ["input", "output", "cache_write", "cache_read"].iter().map(|k| n(p, k)).sum::<u64>())
            .sum();
        assert_eq!(parts_sum, n(u, "cost_micro_usd"), "every record's parts add up to the session's cost");
    }
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_and_daily_caps_hold_when_every_call_misses_the_cache() -> anyhow::Result<()> {
    // A fleet-wide daily cap of 8 cents for the tenant, and 3.5 cents per session: with every call
    // writing its whole prefix to the cache (1.25 × the input price), sessions run out of budget
    // and the day's cap is reached.
    let fleet = TestFleet::start(FleetOptions {
        extra_config: "[tenants.acme]\ndaily_cap_usd = 0.08\n".into(),
        ..Default::default()
    })
    .await?;
    fleet.model.set_faults(Faults { cache_misses: true, ..Faults::default() });
    let body = |i: usize| {
        json!({"agent": "support", "tenant": "acme", "input": long_goal(&format!("[steps=100] miss {i}")),
               "budget": {"max_cost_usd": 0.035, "max_cost_per_step_usd": 0.02}})
    };
    // Two sessions run out of their own budget (at most 7 of the 8 cents)...
    let mut ids: Vec<SessionId> = vec![fleet.submit_json(&body(0)).await?, fleet.submit_json(&body(1)).await?];
    let mut sessions = fleet.wait_settled(&ids, Duration::from_secs(60)).await?;
    // ...and the next ones reach the day's cap.
    let more: Vec<SessionId> = futures::future::try_join_all((2..8).map(|i| {
        let b = body(i);
        let fleet = &fleet;
        async move { fleet.submit_json(&b).await }
    }))
    .await?;
    sessions.extend(fleet.wait_settled(&more, Duration::from_secs(60)).await?);
    ids.extend(more);
    let mut spent = 0;
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    for s in &sessions {
        let u = &s["usage"];
        assert_eq!(n(u, "cache_read_input_tokens"), 0, "every call missed: {u}");
        assert!(n(u, "cost_micro_usd") <= 35_000, "the session's cap holds: {u}");
        spent += n(u, "cost_micro_usd");
        *statuses.entry(s["status"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
    }
    println!("every call a cache miss: {spent} µ$ spent of an 80000 µ$ daily cap; sessions by status {statuses:?}");
    let stats = fleet.model.stats();
    assert!(stats.cache.writes > 0 && stats.cache.reads == 0, "{:?}", stats.cache);
    assert!(spent <= 80_000, "the daily cap holds: {spent} µ$ spent, statuses {statuses:?}");
    assert!(statuses.get("budget_exhausted").is_some_and(|n| *n > 0), "{statuses:?}");
    assert!(statuses.get("paused").is_some_and(|n| *n > 0), "the daily cap stopped some: {statuses:?}");
    fleet.cleanup().await
}
