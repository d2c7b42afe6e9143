//! What people do to sessions: cancel them, answer escalations, approve or reject tool calls, and
//! see what waits for them.
//!
//! A reply, an approval or a rejection is one Lua script that checks the session still waits in the
//! expected status, records the decision (the human's answer or the rejection as the tool's result;
//! an approval as a mark the tool phase reads) and sets it running; then the current step is
//! published again and the tool phase resumes where it paused.

use agentfleet::amqp::StepPublisher;
use agentfleet::domain::{Name, SessionId, SessionStatus, StepMessage};
use agentfleet::llm::ToolOutcome;
use agentfleet::store::{CancelOutcome, Meta, ResumeOutcome};
use agentfleet::telemetry::now_ms;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;
use utoipa::ToSchema;

use agentfleet::config::Role;
use agentfleet::domain::TenantId;

use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiJson, ErrorBody};
use crate::session_ref::{event, load, load_for, path_id, session_span};

const MAX_TEXT_BYTES: usize = 64 * 1024;

/// The answer to a cancel, a reply, an approval or a rejection.
#[derive(Serialize, ToSchema)]
pub(crate) struct Accepted {
    id: SessionId,
    status: ActionStatus,
}

/// Where an action left the session.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ActionStatus {
    /// A step is running: the session stops when it ends.
    Cancelling,
    /// The session stopped at once.
    Cancelled,
    /// The session resumed.
    Running,
}

/// Cancels a session: at once when nothing runs, else when the running step ends.
#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/cancel",
    tag = "sessions",
    params(("id" = String, Path, description = "The session id", pattern = "^s_[0-9A-HJKMNP-TV-Z]{26}$")),
    responses(
        (status = 202, description = "`cancelled`, or `cancelling` while a step runs", body = Accepted),
        (status = 400, description = "`id` is not a session id", body = ErrorBody),
        (status = 404, description = "No such session", body = ErrorBody),
        (status = 409, description = "The session has already ended", body = ErrorBody),
        (status = 503, description = "Redis is down", body = ErrorBody),
    )
)]
pub(crate) async fn cancel(
    caller: Caller,
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Operate)?;
    let id = path_id(&id)?;
    load_for(&s, &caller, &id).await?;
    let status = cancel_session(&s, &id).instrument(session_span("session.cancel", &id)).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(Accepted { id, status })))
}

async fn cancel_session(s: &AppState, id: &SessionId) -> Result<ActionStatus, ApiError> {
    let outcome = s.store.cancel(id, now_ms()).await.map_err(|e| ApiError::unavailable(&e))?;
    let status = match outcome {
        CancelOutcome::Missing => return Err(ApiError::not_found(format!("no session `{id}`"))),
        CancelOutcome::Ended(status) => {
            return Err(ApiError::conflict(format!("the session has already ended ({status})")));
        }
        CancelOutcome::Requested => ActionStatus::Cancelling,
        CancelOutcome::Cancelled => {
            let view = load(s, id).await?;
            // On failure the session stays in the live index, and the janitor reindexes it.
            let _ = s.store.reindex(id, now_ms()).await;
            agentfleet::lifecycle::session_ended(id, &view.meta, SessionStatus::Cancelled, "");
            event(s, &view.meta, id, "session.cancelled", "cancelled by request").await;
            ActionStatus::Cancelled
        }
    };
    Ok(status)
}

/// The body of `POST /v1/sessions/{id}/reply`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Reply {
    /// The answer, given to the model as the result of `escalate_to_human`; not blank, at most 64 KiB.
    #[schema(
        min_length = 1,
        max_length = 65536,
        pattern = r"[^\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
    )]
    text: String,
}

/// The body of `POST /v1/sessions/{id}/approve`.
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Approve {
    /// Logged with the approval.
    #[serde(default)]
    note: Option<String>,
}

