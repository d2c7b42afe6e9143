//! Budgets that cannot run away: step, cost, token and per-step limits, fleet-wide daily caps, the
//! alert event, and the accounting of a call whose checkpoint is lost — on real RabbitMQ and Redis.

use std::collections::HashMap;
use std::time::Duration;

use agentfleet::config::RedisConfig;
use agentfleet::domain::{SessionId, TenantId};
use agentfleet::store::{AdminStore, DailyCap, DailyCaps, DailyVerdict, RedisStore, StepStore};
use agentfleet_tests::fleet::{
    FleetOptions, TestFleet, delete_keys_under, queue_depth, redis_at, redis_url, try_eventually,
};
use futures::future::try_join_all;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};

/// Sonnet's output price: micro-USD per token.
const OUT_PRICE: u64 = 15;

async fn run_one(fleet: &TestFleet, body: Value) -> anyhow::Result<Value> {
    let id = fleet.submit_json(&body).await?;
    Ok(fleet.wait_settled(&[id], Duration::from_secs(120)).await?.remove(0))
}

fn micro(v: &Value, field: &str) -> u64 {
    v["usage"][field].as_u64().unwrap_or(u64::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_step_script_ends_at_max_steps_with_a_summary() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions::default()).await?;
    let s =
        run_one(&fleet, json!({"agent": "support", "input": "[steps=100] loop forever", "budget": {"max_steps": 10}}))
            .await?;
    assert_eq!(s["status"], "budget_exhausted", "{s}");
    assert!(s["result"].as_str().is_some_and(|r| r.starts_with("Summary:")), "{s}");
    assert!(s["error"].as_str().is_some_and(|e| e.contains("max_steps (10)")), "{s}");
    assert_eq!(s["usage"]["model_calls"], 11, "ten steps and the summary");
    assert_eq!(s["usage"]["steps"], 10);
    assert_eq!(s["remaining"]["steps"], 0);
    let stats = fleet.model.stats();
    assert_eq!(stats.tool_choice_seen.get("none"), Some(&1), "the summary call offers no tools");
    assert_eq!(stats.invalid_total, 0, "{:?}", stats.invalid_reasons);
    let last_user = &s["messages"].as_array().map(|m| m[m.len() - 2].clone()).unwrap_or_default();
    assert_eq!(
        last_user["content"],
        json!([{"type": "text", "text": "Budget limit reached. Summarize what you have accomplished so far."}])
    );
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cost_cap_holds_with_the_summary_reserved_from_the_same_budget() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions::default()).await?;
    for (cap, per_step) in [(0.05, 0.02), (0.03, 0.03), (0.08, 0.01)] {
        let body = json!({"agent": "support", "input": "[steps=100] expensive",
                          "budget": {"max_cost_usd": cap, "max_cost_per_step_usd": per_step}});
        let s = run_one(&fleet, body).await?;
        assert_eq!(s["status"], "budget_exhausted", "{s}");
        assert!(s["error"].as_str().is_some_and(|e| e.contains("max_cost")), "{s}");
        assert!(s["result"].as_str().is_some_and(|r| r.starts_with("Summary:")), "{s}");
        let cap_micro = (cap * 1e6) as u64;
        assert!(micro(&s, "cost_micro_usd") <= cap_micro, "spent {} of {cap_micro}", micro(&s, "cost_micro_usd"));
    }
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_cap_holds() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions::default()).await?;
    let s = run_one(&fleet, json!({"agent": "support", "input": "[steps=100] wordy", "budget": {"max_tokens": 20000}}))
        .await?;
    assert_eq!(s["status"], "budget_exhausted", "{s}");
    assert!(s["error"].as_str().is_some_and(|e| e.contains("max_tokens (20000)")), "{s}");
    assert!(micro(&s, "total_tokens") <= 20_000, "{}", s["usage"]);
    assert!(s["result"].as_str().is_some_and(|r| r.starts_with("Summary:")), "{s}");
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_step_can_cost_more_than_the_per_step_cap() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions::default()).await?;
    let per_step = 15_000; // µ$: at 15 µ$ per output token, at most 1000 tokens even with free input
    let body = json!({"agent": "support", "input": "[steps=6] careful", "budget": {"max_cost_per_step_usd": per_step as f64 / 1e6}});
    let s = run_one(&fleet, body).await?;
    assert_eq!(s["status"], "completed", "{s}");
    let seen = fleet.model.stats().max_tokens_seen;
    assert_eq!(seen.len(), 6);
    for max_tokens in &seen {
        assert!(max_tokens * OUT_PRICE <= per_step, "max_tokens {max_tokens} could cost more than {per_step} µ$");
        assert!(*max_tokens < 1024, "the cap lowered the agent's max_tokens");
    }
    // And the billed cost of each call stayed under the cap: the average cannot exceed it either.
    assert!(micro(&s, "cost_micro_usd") <= 6 * per_step, "{}", s["usage"]);
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cannot_raise_a_limit() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions { workers: 0, ..Default::default() }).await?;
    let r = fleet
        .http
        .post(format!("{}/v1/sessions", fleet.api))
        .json(&json!({"agent": "support", "input": "x", "budget": {"max_cost_usd": 1000.0}}))
        .send()
        .await?;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await?;
    assert!(v["error"]["message"].as_str().is_some_and(|m| m.starts_with("budget.max_cost_usd")), "{v}");
    fleet.cleanup().await
}

