//! The step protocol's edges: duplicate step messages, malformed messages, and the HTTP API's
//! answers to bad input — all against real RabbitMQ and Redis.

use std::time::Duration;

use agentfleet::domain::StepMessage;
use agentfleet_tests::fleet::{FleetOptions, TestFleet, check_step_conversation, queue_depth, try_eventually};
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Channel};
use serde_json::{Value, json};

async fn publish_raw(ch: &Channel, fleet: &TestFleet, body: &[u8]) -> anyhow::Result<()> {
    let exchange = format!("{}.steps", fleet.config.amqp.prefix);
    ch.basic_publish(
        exchange.into(),
        "default".into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default(),
    )
    .await?
    .await?;
    Ok(())
}

/// Step messages the workers settled as stale (for a finished session or a step already run).
async fn stale_steps(fleet: &TestFleet) -> anyhow::Result<u64> {
    fleet.worker_counter("agentfleet_step_messages_total", r#"outcome="stale""#).await
}

/// Waits until the workers have settled `at_least` stale step messages in all and the step queue is
/// empty: every published copy was taken and judged stale.
async fn wait_stale(ch: &Channel, fleet: &TestFleet, at_least: u64) -> anyhow::Result<u64> {
    let queue = format!("{}.steps.default", fleet.config.amqp.prefix);
    let what = format!("{at_least} step messages settled as stale and {queue} empty");
    try_eventually(&what, Duration::from_secs(30), || async {
        let stale = stale_steps(fleet).await?;
        Ok((stale >= at_least && queue_depth(ch, &queue).await? == 0).then_some(stale))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_the_same_step_twice_changes_nothing() -> anyhow::Result<()> {
    // The dead-letter queue must stay empty: the dispatcher leaves it alone, so it is what it counts.
    let opts = FleetOptions { workers: 0, dead_letters_config: "store = false".into(), ..Default::default() };
    let mut fleet = TestFleet::start(opts).await?;
    let (_conn, ch) = fleet.amqp().await?;
    let id = fleet.submit("support", "[steps=5] duplicate me").await?;
    // A second copy of step 1 sits in the queue beside the first before any worker runs.
    let dup = serde_json::to_vec(&StepMessage { session_id: id.clone(), step: 1, attempt: 0 })?;
    publish_raw(&ch, &fleet, &dup).await?;
    fleet.spawn_worker()?;
    fleet.spawn_worker()?;
    let done = fleet.wait_settled(std::slice::from_ref(&id), Duration::from_secs(60)).await?.remove(0);
    // The duplicate of step 1 ends up stale, whether it came first to a busy lease or after step 1.
    let stale_before = wait_stale(&ch, &fleet, 1).await?;
    assert_eq!(done["status"], "completed");
    check_step_conversation(&done, 5).map_err(anyhow::Error::msg)?;
    assert_eq!(done["usage"]["model_calls"], 5, "no model call was repeated");
    assert_eq!(fleet.tools.stats().repeats(), 0, "no tool call was repeated");

    // Every step of the finished session, published again, is dropped as stale.
    for step in 1..=5 {
        let again = serde_json::to_vec(&StepMessage { session_id: id.clone(), step, attempt: 0 })?;
        publish_raw(&ch, &fleet, &again).await?;
        publish_raw(&ch, &fleet, &again).await?;
    }
    wait_stale(&ch, &fleet, stale_before + 10).await?;
    let after = fleet.session(&id).await?;
    assert_eq!(after, done, "the session changed after duplicate step messages");
    assert_eq!(fleet.model.stats().valid_total, 5);
    assert_eq!(queue_depth(&ch, &format!("{}.dead", fleet.config.amqp.prefix)).await?, 0);
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_step_messages_are_dead_lettered_with_the_reason() -> anyhow::Result<()> {
    // The test reads the dead-letter queue itself: the dispatcher leaves it alone.
    let opts = FleetOptions { dead_letters_config: "store = false".into(), ..Default::default() };
    let fleet = TestFleet::start(opts).await?;
    let (_conn, ch) = fleet.amqp().await?;
    let bad: [&[u8]; 3] = [
        b"{not json",
        br#"{"session_id":"s_nope","step":1}"#,
        br#"{"session_id":"s_01JD3ZK8Q8YB3Y3C2K9Q2W7X4M","step":0}"#,
    ];
    for body in bad {
        publish_raw(&ch, &fleet, body).await?;
    }
    // A message for a session that does not exist is dead-lettered too.
    let ghost = serde_json::to_vec(&StepMessage {
        session_id: agentfleet::domain::SessionId::generate(),
        step: 1,
        attempt: 0,
    })?;
    publish_raw(&ch, &fleet, &ghost).await?;
    // The worker goes on: a real session still completes.
    let id = fleet.submit("support", "[steps=2] after the garbage").await?;
    let done = fleet.wait_settled(&[id], Duration::from_secs(60)).await?;
    assert_eq!(done[0]["status"], "completed");

    let dead = format!("{}.dead", fleet.config.amqp.prefix);
    let mut reasons = Vec::new();
    let mut bodies = Vec::new();
    while let Some(msg) = ch.basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true }).await? {
        bodies.push(msg.delivery.data.clone());
        reasons.push(reason_header(&msg.delivery.properties).unwrap_or_default());
    }
    assert_eq!(bodies.len(), 4, "reasons: {reasons:?}");
    for body in bad {
        assert!(bodies.iter().any(|b| b == body), "{:?} not dead-lettered unchanged", String::from_utf8_lossy(body));
    }
    assert_eq!(reasons.iter().filter(|r| r.starts_with("malformed: ")).count(), 3, "{reasons:?}");
    assert!(reasons.iter().any(|r| r.starts_with("unknown_session: ")), "{reasons:?}");
    fleet.cleanup().await
}

fn reason_header(props: &BasicProperties) -> Option<String> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get("x-agentfleet-reason")? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

async fn post(fleet: &TestFleet, body: reqwest::Body, content_type: &str) -> anyhow::Result<(u16, Value)> {
    let r = fleet
        .http
        .post(format!("{}/v1/sessions", fleet.api))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_4xx_that_names_the_field() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions { workers: 0, ..Default::default() }).await?;
    let json = "application/json";
    let cases: Vec<(String, &str, u16, &str)> = vec![
        ("{\"agent\": ".into(), json, 400, "EOF"),
        (json!({"agent": "nobody", "input": "hi"}).to_string(), json, 400, "agent"),
        (json!({"agent": "support", "input": "   "}).to_string(), json, 400, "input"),
        (json!({"agent": "support", "input": 42}).to_string(), json, 400, "input"),
        (json!({"agent": "support"}).to_string(), json, 400, "input"),
        (json!({"agent": "support", "input": "hi", "metadata": [1]}).to_string(), json, 400, "metadata"),
        (json!({"agent": "support", "input": "hi", "surprise": 1}).to_string(), json, 400, "surprise"),
        (json!({"agent": "support", "input": "hi", "idempotency_key": ""}).to_string(), json, 400, "idempotency_key"),
        (json!({"agent": "support", "input": "hi", "tenant": "a b"}).to_string(), json, 400, "tenant"),
        (json!({"agent": "support", "input": "x".repeat(70_000)}).to_string(), json, 413, "input"),
        (json!({"agent": "support", "input": "x".repeat(300_000)}).to_string(), json, 413, "length limit"),
        (json!({"agent": "support", "input": "hi"}).to_string(), "text/plain", 415, "Content-Type"),
    ];
    for (body, content_type, status, mentions) in cases {
        let shown = body.chars().take(60).collect::<String>();
        let (got, v) = post(&fleet, body.into(), content_type).await?;
        assert_eq!(got, status, "{shown}: {v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(v["error"]["type"].is_string(), "{shown}: {v}");
        assert!(message.contains(mentions), "{shown}: message {message:?} should mention {mentions:?}");
    }
    let missing = fleet.http.get(format!("{}/v1/sessions/s_01JD3ZK8Q8YB3Y3C2K9Q2W7X4M", fleet.api)).send().await?;
    assert_eq!(missing.status(), 404);
    let malformed = fleet.http.get(format!("{}/v1/sessions/not-an-id", fleet.api)).send().await?;
    assert_eq!(malformed.status(), 400);
    assert!(malformed.json::<Value>().await?["error"]["message"].as_str().is_some_and(|m| m.starts_with("id:")));
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_always_returns_the_same_session() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions::default()).await?;
    let body = json!({"agent": "support", "input": "[steps=2] once only", "idempotency_key": "order-42"});
    let mut ids = Vec::new();
    for _ in 0..5 {
        let r = fleet.http.post(format!("{}/v1/sessions", fleet.api)).json(&body).send().await?;
        assert_eq!(r.status(), 202);
        ids.push(r.json::<Value>().await?["id"].as_str().unwrap_or_default().to_owned());
    }
    assert!(ids.iter().all(|id| id == &ids[0] && id.starts_with("s_")), "{ids:?}");
    let id = agentfleet::domain::SessionId::parse(&ids[0])?;
    let done = fleet.wait_settled(&[id], Duration::from_secs(60)).await?;
    assert_eq!(done[0]["status"], "completed");
    assert_eq!(fleet.model.stats().valid_total, 2, "one session, two model calls");
    let ready: Value = fleet.http.get(format!("{}/readyz", fleet.ops)).send().await?.json().await?;
    assert_eq!(ready["checks"], json!({"redis": true, "rabbitmq": true}));
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_janitor_revives_a_session_whose_step_message_was_lost() -> anyhow::Result<()> {
    let mut fleet = TestFleet::start(FleetOptions { workers: 0, ..Default::default() }).await?;
    let id = submit_and_lose_its_step(&fleet, "[steps=3] lost in the broker").await?;

    let janitor = fleet.janitor(0).await?;
    // `stall_after_s = 0`: the session counts as stalled once the clock has moved past its last update.
    let swept = try_eventually("the janitor to re-publish the stalled session", Duration::from_secs(10), || async {
        let n = janitor.sweep().await?;
        Ok((n > 0).then_some(n))
    })
    .await?;
    assert_eq!(swept, 1, "the stalled session is re-published");

    fleet.spawn_worker()?;
    let done = fleet.wait_settled(std::slice::from_ref(&id), Duration::from_secs(60)).await?;
    assert_eq!(done[0]["status"], "completed");
    check_step_conversation(&done[0], 3).map_err(anyhow::Error::msg)?;
    assert_eq!(janitor.sweep().await?, 0, "a finished session is left alone and leaves the index");
    let mut redis = fleet.redis().await?;
    let live: i64 =
        redis::cmd("ZCARD").arg(format!("{}:active", fleet.config.redis.key_prefix)).query_async(&mut redis).await?;
    assert_eq!(live, 0);
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_janitor_revives_a_session_paused_at_a_cap_whose_retry_was_lost() -> anyhow::Result<()> {
    let mut fleet = TestFleet::start(FleetOptions { workers: 0, ..Default::default() }).await?;
    let id = submit_and_lose_its_step(&fleet, "[steps=2] paused at a cap").await?;
    // As a step that met a daily cap leaves it, with its delayed retry lost with a broker node.
    let mut redis = fleet.redis().await?;
    let meta = format!("{}:{{{}}}:meta", fleet.config.redis.key_prefix, id.as_str());
    let paused_ms = agentfleet::telemetry::now_ms() - agentfleet::lifecycle::PAUSE_RETRY.as_millis() as u64 - 5_000;
    let _: i64 = redis::cmd("HSET")
        .arg(&meta)
        .arg("status")
        .arg("paused")
        .arg("updated_ms")
        .arg(paused_ms)
        .query_async(&mut redis)
        .await?;

    let janitor = fleet.janitor(0).await?;
    let swept = try_eventually("the janitor to re-publish the paused session", Duration::from_secs(10), || async {
        let n = janitor.sweep().await?;
        Ok((n > 0).then_some(n))
    })
    .await?;
    assert_eq!(swept, 1, "the paused session whose retry is long overdue is re-published");

    fleet.spawn_worker()?;
    let done = fleet.wait_status(&id, "completed").await?;
    check_step_conversation(&done, 2).map_err(anyhow::Error::msg)?;
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_janitor_leaves_a_recently_paused_session_to_its_own_retry() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions { workers: 0, ..Default::default() }).await?;
    let id = fleet.submit("support", "[steps=2] paused just now").await?;
    let mut redis = fleet.redis().await?;
    let meta = format!("{}:{{{}}}:meta", fleet.config.redis.key_prefix, id.as_str());
    let now = agentfleet::telemetry::now_ms();
    let _: i64 = redis::cmd("HSET")
        .arg(&meta)
        .arg("status")
        .arg("paused")
        .arg("updated_ms")
        .arg(now)
        .query_async(&mut redis)
        .await?;
    let janitor = fleet.janitor(0).await?;
    // The session is in the live index from its creation; a sweep sees it and leaves it alone.
    assert_eq!(janitor.sweep().await?, 0, "its retry is not overdue yet");
    fleet.cleanup().await
}

/// Submits a `support` session with this goal to a fleet without workers, and purges its first step
/// message, as if it had been lost with a broker node.
async fn submit_and_lose_its_step(fleet: &TestFleet, goal: &str) -> anyhow::Result<agentfleet::domain::SessionId> {
    use lapin::options::QueuePurgeOptions;

    let (_conn, ch) = fleet.amqp().await?;
    let id = fleet.submit("support", goal).await?;
    let queue = format!("{}.steps.default", fleet.config.amqp.prefix);
    assert_eq!(ch.queue_purge(queue.as_str().into(), QueuePurgeOptions::default()).await?, 1, "step 1 was queued");
    Ok(id)
}