/// The body of `POST /v1/sessions/{id}/reject`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Reject {
    /// Given to the model as the tool's error result; not blank, at most 64 KiB.
    #[schema(
        min_length = 1,
        max_length = 65536,
        pattern = r"[^\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
    )]
    reason: String,
}

/// A session's pending escalation, read from its meta.
struct Pending {
    meta: Meta,
    kind: String,
    tool_use_id: String,
}

async fn pending(s: &AppState, caller: &Caller, id: &SessionId) -> Result<Pending, ApiError> {
    let meta = load_for(s, caller, id).await?.meta;
    let escalation: serde_json::Value =
        meta.escalation.as_deref().and_then(|e| serde_json::from_str(e).ok()).ok_or_else(|| {
            ApiError::conflict(format!("the session is not waiting for people (it is {})", meta.status))
        })?;
    let kind = escalation["kind"].as_str().unwrap_or("human").to_owned();
    let tool_use_id = escalation["tool_use_id"].as_str().unwrap_or_default().to_owned();
    Ok(Pending { meta, kind, tool_use_id })
}

/// Checks a person's text field: not blank, at most `limit` bytes.
pub(crate) fn text(field: &str, value: &str, limit: usize) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        return Err(ApiError::invalid(format!("{field}: must not be empty")));
    }
    if value.len() > limit {
        return Err(ApiError::too_large(format!("{field}: the limit is {limit} bytes")));
    }
    Ok(())
}

/// Answers a session awaiting a human: the text becomes the tool's result and the session resumes.
#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/reply",
    tag = "escalations",
    params(("id" = String, Path, description = "The session id", pattern = "^s_[0-9A-HJKMNP-TV-Z]{26}$")),
    request_body = Reply,
    responses(
        (status = 202, description = "The session resumed (`running`)", body = Accepted),
        (status = 400, description = "The body is malformed, `text` is blank or `id` is not a session id", body = ErrorBody),
        (status = 404, description = "No such session", body = ErrorBody),
        (status = 409, description = "The session is not awaiting a human reply", body = ErrorBody),
        (status = 413, description = "`text` is too large", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 503, description = "Redis or RabbitMQ is down", body = ErrorBody),
    )
)]
pub(crate) async fn reply(
    caller: Caller,
    State(s): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Reply>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Operate)?;
    let id = path_id(&id)?;
    text("text", &body.text, MAX_TEXT_BYTES)?;
    let p = pending(&s, &caller, &id).await?;
    if p.meta.status != SessionStatus::AwaitingHuman || p.kind == "approval_timeout" {
        let hint = if p.kind.starts_with("approval") { ": use approve or reject" } else { "" };
        return Err(ApiError::conflict(format!("the session is not awaiting a human reply{hint}")));
    }
    let result = (!p.tool_use_id.is_empty()).then(|| ToolOutcome::ok(body.text.clone()));
    let resumed = resume(&s, &id, &p, SessionStatus::AwaitingHuman, result, false)
        .instrument(session_span("session.reply", &id))
        .await?;
    agentfleet::telemetry::metric::human_decision("replied");
    Ok(resumed)
}

/// Approves the tool call a session waits on; the call then runs.
#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/approve",
    tag = "escalations",
    params(("id" = String, Path, description = "The session id", pattern = "^s_[0-9A-HJKMNP-TV-Z]{26}$")),
    request_body(content = Option<Approve>, description = "Optional: an empty body approves too"),
    responses(
        (status = 202, description = "The session resumed (`running`)", body = Accepted),
        (status = 400, description = "The body is malformed or `id` is not a session id", body = ErrorBody),
        (status = 404, description = "No such session", body = ErrorBody),
        (status = 409, description = "The session is not awaiting an approval", body = ErrorBody),
        (status = 503, description = "Redis or RabbitMQ is down", body = ErrorBody),
    )
)]
pub(crate) async fn approve(
    caller: Caller,
    State(s): State<AppState>,
    Path(id): Path<String>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Approve)?;
    let id = path_id(&id)?;
    let body = body?;
    let body: Approve = if body.iter().all(u8::is_ascii_whitespace) {
        Approve::default()
    } else if !body.trim_ascii_start().starts_with(b"{") {
        return Err(ApiError::invalid("body: must be a JSON object"));
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::invalid(format!("body: {e}")))?
    };
    decide(&s, &caller, &id, Verdict::Approve { note: body.note }).await
}

