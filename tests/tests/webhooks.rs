//! Signed webhooks of lifecycle events: every event reaches its receiver, signed, at least once —
//! also when the receiver is down for a while (the retries go through the queues).
//!
//! The receiver is a real HTTP server that checks every signature with
//! `agentfleet::webhooks::verify` — against the URL it is reached at and the tenant's secret —
//! answers 401 to a bad one (the tests assert there are none), and records each event by its
//! delivery id. Sessions with a `callback_url` belong to the tenant `acme`, whose callback prefix is
//! the receiver and which has its own signing secret; the other sessions belong to the harness
//! token's tenant `harness`, which has none, so their agent's `webhook_url` is signed with the
//! fleet's secret. The receivers are on 127.0.0.1, so these fleets set
//! `webhooks.allow_private_addresses` — except the ones that check it is refused otherwise.
//!
//! Sessions are submitted as soon as the fleet is up: the dispatcher declares the webhook queue
//! before it serves, so no event is published while nothing is bound to take it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentfleet::domain::SessionId;
use agentfleet::webhooks::{self, DEFAULT_TOLERANCE};
use agentfleet_tests::fleet::{FleetOptions, TestFleet, eventually, queue_depth, try_eventually};
use agentfleet_tests::serve::Served;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::routing::post;
use futures::future::try_join_all;
use lapin::Channel;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// The fleet's secret: events of sessions without a tenant secret.
const SECRET: &str = "whsec_integration_test";
/// The tenant `acme`'s own secret.
const ACME_SECRET: &str = "whsec_acme_integration_test";

/// One event as the receiver accepted it.
#[derive(Debug, Clone)]
struct Received {
    kind: String,
    session: String,
    path: String,
}

/// A webhook receiver: verifies, counts, records.
#[derive(Default)]
struct Receiver {
    /// `http://<addr>`: the URL it is reached at, less the path.
    base: String,
    /// While false, every well-signed request gets 503.
    healthy: AtomicBool,
    bad_signatures: AtomicUsize,
    refused: AtomicUsize,
    /// Accepted requests by delivery id (more than one: a duplicate).
    by_delivery: Mutex<BTreeMap<String, Vec<Received>>>,
}

impl Receiver {
    fn at(addr: SocketAddr, healthy: bool) -> Self {
        Self { base: format!("http://{addr}"), healthy: AtomicBool::new(healthy), ..Default::default() }
    }

    fn events(&self) -> Vec<Received> {
        let seen = self.by_delivery.lock().expect("lock");
        seen.values().filter_map(|v| v.first().cloned()).collect()
    }

    /// Deliveries accepted more than once, and the extra copies.
    fn duplicates(&self) -> (usize, usize) {
        let seen = self.by_delivery.lock().expect("lock");
        let dup = seen.values().filter(|v| v.len() > 1);
        (dup.clone().count(), dup.map(|v| v.len() - 1).sum())
    }

    fn accepted_total(&self) -> usize {
        self.by_delivery.lock().expect("lock").values().map(Vec::len).sum()
    }
}

