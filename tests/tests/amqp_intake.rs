//! The AMQP intake as a business system sees it: a plain AMQP client (raw `lapin`, none of the
//! agentfleet crates) publishes session requests to `<prefix>.requests`, reads the replies on its
//! own queue by `correlation_id`, and follows the sessions on the events exchange.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use agentfleet_tests::chaos::services::PrivateRedis;
use agentfleet_tests::fleet::{FleetOptions, TestFleet, eventually};
use anyhow::{Context, bail, ensure};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// The business system's side: a connection and a confirming channel.
struct Client {
    conn: Connection,
    ch: Channel,
    prefix: String,
}

impl Client {
    async fn connect(fleet: &TestFleet) -> anyhow::Result<Self> {
        let conn = Connection::connect(&fleet.config.amqp.url, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Self { conn, ch, prefix: fleet.config.amqp.prefix.clone() })
    }

    /// A server-named exclusive queue, consumed without acks.
    async fn private_queue(&self) -> anyhow::Result<(String, Consumer)> {
        let opts = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        let q = self.ch.queue_declare("".into(), opts, FieldTable::default()).await?;
        let name = q.name().to_string();
        let consume = BasicConsumeOptions { no_ack: true, ..Default::default() };
        let consumer = self.ch.basic_consume(name.as_str().into(), "".into(), consume, FieldTable::default()).await?;
        Ok((name, consumer))
    }

    /// A private queue bound to the events exchange for `keys`.
    async fn events(&self, keys: &[&str]) -> anyhow::Result<Consumer> {
        let (name, consumer) = self.private_queue().await?;
        let exchange = format!("{}.events", self.prefix);
        for key in keys {
            let opts = QueueBindOptions::default();
            self.ch
                .queue_bind(name.as_str().into(), exchange.as_str().into(), (*key).into(), opts, FieldTable::default())
                .await?;
        }
        Ok(consumer)
    }

    /// Publishes a request to `<prefix>.requests` and waits for the broker's confirm.
    async fn request(&self, body: &[u8], props: BasicProperties) -> anyhow::Result<()> {
        let queue = format!("{}.requests", self.prefix);
        let opts = BasicPublishOptions { mandatory: true, ..Default::default() };
        let confirm = self.ch.basic_publish("".into(), queue.as_str().into(), opts, body, props).await?.await?;
        ensure!(matches!(confirm, Confirmation::Ack(None)), "request not confirmed or unroutable: {confirm:?}");
        Ok(())
    }
}

/// The RabbitMQ user the harness connects as; the harness config maps it to tenant `acme`.
const USER: &str = "guest";

fn request_props(reply_to: Option<&str>, correlation_id: &str) -> BasicProperties {
    let props = BasicProperties::default()
        .with_user_id(USER.into())
        .with_content_type("application/json".into())
        .with_correlation_id(correlation_id.into())
        .with_message_id(format!("msg-{correlation_id}").into());
    match reply_to {
        Some(q) => props.with_reply_to(q.into()),
        None => props,
    }
}

/// Receives `n` messages, or fails after `WAIT` saying how many came.
async fn receive(consumer: &mut Consumer, n: usize, what: &str) -> anyhow::Result<Vec<lapin::message::Delivery>> {
    let mut got = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < n {
        match tokio::time::timeout_at(deadline, consumer.next()).await {
            Ok(Some(d)) => got.push(d?),
            Ok(None) => bail!("the {what} consumer ended after {} of {n}", got.len()),
            Err(_) => bail!("only {} of {n} {what} within {WAIT:?}", got.len()),
        }
    }
    Ok(got)
}

fn json_body(d: &lapin::message::Delivery) -> anyhow::Result<Value> {
    serde_json::from_slice(&d.data).with_context(|| format!("not JSON: {}", String::from_utf8_lossy(&d.data)))
}

fn correlation_id(d: &lapin::message::Delivery) -> String {
    d.properties.correlation_id().as_ref().map(|c| c.to_string()).unwrap_or_default()
}