/// Rejects the tool call a session waits on: the reason becomes the tool's error result.
#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/reject",
    tag = "escalations",
    params(("id" = String, Path, description = "The session id", pattern = "^s_[0-9A-HJKMNP-TV-Z]{26}$")),
    request_body = Reject,
    responses(
        (status = 202, description = "The session resumed (`running`)", body = Accepted),
        (status = 400, description = "The body is malformed, `reason` is blank or `id` is not a session id", body = ErrorBody),
        (status = 404, description = "No such session", body = ErrorBody),
        (status = 409, description = "The session is not awaiting an approval", body = ErrorBody),
        (status = 413, description = "`reason` is too large", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 503, description = "Redis or RabbitMQ is down", body = ErrorBody),
    )
)]
pub(crate) async fn reject(
    caller: Caller,
    State(s): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Reject>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Approve)?;
    let id = path_id(&id)?;
    text("reason", &body.reason, MAX_TEXT_BYTES)?;
    decide(&s, &caller, &id, Verdict::Reject { reason: body.reason }).await
}

/// What a reviewer decided about the tool call a session waits on.
enum Verdict {
    /// The call runs; the note is only logged.
    Approve { note: Option<String> },
    /// The reason becomes the tool's error result.
    Reject { reason: String },
}

/// Applies a verdict to the approval a session waits on, and resumes it.
async fn decide(
    s: &AppState,
    caller: &Caller,
    id: &SessionId,
    verdict: Verdict,
) -> Result<impl IntoResponse + use<>, ApiError> {
    let p = approval(s, caller, id).await?;
    let (result, approve, span, decision) = match verdict {
        Verdict::Approve { note } => {
            let note = note.as_deref().unwrap_or("");
            tracing::info!(session = %id, tool_use_id = p.tool_use_id, note, "tool call approved");
            (None, true, "session.approve", "approved")
        }
        Verdict::Reject { reason } => {
            let result = ToolOutcome::error(format!("A reviewer rejected this call: {reason}"));
            (Some(result), false, "session.reject", "rejected")
        }
    };
    let expected = p.meta.status;
    let resumed = resume(s, id, &p, expected, result, approve).instrument(session_span(span, id)).await?;
    agentfleet::telemetry::metric::human_decision(decision);
    Ok(resumed)
}

async fn approval(s: &AppState, caller: &Caller, id: &SessionId) -> Result<Pending, ApiError> {
    let p = pending(s, caller, id).await?;
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
    let _ = s.store.reindex(id, now_ms()).await;
    publish_step(s, id, &p.meta, step).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(Accepted { id: id.clone(), status: ActionStatus::Running })))
}

/// Publishes the session's current step so a worker resumes it.
async fn publish_step(s: &AppState, id: &SessionId, meta: &Meta, step: u32) -> Result<(), ApiError> {
    let Some(agent) = s.cfg.agent(meta.agent.as_str()) else {
        return Err(ApiError::conflict(format!("agent `{}` is no longer configured", meta.agent)));
    };
    let msg = StepMessage { session_id: id.clone(), step, attempt: 0 };
    // On failure the session is running with no message: the janitor re-publishes it.
    s.publisher.publish_step(&agent.pool, &msg, None).await.map_err(|e| ApiError::unavailable(&e))
}

/// `GET /v1/escalations`.
#[derive(Serialize, ToSchema)]
pub(crate) struct EscalationList {
    escalations: Vec<Escalation>,
}

