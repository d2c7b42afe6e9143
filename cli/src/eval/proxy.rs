//! The model API as the eval's fleet sees it: passed through, recorded, or replayed.
//!
//! The eval's fleet sends its Anthropic Messages calls here (its `anthropic.base_url`), so the
//! workers' real client code runs every time. A call belongs to the case whose input is its first
//! message, and is the case's turn *k* when the request holds *k* assistant messages.
//!
//! - **Pass** forwards each request to the upstream API and its answer back.
//! - **Record** does the same and keeps, per case and turn, the last request answered 200 and its
//!   answer; [`Proxy::save`] writes them to one file per case.
//! - **Replay** answers from those files without any upstream. A request that differs from the
//!   recorded one (a changed system prompt, tools, model, or an assistant or user turn) is answered
//!   400 and reported as a mismatch for its case, never silently answered. Tool results' content is
//!   left out of the comparison (a changed tool is what replay lets you evaluate), and so are the
//!   `cache_control` markers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// Headers passed on to the upstream API.
const FORWARDED: [&str; 5] = ["x-api-key", "authorization", "anthropic-version", "anthropic-beta", "content-type"];

/// What the proxy does with a call.
#[derive(Debug)]
pub(crate) enum Mode {
    Pass { upstream: String },
    Record { upstream: String, dir: PathBuf },
    Replay { dir: PathBuf },
}

/// One answered call of a case.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Exchange {
    turn: usize,
    request: Value,
    response: Value,
}

/// A case's recording, as stored in `<dir>/<case id>.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Recording {
    case: String,
    key: String,
    exchanges: Vec<Exchange>,
}

#[derive(Default)]
struct Calls {
    /// By case key: the exchanges recorded (record) or loaded (replay).
    exchanges: HashMap<String, Vec<Exchange>>,
    /// By case key: what did not match the recording.
    mismatches: HashMap<String, Vec<String>>,
    /// By case key: the calls answered.
    answered: HashMap<String, u64>,
}

struct Shared {
    mode: Mode,
    http: reqwest::Client,
    calls: Mutex<Calls>,
}

/// A running proxy.
#[derive(Clone)]
pub(crate) struct Proxy {
    shared: Arc<Shared>,
    /// Its base URL, for the fleet's `anthropic.base_url`.
    pub(crate) url: String,
}

/// The key of the case whose first message has `content`: a text, or blocks, where the fleet may
/// have put a cache marker (the newest message's last block carries one).
pub(crate) fn case_key(content: &Value) -> String {
    let blocks = match content {
        Value::String(text) => json!([{ "type": "text", "text": text }]),
        other => comparable(other),
    };
    let digest = Sha256::digest(blocks.to_string().as_bytes());
    digest.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

impl Proxy {
    /// Starts the proxy on a loopback port; it stops with `shutdown`. Replay loads its recordings.
    pub(crate) async fn start(mode: Mode, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let mut calls = Calls::default();
        if let Mode::Replay { dir } = &mode {
            calls.exchanges = load_recordings(dir)?;
        }
        let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(600)).build()?;
        let shared = Arc::new(Shared { mode, http, calls: Mutex::new(calls) });
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let app = Router::new().fallback(handle).with_state(shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
        });
        Ok(Self { shared, url })
    }

    /// What did not match the recording for the case with `key`.
    pub(crate) fn mismatches(&self, key: &str) -> Vec<String> {
        self.calls().mismatches.get(key).cloned().unwrap_or_default()
    }

    /// Whether a recording exists for `key` (replay).
    pub(crate) fn has_recording(&self, key: &str) -> bool {
        self.calls().exchanges.contains_key(key)
    }

    /// Record mode: writes the case's recording to `<dir>/<id>.json`.
    pub(crate) fn save(&self, id: &str, key: &str) -> anyhow::Result<()> {
        let Mode::Record { dir, .. } = &self.shared.mode else { return Ok(()) };
        let mut exchanges = self.calls().exchanges.get(key).cloned().unwrap_or_default();
        exchanges.sort_by_key(|e| e.turn);
        let recording = Recording { case: id.to_owned(), key: key.to_owned(), exchanges };
        let path = dir.join(format!("{id}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(&recording)?)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    fn calls(&self) -> std::sync::MutexGuard<'_, Calls> {
        self.shared.calls.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn load_recordings(dir: &Path) -> anyhow::Result<HashMap<String, Vec<Exchange>>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("--replay {}: cannot read it", dir.display()))?;
    let mut out = HashMap::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let text = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let recording: Recording =
            serde_json::from_slice(&text).with_context(|| format!("{}: not a recording", path.display()))?;
        out.insert(recording.key, recording.exchanges);
    }
    if out.is_empty() {
        anyhow::bail!("--replay {}: no recordings (*.json from --record) in it", dir.display());
    }
    Ok(out)
}

