//! Replays the malformed-input corpus (`tests/corpus/`, see its README) against a real fleet, with
//! good sessions in flight around it.
//!
//! - every step message is dead-lettered with a reason header;
//! - every session request is answered with an error reply (when it names `reply_to`) and
//!   dead-lettered with a reason (when it does not): nothing is dropped silently;
//! - every HTTP body gets a 4xx in the API's error shape with a message: never a 5xx, never a hang;
//! - the workers stay up, the sessions waiting for people are untouched by the bad bodies, and every
//!   good session, started before or after the corpus, completes.
//!
//! New corpus files are picked up as they are added: the test walks the folders.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agentfleet::domain::SessionId;
use agentfleet_tests::fleet::{FleetOptions, TestFleet, TestToken, check_step_conversation, token_secret};
use anyhow::{Context, bail, ensure};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Consumer};
use serde_json::{Value, json};

/// How long one corpus case may take to be answered.
const ANSWER: Duration = Duration::from_secs(30);

/// An agent whose pool no worker consumes: its sessions stay queued at step 1, so a step message
/// ahead of that is deterministically a future step.
const PARKED_AGENT: &str = r#"
[agents.parked]
model = "claude-sonnet-4-5"
system_prompt = "You never run."
tools = []
pool = "parked"
"#;

/// The API token the HTTP corpus is sent with: every role but admin, of tenant `acme`.
const TOKEN: &str = "corpus";

/// One corpus file.
struct Case {
    path: PathBuf,
    body: Vec<u8>,
}

impl Case {
    fn name(&self) -> String {
        let parent = self.path.parent().and_then(Path::file_name).map(|p| p.to_string_lossy().into_owned());
        let file = self.path.file_name().map(|f| f.to_string_lossy().into_owned());
        format!("{}/{}", parent.unwrap_or_default(), file.unwrap_or_default())
    }

    /// The content type the file's extension stands for.
    fn content_type(&self) -> &'static str {
        match self.path.extension().and_then(|e| e.to_str()) {
            Some("json") => "application/json",
            Some("txt") => "text/plain",
            _ => "application/octet-stream",
        }
    }
}

