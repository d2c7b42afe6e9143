//! Property tests of every decoder of outside input: step messages, config files, model responses
//! (Anthropic and OpenAI-compatible), tool responses, and session requests over HTTP and AMQP.
//!
//! Each one is fed arbitrary bytes, arbitrary JSON, and mutations of valid input (missing fields,
//! wrong types, huge and negative numbers, unknown values, truncation, duplicate keys, non-UTF-8).
//! The property is always the same: no panic, a valid input is accepted, and every refusal carries a
//! reason a person can act on. Model and tool responses go through the real clients over HTTP (a
//! canned-response server on port 0), so status codes, headers and the body read are covered too.
//!
//! Case counts are kept moderate so the file runs in seconds in a debug build; set
//! `PROPTEST_CASES` to run more.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentfleet::config::{AnthropicConfig, Config, HandlerConfig, OpenAiConfig, ToolConfig};
use agentfleet::domain::{Name, SessionId, StepMessage};
use agentfleet::llm::types::MAX_TOKENS_PER_CALL;
use agentfleet::llm::{
    AnthropicClient, Block, CallSpec, LlmError, ModelReply, OpenAiClient, stored_content, user_message,
};
use agentfleet::tools::{Health, ToolLimits, ToolRun, ToolSet, escalate_definition};
use agentfleet_tests::fleet::{ADMIN_TOKEN, FleetOptions, TestFleet, config_text};
use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Response, StatusCode};
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Running properties

/// Runs `check` on `cases` inputs of `strategy` (or `PROPTEST_CASES`); a failure or a panic fails
/// the test with the smallest input found.
fn run<S: Strategy>(cases: u32, strategy: S, check: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(cases);
    let config = RunnerConfig { cases, failure_persistence: None, ..RunnerConfig::default() };
    let mut runner = TestRunner::new(config);
    if let Err(e) = runner.run(&strategy, check) {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Shared strategies

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
        ".{0,24}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Numbers as JSON text, including the ones `serde_json::Value` cannot hold.
fn number_text() -> impl Strategy<Value = String> {
    const ODD: &[&str] = &[
        "0",
        "-0",
        "1",
        "-1",
        "1.5",
        "-1.5",
        "1e2",
        "1e400",
        "-1e400",
        "4294967295",
        "4294967296",
        "9223372036854775807",
        "-9223372036854775808",
        "18446744073709551615",
        "18446744073709551616",
        "340282366920938463463374607431768211456",
        "0.0000001",
        "NaN",
        "Infinity",
        "01",
        "\"3\"",
        "null",
        "true",
        "[]",
        "{}",
    ];
    prop_oneof![
        4 => (0u64..1000).prop_map(|n| n.to_string()),
        2 => any::<u64>().prop_map(|n| n.to_string()),
        2 => any::<i64>().prop_map(|n| n.to_string()),
        3 => select(ODD).prop_map(str::to_owned),
    ]
}

/// A JSON string literal of any text (control characters, unicode, quotes).
fn string_text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,32}".prop_map(|s| Value::from(s).to_string()),
        select(&["\"\"", "\" \"", "\"\\u0000\"", "\"\\ud800\"", "\"😀\"", "\"\\\\\""][..]).prop_map(str::to_owned),
    ]
}

/// A field's raw JSON: the valid value mostly, else missing, another type, or anything.
fn field(valid: impl Strategy<Value = String> + 'static) -> BoxedStrategy<Option<String>> {
    prop_oneof![
        8 => valid.prop_map(Some),
        1 => Just(None),
        1 => number_text().prop_map(Some),
        1 => string_text().prop_map(Some),
        1 => json_value().prop_map(|v| Some(v.to_string())),
    ]
    .boxed()
}

/// `{"key": raw, …}` from the fields present, sometimes with the first one repeated at the end
/// (duplicate keys) and in a shuffled order.
fn object(fields: Vec<(&'static str, Option<String>)>, duplicate: bool) -> String {
    let mut parts: Vec<String> =
        fields.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{}:{v}", Value::from(*k)))).collect();
    if duplicate && let Some(first) = parts.first().cloned() {
        parts.push(first);
    }
    format!("{{{}}}", parts.join(","))
}

/// How a body is damaged in transit or by a careless producer.
#[derive(Debug, Clone)]
enum Damage {
    None,
    Truncate(Index),
    InsertByte(Index, u8),
    Wrap,
    Nest(usize),
    TrailingGarbage(String),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        12 => Just(Damage::None),
        2 => any::<Index>().prop_map(Damage::Truncate),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(at, b)| Damage::InsertByte(at, b)),
        1 => Just(Damage::Wrap),
        1 => prop_oneof![1usize..200, Just(100_000)].prop_map(Damage::Nest),
        1 => ".{1,8}".prop_map(Damage::TrailingGarbage),
    ]
}