async fn handle(State(s): State<Arc<Shared>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let request: Option<Value> = serde_json::from_slice(&body).ok();
    let located = request.as_ref().filter(|_| uri.path() == "/v1/messages").and_then(locate);
    match (&s.mode, located) {
        (Mode::Replay { .. }, Some((key, turn))) => replay(&s, &key, turn, request.as_ref()),
        (Mode::Replay { .. }, None) => {
            error(StatusCode::NOT_FOUND, "not_found_error", "replay answers only /v1/messages")
        }
        (Mode::Pass { upstream } | Mode::Record { upstream, .. }, located) => {
            let answer = forward(&s, upstream, &path, &headers, body).await;
            if let (Mode::Record { .. }, Some((key, turn)), Ok((StatusCode::OK, bytes))) = (&s.mode, &located, &answer)
                && let (Some(request), Ok(response)) = (request, serde_json::from_slice::<Value>(bytes))
            {
                let mut calls = s.calls.lock().unwrap_or_else(PoisonError::into_inner);
                let list = calls.exchanges.entry(key.clone()).or_default();
                list.retain(|e| e.turn != *turn);
                list.push(Exchange { turn: *turn, request, response });
            }
            match answer {
                Ok((status, bytes)) => (status, [("content-type", "application/json")], bytes).into_response(),
                Err(e) => error(StatusCode::BAD_GATEWAY, "api_error", &format!("the eval's proxy: {e:#}")),
            }
        }
    }
}

/// The case key and turn of a Messages request.
fn locate(request: &Value) -> Option<(String, usize)> {
    let messages = request.get("messages")?.as_array()?;
    let first = messages.first()?.get("content")?;
    let turn = messages.iter().filter(|m| m["role"] == "assistant").count();
    Some((case_key(first), turn))
}

async fn forward(
    s: &Shared,
    upstream: &str,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let mut request = s.http.post(format!("{}{path}", upstream.trim_end_matches('/'))).body(body);
    for name in FORWARDED {
        if let Some(value) = headers.get(name) {
            request = request.header(name, value);
        }
    }
    let answer = request.send().await.context("no answer from the model API")?;
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    Ok((status, answer.bytes().await?))
}

fn replay(s: &Shared, key: &str, turn: usize, request: Option<&Value>) -> Response {
    let mut calls = s.calls.lock().unwrap_or_else(PoisonError::into_inner);
    let recorded = calls.exchanges.get(key).and_then(|list| list.iter().find(|e| e.turn == turn)).cloned();
    let problem = match (&recorded, request) {
        (None, _) if !calls.exchanges.contains_key(key) => {
            "no recording has this first message (a changed input, or a case not recorded)".to_owned()
        }
        (None, _) => format!("the recording ends before turn {} (the fleet asked for more turns)", turn + 1),
        (Some(_), None) => "the request is not JSON".to_owned(),
        (Some(e), Some(request)) => match first_difference(&comparable(&e.request), &comparable(request), "") {
            None => {
                *calls.answered.entry(key.to_owned()).or_default() += 1;
                return (StatusCode::OK, axum::Json(e.response.clone())).into_response();
            }
            Some(diff) => format!("turn {}: {diff}", turn + 1),
        },
    };
    calls.mismatches.entry(key.to_owned()).or_default().push(problem.clone());
    error(StatusCode::BAD_REQUEST, "invalid_request_error", &format!("replay mismatch: {problem}"))
}