/// Every file of `tests/corpus/<dir>` but the README, sorted, with `${PARKED}` replaced.
fn corpus(dir: &str, parked: &SessionId) -> anyhow::Result<Vec<Case>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(dir);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&root)
        .with_context(|| format!("reading {}", root.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    paths.retain(|p| p.is_file() && p.extension().is_some_and(|e| e != "md"));
    paths.sort();
    ensure!(!paths.is_empty(), "no corpus files in {}", root.display());
    let placeholder = b"${PARKED}";
    paths
        .into_iter()
        .map(|path| {
            let raw = std::fs::read(&path)?;
            let body = match raw.windows(placeholder.len()).position(|w| w == placeholder) {
                Some(at) => [&raw[..at], parked.as_str().as_bytes(), &raw[at + placeholder.len()..]].concat(),
                None => raw,
            };
            Ok(Case { path, body })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The business system's AMQP side

struct Amqp {
    ch: Channel,
    prefix: String,
    reply_to: String,
    replies: Consumer,
}

impl Amqp {
    async fn connect(fleet: &TestFleet) -> anyhow::Result<(lapin::Connection, Self)> {
        let (conn, ch) = fleet.amqp().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let opts = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        let q = ch.queue_declare("".into(), opts, FieldTable::default()).await?;
        let consume = BasicConsumeOptions { no_ack: true, ..Default::default() };
        let replies = ch.basic_consume(q.name().clone(), "".into(), consume, FieldTable::default()).await?;
        let prefix = fleet.config.amqp.prefix.clone();
        Ok((conn, Self { ch, prefix, reply_to: q.name().to_string(), replies }))
    }

    /// Publishes `body` to `exchange` with `key`, and waits for the broker to route and confirm it.
    async fn publish(&self, exchange: &str, key: &str, body: &[u8], props: BasicProperties) -> anyhow::Result<()> {
        let opts = BasicPublishOptions { mandatory: true, ..Default::default() };
        let confirm = self.ch.basic_publish(exchange.into(), key.into(), opts, body, props).await?.await?;
        ensure!(matches!(confirm, Confirmation::Ack(None)), "not routed or not confirmed: {confirm:?}");
        Ok(())
    }

    /// The next dead letter, with its reason header.
    async fn dead_letter(&self, case: &str) -> anyhow::Result<(Vec<u8>, String)> {
        let dead = format!("{}.dead", self.prefix);
        let deadline = tokio::time::Instant::now() + ANSWER;
        loop {
            if let Some(msg) = self.ch.basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true }).await? {
                let reason = match header(&msg.delivery.properties, "x-agentfleet-reason") {
                    Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                    other => bail!("{case}: dead-lettered without a reason header ({other:?})"),
                };
                return Ok((msg.delivery.data.clone(), reason));
            }
            ensure!(tokio::time::Instant::now() < deadline, "{case}: not dead-lettered within {ANSWER:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The reply to the request with correlation id `cid`.
    async fn reply(&mut self, cid: &str) -> anyhow::Result<Value> {
        let delivery = match tokio::time::timeout(ANSWER, self.replies.next()).await {
            Ok(Some(d)) => d?,
            Ok(None) => bail!("{cid}: the reply consumer ended"),
            Err(_) => bail!("{cid}: no reply within {ANSWER:?}"),
        };
        let got = delivery.properties.correlation_id().as_ref().map(|c| c.to_string());
        ensure!(got.as_deref() == Some(cid), "{cid}: a reply for {got:?}");
        serde_json::from_slice(&delivery.data).with_context(|| format!("{cid}: the reply is not JSON"))
    }

    async fn dead_queue_depth(&self) -> anyhow::Result<u32> {
        agentfleet_tests::fleet::queue_depth(&self.ch, &format!("{}.dead", self.prefix)).await
    }
}

fn header(props: &BasicProperties, name: &str) -> Option<AMQPValue> {
    props.headers().as_ref()?.inner().get(name).cloned()
}

/// `<kind>: <detail>`, both non-empty.
fn check_reason(case: &str, reason: &str) -> anyhow::Result<()> {
    let (kind, detail) = reason.split_once(": ").with_context(|| format!("{case}: reason {reason:?}"))?;
    ensure!(!kind.trim().is_empty() && !detail.trim().is_empty(), "{case}: reason {reason:?}");
    Ok(())
}

/// An error body in the API's shape: `{"error": {"type", "message"}}`, both non-empty.
fn check_error(case: &str, value: &Value) -> anyhow::Result<String> {
    let kind = value["error"]["type"].as_str().unwrap_or_default();
    let message = value["error"]["message"].as_str().unwrap_or_default();
    ensure!(!kind.is_empty() && !message.trim().is_empty(), "{case}: not our error shape: {value}");
    ensure!(value.get("id").is_none(), "{case}: a refused request created a session: {value}");
    Ok(message.to_owned())
}

// ---------------------------------------------------------------------------------------------
// The replays

/// Step messages go to the default pool's queue; each must come out of the dead-letter queue.
async fn replay_steps(amqp: &Amqp, parked: &SessionId) -> anyhow::Result<usize> {
    let cases = corpus("steps", parked)?;
    let exchange = format!("{}.steps", amqp.prefix);
    for case in &cases {
        let name = case.name();
        let props = BasicProperties::default().with_delivery_mode(2);
        amqp.publish(&exchange, "default", &case.body, props).await.with_context(|| name.clone())?;
        let (_, reason) = amqp.dead_letter(&name).await?;
        check_reason(&name, &reason)?;
        eprintln!("{name}: dead-lettered: {}", agentfleet::telemetry::summarize(&reason, 160));
    }
    Ok(cases.len())
}

/// Session requests: once with `reply_to` (an error reply), once without (a dead letter).
/// Files named `anonymous-*` are published without `user_id`.
async fn replay_requests(amqp: &mut Amqp, parked: &SessionId) -> anyhow::Result<usize> {
    let cases = corpus("requests", parked)?;
    let queue = format!("{}.requests", amqp.prefix);
    for (i, case) in cases.iter().enumerate() {
        let name = case.name();
        let anonymous = case.path.file_name().is_some_and(|f| f.to_string_lossy().starts_with("anonymous-"));
        let props = |cid: &str| {
            let props = BasicProperties::default()
                .with_content_type(case.content_type().into())
                .with_correlation_id(cid.into());
            if anonymous { props } else { props.with_user_id("guest".into()) }
        };
        let cid = format!("corpus-{i}");
        let with_reply = props(&cid).with_reply_to(amqp.reply_to.as_str().into());
        amqp.publish("", &queue, &case.body, with_reply).await.with_context(|| name.clone())?;
        let reply = amqp.reply(&cid).await?;
        let message = check_error(&name, &reply)?;
        eprintln!("{name}: answered: {}", agentfleet::telemetry::summarize(&message, 160));

        amqp.publish("", &queue, &case.body, props(&format!("{cid}-dead"))).await.with_context(|| name.clone())?;
        let (body, reason) = amqp.dead_letter(&name).await?;
        ensure!(body == case.body, "{name}: another message was dead-lettered");
        check_reason(&name, &reason)?;
    }
    Ok(cases.len())
}

/// HTTP bodies, each sent to its folder's endpoint: `create` to `POST /v1/sessions`, the others to
/// the action of the session given.
async fn replay_http(fleet: &TestFleet, dir: &str, url: &str, parked: &SessionId) -> anyhow::Result<usize> {
    let cases = corpus(&format!("http/{dir}"), parked)?;
    // A connection per request: the dispatcher closes the connection of a 413.
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {}", token_secret(TOKEN)).parse()?);
    let client = reqwest::Client::builder().default_headers(headers).pool_max_idle_per_host(0).build()?;
    let limit = fleet.config.dispatcher.max_body_bytes;
    for case in &cases {
        let name = case.name();
        let request = client.post(url).header("content-type", case.content_type()).body(case.body.clone());
        let sent = tokio::time::timeout(ANSWER, request.send())
            .await
            .map_err(|_| anyhow::anyhow!("{name}: no answer within {ANSWER:?}"))?;
        let response = match sent {
            Ok(response) => response,
            // The dispatcher answers 413 as soon as it sees the length and closes the connection;
            // a client still writing the body may see the reset instead (a fact of HTTP).
            Err(e) if case.body.len() > limit && e.is_request() => {
                eprintln!("{name}: over the body limit; the connection closed during the upload");
                continue;
            }
            Err(e) => return Err(anyhow::Error::from(e).context(name)),
        };
        let status = response.status().as_u16();
        let bytes = response.bytes().await?;
        let body: Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{name}: HTTP {status}, not JSON: {}", String::from_utf8_lossy(&bytes)))?;
        ensure!((400..500).contains(&status), "{name}: HTTP {status}: {body}");
        let message = check_error(&name, &body)?;
        eprintln!("{name}: HTTP {status}: {}", agentfleet::telemetry::summarize(&message, 160));
    }
    Ok(cases.len())
}

// ---------------------------------------------------------------------------------------------

async fn submit_good(fleet: &TestFleet, what: &str, n: usize) -> anyhow::Result<Vec<SessionId>> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(fleet.submit("support", &format!("[steps=3] {what} {i}")).await?);
    }
    Ok(ids)
}

/// Creates a session with the corpus token, so that the HTTP corpus reaches it (the harness's
/// admin token creates sessions of another tenant, which the corpus token cannot see).
async fn submit_as_corpus(fleet: &TestFleet, input: &str) -> anyhow::Result<SessionId> {
    let url = format!("{}/v1/sessions", fleet.api);
    let response = fleet.client(TOKEN).post(url).json(&json!({"agent": "support", "input": input})).send().await?;
    let body: Value = response.json().await?;
    let id = body["id"].as_str().with_context(|| format!("no session created: {body}"))?;
    Ok(SessionId::parse(id)?)
}

async fn status_of(fleet: &TestFleet, id: &SessionId) -> anyhow::Result<String> {
    Ok(fleet.session(id).await?["status"].as_str().unwrap_or_default().to_owned())
}

async fn post(fleet: &TestFleet, path: &str, body: Value) -> anyhow::Result<u16> {
    let response = fleet.client(TOKEN).post(format!("{}{path}", fleet.api)).json(&body).send().await?;
    Ok(response.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_malformed_input_corpus_is_refused_with_reasons_and_loses_no_session() -> anyhow::Result<()> {
    let roles = ["submit", "read", "operate", "approve"];
    let opts = FleetOptions {
        workers: 2,
        extra_config: PARKED_AGENT.into(),
        tokens: vec![TestToken::new(TOKEN, "acme", &roles)],
        // The corpus reads each dead letter from the queue itself.
        dead_letters_config: "store = false".into(),
        ..Default::default()
    };
    let fleet = TestFleet::start(opts).await?;
    let (conn, mut amqp) = Amqp::connect(&fleet).await?;

    // Good work in flight while the corpus is replayed, and two sessions waiting for people.
    let parked = fleet.submit("parked", "[steps=1] never runs").await?;
    let before = submit_good(&fleet, "before the corpus", 10).await?;
    let human = submit_as_corpus(&fleet, "I want a refund for last month, bob@example.com").await?;
    let approval = submit_as_corpus(&fleet, "[refund=500] needs a reviewer").await?;
    fleet.wait_status(&human, "awaiting_human").await?;
    fleet.wait_status(&approval, "awaiting_approval").await?;

    let steps = replay_steps(&amqp, &parked).await?;
    let requests = replay_requests(&mut amqp, &parked).await?;
    let api = &fleet.api;
    let mut bodies = replay_http(&fleet, "create", &format!("{api}/v1/sessions"), &parked).await?;
    bodies += replay_http(&fleet, "reply", &format!("{api}/v1/sessions/{human}/reply"), &parked).await?;
    bodies += replay_http(&fleet, "approve", &format!("{api}/v1/sessions/{approval}/approve"), &parked).await?;
    bodies += replay_http(&fleet, "reject", &format!("{api}/v1/sessions/{approval}/reject"), &parked).await?;
    eprintln!("replayed {steps} step messages, {requests} session requests (twice each), {bodies} HTTP bodies");

    // Nothing of the corpus moved the waiting sessions or the parked one.
    assert_eq!(status_of(&fleet, &human).await?, "awaiting_human");
    assert_eq!(status_of(&fleet, &approval).await?, "awaiting_approval");
    assert_eq!(status_of(&fleet, &parked).await?, "queued");
    assert_eq!(fleet.live_workers().len(), 2, "a worker died on the corpus");

    // Work after the corpus, and the waiting sessions answered properly: all of it completes.
    let after = submit_good(&fleet, "after the corpus", 10).await?;
    assert_eq!(post(&fleet, &format!("/v1/sessions/{human}/reply"), json!({"text": "Ticket T-7 handled"})).await?, 202);
    assert_eq!(post(&fleet, &format!("/v1/sessions/{approval}/approve"), json!({"note": "ok"})).await?, 202);
    let good: Vec<SessionId> = before.iter().chain(&after).cloned().collect();
    let done = fleet.wait_settled(&good, Duration::from_secs(90)).await?;
    for (id, session) in good.iter().zip(&done) {
        assert_eq!(session["status"], "completed", "{id}: {session}");
        check_step_conversation(session, 3).map_err(|e| anyhow::anyhow!("{id}: {e}"))?;
    }
    let people = fleet.wait_settled(&[human.clone(), approval.clone()], Duration::from_secs(60)).await?;
    for session in &people {
        assert_eq!(session["status"], "completed", "{session}");
    }
    assert_eq!(fleet.live_workers().len(), 2, "a worker died");
    assert_eq!(amqp.dead_queue_depth().await?, 0, "dead letters that no corpus case accounts for");

    // The harness deletes the queues of the worker pools; the parked pool's is this test's own.
    let parked_queue = format!("{}.steps.parked", amqp.prefix);
    amqp.ch.queue_delete(parked_queue.as_str().into(), lapin::options::QueueDeleteOptions::default()).await?;
    let _ = conn.close(200, "done".into()).await;
    fleet.cleanup().await
}
