//! The HTTP surface: `POST /v1/chat/completions` and the `/admin` endpoints.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use super::error::ApiError;
use super::script::{self, Turn};
use super::stats::{OpenAiStats, StatsRecorder};
use super::validate::{self, Validated};

/// The largest request body accepted.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// State shared by the handlers and the [`super::OpenAiServer`] handle.
#[derive(Debug)]
pub(crate) struct AppState {
    api_key: Option<String>,
    pub(crate) stats: StatsRecorder,
}

impl AppState {
    pub(crate) fn new(api_key: Option<String>) -> Self {
        Self { api_key, stats: StatsRecorder::default() }
    }
}

/// All routes.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/admin/stats", get(stats))
        .route("/admin/reset", post(reset))
        .fallback(|| async { ApiError::not_found() })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// `POST /v1/chat/completions`: count, validate, play the script, answer.
async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    state.stats.request();
    let validated = body
        .map_err(|e| ApiError::at("body", format!("could not read the request body: {}", e.body_text())))
        .and_then(|bytes| validate::validate(&headers, &bytes, state.api_key.as_deref()));
    let response = match validated {
        Ok(valid) => answer(&state, &valid),
        Err(error) => reject(&state, error),
    };
    state.stats.status(response.status().as_u16());
    response
}

fn reject(state: &AppState, error: ApiError) -> Response {
    tracing::info!(reason = %error.message, "rejected chat completion request");
    state.stats.invalid(&error.message);
    error.into_response()
}

fn answer(state: &AppState, valid: &Validated) -> Response {
    state.stats.valid(&valid.tool_choice);
    // `tool_choice: "none"`: the tools are defined but may not be called.
    let callable: &[String] = if valid.tool_choice == "none" { &[] } else { &valid.tools };
    let context = script::Context {
        goal: &valid.goal,
        turn: valid.turn,
        tools: callable,
        last_tool_result: valid.last_tool_result.as_deref(),
    };
    (StatusCode::OK, Json(completion(valid, &script::play(&context)))).into_response()
}

#[derive(Serialize)]
struct Completion<'a> {
    id: String,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: &'static str,
    choices: [Choice<'a>; 1],
    usage: UsageOut,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    message: MessageOut<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct MessageOut<'a> {
    role: &'static str,
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCallOut<'a>>,
    refusal: Option<()>,
}

#[derive(Serialize)]
struct ToolCallOut<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionOut<'a>,
}

#[derive(Serialize)]
struct FunctionOut<'a> {
    name: &'a str,
    arguments: &'a str,
}

#[derive(Serialize)]
struct UsageOut {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    prompt_tokens_details: PromptDetails,
}

#[derive(Serialize)]
struct PromptDetails {
    cached_tokens: u64,
}

/// The 200 body. Tokens are sizes / 4, so tests can predict them: prompt = ceil(body bytes / 4),
/// cached = system bytes / 4, completion = ceil(message JSON bytes / 4), at least 1.
fn completion<'a>(valid: &'a Validated, turn: &'a Turn) -> Completion<'a> {
    let tool_calls = turn.tool_calls.iter().map(|c| ToolCallOut {
        id: &c.id,
        kind: "function",
        function: FunctionOut { name: &c.name, arguments: &c.arguments },
    });
    let message = MessageOut {
        role: "assistant",
        content: turn.content.as_deref(),
        tool_calls: tool_calls.collect(),
        refusal: None,
    };
    let completion_bytes = serde_json::to_vec(&message).map_or(0, |b| b.len());
    let prompt_tokens = to_u64(valid.body_bytes.div_ceil(4));
    let completion_tokens = to_u64(completion_bytes.div_ceil(4)).max(1);
    let usage = UsageOut {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
        prompt_tokens_details: PromptDetails { cached_tokens: to_u64(valid.system_bytes / 4).min(prompt_tokens) },
    };
    Completion {
        id: format!("chatcmpl-{}", ulid::Ulid::new()),
        object: "chat.completion",
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        model: &valid.model,
        system_fingerprint: "fp_scripted",
        choices: [Choice { index: 0, message, logprobs: None, finish_reason: turn.finish_reason }],
        usage,
    }
}

fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// `GET /admin/stats`.
async fn stats(State(state): State<Arc<AppState>>) -> Json<OpenAiStats> {
    Json(state.stats.snapshot())
}

/// `POST /admin/reset`: zeroes the stats.
async fn reset(State(state): State<Arc<AppState>>) -> StatusCode {
    state.stats.reset();
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai_server::script::ToolCall;

    #[test]
    fn completion_has_the_openai_shape_and_sized_usage() {
        let valid = Validated {
            model: "m".to_owned(),
            goal: String::new(),
            turn: 0,
            tools: Vec::new(),
            tool_choice: "absent".to_owned(),
            last_tool_result: None,
            system_bytes: 40,
            body_bytes: 401,
        };
        let call = ToolCall { id: "call_1".to_owned(), name: "t".to_owned(), arguments: "{x".to_owned() };
        let turn = Turn { content: None, tool_calls: vec![call], finish_reason: "tool_calls" };
        let body = serde_json::to_value(completion(&valid, &turn)).expect("json");
        assert_eq!(body["choices"][0]["message"]["content"], serde_json::Value::Null);
        assert_eq!(body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"], "{x");
        assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            (body["usage"]["prompt_tokens"].as_u64(), body["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64()),
            (Some(101), Some(10))
        );
        let text = Turn { content: Some("hi".to_owned()), tool_calls: Vec::new(), finish_reason: "stop" };
        let body = serde_json::to_value(completion(&valid, &text)).expect("json");
        assert!(body["choices"][0]["message"].get("tool_calls").is_none());
    }
}