fn apply(body: String, damage: &Damage) -> Vec<u8> {
    let mut bytes = body.into_bytes();
    match damage {
        Damage::None => {}
        Damage::Truncate(at) => bytes.truncate(at.index(bytes.len() + 1)),
        Damage::InsertByte(at, b) => bytes.insert(at.index(bytes.len() + 1), *b),
        Damage::Wrap => {
            bytes.insert(0, b'[');
            bytes.push(b']');
        }
        Damage::Nest(depth) => {
            let mut nested = "[".repeat(*depth).into_bytes();
            nested.extend_from_slice(&bytes);
            nested.extend_from_slice("]".repeat(*depth).as_bytes());
            bytes = nested;
        }
        Damage::TrailingGarbage(g) => bytes.extend_from_slice(g.as_bytes()),
    }
    bytes
}

/// Arbitrary bytes, arbitrary JSON, or a damaged variant of `valid`.
fn body_from(valid: impl Strategy<Value = String> + 'static) -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..256),
        1 => json_value().prop_map(|v| v.to_string().into_bytes()),
        6 => (valid, damage()).prop_map(|(body, d)| apply(body, &d)),
    ]
    .boxed()
}

fn reason_ok(text: &str) -> Result<(), TestCaseError> {
    prop_assert!(!text.trim().is_empty(), "a refusal without a reason");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Step messages

fn session_id_text() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => any::<u128>().prop_map(|n| Value::from(format!("s_{}", ulid::Ulid::from(n))).to_string()),
        1 => "s_[0-9A-Za-z]{0,30}".prop_map(|s| Value::from(s).to_string()),
        1 => "[a-z]_[0-9A-Z]{26}".prop_map(|s| Value::from(s).to_string()),
    ]
}

fn step_message_body() -> impl Strategy<Value = String> {
    let fields = (
        field(session_id_text()),
        field((1u32..=u32::MAX).prop_map(|n| n.to_string())),
        prop_oneof![3 => field((0u32..20).prop_map(|n| n.to_string())), 1 => Just(None)],
        prop_oneof![6 => Just(None), 1 => (".{0,8}", json_value()).prop_map(|(k, v)| Some((k, v.to_string())))],
        any::<bool>(),
    );
    fields.prop_flat_map(|(id, step, attempt, extra, duplicate)| {
        let extra = extra.map(|(k, v)| format!("{}:{v}", Value::from(k)));
        let fields = vec![("session_id", id), ("step", step), ("attempt", attempt)];
        Just(fields).prop_shuffle().prop_map(move |fields| {
            let body = object(fields, duplicate);
            match &extra {
                Some(extra) if body.len() > 2 => format!("{},{extra}}}", &body[..body.len() - 1]),
                Some(extra) => format!("{{{extra}}}"),
                None => body,
            }
        })
    })
}

fn check_step_message(body: &[u8]) -> Result<(), TestCaseError> {
    match StepMessage::parse(body) {
        Ok(msg) => {
            prop_assert!(msg.step >= 1, "step 0 accepted");
            prop_assert!(SessionId::parse(msg.session_id.as_str()).is_ok());
            let again = serde_json::to_vec(&msg).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(StepMessage::parse(&again), Ok(msg.clone()), "does not round-trip");
            prop_assert_eq!(msg.message_id(), format!("{}:{}", msg.session_id, msg.step));
        }
        Err(e) => {
            let text = e.to_string();
            let problem = text.strip_prefix("step message: ");
            prop_assert!(problem.is_some_and(|p| !p.trim().is_empty()), "refusal without a reason: {text:?}");
        }
    }
    Ok(())
}

#[test]
fn step_messages_never_panic_and_every_refusal_says_why() {
    run(1000, body_from(step_message_body()), |body| check_step_message(&body));
}

