//! OpenTelemetry export: each session is one trace, with a span per step and one per action, from
//! every worker that ran it and from the dispatcher, received by a real OTLP/HTTP endpoint.
//!
//! The workers are real processes with `[telemetry.otlp]` in their config. This test process plays
//! the dispatcher's part too: it installs the same telemetry as `agentfleet-dispatcher` does, so the
//! in-process dispatcher's spans are exported the same way.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use agentfleet::config::Config;
use agentfleet::domain::SessionId;
use agentfleet_tests::fleet::{FleetOptions, TestFleet, eventually};
use agentfleet_tests::otlp_collector::{CollectedSpan, Collector};
use futures::future::try_join_all;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// The W3C trace context a business system sends with its request.
const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn otlp_config(endpoint: &str) -> String {
    format!("\n[telemetry.otlp]\nendpoint = \"{endpoint}\"\nbatch_delay_ms = 100\ntimeout_ms = 2000\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_session_is_one_trace_with_a_span_per_step_and_per_action() -> anyhow::Result<()> {
    let collector = Collector::start(TcpListener::bind("127.0.0.1:0").await?).await?;
    let extra = otlp_config(&collector.endpoint());
    let mut fleet = TestFleet::start(FleetOptions { workers: 2, extra_config: extra, ..Default::default() }).await?;
    // This process runs the fleet's dispatcher: give it the telemetry `agentfleet-dispatcher` has.
    let telemetry = agentfleet::telemetry::init(&fleet.config.telemetry, "agentfleet-dispatcher")?;

    let traced = submit_with_traceparent(&fleet, "[steps=3] traced").await?;
    let others: Vec<SessionId> =
        try_join_all(["[steps=4] more", "[stop=refusal] no"].iter().map(|g| fleet.submit("support", g))).await?;
    let ids: Vec<SessionId> = std::iter::once(traced.clone()).chain(others).collect();
    let sessions = fleet.wait_settled(&ids, Duration::from_secs(60)).await?;
    for i in fleet.live_workers() {
        assert!(fleet.stop_worker(i)?.success(), "worker {i} drained and flushed its spans");
    }

    for (id, session) in ids.iter().zip(&sessions) {
        let trace_id = agentfleet::telemetry::otel::trace_id(id).to_string();
        let api_trace: Value =
            fleet.http.get(format!("{}/v1/sessions/{id}/trace", fleet.api)).send().await?.json().await?;
        assert_eq!(api_trace["otel_trace_id"], trace_id.as_str(), "the trace API names the OpenTelemetry trace");
        let spans = wait_for_session_span(&collector, &trace_id).await?;
        check_session_trace(id, session, &api_trace, &spans);
    }
    check_caller_link(&collector, &traced);
    assert_eq!(collector.requests().1, 0, "every export decoded as OTLP protobuf");
    telemetry.flush().await;
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absent_collector_slows_nothing_and_blocks_no_shutdown() -> anyhow::Result<()> {
    // A port nobody listens on: every export fails.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let extra = otlp_config(&format!("http://{closed}"));
    let mut fleet = TestFleet::start(FleetOptions { workers: 1, extra_config: extra, ..Default::default() }).await?;
    let goals: Vec<String> = (0..20).map(|i| format!("[steps=3] unobserved {i}")).collect();
    let ids: Vec<SessionId> = try_join_all(goals.iter().map(|g| fleet.submit("support", g))).await?;
    let sessions = fleet.wait_settled(&ids, Duration::from_secs(60)).await?;
    assert!(sessions.iter().all(|s| s["status"] == "completed"), "{sessions:?}");
    let started = Instant::now();
    assert!(fleet.stop_worker(0)?.success());
    // The final flush gives up after the export timeout (2 s) rather than hanging the pod's exit.
    assert!(started.elapsed() < Duration::from_secs(15), "SIGTERM took {:?}", started.elapsed());
    fleet.cleanup().await
}

#[test]
fn a_bad_otlp_section_is_a_config_error_that_names_the_field() {
    let dir = std::env::temp_dir().join(format!("agentfleet-otlp-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    for (section, field) in [
        ("endpoint = \"collector:4318\"", "telemetry.otlp.endpoint"),
        ("endpoint = \"ftp://collector\"", "telemetry.otlp.endpoint"),
        ("endpoint = \"http://c:4318\"\nsample_ratio = 1.5", "telemetry.otlp.sample_ratio"),
        ("endpoint = \"http://c:4318\"\nmax_queue_size = 0", "telemetry.otlp.max_queue_size"),
        ("endpont = \"http://c:4318\"", "endpont"),
    ] {
        let text = format!(
            "{}\n[telemetry.otlp]\n{section}\n",
            agentfleet_tests::fleet::config_text("t", &FleetOptions::default(), "http://m", "http://t")
        );
        let path = dir.join("bad.toml");
        std::fs::write(&path, text).expect("write config");
        let err = Config::load(&path, &|_| None).expect_err(section).to_string();
        assert!(err.contains(field), "{section}: {err}");
    }
}

async fn submit_with_traceparent(fleet: &TestFleet, input: &str) -> anyhow::Result<SessionId> {
    let r = fleet
        .http
        .post(format!("{}/v1/sessions", fleet.api))
        .header("traceparent", format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01"))
        .json(&json!({ "agent": "support", "input": input }))
        .send()
        .await?;
    anyhow::ensure!(r.status() == reqwest::StatusCode::ACCEPTED, "POST /v1/sessions answered {}", r.status());
    let v: Value = r.json().await?;
    Ok(SessionId::parse(v["id"].as_str().unwrap_or_default())?)
}

/// The spans of one trace, once its session span (written last, by the worker that ended the
/// session) has arrived.
async fn wait_for_session_span(collector: &Collector, trace_id: &str) -> anyhow::Result<Vec<CollectedSpan>> {
    let what = format!("the session and session.create spans of trace {trace_id} at the collector");
    let spans = eventually(&what, Duration::from_secs(20), || async {
        let spans: Vec<CollectedSpan> = collector.spans().into_iter().filter(|s| s.trace_id == trace_id).collect();
        let has_root = spans.iter().any(|s| s.name == "session");
        let has_create = spans.iter().any(|s| s.name == "session.create");
        (has_root && has_create).then_some(spans)
    })
    .await;
    Ok(spans)
}

fn check_session_trace(id: &SessionId, session: &Value, api_trace: &Value, spans: &[CollectedSpan]) {
    let roots: Vec<&CollectedSpan> = spans.iter().filter(|s| s.name == "session").collect();
    assert_eq!(roots.len(), 1, "{id}: one session span");
    let root = roots[0];
    assert_eq!(root.service, "agentfleet-worker");
    assert!(root.parent_span_id.is_empty(), "{id}: the session span is the trace's root");
    assert_eq!(root.attr("agentfleet.status"), session["status"].as_str().unwrap_or_default());
    assert_eq!(root.attr("agentfleet.session_id"), id.as_str());
    let failed = session["status"] != "completed";
    assert_eq!(root.status_code == 2, failed, "{id}: the session span's status follows the outcome");
    assert_eq!(Some(root.start_ns / 1_000_000), session["created_at_ms"].as_u64(), "{id}: it starts at creation");

    let steps: Vec<&CollectedSpan> = spans.iter().filter(|s| s.name == "step").collect();
    assert!(steps.iter().all(|s| s.parent_span_id == root.span_id && s.kind == 5), "{id}: steps hang off the session");
    let numbers: BTreeSet<u64> = steps.iter().filter_map(|s| s.attr("step").parse().ok()).collect();
    let last = session["step"].as_u64().unwrap_or(0);
    assert_eq!(numbers, (1..=last).collect(), "{id}: a span for every step");

    let step_ids: BTreeSet<&str> = steps.iter().map(|s| s.span_id.as_str()).collect();
    let records = api_trace["records"].as_array().cloned().unwrap_or_default();
    let actions: Vec<&CollectedSpan> = spans.iter().filter(|s| !s.attr("agentfleet.action").is_empty()).collect();
    assert_eq!(actions.len(), records.len(), "{id}: one span per trace record");
    for a in &actions {
        assert!(step_ids.contains(a.parent_span_id.as_str()), "{id}: {} is a child of a step span", a.name);
        assert!(a.end_ns >= a.start_ns, "{id}: {} ends after it starts", a.name);
    }
    let tokens: u64 = actions.iter().filter_map(|a| a.attr("gen_ai.usage.input_tokens").parse::<u64>().ok()).sum();
    assert_eq!(tokens, session["usage"]["input_tokens"].as_u64().unwrap_or(0), "{id}: span tokens add up");
    let tools = actions.iter().filter(|a| a.name.starts_with("execute_tool ")).count();
    assert_eq!(tools as u64, api_trace["summary"]["tool_calls"].as_u64().unwrap_or(0), "{id}: a span per tool call");
    assert!(tools == 0 || actions.iter().any(|a| a.attr("gen_ai.tool.name") == "search_knowledge_base"));

    let create = spans.iter().find(|s| s.name == "session.create").expect("waited for it");
    assert_eq!(create.service, "agentfleet-dispatcher");
    assert_eq!(create.parent_span_id, root.span_id, "{id}: creation is part of the session's trace");
}

/// The POST that created the session continues the caller's trace, and the session links to it.
fn check_caller_link(collector: &Collector, id: &SessionId) {
    let spans = collector.spans();
    let post = spans
        .iter()
        .find(|s| s.name == "POST /v1/sessions" && s.trace_id == CALLER_TRACE)
        .expect("the request span continues the caller's trace");
    assert_eq!(post.parent_span_id, CALLER_SPAN);
    assert_eq!(post.kind, 2, "a server span");
    let trace_id = agentfleet::telemetry::otel::trace_id(id).to_string();
    let create = spans.iter().find(|s| s.name == "session.create" && s.trace_id == trace_id).expect("creation span");
    assert!(
        create.links.contains(&(CALLER_TRACE.to_owned(), post.span_id.clone())),
        "the session's creation links to the request: {:?}",
        create.links
    );
}