/// The request as compared: without `cache_control` markers, and tool results without content.
fn comparable(v: &Value) -> Value {
    match v {
        Value::Object(map) => {
            let is_result = map.get("type").and_then(Value::as_str) == Some("tool_result");
            let kept = map.iter().filter(|(k, _)| *k != "cache_control" && !(is_result && *k == "content"));
            Value::Object(kept.map(|(k, v)| (k.clone(), comparable(v))).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(comparable).collect()),
        other => other.clone(),
    }
}

/// Where `now` first differs from `then`, as `path: recorded X, now Y`.
fn first_difference(then: &Value, now: &Value, path: &str) -> Option<String> {
    let here = || if path.is_empty() { "the request".to_owned() } else { path.to_owned() };
    match (then, now) {
        (Value::Object(a), Value::Object(b)) => {
            let keys = a.keys().chain(b.keys().filter(|k| !a.contains_key(*k)));
            for key in keys {
                let sub = format!("{}{}{key}", path, if path.is_empty() { "" } else { "." });
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => {
                        if let Some(d) = first_difference(x, y, &sub) {
                            return Some(d);
                        }
                    }
                    (Some(_), None) => return Some(format!("{sub}: recorded, now absent")),
                    (None, Some(y)) => return Some(format!("{sub}: absent when recorded, now {}", short(y))),
                    (None, None) => {}
                }
            }
            None
        }
        (Value::Array(a), Value::Array(b)) => {
            if let Some(d) =
                a.iter().zip(b).enumerate().find_map(|(i, (x, y))| first_difference(x, y, &format!("{path}[{i}]")))
            {
                return Some(d);
            }
            (a.len() != b.len()).then(|| format!("{}: {} items recorded, now {}", here(), a.len(), b.len()))
        }
        (a, b) if a == b => None,
        (Value::String(a), Value::String(b)) => {
            // Long texts (a system prompt) are shown from a little before where they part.
            let at = a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count();
            let from = at.saturating_sub(20);
            let part = |s: &str| {
                let tail: String = s.chars().skip(from).take(60).collect();
                format!(
                    "{}{tail}{}",
                    if from > 0 { "…" } else { "" },
                    if s.chars().count() > from + 60 { "…" } else { "" }
                )
            };
            Some(format!("{} (from character {at}): recorded \"{}\", now \"{}\"", here(), part(a), part(b)))
        }
        (a, b) => Some(format!("{}: recorded {}, now {}", here(), short(a), short(b))),
    }
}

/// At most 80 characters of `v`'s JSON.
fn short(v: &Value) -> String {
    let text = v.to_string();
    if text.chars().count() <= 80 { text } else { format!("{}…", text.chars().take(80).collect::<String>()) }
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({ "type": "error", "error": { "type": kind, "message": message } });
    (status, axum::Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_and_tool_result_content_are_not_compared() {
        let then = json!({"system": [{"type": "text", "text": "p", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "a"}]}]});
        let now = json!({"system": [{"type": "text", "text": "p"}],
            "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "b"}]}]});
        assert_eq!(first_difference(&comparable(&then), &comparable(&now), ""), None);
    }

    #[test]
    fn a_changed_prompt_is_named() {
        let then = json!({"model": "m", "system": [{"type": "text", "text": "Be brief."}], "messages": []});
        let now = json!({"model": "m", "system": [{"type": "text", "text": "Be chatty."}], "messages": []});
        let diff = first_difference(&comparable(&then), &comparable(&now), "").expect("differs");
        assert_eq!(diff, r#"system[0].text (from character 3): recorded "Be brief.", now "Be chatty.""#);
        let fewer = first_difference(&json!({"tools": [1, 2]}), &json!({"tools": [1]}), "").expect("differs");
        assert_eq!(fewer, "tools: 2 items recorded, now 1");
    }

    #[test]
    fn calls_are_located_by_first_message_and_turn() {
        let request = json!({"messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": []}, {"role": "user", "content": []}]});
        assert_eq!(locate(&request), Some((case_key(&json!("hi")), 1)));
        assert_eq!(locate(&json!({"messages": []})), None);
    }
}
