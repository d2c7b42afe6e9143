//! How every handler refers to a session: the `{id}` of a path parsed, the session loaded, a span
//! in its trace, and its lifecycle events published.
//!
//! These helpers sit below `sessions` (create, list, show) and `actions` (cancel, reply, approve,
//! reject), which both use them, so neither of those modules imports the other.

use agentfleet::domain::SessionId;
use agentfleet::lifecycle;
use agentfleet::store::{Meta, SessionView};

use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;

/// A span in the session's own trace (see `agentfleet::telemetry::otel`), linked to the span of
/// the request or delivery that caused it.
pub(crate) fn session_span(name: &'static str, id: &SessionId) -> tracing::Span {
    let span = tracing::info_span!("session_action", otel.name = name, session = %id);
    agentfleet::telemetry::otel::adopt_linked(&span, id);
    span
}

/// The session and its conversation: 404 when there is none, 503 when Redis is down.
pub(crate) async fn load(s: &AppState, id: &SessionId) -> Result<SessionView, ApiError> {
    s.store
        .view(id)
        .await
        .map_err(|e| ApiError::unavailable(&e))?
        .ok_or_else(|| ApiError::not_found(format!("no session `{id}`")))
}

/// The session as `caller` may see it: a session of another tenant is 404, exactly like a missing one.
pub(crate) async fn load_for(s: &AppState, caller: &Caller, id: &SessionId) -> Result<SessionView, ApiError> {
    let view = load(s, id).await?;
    if caller.sees(&view.meta) { Ok(view) } else { Err(ApiError::not_found(format!("no session `{id}`"))) }
}

/// Parses the `{id}` of a path.
pub(crate) fn path_id(id: &str) -> Result<SessionId, ApiError> {
    SessionId::parse(id).map_err(|e| ApiError::invalid(format!("id: {e}")))
}

/// Publishes a lifecycle event; failures are logged, never returned to the client.
pub(crate) async fn event(s: &AppState, meta: &Meta, id: &SessionId, kind: &str, summary: &str) {
    lifecycle::publish(s.publisher.as_ref(), meta, id, meta.step, kind, summary, serde_json::json!({})).await;
}