async fn receive(State(r): State<Arc<Receiver>>, uri: Uri, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (ts, sig) = (header(webhooks::TIMESTAMP_HEADER), header(webhooks::SIGNATURE_HEADER));
    // The receiver knows its own URL and the tenants it serves; the tenant header only says which.
    let tenant = header(webhooks::TENANT_HEADER);
    let secret = match tenant.as_str() {
        "acme" => ACME_SECRET,
        // The harness's admin token's tenant, which has no secret of its own.
        "harness" | "" => SECRET,
        _ => return StatusCode::UNAUTHORIZED,
    };
    let here = webhooks::Destination { url: &format!("{}{}", r.base, uri), tenant: &tenant };
    if webhooks::verify(secret.as_bytes(), &here, &ts, &body, &sig, now, DEFAULT_TOLERANCE).is_err() {
        r.bad_signatures.fetch_add(1, Ordering::SeqCst);
        return StatusCode::UNAUTHORIZED;
    }
    if uri.path() == "/slow" {
        tokio::time::sleep(Duration::from_secs(3)).await; // past the deliverer's timeout
    } else if !r.healthy.load(Ordering::SeqCst) {
        r.refused.fetch_add(1, Ordering::SeqCst);
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let Ok(event) = serde_json::from_slice::<Value>(&body) else { return StatusCode::BAD_REQUEST };
    let kind = event["type"].as_str().unwrap_or_default().to_owned();
    let consistent = header("content-type") == "application/json"
        && header(webhooks::EVENT_HEADER) == kind
        && header(webhooks::DELIVERY_HEADER) == webhooks::delivery_id(&body);
    if !consistent {
        return StatusCode::BAD_REQUEST;
    }
    let session = event["session_id"].as_str().unwrap_or_default().to_owned();
    let received = Received { kind, session, path: uri.path().to_owned() };
    r.by_delivery.lock().expect("lock").entry(header(webhooks::DELIVERY_HEADER)).or_default().push(received);
    StatusCode::NO_CONTENT
}

/// Serves `receiver` on `listener` until the returned server is dropped.
fn serve(listener: TcpListener, receiver: Arc<Receiver>) -> anyhow::Result<Served> {
    let app = Router::new().route("/{*path}", post(receive)).with_state(receiver);
    Served::start("webhook receiver", listener, app)
}

/// A fleet whose tenant `acme` may call back to `prefix`, with its own secret; `webhooks` is more
/// of the `[webhooks]` section (private addresses are allowed unless it says otherwise).
fn options(prefix: &str, webhooks: &str, extra: String) -> FleetOptions {
    let env = [("AGENTFLEET_WEBHOOK_SECRET", SECRET), ("ACME_WEBHOOK_SECRET", ACME_SECRET)];
    let env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    let allow = if webhooks.contains("allow_private_addresses") { "" } else { "allow_private_addresses = true\n" };
    let extra_config = format!(
        "[webhooks]\n{allow}{webhooks}\n[tenants.acme]\ncallback_prefixes = [\"{prefix}\"]\n\
         webhook_secret_env = \"ACME_WEBHOOK_SECRET\"\n\n{extra}"
    );
    // These tests read the dead-letter queue itself: the dispatcher leaves it alone.
    let dead_letters_config = "store = false".into();
    FleetOptions { workers: 2, env, extra_config, dead_letters_config, ..Default::default() }
}

/// Waits until `receiver` has `session.created` and `session.completed` of every session.
async fn wait_for_events(receiver: &Receiver, ids: &[SessionId], timeout: Duration) {
    let what = format!("session.created and session.completed of {} sessions at the receiver", ids.len());
    eventually(&what, timeout, || async { missing_events(receiver, ids).is_empty().then_some(()) }).await;
}

fn missing_events(receiver: &Receiver, ids: &[SessionId]) -> Vec<(String, &'static str)> {
    let seen: BTreeSet<(String, String)> = receiver.events().into_iter().map(|e| (e.session, e.kind)).collect();
    let wanted = ids.iter().flat_map(|id| ["session.created", "session.completed"].map(|k| (id.to_string(), k)));
    wanted.filter(|(id, k)| !seen.contains(&(id.clone(), (*k).to_owned()))).collect()
}

/// The number of messages in this fleet's dead-letter queue.
async fn dead_letters(fleet: &TestFleet) -> anyhow::Result<u32> {
    let (conn, ch) = fleet.amqp().await?;
    let depth = queue_depth(&ch, &format!("{}.dead", fleet.prefix)).await?;
    let _ = conn.close(200, "checked".into()).await;
    Ok(depth)
}

/// Ready messages in the webhook queue and in each of its retry tiers.
async fn webhook_backlog(ch: &Channel, fleet: &TestFleet) -> anyhow::Result<(u32, u32)> {
    let prefix = &fleet.config.amqp.prefix;
    let main = queue_depth(ch, &webhooks::queue(prefix)).await?;
    let mut retrying = 0;
    for (tier, _) in webhooks::RETRY_TIERS {
        retrying += queue_depth(ch, &webhooks::retry_queue(prefix, tier)).await?;
    }
    Ok((main, retrying))
}

/// Takes every message from this fleet's dead-letter queue: its reason header and event type.
async fn take_dead_letters(fleet: &TestFleet) -> anyhow::Result<Vec<(String, String)>> {
    let (conn, ch) = fleet.amqp().await?;
    let dead = format!("{}.dead", fleet.prefix);
    let mut taken = Vec::new();
    let opts = lapin::options::BasicGetOptions { no_ack: true };
    while let Some(m) = ch.basic_get(dead.as_str().into(), opts).await? {
        let headers = m.delivery.properties.headers().clone().unwrap_or_default();
        let reason = headers.inner().get("x-agentfleet-reason").and_then(|v| v.as_long_string()).map(|r| r.to_string());
        let event: Value = serde_json::from_slice(&m.delivery.data)?;
        taken.push((reason.unwrap_or_default(), event["type"].as_str().unwrap_or_default().to_owned()));
    }
    let _ = conn.close(200, "taken".into()).await;
    Ok(taken)
}

async fn submit(fleet: &TestFleet, agent: &str, input: String, callback: Option<&str>) -> anyhow::Result<SessionId> {
    let mut body = json!({ "agent": agent, "input": input });
    if let Some(url) = callback {
        body["callback_url"] = json!(url);
        body["tenant"] = json!("acme");
    }
    fleet.submit_json(&body).await
}

/// An agent `hooked` whose `webhook_url` is the receiver at `addr`.
fn hooked_agent(addr: SocketAddr) -> String {
    format!(
        "[agents.hooked]\nmodel = \"claude-sonnet-4-5\"\nsystem_prompt = \"You help.\"\n\
         tools = [\"search_knowledge_base\"]\nwebhook_url = \"http://{addr}/agent-hook\"\n"
    )
}

/// Ten two-step sessions with a `callback_url`, and sessions of an agent with a `webhook_url`:
/// every `session.created` and `session.completed` arrives, signed, at the right URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_session_event_arrives_signed_at_its_url() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let receiver = Arc::new(Receiver::at(addr, true));
    let _server = serve(listener, receiver.clone())?;
    let fleet = TestFleet::start(options(&format!("http://{addr}/"), "", hooked_agent(addr))).await?;
    let callback = format!("http://{addr}/callback");

    let started = Instant::now();
    let submits = (0..10).map(|i| submit(&fleet, "support", format!("[steps=2] job {i}"), Some(&callback)));
    let mut ids: Vec<SessionId> = try_join_all(submits).await?;
    let agent_hook = submit(&fleet, "hooked", "[steps=2] agent hook".into(), None).await?;
    let overridden = submit(&fleet, "hooked", "[steps=2] own callback".into(), Some(&callback)).await?;
    let silent = submit(&fleet, "support", "[steps=2] nobody listens".into(), None).await?;
    ids.extend([agent_hook.clone(), overridden.clone()]);
    for s in fleet.wait_settled(&ids, Duration::from_secs(60)).await? {
        assert_eq!(s["status"], "completed", "{s}");
    }
    wait_for_events(&receiver, &ids, Duration::from_secs(30)).await;
    let elapsed = started.elapsed();
    fleet.wait_settled(std::slice::from_ref(&silent), Duration::from_secs(30)).await?;
    let (_conn, ch) = fleet.amqp().await?;
    try_eventually("the webhook queue and its retry tiers to be empty", Duration::from_secs(30), || async {
        Ok((webhook_backlog(&ch, &fleet).await? == (0, 0)).then_some(()))
    })
    .await?;
    // Negative check: the silent session's events may still be in the deliverer's hands (taken from
    // the queue, not yet acknowledged); give a wrongly sent one 500 ms to arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let events = receiver.events();
    let path_of = |id: &SessionId| {
        let paths: BTreeSet<String> =
            events.iter().filter(|e| e.session == id.as_str()).map(|e| e.path.clone()).collect();
        paths.into_iter().collect::<Vec<_>>()
    };
    assert_eq!(path_of(&agent_hook), ["/agent-hook"], "the agent's webhook_url is used without a callback");
    assert_eq!(path_of(&overridden), ["/callback"], "the session's callback_url wins over the agent's");
    assert!(path_of(&silent).is_empty(), "a session without any URL sends nothing");
    assert_eq!(receiver.bad_signatures.load(Ordering::SeqCst), 0);
    let (dup_events, extra) = receiver.duplicates();
    println!(
        "webhooks: {} sessions, {} events accepted ({} distinct), {dup_events} duplicated ({extra} extra copies), \
         all within {:.1} s of the first submit",
        ids.len(),
        receiver.accepted_total(),
        events.len(),
        elapsed.as_secs_f64()
    );
    assert_eq!(dead_letters(&fleet).await?, 0);
    fleet.cleanup().await
}

