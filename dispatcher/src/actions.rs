//! What people do to sessions: cancel them, answer escalations, approve or reject tool calls, and
//! see what waits for them.
//!
//! A reply, an approval or a rejection is one Lua script that checks the session still waits in the
//! expected status, records the decision (the human's answer or the rejection as the tool's result;
//! an approval as a mark the tool phase reads) and sets it running; then the current step is
//! published again and the tool phase resumes where it paused.

use agentfleet::amqp::StepPublisher;
use agentfleet::domain::{SessionId, SessionStatus, StepMessage};
use agentfleet::llm::ToolOutcome;
use agentfleet::step::lifecycle_event;
use agentfleet::store::{CancelOutcome, Meta, ResumeOutcome};
use agentfleet::telemetry::now_ms;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;

use crate::AppState;
use crate::error::{ApiError, ApiJson};
use crate::sessions::{load, path_id};

const MAX_TEXT_BYTES: usize = 64 * 1024;

/// Publishes a lifecycle event; failures are logged, never returned to the client.
pub(crate) async fn event(s: &AppState, meta: &Meta, id: &SessionId, kind: &str, summary: &str) {
    let event = lifecycle_event(meta, id, meta.step, kind, summary, serde_json::json!({}));
    if let Err(e) = s.publisher.publish_event(kind, &event).await {
        tracing::warn!(error = %e, kind, session = %id, "publishing an event failed");
    }
}

pub(crate) async fn cancel(State(s): State<AppState>, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let id = path_id(&id)?;
    let outcome = s.store.cancel(&id, now_ms()).await.map_err(|e| ApiError::unavailable(&e))?;
    let status = match outcome {
        CancelOutcome::Missing => return Err(ApiError::not_found(format!("no session `{id}`"))),
        CancelOutcome::Ended(status) => {
            return Err(ApiError::conflict(format!("the session has already ended ({status})")));
        }
        CancelOutcome::Requested => "cancelling",
        CancelOutcome::Cancelled => {
            let view = load(&s, &id).await?;
            let _ = s.store.deactivate(&id).await;
            let _ = s.store.unwait(&id).await;
            event(&s, &view.meta, &id, "session.cancelled", "cancelled by request").await;
            "cancelled"
        }
    };
    Ok((StatusCode::ACCEPTED, axum::Json(serde_json::json!({ "id": id, "status": status }))))
}

/// The body of `POST /v1/sessions/{id}/reply`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Reply {
    text: String,
}

/// The body of `POST /v1/sessions/{id}/approve`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct Approve {
    #[serde(default)]
    note: Option<String>,
}

/// The body of `POST /v1/sessions/{id}/reject`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Reject {
    reason: String,
}

/// A session's pending escalation, read from its meta.
struct Pending {
    meta: Meta,
    kind: String,
    tool_use_id: String,
}

async fn pending(s: &AppState, id: &SessionId) -> Result<Pending, ApiError> {
    let meta = load(s, id).await?.meta;
    let escalation: serde_json::Value =
        meta.escalation.as_deref().and_then(|e| serde_json::from_str(e).ok()).ok_or_else(|| {
            ApiError::conflict(format!("the session is not waiting for people (it is {})", meta.status))
        })?;
    let kind = escalation["kind"].as_str().unwrap_or("human").to_owned();
    let tool_use_id = escalation["tool_use_id"].as_str().unwrap_or_default().to_owned();
    Ok(Pending { meta, kind, tool_use_id })
}

fn text(field: &str, value: &str) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        return Err(ApiError::invalid(format!("{field}: must not be empty")));
    }
    if value.len() > MAX_TEXT_BYTES {
        return Err(ApiError::too_large(format!("{field}: the limit is {MAX_TEXT_BYTES} bytes")));
    }
    Ok(())
}

pub(crate) async fn reply(
    State(s): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Reply>,
) -> Result<impl IntoResponse, ApiError> {
    let id = path_id(&id)?;
    text("text", &body.text)?;
    let p = pending(&s, &id).await?;
    if p.meta.status != SessionStatus::AwaitingHuman || p.kind == "approval_timeout" {
        let hint = if p.kind.starts_with("approval") { ": use approve or reject" } else { "" };
        return Err(ApiError::conflict(format!("the session is not awaiting a human reply{hint}")));
    }
    let result = (!p.tool_use_id.is_empty()).then(|| ToolOutcome::ok(body.text.clone()));
    resume(&s, &id, &p, SessionStatus::AwaitingHuman, result, false).await
}

