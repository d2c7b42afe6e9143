//! The HTTP surface: `POST /tools/{name}` and the `/admin` endpoints.
//!
//! A tool call reads as its steps: count it, wait, maybe fail on purpose, parse, run the tool.

use std::sync::{Arc, PoisonError, RwLock};

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::Value;

use super::ToolServerConfig;
use super::behaviour::Behaviour;
use super::stats::{ToolStats, ToolStatsRecorder};
use super::tools::{self, TicketDesk, ToolError};

/// State shared by the handlers and the [`super::ToolServer`] handle.
#[derive(Debug)]
pub(crate) struct AppState {
    behaviour: RwLock<Behaviour>,
    pub(crate) stats: ToolStatsRecorder,
    pub(crate) desk: TicketDesk,
}

impl AppState {
    pub(crate) fn new(config: ToolServerConfig) -> Self {
        let behaviour = RwLock::new(config.behaviour);
        Self { behaviour, stats: ToolStatsRecorder::default(), desk: TicketDesk::default() }
    }

    /// The behaviour in force.
    pub(crate) fn behaviour(&self) -> Behaviour {
        self.behaviour.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Replaces the behaviour.
    pub(crate) fn set_behaviour(&self, behaviour: Behaviour) {
        *self.behaviour.write().unwrap_or_else(PoisonError::into_inner) = behaviour;
    }

    /// Zeroes the stats and forgets idempotency keys.
    pub(crate) fn reset(&self) {
        self.stats.reset();
        self.desk.forget_keys();
    }
}

/// All routes.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/tools/{name}", post(call_tool))
        .route("/admin/stats", get(stats))
        .route("/admin/behaviour", post(set_behaviour))
        .route("/admin/reset", post(reset))
        .fallback(not_found)
        .with_state(state)
}

/// `POST /tools/{name}`.
async fn call_tool(
    State(state): State<Arc<AppState>>,
    name: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Ok(Path(name)) = name else {
        return ToolError::bad_request("path: invalid tool name").into_response();
    };
    let key = idempotency_key(&headers);
    state.stats.call(&name, key);
    let behaviour = state.behaviour().for_tool(&name);
    tokio::time::sleep(behaviour.delay()).await;
    if behaviour.draw_failure() {
        state.stats.failure();
        return ToolError::injected(behaviour.fail_status).into_response();
    }
    if let Some(flood) = flood(&name) {
        return flood;
    }
    match run(&state, &name, key, body) {
        Ok(output) => {
            state.stats.executed(key);
            Json(output).into_response()
        }
        Err(error) => error.into_response(),
    }
}

/// The size of `huge_response`'s body: 64 MiB, declared in `Content-Length`.
pub(crate) const HUGE_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Bodies for the bounded-read tests, made as they are sent (the server holds one 64 KiB chunk):
/// `endless_response` streams `x` forever with no `Content-Length`, `huge_response` declares and
/// sends [`HUGE_RESPONSE_BYTES`]. Both stop when the client hangs up.
fn flood(name: &str) -> Option<Response> {
    const CHUNK: usize = 64 * 1024;
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let chunks = futures::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
    match name {
        "endless_response" => Some(Response::new(Body::from_stream(chunks))),
        "huge_response" => {
            let body = Body::from_stream(chunks.take(HUGE_RESPONSE_BYTES / CHUNK));
            Some(([(header::CONTENT_LENGTH, HUGE_RESPONSE_BYTES.to_string())], body).into_response())
        }
        _ => None,
    }
}

/// Parses the body and runs the tool.
fn run(
    state: &AppState,
    name: &str,
    key: Option<&str>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Value, ToolError> {
    let bytes = body.map_err(|rejection| ToolError::bad_request(format!("body: {}", rejection.body_text())))?;
    let input = tools::parse_input(&bytes)?;
    match name {
        "search_knowledge_base" => tools::search_knowledge_base(&input),
        "lookup_customer" => tools::lookup_customer(&input),
        "check_order_status" => tools::check_order_status(&input),
        "create_ticket" => tools::create_ticket(&input, &state.desk, key),
        other => Ok(tools::echo(other, input)),
    }
}

/// The `Idempotency-Key` header, when present and readable.
fn idempotency_key(headers: &HeaderMap) -> Option<&str> {
    headers.get("idempotency-key").and_then(|value| value.to_str().ok())
}

/// `GET /admin/stats`.
async fn stats(State(state): State<Arc<AppState>>) -> Json<ToolStats> {
    Json(state.stats.snapshot())
}

/// `POST /admin/behaviour` with a [`Behaviour`] body.
async fn set_behaviour(
    State(state): State<Arc<AppState>>,
    body: Result<Json<Behaviour>, JsonRejection>,
) -> Result<Json<Behaviour>, ToolError> {
    let Json(behaviour) =
        body.map_err(|rejection| ToolError::bad_request(format!("behaviour: {}", rejection.body_text())))?;
    behaviour.validate().map_err(|e| ToolError::bad_request(format!("behaviour: {e}")))?;
    state.set_behaviour(behaviour.clone());
    Ok(Json(behaviour))
}

/// `POST /admin/reset`.
async fn reset(State(state): State<Arc<AppState>>) -> StatusCode {
    state.reset();
    StatusCode::NO_CONTENT
}

async fn not_found() -> ToolError {
    ToolError { status: StatusCode::NOT_FOUND, message: "not found".to_owned() }
}