fn header(props: &BasicProperties, name: &str) -> Option<AMQPValue> {
    props.headers().as_ref()?.inner().get(name).cloned()
}

/// The five invalid requests: correlation id, body, and a fragment the error message must contain.
fn invalid_requests() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    vec![
        ("bad-json", br#"{"agent": "support", "input": "#.to_vec(), "JSON"),
        ("bad-agent", br#"{"agent": "nobody", "input": "hello"}"#.to_vec(), "no agent named `nobody`"),
        ("bad-empty", br#"{"agent": "support", "input": "   "}"#.to_vec(), "input: must not be empty"),
        ("bad-type", br#"{"agent": "support", "input": 42}"#.to_vec(), "invalid type: integer `42`"),
        ("bad-field", br#"{"agent": "support", "input": "hi", "colour": "red"}"#.to_vec(), "unknown field `colour`"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_amqp_are_answered_by_correlation_id_and_complete() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions { workers: 2, ..Default::default() }).await?;
    let client = Client::connect(&fleet).await?;
    let (reply_queue, mut replies) = client.private_queue().await?;
    let mut completed = client.events(&["session.completed"]).await?;

    for i in 0..50 {
        let body =
            json!({ "agent": "support", "input": format!("[steps=3] amqp job {i}"), "metadata": { "order": i } });
        client.request(&serde_json::to_vec(&body)?, request_props(Some(&reply_queue), &format!("ok-{i}"))).await?;
    }
    let invalid = invalid_requests();
    for (cid, body, _) in &invalid {
        client.request(body, request_props(Some(&reply_queue), cid)).await?;
    }

    let mut by_cid: HashMap<String, Value> = HashMap::new();
    for d in receive(&mut replies, 55, "replies").await? {
        let content_type = d.properties.content_type().as_ref().map(|c| c.to_string());
        assert_eq!(content_type.as_deref(), Some("application/json"), "reply {}", correlation_id(&d));
        let previous = by_cid.insert(correlation_id(&d), json_body(&d)?);
        assert!(previous.is_none(), "two replies for {}", correlation_id(&d));
    }
    let mut order_of: HashMap<String, i64> = HashMap::new();
    for i in 0..50 {
        let reply = by_cid.get(&format!("ok-{i}")).with_context(|| format!("no reply for ok-{i}: {by_cid:?}"))?;
        let id = reply["id"].as_str().with_context(|| format!("reply to ok-{i} has no id: {reply}"))?;
        assert!(id.starts_with("s_"), "{reply}");
        assert_eq!(reply["status"], "queued", "{reply}");
        assert!(order_of.insert(id.to_owned(), i).is_none(), "ok-{i} got an id already given: {id}");
    }
    for (cid, _, fragment) in &invalid {
        let reply = by_cid.get(*cid).with_context(|| format!("no reply for {cid}"))?;
        assert_eq!(reply["error"]["type"], "invalid_request", "{cid}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(fragment), "{cid}: {message:?} does not say {fragment:?}");
        assert!(reply.get("id").is_none(), "{cid}: {reply}");
    }

    let mut done: HashMap<String, i64> = HashMap::new();
    for d in receive(&mut completed, 50, "session.completed events").await? {
        let event = json_body(&d)?;
        assert_eq!(event["type"], "session.completed", "{event}");
        assert_eq!(event["agent"], "support", "{event}");
        let id = event["session_id"].as_str().with_context(|| format!("no session_id: {event}"))?.to_owned();
        let order = event["metadata"]["order"].as_i64().with_context(|| format!("no metadata.order: {event}"))?;
        assert_eq!(order_of.get(&id), Some(&order), "event for {id} carries order {order}: {event}");
        assert!(done.insert(id.clone(), order).is_none(), "two completions of {id}");
    }
    let expected: BTreeSet<&String> = order_of.keys().collect();
    let seen: BTreeSet<&String> = done.keys().collect();
    assert_eq!(seen, expected, "completed sessions are not the ones the replies named");

    let _ = client.conn.close(200, "done".into()).await;
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_without_reply_to_are_dead_lettered_with_the_reason() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions {
        workers: 1,
        dead_letters_config: "store = false".into(),
        ..Default::default()
    })
    .await?;
    let client = Client::connect(&fleet).await?;
    let unknown_agent = br#"{"agent": "nobody", "input": "hello"}"#;
    let malformed = b"not json at all";
    client.request(unknown_agent, request_props(None, "dead-1")).await?;
    client.request(malformed, request_props(None, "dead-2")).await?;

    let dead = format!("{}.dead", fleet.config.amqp.prefix);
    let mut reasons: HashMap<Vec<u8>, String> = HashMap::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while reasons.len() < 2 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "only {} dead-lettered within {WAIT:?}: {reasons:?}",
            reasons.len()
        );
        match client.ch.basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true }).await? {
            Some(msg) => {
                let reason = match header(&msg.delivery.properties, "x-agentfleet-reason") {
                    Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                    other => bail!("dead letter without a reason header: {other:?}"),
                };
                reasons.insert(msg.delivery.data.clone(), reason);
            }
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let reason = &reasons[unknown_agent.as_slice()];
    assert!(reason.starts_with("invalid_request: ") && reason.contains("no agent named `nobody`"), "{reason}");
    let reason = &reasons[malformed.as_slice()];
    assert!(reason.starts_with("invalid_request: ") && reason.contains("JSON"), "{reason}");

    let _ = client.conn.close(200, "done".into()).await;
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_twice_with_one_message_id_creates_one_session() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions { workers: 1, ..Default::default() }).await?;
    let client = Client::connect(&fleet).await?;
    let (reply_queue, mut replies) = client.private_queue().await?;
    let body = br#"{"agent": "support", "input": "[steps=1] once"}"#;
    let props = request_props(Some(&reply_queue), "twice");
    client.request(body, props.clone()).await?;
    let first = receive(&mut replies, 1, "replies").await?.remove(0);
    client.request(body, props).await?;
    let second = receive(&mut replies, 1, "replies").await?.remove(0);

    let (a, b) = (json_body(&first)?, json_body(&second)?);
    assert!(a["id"].is_string(), "{a}");
    assert_eq!(a["id"], b["id"], "the redelivered request made a second session");
    assert_eq!(header(&first.properties, "idempotent-replayed"), Some(AMQPValue::Boolean(false)));
    assert_eq!(header(&second.properties, "idempotent-replayed"), Some(AMQPValue::Boolean(true)));

    let _ = client.conn.close(200, "done".into()).await;
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_arrives_while_redis_is_down_is_held_until_it_is_back() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join("agentfleet-tests").join(format!("redis-{}", ulid::Ulid::new()));
    let mut redis = PrivateRedis::start_with(&dir, &["--appendonly", "no"]).await?;
    let fleet = TestFleet::start(FleetOptions {
        workers: 1,
        redis_url: redis.url(),
        dead_letters_config: "store = false".into(),
        ..Default::default()
    })
    .await?;
    let client = Client::connect(&fleet).await?;
    let (reply_queue, mut replies) = client.private_queue().await?;
    let mut completed = client.events(&["session.completed"]).await?;

    redis.stop().await;
    let body = br#"{"agent": "support", "input": "[steps=2] while redis is down", "metadata": {"order": 7}}"#;
    client.request(body, request_props(Some(&reply_queue), "outage")).await?;
    let early = tokio::time::timeout(Duration::from_secs(3), replies.next()).await;
    ensure!(early.is_err(), "a reply came while Redis was down: {early:?}");
    let dead = format!("{}.dead", fleet.config.amqp.prefix);
    let dead_letter = client.ch.basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true }).await?;
    ensure!(dead_letter.is_none(), "the request was dead-lettered during the outage");

    redis.start_again().await?;
    let reply = json_body(&receive(&mut replies, 1, "replies after the outage").await?[0])?;
    let id = reply["id"].as_str().with_context(|| format!("no id after the outage: {reply}"))?;
    let event = json_body(&receive(&mut completed, 1, "session.completed events").await?[0])?;
    assert_eq!(event["session_id"], id, "{event}");
    assert_eq!(event["metadata"]["order"], 7, "{event}");

    let _ = client.conn.close(200, "done".into()).await;
    fleet.cleanup().await
}