/// The receiver refuses connections for a while, then answers 503, then recovers: every event
/// still arrives, at least once, through the retry tiers; nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_after_the_receiver_was_down_for_a_while() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    drop(listener); // not listening yet: connections are refused
    let receiver = Arc::new(Receiver::at(addr, false));
    let fleet = TestFleet::start(options(&format!("http://{addr}/"), "", String::new())).await?;
    let callback = format!("http://{addr}/hooks");

    let started = Instant::now();
    let first = (0..5).map(|i| submit(&fleet, "support", format!("[steps=2] early {i}"), Some(&callback)));
    let mut ids: Vec<SessionId> = try_join_all(first).await?;
    // The receiver stays down until the deliverer has been refused: an event waits in a retry tier.
    let (_conn, ch) = fleet.amqp().await?;
    try_eventually("a refused webhook delivery to wait in a retry tier", Duration::from_secs(30), || async {
        Ok((webhook_backlog(&ch, &fleet).await?.1 > 0).then_some(()))
    })
    .await?;
    let _server = serve(TcpListener::bind(addr).await?, receiver.clone())?; // listening, but answering 503
    let second = (0..5).map(|i| submit(&fleet, "support", format!("[steps=2] late {i}"), Some(&callback)));
    ids.extend(try_join_all(second).await?);
    for s in fleet.wait_settled(&ids, Duration::from_secs(60)).await? {
        assert_eq!(s["status"], "completed", "{s}");
    }
    eventually("the unhealthy receiver to answer 503", Duration::from_secs(30), || async {
        (receiver.refused.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    assert!(receiver.events().is_empty(), "nothing is accepted while the receiver is down");
    receiver.healthy.store(true, Ordering::SeqCst);
    let healthy_at = started.elapsed();

    wait_for_events(&receiver, &ids, Duration::from_secs(90)).await;
    let recovered = started.elapsed();
    try_eventually("the webhook queue and its retry tiers to be empty", Duration::from_secs(30), || async {
        Ok((webhook_backlog(&ch, &fleet).await? == (0, 0)).then_some(()))
    })
    .await?;
    // Negative check: no event beyond created and completed; give a stray one still in the
    // deliverer's hands 2 s to arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let refused = receiver.refused.load(Ordering::SeqCst);
    let (dup_events, extra) = receiver.duplicates();
    println!(
        "webhooks after an outage: {} sessions, down {:.1} s (refused connections, then {refused} × 503), \
         all {} events in by {:.1} s, {} accepted, {dup_events} duplicated ({extra} extra copies)",
        ids.len(),
        healthy_at.as_secs_f64(),
        receiver.events().len(),
        recovered.as_secs_f64(),
        receiver.accepted_total()
    );
    assert!(refused > 0, "the receiver answered 503 during the outage");
    assert_eq!(receiver.bad_signatures.load(Ordering::SeqCst), 0);
    assert_eq!(receiver.events().len(), 2 * ids.len(), "exactly the created and completed events");
    assert_eq!(dead_letters(&fleet).await?, 0);
    fleet.cleanup().await
}

/// With `max_attempts = 2`, events whose receiver keeps answering 503, or answers only after the
/// timeout, go to the dead-letter queue after their second attempt, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_that_keep_failing_are_dead_lettered_with_the_reason() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let receiver = Arc::new(Receiver::at(addr, false)); // never healthy
    let _server = serve(listener, receiver.clone())?;
    let opts = options(&format!("http://{addr}/"), "max_attempts = 2\ntimeout_ms = 500\n", String::new());
    let fleet = TestFleet::start(opts).await?;
    let failing = submit(&fleet, "support", "[steps=1] failing".into(), Some(&format!("http://{addr}/hooks"))).await?;
    let slow = submit(&fleet, "support", "[steps=1] slow".into(), Some(&format!("http://{addr}/slow"))).await?;
    fleet.wait_settled(&[failing, slow], Duration::from_secs(60)).await?;

    let (_conn, ch) = fleet.amqp().await?;
    let dead = format!("{}.dead", fleet.prefix);
    try_eventually("4 events in the dead-letter queue", Duration::from_secs(30), || async {
        Ok((queue_depth(&ch, &dead).await? >= 4).then_some(()))
    })
    .await?;
    // Negative check: each event is dead-lettered once; give a second copy 2 s to show up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut dead = take_dead_letters(&fleet).await?;
    dead.sort();
    println!("webhooks dead-lettered: {dead:?}");
    assert_eq!(dead.len(), 4, "each event once: {dead:?}");
    let refused = dead.iter().filter(|(r, _)| r.contains("after 2 attempts") && r.contains("503")).count();
    let timed_out = dead.iter().filter(|(r, _)| r.contains("after 2 attempts") && r.contains("timeout")).count();
    assert_eq!((refused, timed_out), (2, 2), "{dead:?}");
    assert_eq!(receiver.refused.load(Ordering::SeqCst), 4, "two attempts of each of two events");
    assert_eq!(receiver.bad_signatures.load(Ordering::SeqCst), 0);
    fleet.cleanup().await
}

/// `POST /v1/sessions`: the status and the body.
async fn create(fleet: &TestFleet, body: Value) -> anyhow::Result<(reqwest::StatusCode, Value)> {
    let r = fleet.http.post(format!("{}/v1/sessions", fleet.api)).json(&body).send().await?;
    Ok((r.status(), r.json().await?))
}

/// Without `allow_private_addresses`, a `callback_url` is refused at create with a 400 that names
/// the problem: a literal loopback, private, metadata or IPv6 loopback address, userinfo, a URL
/// outside the tenant's prefixes, a tenant without prefixes, or no tenant at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_urls_are_checked_when_a_session_is_created() -> anyhow::Result<()> {
    let prefixes = r#"https://hooks.acme.example/", "http://127.0.0.1:9/", "http://10.0.0.1/", "http://169.254.169.254/", "http://[::1]/"#;
    let opts = options(prefixes, "allow_private_addresses = false\n", "[tenants.globex]\ndaily_cap_usd = 5.0\n".into());
    let fleet = TestFleet::start(FleetOptions { workers: 0, ..opts }).await?;
    let cases = [
        ("acme", "http://127.0.0.1:9/hook", "loopback"),
        ("acme", "http://10.0.0.1/hook", "private"),
        ("acme", "http://169.254.169.254/latest/meta-data", "cloud metadata"),
        ("acme", "http://[::1]/hook", "loopback"),
        ("acme", "https://user:pw@hooks.acme.example/hook", "userinfo"),
        ("acme", "https://hooks.acme.example.evil.test/hook", "callback_prefixes"),
        ("globex", "https://hooks.acme.example/hook", "no callback_prefixes"),
        ("", "https://hooks.acme.example/hook", "no callback_prefixes"),
    ];
    for (tenant, url, problem) in cases {
        let mut body = json!({ "agent": "support", "input": "hi", "callback_url": url });
        if !tenant.is_empty() {
            body["tenant"] = json!(tenant);
        }
        let (status, v) = create(&fleet, body).await?;
        assert_eq!(status, reqwest::StatusCode::BAD_REQUEST, "{tenant} {url}: {v}");
        let text = v.to_string();
        assert!(text.contains("callback_url") && text.contains(problem), "{tenant} {url}: {text}");
    }
    let ok =
        json!({ "agent": "support", "input": "hi", "tenant": "acme", "callback_url": "https://hooks.acme.example/x" });
    assert_eq!(create(&fleet, ok).await?.0, reqwest::StatusCode::ACCEPTED);
    fleet.cleanup().await
}