/// A session that waits for people.
#[derive(Serialize, ToSchema)]
pub(crate) struct Escalation {
    session_id: SessionId,
    agent: Name,
    /// Null when the request named none.
    tenant: Option<String>,
    /// `awaiting_human` or `awaiting_approval`.
    status: SessionStatus,
    /// `human`, `approval`, `approval_timeout` or `model_failure`.
    kind: Option<String>,
    /// The tool call that waits, if one does.
    tool_use_id: Option<String>,
    /// The tool that needs an approval.
    tool: Option<String>,
    /// The input of the call that waits.
    #[schema(value_type = Option<Object>)]
    input: serde_json::Value,
    /// Why it waits.
    reason: Option<String>,
    /// When it began to wait (Unix ms).
    since_ms: u64,
    /// When the wait expires (Unix ms).
    deadline_ms: u64,
}

impl Escalation {
    fn of(id: SessionId, meta: Meta, deadline_ms: u64) -> Self {
        let e: serde_json::Value =
            meta.escalation.as_deref().and_then(|e| serde_json::from_str(e).ok()).unwrap_or_default();
        let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
        Self {
            session_id: id,
            tenant: meta.tenant.map(String::from),
            agent: meta.agent,
            status: meta.status,
            kind: text(&e["kind"]),
            tool_use_id: text(&e["tool_use_id"]),
            tool: text(&e["tool"]),
            reason: text(&e["reason"]).or_else(|| text(&e["input"]["reason"])),
            input: e["input"].clone(),
            since_ms: meta.updated_ms,
            deadline_ms,
        }
    }
}

/// The query of `GET /v1/escalations`.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct EscalationQuery {
    /// Only this tenant's sessions (an admin token; others see only their own tenant).
    #[param(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    tenant: Option<String>,
}

/// Lists the sessions of the caller's tenant that wait for a human reply or an approval, soonest
/// deadline first.
#[utoipa::path(
    get,
    path = "/v1/escalations",
    tag = "escalations",
    params(EscalationQuery),
    responses(
        (status = 200, description = "Up to 500 waiting sessions", body = EscalationList),
        (status = 400, description = "A query parameter is invalid", body = ErrorBody),
        (status = 503, description = "Redis is down", body = ErrorBody),
    )
)]
pub(crate) async fn escalations(
    caller: Caller,
    State(s): State<AppState>,
    query: Result<axum::extract::Query<EscalationQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Operate)?;
    let axum::extract::Query(q) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let only = tenant_scope(&caller, q.tenant.as_deref())?;
    let waiting = s.store.waiting(None, 500).await.map_err(|e| ApiError::unavailable(&e))?;
    let mut escalations = Vec::new();
    for (id, deadline_ms) in waiting {
        let Some(meta) = s.store.meta(&id).await.map_err(|e| ApiError::unavailable(&e))? else { continue };
        let mine = caller.sees(&meta) && only.as_ref().is_none_or(|t| meta.tenant.as_ref() == Some(t));
        if mine && matches!(meta.status, SessionStatus::AwaitingHuman | SessionStatus::AwaitingApproval) {
            escalations.push(Escalation::of(id, meta, deadline_ms));
        }
    }
    Ok(axum::Json(EscalationList { escalations }))
}

/// The tenant a listing is limited to: an admin's filter (or none: every tenant), else the
/// caller's own tenant; a non-admin naming another tenant is 403.
pub(crate) fn tenant_scope(caller: &Caller, asked: Option<&str>) -> Result<Option<TenantId>, ApiError> {
    let asked = asked.map(TenantId::parse).transpose().map_err(|e| ApiError::invalid(format!("tenant: {e}")))?;
    if caller.is_admin() {
        return Ok(asked);
    }
    match asked {
        Some(t) if t != caller.tenant => {
            Err(ApiError::forbidden(format!("tenant: this token sees only tenant `{}`", caller.tenant)))
        }
        _ => Ok(Some(caller.tenant.clone())),
    }
}