/// The reply to one request published with `props` (a fresh private queue as `reply_to`).
async fn ask(client: &Client, body: &[u8], props: BasicProperties) -> anyhow::Result<Value> {
    let (reply_queue, mut replies) = client.private_queue().await?;
    client.request(body, props.with_reply_to(reply_queue.as_str().into())).await?;
    json_body(&receive(&mut replies, 1, "replies").await?[0])
}

fn refusal(reply: &Value) -> &str {
    assert_eq!(reply["error"]["type"], "invalid_request", "{reply}");
    assert!(reply.get("id").is_none(), "a refused request created a session: {reply}");
    reply["error"]["message"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tenant_is_the_publishing_users_and_requests_without_one_are_refused() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions {
        workers: 0,
        dead_letters_config: "store = false".into(),
        ..Default::default()
    })
    .await?;
    let client = Client::connect(&fleet).await?;
    let body = br#"{"agent": "support", "input": "[steps=1] whose?"}"#;
    let anonymous = BasicProperties::default().with_content_type("application/json".into());

    let reply = ask(&client, body, anonymous.clone().with_correlation_id("anon".into())).await?;
    let message = refusal(&reply);
    assert!(message.contains("no `user_id` property"), "{message}");

    let reply = ask(&client, body, request_props(None, "mapped")).await?;
    let id = reply["id"].as_str().with_context(|| format!("no id: {reply}"))?;
    let session: Value = fleet.http.get(format!("{}/v1/sessions/{id}", fleet.api)).send().await?.json().await?;
    assert_eq!(session["tenant"], "acme", "the session's tenant is not the user's: {session}");

    let same = br#"{"agent": "support", "input": "[steps=1] mine", "tenant": "acme"}"#;
    ensure!(ask(&client, same, request_props(None, "same")).await?["id"].is_string(), "own tenant refused");
    let other = br#"{"agent": "support", "input": "[steps=1] theirs", "tenant": "globex"}"#;
    let reply = ask(&client, other, request_props(None, "other")).await?;
    let message = refusal(&reply);
    assert!(message.starts_with("tenant: ") && message.contains("`acme`"), "{message}");

    // Refused without anyone to answer: dead-lettered with the reason.
    client.request(body, anonymous.with_correlation_id("anon-dead".into())).await?;
    let dead = format!("{}.dead", fleet.config.amqp.prefix);
    let what = "the anonymous request in the dead-letter queue";
    let reason = eventually(what, WAIT, || async {
        let msg = client.ch.basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true }).await.ok()??;
        match header(&msg.delivery.properties, "x-agentfleet-reason") {
            Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            _ => Some(String::new()),
        }
    })
    .await;
    assert!(reason.contains("user_id"), "{reason:?}");

    let _ = client.conn.close(200, "done".into()).await;
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_a_tenant_is_refused() -> anyhow::Result<()> {
    // The broker checks `user_id` against the connection's user, and the test connects as guest:
    // so this fleet maps another user, and guest is the unmapped one.
    let amqp_users = vec![("billing".into(), "acme".into())];
    let fleet = TestFleet::start(FleetOptions { workers: 0, amqp_users, ..Default::default() }).await?;
    let client = Client::connect(&fleet).await?;
    let body = br#"{"agent": "support", "input": "[steps=1] who am I?"}"#;
    let reply = ask(&client, body, request_props(None, "unmapped")).await?;
    let message = refusal(&reply);
    assert!(message.contains("`guest` has no tenant"), "{message}");

    let _ = client.conn.close(200, "done".into()).await;
    fleet.cleanup().await
}