#[test]
fn valid_step_messages_round_trip() {
    let valid = (any::<u128>(), 1u32..=u32::MAX, 0u32..50);
    run(256, valid, |(id, step, attempt)| {
        let msg = StepMessage { session_id: SessionId::parse(&format!("s_{}", ulid::Ulid::from(id)))?, step, attempt };
        let body = serde_json::to_vec(&msg).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(StepMessage::parse(&body), Ok(msg));
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Config files

/// The environment the example configs are read with, plus overrides from the case.
fn example_env(extra: &[(String, String)]) -> impl Fn(&str) -> Option<String> + '_ {
    move |k: &str| {
        if let Some((_, v)) = extra.iter().find(|(name, _)| name == k) {
            return Some(v.clone());
        }
        (k == "AGENTFLEET_ADMIN_TOKEN_SHA256").then(|| "ab".repeat(32))
    }
}

/// The shipped example config and the test fleet's config: both valid as they are.
fn example_configs() -> Vec<String> {
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/agentfleet.toml");
    let local = std::fs::read_to_string(&local).unwrap_or_else(|e| panic!("{}: {e}", local.display()));
    let fleet = config_text("tfuzz", &FleetOptions::default(), "http://127.0.0.1:1", "http://127.0.0.1:2");
    let configs = vec![local, fleet];
    for (i, text) in configs.iter().enumerate() {
        if let Err(e) = Config::parse(text, Path::new("fuzz.toml"), &example_env(&[])) {
            panic!("example config {i} does not parse as it is: {e}");
        }
    }
    configs
}

/// One edit of a config file, line by line.
#[derive(Debug, Clone)]
enum Edit {
    Remove(Index),
    Duplicate(Index),
    /// Keeps `key =` and puts another value after it.
    Value(Index, String),
    Insert(Index, String),
    Truncate(Index),
}

fn toml_value() -> impl Strategy<Value = String> {
    const ODD: &[&str] = &[
        "-1",
        "0",
        "1",
        "9223372036854775807",
        "-9223372036854775808",
        "99999999999999999999",
        "1e308",
        "1e999",
        "inf",
        "-inf",
        "nan",
        "0.5",
        "-0.5",
        "\"\"",
        "\" \"",
        "\"x\"",
        "\"not a url\"",
        "\"http://\"",
        "\"amqp://\"",
        "\"redis://[::1\"",
        "\"ftp://x\"",
        "\"😀\"",
        "\"a b\"",
        "[]",
        "{}",
        "[1, \"a\"]",
        "{ kind = \"nope\" }",
        "{ kind = \"http\" }",
        "{ type = \"array\" }",
        "true",
        "1979-05-27T07:32:00Z",
        "\"amount ~ 3\"",
        "\"sum() > 1\"",
        "[\"admin\", \"root\"]",
    ];
    prop_oneof![
        3 => select(ODD).prop_map(str::to_owned),
        1 => ".{0,24}".prop_map(|s| Value::from(s).to_string()),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_map(|f| format!("{f:?}")),
    ]
}

fn toml_line() -> impl Strategy<Value = String> {
    const LINES: &[&str] = &[
        "[agents.x]",
        "[agents.support.budget]",
        "[tools.t]",
        "[[auth.tokens]]",
        "[prices.\"m\"]",
        "[tenants.acme]",
        "[tenants.\"no way\"]",
        "[providers.anthropic]",
        "[providers.mystery]",
        "[worker]",
        "[telemetry.otlp]",
        "max_steps = -3",
        "concurrency = 0",
        "lease_ms = 1",
        "daily_cap_usd = 0",
        "alert_threshold = 2.0",
        "sample_ratio = 7",
        "tools = [\"nope\"]",
        "pool = \"a b\"",
        "fallback = \"search_knowledge_base\"",
        "approval_rule = \"amount > x\"",
        "x = 1",
        "=",
        "[",
        "]]",
        "\"",
        "'''",
    ];
    prop_oneof![3 => select(LINES).prop_map(str::to_owned), 1 => ".{0,40}"]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        2 => any::<Index>().prop_map(Edit::Remove),
        1 => any::<Index>().prop_map(Edit::Duplicate),
        4 => (any::<Index>(), toml_value()).prop_map(|(i, v)| Edit::Value(i, v)),
        2 => (any::<Index>(), toml_line()).prop_map(|(i, l)| Edit::Insert(i, l)),
        1 => any::<Index>().prop_map(Edit::Truncate),
    ]
}

fn edited(text: &str, edits: &[Edit]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for e in edits {
        if lines.is_empty() {
            break;
        }
        match e {
            Edit::Remove(i) => {
                lines.remove(i.index(lines.len()));
            }
            Edit::Duplicate(i) => {
                let at = i.index(lines.len());
                lines.insert(at, lines[at].clone());
            }
            Edit::Value(i, value) => {
                // Only lines that set something: find the nearest one at or after the index.
                let start = i.index(lines.len());
                let Some(at) = (start..lines.len()).chain(0..start).find(|&j| lines[j].contains(" = ")) else {
                    continue;
                };
                let key = lines[at].split(" = ").next().unwrap_or_default().to_owned();
                lines[at] = format!("{key} = {value}");
            }
            Edit::Insert(i, line) => lines.insert(i.index(lines.len() + 1), line.clone()),
            Edit::Truncate(i) => {
                let joined = lines.join("\n");
                let mut cut = i.index(joined.len() + 1);
                while !joined.is_char_boundary(cut) {
                    cut -= 1;
                }
                lines = joined[..cut].lines().map(str::to_owned).collect();
            }
        }
    }
    lines.join("\n")
}

/// Environment overrides: the variables the loader reads, set to anything.
fn env_overrides() -> impl Strategy<Value = Vec<(String, String)>> {
    const VARS: &[&str] = &[
        "AMQP_URL",
        "REDIS_URL",
        "ANTHROPIC_BASE_URL",
        "ANTHROPIC_API_KEY",
        "OPENAI_BASE_URL",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "AGENTFLEET_ADMIN_TOKEN_SHA256",
    ];
    let value = prop_oneof![
        select(&["", " ", "not a url", "http://", "amqp://u:p@h:99999/", "redis://", "zz", "\n"][..])
            .prop_map(str::to_owned),
        ".{0,30}",
    ];
    prop::collection::vec((select(VARS).prop_map(str::to_owned), value), 0..3)
}

fn check_config(text: &str, env: &[(String, String)]) -> Result<(), TestCaseError> {
    match Config::parse(text, Path::new("fuzz.toml"), &example_env(env)) {
        Ok(cfg) => prop_assert!(!cfg.agents.is_empty(), "a config without agents was accepted"),
        Err(e) => {
            prop_assert!(!e.field.trim().is_empty(), "no field named: {e}");
            reason_ok(&e.problem)?;
            prop_assert!(e.to_string().starts_with("config error in fuzz.toml: field `"), "{e}");
            if e.field == "(file)" {
                let named = e.problem.contains("line") || e.problem.contains('`');
                prop_assert!(named, "an error of the whole file that names no position or field: {e}");
            }
        }
    }
    Ok(())
}

#[test]
fn config_files_never_panic_and_every_error_names_a_field_or_a_position() {
    let bases = example_configs();
    let edits = prop::collection::vec(edit(), 1..5);
    let strategy = (select(bases), edits, env_overrides());
    run(600, strategy, |(base, edits, env)| check_config(&edited(&base, &edits), &env));
}

#[test]
fn arbitrary_text_is_never_a_panic_as_a_config_file() {
    run(300, (".{0,400}", env_overrides()), |(text, env)| check_config(&text, &env));
}

// ---------------------------------------------------------------------------------------------
// A server that answers every request with the response of the current case

#[derive(Debug, Clone, Default)]
struct Canned {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

struct CannedServer {
    base: String,
    canned: Arc<Mutex<Canned>>,
}

impl CannedServer {
    async fn start() -> Self {
        let canned = Arc::new(Mutex::new(Canned::default()));
        let shared = canned.clone();
        let app = axum::Router::new().fallback(move || {
            let c = shared.lock().map(|c| c.clone()).unwrap_or_default();
            async move { respond(c) }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { base, canned }
    }

    fn set(&self, c: Canned) {
        if let Ok(mut slot) = self.canned.lock() {
            *slot = c;
        }
    }
}

/// The canned response; headers an HTTP server could not send are left out.
fn respond(c: Canned) -> Response<Body> {
    let mut response = Response::new(Body::from(c.body));
    *response.status_mut() = StatusCode::from_u16(c.status).unwrap_or(StatusCode::OK);
    for (name, value) in c.headers {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(&value)) {
            response.headers_mut().append(n, v);
        }
    }
    response
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

fn status() -> impl Strategy<Value = u16> {
    const ODD: &[u16] = &[
        201, 204, 206, 299, 300, 304, 400, 401, 403, 404, 408, 409, 413, 422, 429, 500, 502, 503, 504, 529, 599, 600,
        999,
    ];
    prop_oneof![6 => Just(200u16), 2 => select(ODD), 1 => 200u16..=599]
}

fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
    const NAMES: &[&str] = &[
        "retry-after",
        "retry-after-ms",
        "content-type",
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-input-tokens-remaining",
        "anthropic-ratelimit-output-tokens-remaining",
        "x-junk",
    ];
    const VALUES: &[&str] = &[
        "7",
        "0",
        "-1",
        "1e400",
        "NaN",
        "inf",
        "0.5",
        "99999999999",
        "18446744073709551616",
        "",
        "soon",
        "Wed, 21 Oct 2015 07:28:00 GMT",
        "application/json",
        "text/html; charset=utf-16",
    ];
    let value = prop_oneof![3 => select(VALUES).prop_map(str::to_owned), 1 => ".{0,16}"];
    prop::collection::vec((select(NAMES).prop_map(str::to_owned), value), 0..3)
}

/// Sometimes a large body: a valid one padded to size, or plain bytes.
fn sized(body: BoxedStrategy<Vec<u8>>) -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        20 => body,
        1 => prop_oneof![Just(64 * 1024), Just(1024 * 1024)].prop_map(|n| vec![b'x'; n]),
    ]
    .boxed()
}

// ---------------------------------------------------------------------------------------------
// Model responses

fn text_block() -> impl Strategy<Value = String> {
    (field(Just("\"text\"".to_owned())), field(string_text()))
        .prop_map(|(t, text)| object(vec![("type", t), ("text", text)], false))
}

fn tool_use_block() -> impl Strategy<Value = String> {
    let input = prop_oneof![
        3 => json_value().prop_map(|v| json!({"query": v}).to_string()),
        1 => json_value().prop_map(|v| v.to_string()),
        1 => Just("{\"a\":".to_owned()),
    ];
    (field(Just("\"tool_use\"".to_owned())), field(string_text()), field(Just("\"search\"".to_owned())), field(input))
        .prop_map(|(t, id, name, input)| object(vec![("type", t), ("id", id), ("name", name), ("input", input)], false))
}

fn other_block() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(r#"{"type":"thinking","thinking":"hm","signature":"c2ln"}"#.to_owned()),
        Just(r#"{"type":"redacted_thinking","data":"x"}"#.to_owned()),
        ".{0,12}".prop_map(|t| json!({"type": t, "x": [1, 2]}).to_string()),
        json_value().prop_map(|v| v.to_string()),
    ]
}

fn anthropic_reply() -> impl Strategy<Value = String> {
    let block = prop_oneof![3 => text_block(), 3 => tool_use_block(), 1 => other_block()];
    let content = prop::collection::vec(block, 0..5).prop_map(|b| format!("[{}]", b.join(",")));
    let stop = select(
        &[
            "\"end_turn\"",
            "\"tool_use\"",
            "\"max_tokens\"",
            "\"stop_sequence\"",
            "\"pause_turn\"",
            "\"refusal\"",
            "\"model_context_window_exceeded\"",
            "\"\"",
            "null",
        ][..],
    )
    .prop_map(str::to_owned);
    let usage = (field(number_text()), field(number_text()), field(number_text()), field(number_text())).prop_map(
        |(i, o, cc, cr)| {
            let fields = vec![
                ("input_tokens", i),
                ("output_tokens", o),
                ("cache_creation_input_tokens", cc),
                ("cache_read_input_tokens", cr),
            ];
            object(fields, false)
        },
    );
    let fields = (
        field(Just("\"msg_01\"".to_owned())),
        field(Just("\"message\"".to_owned())),
        field(content),
        field(stop),
        field(usage),
        any::<bool>(),
    );
    fields.prop_map(|(id, kind, content, stop, usage, duplicate)| {
        let role = Some("\"assistant\"".to_owned());
        let fields = vec![
            ("id", id),
            ("type", kind),
            ("role", role),
            ("content", content),
            ("stop_reason", stop),
            ("usage", usage),
        ];
        object(fields, duplicate)
    })
}

/// An error body in the Anthropic or the OpenAI shape, or something else.
fn error_body() -> impl Strategy<Value = String> {
    let detail = (field(string_text()), field(string_text()), field(number_text()))
        .prop_map(|(t, m, code)| object(vec![("type", t), ("message", m), ("code", code)], false));
    prop_oneof![
        detail.clone().prop_map(|d| format!(r#"{{"type":"error","error":{d}}}"#)),
        detail,
        string_text().prop_map(|s| format!(r#"{{"error":{s}}}"#)),
        Just("<html>bad gateway</html>".to_owned()),
        Just(String::new()),
    ]
}

fn model_case(reply: impl Strategy<Value = String> + 'static) -> impl Strategy<Value = Canned> {
    let body = sized(prop_oneof![3 => body_from(reply), 1 => body_from(error_body())].boxed());
    (status(), headers(), body).prop_map(|(status, headers, body)| Canned { status, headers, body })
}

/// What every model call's result must satisfy, given the status the server sent.
fn check_model_result(result: Result<ModelReply, LlmError>, status: u16) -> Result<(), TestCaseError> {
    let success = (200..300).contains(&status);
    match result {
        Ok(reply) => {
            prop_assert!(success, "HTTP {status} gave a reply");
            check_reply(&reply)?;
        }
        Err(LlmError::Api { status: got, kind, message, retry_after }) => {
            prop_assert!(!success, "HTTP {status} was an API error");
            prop_assert_eq!(got, status);
            reason_ok(&kind)?;
            reason_ok(&message)?;
            prop_assert!(retry_after.is_none_or(|d| d <= Duration::from_secs(86_400)), "{retry_after:?}");
        }
        Err(LlmError::Decode(detail)) => {
            prop_assert!(success, "HTTP {status} was a decode error: {detail}");
            reason_ok(&detail)?;
        }
        Err(other) => prop_assert!(false, "HTTP {status} gave {other:?}"),
    }
    Ok(())
}

/// A reply is something the engine can store and read back.
fn check_reply(reply: &ModelReply) -> Result<(), TestCaseError> {
    prop_assert!(!reply.stop_reason.label().is_empty());
    let u = &reply.usage;
    let counts = [u.input_tokens, u.output_tokens, u.cache_creation_input_tokens, u.cache_read_input_tokens];
    prop_assert!(counts.iter().all(|n| *n <= MAX_TOKENS_PER_CALL), "absurd usage accepted: {u:?}");
    prop_assert!(counts.iter().try_fold(0u64, |sum, n| sum.checked_add(*n)).is_some(), "{u:?}");
    let _ = reply.text();
    let stored = reply.assistant_message();
    let value: Value = serde_json::from_str(&stored).map_err(|e| TestCaseError::fail(format!("{e}: {stored}")))?;
    prop_assert_eq!(&value["role"], "assistant");
    let back = stored_content(&stored).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(back.len(), reply.block_views().len());
    let views: Vec<Block> = back.iter().map(|b| Block::view(b)).collect();
    prop_assert_eq!(views.as_slice(), reply.block_views(), "a stored block reads as the reply's view");
    Ok(())
}

fn call_spec() -> CallSpec<'static> {
    CallSpec { model: "m", system: "s", max_tokens: 100, tools: None, tool_choice: None, cache: None }
}

fn conversation() -> Vec<String> {
    vec![user_message("hi")]
}

#[test]
fn anthropic_responses_never_panic_and_every_refusal_says_why() {
    let rt = runtime();
    let server = rt.block_on(CannedServer::start());
    let cfg = AnthropicConfig {
        base_url: server.base.clone(),
        api_key: Some("k".into()),
        timeout_ms: 30_000,
        ..AnthropicConfig::default()
    };
    let client = AnthropicClient::new(&cfg).expect("client");
    let messages = conversation();
    run(600, model_case(anthropic_reply()), |canned| {
        let status = canned.status;
        server.set(canned);
        check_model_result(rt.block_on(client.create_message(&call_spec(), &messages[..])), status)
    });
}

fn openai_reply() -> impl Strategy<Value = String> {
    let arguments = prop_oneof![
        3 => json_value().prop_map(|v| Value::from(json!({"query": v}).to_string()).to_string()),
        1 => string_text(),
        1 => json_value().prop_map(|v| v.to_string()),
    ];
    let call = (field(string_text()), field(Just("\"function\"".to_owned())), field(string_text()), field(arguments))
        .prop_map(|(id, kind, name, arguments)| {
            let function = object(vec![("name", name), ("arguments", arguments)], false);
            object(vec![("id", id), ("type", kind), ("function", Some(function))], false)
        });
    let calls = prop::collection::vec(call, 0..4).prop_map(|c| format!("[{}]", c.join(",")));
    let content = prop_oneof![
        string_text(),
        Just("null".to_owned()),
        Just(r#"[{"type":"text","text":"a"},{"type":"image_url"}]"#.to_owned())
    ];
    let message = (field(content), field(calls), field(string_text())).prop_map(|(content, calls, refusal)| {
        let role = Some("\"assistant\"".to_owned());
        object(vec![("role", role), ("content", content), ("tool_calls", calls), ("refusal", refusal)], false)
    });
    let finish =
        select(&["\"stop\"", "\"length\"", "\"tool_calls\"", "\"content_filter\"", "\"abort\"", "null", "\"\""][..])
            .prop_map(str::to_owned);
    let choice = (field(message), field(finish))
        .prop_map(|(m, f)| object(vec![("index", Some("0".into())), ("message", m), ("finish_reason", f)], false));
    let choices = prop::collection::vec(choice, 0..3).prop_map(|c| format!("[{}]", c.join(",")));
    let usage = (field(number_text()), field(number_text()), field(number_text())).prop_map(|(p, c, cached)| {
        let details = cached.map(|n| format!(r#"{{"cached_tokens":{n}}}"#));
        object(vec![("prompt_tokens", p), ("completion_tokens", c), ("prompt_tokens_details", details)], false)
    });
    (field(Just("\"chatcmpl-1\"".to_owned())), field(choices), field(usage), any::<bool>()).prop_map(
        |(id, choices, usage, duplicate)| {
            let object_kind = Some("\"chat.completion\"".to_owned());
            object(vec![("id", id), ("object", object_kind), ("choices", choices), ("usage", usage)], duplicate)
        },
    )
}

/// The client's promises about tool calls: unique, portable ids and object inputs.
fn check_tool_calls(reply: &ModelReply) -> Result<(), TestCaseError> {
    let mut ids = std::collections::HashSet::new();
    for block in reply.block_views() {
        if let Block::ToolUse(call) = block {
            let portable = (1..=128).contains(&call.id.len())
                && call.id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            prop_assert!(portable, "tool call id {:?}", call.id);
            prop_assert!(ids.insert(call.id.clone()), "tool call id {:?} twice", call.id);
            prop_assert!(call.input.is_object(), "tool input {}", call.input);
        }
    }
    Ok(())
}

#[test]
fn openai_responses_never_panic_and_every_refusal_says_why() {
    let rt = runtime();
    let server = rt.block_on(CannedServer::start());
    let cfg = OpenAiConfig { base_url: format!("{}/v1", server.base), timeout_ms: 30_000, ..OpenAiConfig::default() };
    let client = OpenAiClient::new(&cfg).expect("client");
    let messages = conversation();
    run(600, model_case(openai_reply()), |canned| {
        let status = canned.status;
        server.set(canned);
        let result = rt.block_on(client.create_message(&call_spec(), &messages[..]));
        if let Ok(reply) = &result {
            check_tool_calls(reply)?;
        }
        check_model_result(result, status)
    });
}

// ---------------------------------------------------------------------------------------------
// Tool responses

/// The longest result the fuzzed tool keeps.
const MAX_RESULT: usize = 1024;

fn tool_case() -> impl Strategy<Value = Canned> {
    let json_body = json_value().prop_map(|v| v.to_string().into_bytes());
    let text = ".{0,64}".prop_map(String::into_bytes);
    let bytes = prop::collection::vec(any::<u8>(), 0..256);
    let body = sized(prop_oneof![json_body, text, bytes, Just(Vec::new())].boxed());
    (status(), headers(), body).prop_map(|(status, headers, body)| Canned { status, headers, body })
}

fn fuzz_tool(base: &str) -> ToolSet {
    let name = Name::parse("t").expect("name");
    let def = ToolConfig {
        description: "d".into(),
        input_schema: json!({"type": "object"}),
        handler: HandlerConfig::Http {
            url: format!("{base}/t"),
            method: "POST".into(),
            timeout_ms: 30_000,
            headers_from_env: BTreeMap::new(),
        },
        retries: 1,
        retry_backoff_ms: 1,
        ..escalate_definition()
    };
    let defs = BTreeMap::from([(name.clone(), def)]);
    // No in-process wait at all: a retryable answer becomes `Later` at once (or is retried once
    // at once, when it asks for no wait).
    let limits = ToolLimits { max_inline_wait: Duration::ZERO, max_result_bytes: MAX_RESULT, ..ToolLimits::default() };
    ToolSet::build(&[name], &defs, &|_| None, limits).expect("tool set")
}

fn check_tool_run(run: ToolRun, canned: &Canned) -> Result<(), TestCaseError> {
    let status = canned.status;
    // The outcome quotes at most the capped body, inside a sentence.
    let bounded = |text: &str| text.len() <= MAX_RESULT + 300;
    match (status, run) {
        (200..=299, ToolRun::Done(out, Health::Up)) => {
            prop_assert!(!out.is_error, "HTTP {status} was an error: {}", out.content);
            prop_assert!(bounded(&out.content), "a result of {} bytes", out.content.len());
            // 204 and 304 have no body, whatever the server wrote.
            if let Ok(text) = std::str::from_utf8(&canned.body)
                && !matches!(status, 204 | 304)
                && text.len() <= MAX_RESULT
                && !canned.headers.iter().any(|(n, _)| n == "content-type")
            {
                prop_assert_eq!(out.content.as_str(), text);
            }
        }
        (408 | 429 | 500..=599, ToolRun::Later(wait, why)) => {
            prop_assert!(wait <= Duration::from_secs(86_400), "{wait:?}");
            prop_assert!(why.contains(&format!("HTTP {status}")), "{why}");
            prop_assert!(bounded(&why), "a reason of {} bytes", why.len());
        }
        (408 | 429 | 500..=599, ToolRun::Done(out, Health::Down)) => {
            prop_assert!(out.is_error && out.content.contains("is failing"), "{}", out.content);
            prop_assert!(bounded(&out.content), "a reason of {} bytes", out.content.len());
        }
        (_, ToolRun::Done(out, Health::Up)) if !(200..=299).contains(&status) => {
            let expected = format!("rejected the call: HTTP {status}");
            prop_assert!(out.is_error && out.content.contains(&expected), "{}", out.content);
            prop_assert!(bounded(&out.content), "a reason of {} bytes", out.content.len());
        }
        (_, other) => prop_assert!(false, "HTTP {status} gave {other:?}"),
    }
    Ok(())
}

#[test]
fn tool_responses_never_panic_and_every_failure_tells_the_model_why() {
    let rt = runtime();
    let server = rt.block_on(CannedServer::start());
    let tools = fuzz_tool(&server.base);
    let call = agentfleet::llm::ToolUse { id: "toolu_1".into(), name: "t".into(), input: json!({"q": 1}) };
    run(400, tool_case(), |canned| {
        server.set(canned.clone());
        check_tool_run(rt.block_on(tools.run(&call, "s_x:toolu_1")), &canned)
    });
}

// ---------------------------------------------------------------------------------------------
// Session requests: `POST /v1/sessions` and the AMQP requests queue

fn create_body() -> impl Strategy<Value = String> {
    let agent = prop_oneof![4 => Just("\"support\"".to_owned()), 1 => string_text()];
    let input = prop_oneof![
        4 => ".{1,40}".prop_map(|s| Value::from(format!("[steps=1] {s}")).to_string()),
        1 => string_text(),
        1 => Just(Value::from("x".repeat(70 * 1024)).to_string()),
    ];
    let metadata = prop_oneof![
        json_value().prop_map(|v| json!({"k": v}).to_string()),
        Just(json!({"big": "y".repeat(17 * 1024)}).to_string()),
    ];
    let budget = (field(number_text()), field(number_text()))
        .prop_map(|(steps, cost)| object(vec![("max_steps", steps), ("max_cost_usd", cost)], false));
    let fields = (
        field(agent),
        field(input),
        prop_oneof![3 => Just(None), 1 => field(metadata)],
        prop_oneof![3 => Just(None), 1 => field(string_text())],
        prop_oneof![3 => Just(None), 1 => field(select(&["\"acme\"", "\"no way\""][..]).prop_map(str::to_owned))],
        prop_oneof![3 => Just(None), 1 => field(budget)],
        prop_oneof![3 => Just(None), 1 => field(string_text())],
        prop_oneof![8 => Just(None), 1 => Just(Some("1".to_owned()))],
        any::<bool>(),
    );
    fields.prop_map(|(agent, input, metadata, key, tenant, budget, callback, extra, duplicate)| {
        let fields = vec![
            ("agent", agent),
            ("input", input),
            ("metadata", metadata),
            ("idempotency_key", key),
            ("tenant", tenant),
            ("budget", budget),
            ("callback_url", callback),
            ("colour", extra),
        ];
        object(fields, duplicate)
    })
}

/// A client that sends `token` and opens a connection per request: the dispatcher closes the
/// connection of a 413, and a pooled client may try to reuse it for the next case.
fn unpooled_client(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    let bearer = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).expect("header");
    headers.insert(reqwest::header::AUTHORIZATION, bearer);
    reqwest::Client::builder().default_headers(headers).pool_max_idle_per_host(0).build().expect("client")
}

/// An error answer in the API's shape, with a message.
fn check_error_body(status: u16, body: &[u8]) -> Result<(), TestCaseError> {
    let value: Value = serde_json::from_slice(body).map_err(|_| {
        TestCaseError::fail(format!("HTTP {status} body is not JSON: {}", String::from_utf8_lossy(body)))
    })?;
    let kind = value["error"]["type"].as_str().unwrap_or_default();
    let message = value["error"]["message"].as_str().unwrap_or_default();
    prop_assert!(!kind.is_empty() && !message.trim().is_empty(), "HTTP {status}: {value}");
    Ok(())
}

#[test]
fn session_requests_over_http_get_a_session_or_a_client_error_with_a_message() {
    let rt = runtime();
    let fleet = rt.block_on(TestFleet::start(FleetOptions { workers: 0, ..Default::default() })).expect("fleet");
    let content_type = prop_oneof![6 => Just(Some("application/json")), 1 => Just(None), 1 => Just(Some("text/plain"))];
    // Over the body limit too. The dispatcher answers 413 as soon as it sees the length and closes
    // the connection, so a client still writing a large body may see the connection reset instead
    // of the answer: a fact of HTTP (clients that care send `Expect: 100-continue`), allowed for
    // bodies over the limit only.
    let limit = fleet.config.dispatcher.max_body_bytes;
    let client = unpooled_client(ADMIN_TOKEN);
    let body = prop_oneof![20 => body_from(create_body()), 1 => Just(vec![b'x'; 300 * 1024])];
    run(300, (body, content_type), |(body, content_type)| {
        let over_limit = body.len() > limit;
        let mut request = client.post(format!("{}/v1/sessions", fleet.api)).body(body);
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        let answer = rt.block_on(async {
            let response = request.send().await?;
            Ok::<_, reqwest::Error>((response.status().as_u16(), response.bytes().await?))
        });
        let (status, answer) = match answer {
            Ok(answer) => answer,
            Err(e) if over_limit && e.is_request() => return Ok(()),
            Err(e) => return Err(TestCaseError::fail(format!("{:#}", anyhow::Error::from(e)))),
        };
        match status {
            202 => {
                let value: Value = serde_json::from_slice(&answer).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(value["id"].as_str().is_some_and(|id| SessionId::parse(id).is_ok()), "{value}");
            }
            400..=499 => check_error_body(status, &answer)?,
            _ => prop_assert!(false, "HTTP {status}: {}", String::from_utf8_lossy(&answer)),
        }
        Ok(())
    });
    rt.block_on(fleet.cleanup()).expect("cleanup");
}

#[test]
fn session_requests_over_amqp_are_each_answered_with_a_session_or_a_reason() {
    use futures::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;

    let rt = runtime();
    let fleet = rt.block_on(TestFleet::start(FleetOptions { workers: 0, ..Default::default() })).expect("fleet");
    let (conn, ch, reply_to, consumer) = rt
        .block_on(async {
            let (conn, ch) = fleet.amqp().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            let opts = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
            let q = ch.queue_declare("".into(), opts, FieldTable::default()).await?;
            let consume = BasicConsumeOptions { no_ack: true, ..Default::default() };
            let consumer = ch.basic_consume(q.name().clone(), "".into(), consume, FieldTable::default()).await?;
            anyhow::Ok((conn, ch, q.name().to_string(), consumer))
        })
        .expect("amqp");
    let consumer = tokio::sync::Mutex::new(consumer);
    let requests = format!("{}.requests", fleet.config.amqp.prefix);
    let counter = std::sync::atomic::AtomicU64::new(0);
    let user = prop_oneof![6 => Just(Some("guest")), 1 => Just(None)];
    run(150, (body_from(create_body()), user, prop::option::of("[ -~]{0,40}")), |(body, user, message_id)| {
        let cid = format!("case-{}", counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let mut props = lapin::BasicProperties::default()
            .with_correlation_id(cid.as_str().into())
            .with_reply_to(reply_to.as_str().into());
        if let Some(user) = user {
            props = props.with_user_id(user.into());
        }
        if let Some(id) = message_id {
            props = props.with_message_id(id.into());
        }
        let reply = rt
            .block_on(async {
                let opts = BasicPublishOptions { mandatory: true, ..Default::default() };
                ch.basic_publish("".into(), requests.as_str().into(), opts, &body, props).await?.await?;
                let mut consumer = consumer.lock().await;
                let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
                    .await
                    .map_err(|_| anyhow::anyhow!("no reply to {cid} within 30 s"))?
                    .ok_or_else(|| anyhow::anyhow!("the reply consumer ended"))??;
                anyhow::Ok(delivery)
            })
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let got = reply.properties.correlation_id().as_ref().map(|c| c.to_string());
        prop_assert_eq!(got.as_deref(), Some(cid.as_str()), "a reply to another request");
        let value: Value = serde_json::from_slice(&reply.data).map_err(|e| TestCaseError::fail(e.to_string()))?;
        if value.get("error").is_some() {
            check_error_body(400, &reply.data)?;
        } else {
            prop_assert!(value["id"].as_str().is_some_and(|id| SessionId::parse(id).is_ok()), "{value}");
        }
        Ok(())
    });
    rt.block_on(async {
        let _ = conn.close(200, "done".into()).await;
        fleet.cleanup().await
    })
    .expect("cleanup");
}