const CAPS: &str = r#"
[agents.strict]
model = "claude-sonnet-4-5"
system_prompt = "You are careful."
tools = ["search_knowledge_base"]
budget = { on_daily_cap = "fail" }

[tenants.acme]
daily_cap_usd = 0.30

[tenants.beta]
daily_cap_usd = 0.20
"#;

async fn daily_cap_run(agent: &str, tenant: &str, cap_micro: u64, over: &str) -> anyhow::Result<()> {
    let opts = FleetOptions { workers: 3, concurrency: 16, extra_config: CAPS.into(), ..Default::default() };
    let fleet = TestFleet::start(opts).await?;
    let bodies: Vec<Value> =
        (0..100).map(|i| json!({"agent": agent, "tenant": tenant, "input": format!("[steps=5] job {i}")})).collect();
    let ids: Vec<SessionId> = try_join_all(bodies.iter().map(|b| fleet.submit_json(b))).await?;
    let sessions = fleet.wait_settled(&ids, Duration::from_secs(180)).await?;
    let spent: u64 = sessions.iter().map(|s| micro(s, "cost_micro_usd")).sum();
    let by_status = sessions.iter().fold(HashMap::<String, usize>::new(), |mut m, s| {
        *m.entry(s["status"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
        m
    });
    println!("{agent}/{tenant}: spent {spent} µ$ of a {cap_micro} µ$ cap; sessions by status: {by_status:?}");
    assert!(spent <= cap_micro, "the fleet spent {spent} µ$ against a daily cap of {cap_micro} µ$");
    // A session stops at the cap only when what was spent leaves no room for its next call's worst
    // case (here under 25,000 µ$: 1,024 output tokens at 15 µ$, and a few KB of input at the
    // cache-write rate), never because the room is held by other calls in flight.
    if by_status.contains_key(over) {
        assert!(
            spent + 25_000 > cap_micro,
            "sessions stopped at {spent} µ$ spent of a {cap_micro} µ$ cap: {by_status:?}"
        );
    }
    assert!(by_status.get("completed").copied().unwrap_or(0) > 0, "{by_status:?}");
    assert_eq!(
        by_status.get("completed").copied().unwrap_or(0) + by_status.get(over).copied().unwrap_or(0),
        100,
        "{by_status:?}"
    );
    for s in sessions.iter().filter(|s| s["status"] == over) {
        assert!(
            s["error"].as_str().is_some_and(|e| e.contains(&format!("daily spend cap of tenant `{tenant}`"))),
            "{s}"
        );
    }
    fleet.cleanup().await
}

/// Two workers' stores on one Redis: a refusal says whether the cap is spent or only held by the
/// other's calls in flight, and held room comes back when those calls are settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_refusal_tells_a_spent_cap_from_one_held_by_calls_in_flight() -> anyhow::Result<()> {
    let prefix = format!("t{}", ulid::Ulid::new().to_string().to_lowercase());
    let cfg = RedisConfig { url: redis_url(), key_prefix: prefix.clone(), ..Default::default() };
    let (a, b) = (RedisStore::connect(&cfg).await?, RedisStore::connect(&cfg).await?);
    let tenant = TenantId::parse("acme")?;
    let day = agentfleet::store::utc_day(agentfleet::telemetry::now_ms());
    let caps = DailyCaps { agent: "support", tenant: Some(&tenant), day, agent_cap: None, tenant_cap: Some(10_000) };
    let refused = |held| DailyVerdict::Refused { cap: DailyCap::Tenant, held };

    // Worker A has three calls of 3,000 in flight: 9,000 of the 10,000 held. What A's allowance
    // gives back travels in A's next batch; a refusal that says "held" is the transient kind, so A
    // waits for room as a step does (DailyVerdict::Refused { held: true }).
    for _ in 0..3 {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match a.daily_reserve(&caps, 3_000).await? {
                DailyVerdict::Reserved => break,
                verdict if verdict == refused(true) && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                verdict => panic!("A's own reservation: {verdict:?}"),
            }
        }
    }
    assert_eq!(b.daily_reserve(&caps, 3_000).await?, refused(true), "nothing is spent yet");
    // One of A's calls cost 2,500 and another was not billed: 2,500 spent, 3,000 held, 4,500 free.
    a.daily_settle(&caps, 3_000, 2_500).await?;
    a.daily_settle(&caps, 3_000, 0).await?;
    a.flush().await?;
    assert_eq!(b.daily_reserve(&caps, 3_000).await?, DailyVerdict::Reserved);
    // 2,500 spent, 6,000 held: 8,000 would cross, and 2,500 + 8,000 is more than the cap.
    assert_eq!(b.daily_reserve(&caps, 8_000).await?, refused(false), "the spent part leaves no room for it");
    assert_eq!(b.daily_reserve(&caps, 7_000).await?, refused(true));
    // Both remaining calls spend all they reserved: 8,500 spent, nothing held.
    a.daily_settle(&caps, 3_000, 3_000).await?;
    b.daily_settle(&caps, 3_000, 3_000).await?;
    a.flush().await?;
    b.flush().await?;
    assert_eq!(b.daily_reserve(&caps, 2_000).await?, refused(false));
    assert_eq!(b.daily_reserve(&caps, 1_500).await?, DailyVerdict::Reserved, "exactly up to the cap");
    b.flush().await?;
    assert_eq!(a.daily_spend("support", "acme", day).await?.1, 10_000);
    delete_keys_under(&redis_at(&redis_url()).await?, &prefix).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_daily_cap_holds_across_workers_and_pauses_the_rest() -> anyhow::Result<()> {
    daily_cap_run("support", "acme", 300_000, "paused").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_cap_fails_the_rest_when_configured_so() -> anyhow::Result<()> {
    daily_cap_run("strict", "beta", 200_000, "failed").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_alert_fires_exactly_once_per_session_that_crosses() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions { workers: 2, ..Default::default() }).await?;
    let (_conn, ch) = fleet.amqp().await?;
    let queue = ch
        .queue_declare("".into(), QueueDeclareOptions { exclusive: true, ..Default::default() }, FieldTable::default())
        .await?;
    let events = format!("{}.events", fleet.config.amqp.prefix);
    ch.queue_bind(
        queue.name().clone(),
        events.into(),
        "session.budget_alert".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    // Threshold 0.5 of 10 steps: 8-step sessions cross it at step 5; 3-step sessions never do.
    let budget = json!({"max_steps": 10, "alert_threshold": 0.5});
    let mut bodies = Vec::new();
    for i in 0..20 {
        let steps = if i % 2 == 0 { 8 } else { 3 };
        bodies.push(json!({"agent": "support", "input": format!("[steps={steps}] alert {i}"), "budget": budget}));
    }
    let ids: Vec<SessionId> = try_join_all(bodies.iter().map(|b| fleet.submit_json(b))).await?;
    let sessions = fleet.wait_settled(&ids, Duration::from_secs(120)).await?;
    assert!(sessions.iter().all(|s| s["status"] == "completed"));
    // Every 8-step session publishes one alert: wait until all of them are in the queue.
    let expected = ids.len().div_ceil(2) as u32;
    try_eventually(&format!("{expected} budget alerts in the events queue"), Duration::from_secs(30), || async {
        Ok((queue_depth(&ch, queue.name().as_str()).await? >= expected).then_some(()))
    })
    .await?;
    let mut alerts: HashMap<String, usize> = HashMap::new();
    while let Some(msg) = ch.basic_get(queue.name().clone(), BasicGetOptions { no_ack: true }).await? {
        let event: Value = serde_json::from_slice(&msg.delivery.data)?;
        assert_eq!(event["type"], "session.budget_alert");
        assert_eq!(event["detail"]["limit"], "max_steps");
        *alerts.entry(event["session_id"].as_str().unwrap_or_default().to_owned()).or_default() += 1;
    }
    for (i, id) in ids.iter().enumerate() {
        let expected = usize::from(i % 2 == 0);
        assert_eq!(alerts.get(id.as_str()).copied().unwrap_or(0), expected, "session {i}");
        assert_eq!(sessions[i]["budget_alert"].is_string(), expected == 1);
    }
    fleet.cleanup().await
}

/// SIGKILL right after the model checkpoint, which reconciles the call and stores its reply in one
/// write: the redelivery resumes at the tool phase, the model is not called again, and each call is
/// counted exactly once, at its actual usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_model_checkpoint_repeats_no_call_and_counts_each_once() -> anyhow::Result<()> {
    let mut fleet = TestFleet::start(FleetOptions { workers: 0, ..Default::default() }).await?;
    let id = fleet.submit("support", "[steps=3] crash after the checkpoint").await?;
    let doomed = fleet.spawn_worker_with_env(&[("AGENTFLEET_FAILPOINT", "after_model_checkpoint")])?;
    let status = fleet.wait_exit(doomed, Duration::from_secs(30)).await?;
    assert!(!status.success(), "the worker died at the failpoint: {status}");
    fleet.spawn_worker()?;
    let s = fleet.wait_settled(&[id], Duration::from_secs(60)).await?.remove(0);
    assert_eq!(s["status"], "completed", "{s}");
    let billed = fleet.model.stats();
    assert_eq!(billed.answered_total, 3, "three steps, and no call repeated");
    assert_eq!(s["usage"]["model_calls"], 3);
    assert_eq!(micro(&s, "input_tokens"), billed.billed_input_tokens, "{}", s["usage"]);
    assert_eq!(micro(&s, "output_tokens"), billed.billed_output_tokens, "{}", s["usage"]);
    assert_eq!(s["usage"]["unreconciled_calls"], 0);
    agentfleet_tests::fleet::check_step_conversation(&s, 3).map_err(anyhow::Error::msg)?;
    fleet.cleanup().await
}

/// SIGKILL after the response arrived but before it was reconciled: its usage is unknown, so its
/// reservation — the worst case — is counted, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_lost_before_reconciling_is_counted_once_at_its_worst_case() -> anyhow::Result<()> {
    let mut fleet = TestFleet::start(FleetOptions { workers: 0, ..Default::default() }).await?;
    let id = fleet.submit("support", "[steps=3] crash right after the call").await?;
    let doomed = fleet.spawn_worker_with_env(&[("AGENTFLEET_FAILPOINT", "after_model_call")])?;
    fleet.wait_exit(doomed, Duration::from_secs(30)).await?;
    fleet.spawn_worker()?;
    let s = fleet.wait_settled(&[id], Duration::from_secs(60)).await?.remove(0);
    assert_eq!(s["status"], "completed", "{s}");
    let billed = fleet.model.stats();
    assert_eq!(billed.answered_total, 4);
    assert_eq!(s["usage"]["model_calls"], 4);
    assert_eq!(s["usage"]["unreconciled_calls"], 1);
    assert!(micro(&s, "input_tokens") >= billed.billed_input_tokens, "{}", s["usage"]);
    assert!(micro(&s, "output_tokens") >= billed.billed_output_tokens, "{}", s["usage"]);
    fleet.cleanup().await
}