/// Without `allow_private_addresses`, a callback whose name resolves to loopback (`localhost`) and
/// an agent `webhook_url` at `127.0.0.1` are refused when the deliverer connects: every event is
/// dead-lettered once with the reason, none reaches the receiver, none is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_to_refused_addresses_are_dead_lettered_with_the_reason() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let receiver = Arc::new(Receiver::at(addr, true));
    let _server = serve(listener, receiver.clone())?;
    let local = format!("http://localhost:{}/", addr.port());
    let opts = options(&local, "allow_private_addresses = false\n", hooked_agent(addr));
    let fleet = TestFleet::start(opts).await?;
    let by_name = submit(&fleet, "support", "[steps=1] by name".into(), Some(&format!("{local}hook"))).await?;
    let literal = submit(&fleet, "hooked", "[steps=1] literal".into(), None).await?;
    fleet.wait_settled(&[by_name, literal], Duration::from_secs(60)).await?;

    let (_conn, ch) = fleet.amqp().await?;
    let dead = format!("{}.dead", fleet.prefix);
    try_eventually("4 events in the dead-letter queue", Duration::from_secs(30), || async {
        Ok((queue_depth(&ch, &dead).await? >= 4).then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await; // a second copy would show up by now
    let dead = take_dead_letters(&fleet).await?;
    println!("refused webhook destinations: {dead:?}");
    assert_eq!(dead.len(), 4, "each event once, at its first attempt: {dead:?}");
    let named = dead.iter().filter(|(r, _)| r.contains("refused") && r.contains("localhost is a loopback")).count();
    let literal = dead.iter().filter(|(r, _)| r.contains("refused") && r.contains("127.0.0.1 is a loopback")).count();
    assert_eq!((named, literal), (2, 2), "{dead:?}");
    assert_eq!(webhook_backlog(&ch, &fleet).await?, (0, 0), "nothing waits in a retry tier");
    assert_eq!(receiver.accepted_total() + receiver.bad_signatures.load(Ordering::SeqCst), 0);
    fleet.cleanup().await
}
