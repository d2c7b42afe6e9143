//! The HTTP surface: `POST /v1/messages` and the `/admin` endpoints.
//!
//! `/v1/messages` reads as its steps: count, validate, delay, maybe inject a fault, play the script,
//! read and write the prompt cache, answer. Every response, including 404s and admin answers,
//! carries a `request-id: req_<ulid>`.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, FailedToBufferBody, JsonRejection};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::cache::CacheStore;
use super::error::{ApiError, ErrorKind};
use super::faults::Faults;
use super::recorded::{CacheUsage, RequestLog};
use super::stats::{GoalRecorder, ModelStats, StatsRecorder};
use super::validate::{self, Validated};
use super::{ModelServerConfig, response, script};
use crate::serve::Connections;

/// The largest request body accepted, as the real API's 32 MB.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// State shared by the handlers and the [`super::ModelServer`] handle.
#[derive(Debug)]
pub(crate) struct AppState {
    api_key: Option<String>,
    faults: RwLock<Faults>,
    stats: StatsRecorder,
    pub(crate) by_goal: GoalRecorder,
    connections: Arc<Connections>,
    /// The prompt cache: the one state answers depend on.
    cache: CacheStore,
    /// Whether answered requests are kept in `log`.
    record_requests: bool,
    pub(crate) log: RequestLog,
}

impl AppState {
    /// The state of a server whose listener counts into `connections`.
    pub(crate) fn new(config: ModelServerConfig, connections: Arc<Connections>) -> Self {
        let faults = RwLock::new(config.faults.clamped());
        let (stats, by_goal) = (StatsRecorder::default(), GoalRecorder::default());
        let (cache, log) = (CacheStore::default(), RequestLog::default());
        let record_requests = config.record_requests;
        Self { api_key: config.api_key, faults, stats, by_goal, connections, cache, record_requests, log }
    }

    /// The counters, with the connections and the live cache entries as they are now.
    pub(crate) fn stats(&self) -> ModelStats {
        let mut stats = self.stats.snapshot();
        stats.connections = self.connections.snapshot();
        stats.cache.entries = u64::try_from(self.cache.live_entries(Instant::now())).unwrap_or(u64::MAX);
        stats
    }

    /// Zeroes the counters and the bills, and empties the prompt cache and the request log.
    pub(crate) fn reset(&self) {
        self.stats.reset();
        self.by_goal.reset();
        self.cache.clear();
        self.log.clear();
    }

    /// The faults in force now.
    pub(crate) fn faults(&self) -> Faults {
        self.faults.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Replaces the faults.
    pub(crate) fn set_faults(&self, faults: Faults) {
        *self.faults.write().unwrap_or_else(PoisonError::into_inner) = faults;
    }
}

/// All routes, with the body limit and the `request-id` header.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route("/admin/stats", get(stats))
        .route("/admin/faults", post(set_faults))
        .route("/admin/reset", post(reset))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::map_response(add_request_id))
        .with_state(state)
}

/// `POST /v1/messages`.
async fn messages(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    state.stats.request();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    state.stats.arrived(now);
    if let Ok(bytes) = &body {
        state.stats.received(bytes.len());
    }
    if let Err(BytesRejection::FailedToBufferBody(FailedToBufferBody::UnknownBodyError(e))) = &body {
        // The client went away while sending (a killed worker): nobody reads the answer, and the
        // request was never whole enough to be judged valid or not.
        tracing::info!(error = %e, "request body cut off");
        state.stats.cut_off();
        return StatusCode::BAD_REQUEST.into_response();
    }
    let response = match validate::validate(&headers, body, state.api_key.as_deref()) {
        Ok(valid) => answer(&state, &valid).await,
        Err(error) => reject(&state, error),
    };
    state.stats.status(response.status().as_u16());
    response
}

/// `POST /v1/messages/count_tokens`: the tokens of the request as this server counts them (4 bytes
/// a token), `{"input_tokens": N}`. Not a model call: the stats do not count it.
async fn count_tokens(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(error) = super::headers::check(&headers, state.api_key.as_deref()) {
        return error.into_response();
    }
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(serde_json::Value::Object(request)) if request.contains_key("model") && request.contains_key("messages") => {
            let tokens = (body.len() as u64).div_ceil(4);
            axum::Json(serde_json::json!({ "input_tokens": tokens })).into_response()
        }
        _ => ApiError::invalid("body: expected a JSON object with `model` and `messages`").into_response(),
    }
}

/// Counts and logs a validation failure, then answers with it.
fn reject(state: &AppState, error: ApiError) -> Response {
    tracing::info!(reason = %error.message, "rejected request");
    state.stats.invalid(&error.message);
    error.into_response()
}

/// Answers a valid request: latency, maybe a fault, else the script's turn.
async fn answer(state: &AppState, valid: &Validated) -> Response {
    state.stats.max_tokens(valid.request.max_tokens);
    state.stats.valid(&valid.tool_choice);
    let faults = state.faults();
    tokio::time::sleep(faults.delay()).await;
    if let Some(injection) = faults.draw() {
        state.stats.injected(injection);
        return injection.error(faults.retry_after_s).into_response();
    }
    let goal = valid.request.goal();
    let tool_results = valid.request.tool_results();
    let context = script::Context {
        tool_results: &tool_results,
        goal: &goal,
        turn: valid.request.assistant_turns(),
        tools: &valid.tools,
        last_tool_result: valid.request.last_tool_result(),
        tool_choice: &valid.tool_choice,
    };
    let turn = script::play(&context);
    let total = response::total_input_tokens(valid);
    let cache = state.cache.apply(&valid.cache, total, Instant::now(), faults.cache_misses);
    let (response, usage) = response::success(valid, &turn, &cache);
    state.stats.billed(&usage, &cache);
    state.by_goal.billed(&goal, &usage);
    if state.record_requests {
        state.log.record(&goal, &valid.body, CacheUsage::from(&usage));
    }
    response
}

/// `GET /admin/stats`.
async fn stats(State(state): State<Arc<AppState>>) -> Json<ModelStats> {
    Json(state.stats())
}

/// `POST /admin/faults` with a [`Faults`] body.
async fn set_faults(
    State(state): State<Arc<AppState>>,
    body: Result<Json<Faults>, JsonRejection>,
) -> Result<Json<Faults>, ApiError> {
    let Json(faults) = body.map_err(|rejection| ApiError::invalid(format!("faults: {}", rejection.body_text())))?;
    faults.validate().map_err(|e| ApiError::invalid(format!("faults: {e}")))?;
    state.set_faults(faults.clone());
    Ok(Json(faults))
}

/// `POST /admin/reset`: zeroes the stats and empties the prompt cache.
async fn reset(State(state): State<Arc<AppState>>) -> StatusCode {
    state.reset();
    StatusCode::NO_CONTENT
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorKind::NotFound, "Not found")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(ErrorKind::MethodNotAllowed, "Method not allowed")
}

/// Adds `request-id: req_<ulid>` to a response.
async fn add_request_id(mut response: Response) -> Response {
    if let Ok(value) = HeaderValue::from_str(&format!("req_{}", ulid::Ulid::new())) {
        response.headers_mut().insert("request-id", value);
    }
    response
}