pub(crate) async fn approve(
    State(s): State<AppState>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let id = path_id(&id)?;
    let body: Approve = if body.iter().all(u8::is_ascii_whitespace) {
        Approve::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::invalid(format!("body: {e}")))?
    };
    let note = body.note;
    let p = approval(&s, &id).await?;
    tracing::info!(session = %id, tool_use_id = p.tool_use_id, note = note.as_deref().unwrap_or(""), "tool call approved");
    let expected = p.meta.status;
    resume(&s, &id, &p, expected, None, true).await
}

pub(crate) async fn reject(
    State(s): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Reject>,
) -> Result<impl IntoResponse, ApiError> {
    let id = path_id(&id)?;
    text("reason", &body.reason)?;
    let p = approval(&s, &id).await?;
    let result = ToolOutcome::error(format!("A reviewer rejected this call: {}", body.reason));
    let expected = p.meta.status;
    resume(&s, &id, &p, expected, Some(result), false).await
}

async fn approval(s: &AppState, id: &SessionId) -> Result<Pending, ApiError> {
    let p = pending(s, id).await?;
    if !p.kind.starts_with("approval") || p.tool_use_id.is_empty() {
        return Err(ApiError::conflict(format!("the session is not awaiting an approval (it is {})", p.meta.status)));
    }
    Ok(p)
}

async fn resume(
    s: &AppState,
    id: &SessionId,
    p: &Pending,
    expected: SessionStatus,
    result: Option<ToolOutcome>,
    approve: bool,
) -> Result<impl IntoResponse + use<>, ApiError> {
    let outcome = s
        .store
        .resume(id, expected, &p.tool_use_id, result.as_ref(), approve, now_ms())
        .await
        .map_err(|e| ApiError::unavailable(&e))?;
    let step = match outcome {
        ResumeOutcome::Resumed { step } => step,
        ResumeOutcome::NotWaiting(status) => {
            return Err(ApiError::conflict(format!("the session is no longer waiting (it is {status})")));
        }
    };
    let _ = s.store.unwait(id).await;
    publish_step(s, id, &p.meta, step).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(serde_json::json!({ "id": id, "status": "running" }))))
}

/// Publishes the session's current step so a worker resumes it.
pub(crate) async fn publish_step(s: &AppState, id: &SessionId, meta: &Meta, step: u32) -> Result<(), ApiError> {
    let Some(agent) = s.cfg.agent(meta.agent.as_str()) else {
        return Err(ApiError::conflict(format!("agent `{}` is no longer configured", meta.agent)));
    };
    let msg = StepMessage { session_id: id.clone(), step, attempt: 0 };
    // On failure the session is running with no message: the janitor re-publishes it.
    s.publisher.publish_step(&agent.pool, &msg, None).await.map_err(|e| ApiError::unavailable(&e))
}

pub(crate) async fn escalations(State(s): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let waiting = s.store.waiting(None, 500).await.map_err(|e| ApiError::unavailable(&e))?;
    let mut out = Vec::new();
    for (id, deadline_ms) in waiting {
        let Some(meta) = s.store.meta(&id).await.map_err(|e| ApiError::unavailable(&e))? else { continue };
        if !matches!(meta.status, SessionStatus::AwaitingHuman | SessionStatus::AwaitingApproval) {
            continue;
        }
        let escalation: serde_json::Value =
            meta.escalation.as_deref().and_then(|e| serde_json::from_str(e).ok()).unwrap_or_default();
        out.push(serde_json::json!({
            "session_id": id,
            "agent": meta.agent,
            "tenant": (!meta.tenant.is_empty()).then_some(&meta.tenant),
            "status": meta.status,
            "kind": escalation["kind"],
            "tool_use_id": escalation["tool_use_id"],
            "tool": escalation["tool"],
            "input": escalation["input"],
            "reason": escalation["reason"].as_str().or(escalation["input"]["reason"].as_str()),
            "since_ms": meta.updated_ms,
            "deadline_ms": deadline_ms,
        }));
    }
    Ok(axum::Json(serde_json::json!({ "escalations": out })))
}
