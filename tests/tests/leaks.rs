//! What the outside world must not push into our records (issue 12): secrets in URLs, and label
//! values of the model's choosing.
//!
//! - A tool URL with a token in its query fails with an HTTP-level error (reqwest prints the URL):
//!   the token appears in no trace record, ledger entry, message or session field.
//! - A model endpoint with a token in its query fails the same way: the session's `error` field
//!   and its trace do not carry the token.
//! - A model that calls 50 made-up tools yields `tool="unknown"` series only.
//!
//! The real engine, model client and tools over the in-memory store (`EngineRig`); the servers
//! are real sockets in this process.

use std::sync::Arc;

use agentfleet::domain::SessionStatus;
use agentfleet::guard::OpenGuard;
use agentfleet::store::Snapshot;
use agentfleet_tests::engine_rig::EngineRig;
use agentfleet_tests::fleet::{FleetOptions, config_text, metrics_handle, prometheus_counter};
use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpListener;

const TOOL_TOKEN: &str = "tok_TOOL_SECRET_4711";
const MODEL_TOKEN: &str = "tok_MODEL_SECRET_0815";

/// A server that answers every connection with bytes that are not HTTP, so that the client's
/// error is "error sending request for url (…)", not a connect error (which shows no URL).
async fn garbage_server() -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let _ = sock.write_all(b"garbage\r\n\r\n").await;
        }
    });
    Ok(format!("http://{addr}"))
}

/// Every text the session left behind: meta fields, messages, ledger and trace.
fn everything(s: &Snapshot) -> String {
    let ledger: Vec<String> = s.ledger.values().map(|o| o.content.clone()).collect();
    let meta = [&s.meta.error, &s.meta.result, &s.meta.escalation].map(|f| f.clone().unwrap_or_default());
    [meta.join("\n"), s.messages.join("\n"), ledger.join("\n"), s.trace.join("\n")].join("\n")
}

#[tokio::test]
async fn a_tool_url_token_never_reaches_the_trace_or_the_session() -> anyhow::Result<()> {
    let garbage = garbage_server().await?;
    let leaky = format!(
        r#"
[tools.leaky]
description = "Use this to look things up."
input_schema = {{ type = "object", properties = {{ query = {{ type = "string" }} }} }}
handler = {{ kind = "http", url = "{garbage}/tool?token={TOOL_TOKEN}", timeout_ms = 5000 }}
retries = 0

[agents.leaker]
model = "claude-sonnet-4-5"
system_prompt = "You look things up."
tools = ["leaky"]
"#
    );
    let opts = FleetOptions { extra_config: leaky, ..Default::default() };
    let rig = EngineRig::start(|model, tools| config_text("leaks", &opts, model, tools), Arc::new(OpenGuard)).await?;
    let id = rig.session("leaker", "[steps=2 tool=leaky] look it up", None)?;
    let s = rig.run(&id).await?;
    assert_eq!(s.meta.status, SessionStatus::Completed, "{:?}", s.meta);
    let text = everything(&s);
    let failure = s.ledger.values().next().map(|o| o.content.clone()).unwrap_or_default();
    assert!(failure.contains("request failed") && failure.contains("/tool?[redacted]"), "{failure}");
    assert!(!text.contains(TOOL_TOKEN), "the token leaked: {text}");
    assert!(s.trace.iter().any(|r| r.contains("/tool?[redacted]")), "no tool error in the trace: {:?}", s.trace);
    rig.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_model_url_token_never_reaches_the_session_error() -> anyhow::Result<()> {
    let garbage = garbage_server().await?;
    let base = format!("{garbage}/?key={MODEL_TOKEN}");
    let opts = FleetOptions::default();
    let rig = EngineRig::start(|_, tools| config_text("leaks", &opts, &base, tools), Arc::new(OpenGuard)).await?;
    let id = rig.session("support", "hello", None)?;
    let s = rig.run(&id).await?;
    assert_eq!(s.meta.status, SessionStatus::Failed, "{:?}", s.meta);
    let error = s.meta.error.clone().unwrap_or_default();
    assert!(error.contains("?[redacted]"), "the error does not show the cut URL: {error}");
    let text = everything(&s);
    assert!(!text.contains(MODEL_TOKEN), "the token leaked: {text}");
    rig.stop().await;
    Ok(())
}

/// How many made-up tools the hostile model calls at once.
const MADE_UP: usize = 50;

/// A model that calls [`MADE_UP`] tools that do not exist, then ends the turn.
async fn hostile_model() -> anyhow::Result<String> {
    async fn answer(State(()): State<()>, Json(req): Json<Value>) -> Json<Value> {
        let first = req["messages"].as_array().is_some_and(|m| m.iter().all(|m| m["role"] != "assistant"));
        let content: Vec<Value> = match first {
            true => (0..MADE_UP)
                .map(|i| json!({"type": "tool_use", "id": format!("toolu_{i:02}"), "name": format!("made_up_{i}"), "input": {}}))
                .collect(),
            false => vec![json!({"type": "text", "text": "Done."})],
        };
        Json(json!({
            "id": "msg_hostile", "type": "message", "role": "assistant", "model": req["model"],
            "content": content, "stop_reason": if first { "tool_use" } else { "end_turn" },
            "stop_sequence": null, "usage": {"input_tokens": 10, "output_tokens": 10}
        }))
    }
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().route("/v1/messages", axum::routing::post(answer)).with_state(());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{addr}"))
}

#[tokio::test]
async fn made_up_tool_names_are_counted_as_unknown() -> anyhow::Result<()> {
    let metrics = metrics_handle();
    let model = hostile_model().await?;
    let opts = FleetOptions::default();
    let rig = EngineRig::start(|_, tools| config_text("labels", &opts, &model, tools), Arc::new(OpenGuard)).await?;
    let id = rig.session("support", "call whatever you like", None)?;
    let s = rig.run(&id).await?;
    assert_eq!(s.meta.status, SessionStatus::Completed, "{:?}", s.meta);
    assert_eq!(s.ledger.len(), MADE_UP, "every made-up call got an error result");

    let text = metrics.render();
    let series: Vec<&str> = text.lines().filter(|l| l.starts_with("agentfleet_tool_call")).collect();
    assert!(series.iter().all(|l| !l.contains("made_up_")), "a made-up name became a label: {series:#?}");
    let unknown = prometheus_counter(&text, "agentfleet_tool_calls_total", r#"tool="unknown""#);
    assert!(unknown >= MADE_UP as u64, "{unknown} unknown calls counted: {series:#?}");
    rig.stop().await;
    Ok(())
}
