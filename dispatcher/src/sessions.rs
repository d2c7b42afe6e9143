//! `POST /v1/sessions`, `GET /v1/sessions` and `GET /v1/sessions/{id}`.

use agentfleet::amqp::StepPublisher;
use agentfleet::budget::{Limits, Overrides};
use agentfleet::domain::{Name, SessionId, SessionStatus, StepMessage};
use agentfleet::store::{NewSession, SessionView};
use agentfleet::telemetry::{metric, now_ms};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::AppState;
use crate::error::{ApiError, ApiJson};

const MAX_METADATA_BYTES: usize = 16 * 1024;
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// The body of `POST /v1/sessions`, and of a session request over AMQP.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    agent: String,
    input: String,
    #[serde(default)]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
    /// Lower budget limits for this session.
    #[serde(default)]
    budget: Option<Overrides>,
    /// Where this session's events are POSTed (signed), instead of the agent's webhook.
    #[serde(default)]
    callback_url: Option<String>,
}

/// A request that passed validation.
struct Valid {
    agent: Name,
    pool: Name,
    limits: Limits,
    input: String,
    metadata: serde_json::Value,
    idempotency_key: Option<String>,
    tenant: String,
    callback_url: Option<String>,
}

/// A session that exists now: its id, its status, and whether this request created it.
pub struct Created {
    /// The session.
    pub id: SessionId,
    /// Its status.
    pub status: SessionStatus,
    /// False when an `idempotency_key` returned an earlier session.
    pub created: bool,
}

pub(crate) async fn create(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<CreateSession>,
) -> Result<impl IntoResponse, ApiError> {
    let c = create_session(&s, req).await?;
    let body = serde_json::json!({ "id": c.id, "status": c.status });
    let replayed = if c.created { "false" } else { "true" };
    Ok((StatusCode::ACCEPTED, [("idempotent-replayed", replayed)], axum::Json(body)))
}

/// Validates a request, creates the session once (per idempotency key), and queues its first step.
pub async fn create_session(s: &AppState, req: CreateSession) -> Result<Created, ApiError> {
    let req = validate(s, req)?;
    let mut id = SessionId::generate();
    if let Some(key) = &req.idempotency_key {
        id = s
            .store
            .remember_idempotency_key(key, &id, s.cfg.dispatcher.idempotency_ttl_s)
            .await
            .map_err(|e| ApiError::unavailable(&e))?;
    }
    let new = NewSession {
        id: id.clone(),
        agent: req.agent.clone(),
        tenant: req.tenant.clone(),
        input: req.input.clone(),
        metadata: req.metadata.clone(),
        limits: req.limits,
        callback_url: req.callback_url.clone(),
    };
    let created = s.store.create(&new, now_ms()).await.map_err(|e| ApiError::unavailable(&e))?;
    s.store.activate(&id, now_ms()).await.map_err(|e| ApiError::unavailable(&e))?;
    let view = load(s, &id).await?;
    if !created && view.meta.agent != req.agent {
        return Err(ApiError::conflict("idempotency_key: already used for a session of another agent"));
    }
    if view.meta.status == SessionStatus::Queued && view.meta.published < 1 {
        publish_first_step(s, &id, &req.pool).await?;
    }
    if created {
        metric::session_created(req.agent.as_str());
        let summary = agentfleet::telemetry::summarize(&req.input, 200);
        crate::actions::event(s, &view.meta, &id, "session.created", &summary).await;
    }
    Ok(Created { id, status: view.meta.status, created })
}

fn validate(s: &AppState, req: CreateSession) -> Result<Valid, ApiError> {
    let agent_cfg =
        s.cfg.agent(&req.agent).ok_or_else(|| ApiError::invalid(format!("agent: no agent named `{}`", req.agent)))?;
    let agent = Name::parse(&req.agent).map_err(|e| ApiError::invalid(format!("agent: {e}")))?;
    if req.input.trim().is_empty() {
        return Err(ApiError::invalid("input: must not be empty"));
    }
    let limit = s.cfg.dispatcher.max_input_bytes;
    if req.input.len() > limit {
        return Err(ApiError::too_large(format!("input: is {} bytes; the limit is {limit}", req.input.len())));
    }
    let metadata = serde_json::Value::Object(req.metadata.unwrap_or_default());
    if metadata.to_string().len() > MAX_METADATA_BYTES {
        return Err(ApiError::too_large(format!("metadata: the limit is {MAX_METADATA_BYTES} bytes of JSON")));
    }
    if let Some(key) = &req.idempotency_key
        && (key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY || key.chars().any(char::is_control))
    {
        return Err(ApiError::invalid(format!(
            "idempotency_key: must be 1-{MAX_IDEMPOTENCY_KEY} printable characters"
        )));
    }
    if let Some(url) = &req.callback_url {
        let ok = url::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https"));
        if !ok {
            return Err(ApiError::invalid("callback_url: must be an http(s) URL"));
        }
    }
    let tenant = match req.tenant {
        Some(t) => Name::parse(&t).map_err(|e| ApiError::invalid(format!("tenant: {e}")))?.to_string(),
        None => String::new(),
    };
    Ok(Valid {
        agent,
        pool: agent_cfg.pool.clone(),
        limits: Limits::of(&agent_cfg.budget).lowered(&req.budget.unwrap_or_default()).map_err(ApiError::invalid)?,
        input: req.input,
        metadata,
        idempotency_key: req.idempotency_key,
        tenant,
        callback_url: req.callback_url,
    })
}

async fn publish_first_step(s: &AppState, id: &SessionId, pool: &Name) -> Result<(), ApiError> {
    let msg = StepMessage { session_id: id.clone(), step: 1, attempt: 0 };
    s.publisher.publish_step(pool, &msg, None).await.map_err(|e| ApiError::unavailable(&e))?;
    if let Err(e) = s.store.mark_published(id, 1).await {
        // Harmless: a later replay of the request may publish a duplicate, which is dropped as stale.
        tracing::warn!(error = %e, session = %id, "marking step 1 published failed");
    }
    Ok(())
}

pub(crate) async fn load(s: &AppState, id: &SessionId) -> Result<SessionView, ApiError> {
    s.store
        .view(id)
        .await
        .map_err(|e| ApiError::unavailable(&e))?
        .ok_or_else(|| ApiError::not_found(format!("no session `{id}`")))
}

/// Parses the `{id}` of a path.
pub(crate) fn path_id(id: &str) -> Result<SessionId, ApiError> {
    SessionId::parse(id).map_err(|e| ApiError::invalid(format!("id: {e}")))
}

/// The query of `GET /v1/sessions`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    status: Option<String>,
    agent: Option<String>,
    tenant: Option<String>,
    created_after_ms: Option<u64>,
    created_before_ms: Option<u64>,
    limit: Option<usize>,
    cursor: Option<String>,
}

pub(crate) async fn list(
    State(s): State<AppState>,
    query: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let axum::extract::Query(q) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let status = match q.status.as_deref() {
        Some(st) => Some(st.parse::<SessionStatus>().map_err(|e| ApiError::invalid(format!("status: {e}")))?),
        None => None,
    };
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid("limit: must be between 1 and 500"));
    }
    let filter = agentfleet::store::ListFilter {
        status,
        agent: q.agent,
        tenant: q.tenant,
        created_after_ms: q.created_after_ms,
        created_before_ms: q.created_before_ms,
    };
    let (rows, next) = s.store.list(&filter, q.cursor.as_deref(), limit).await.map_err(|e| match e {
        agentfleet::store::StoreError::Corrupt(_) => ApiError::invalid("cursor: not a cursor from this API"),
        other => ApiError::unavailable(&other),
    })?;
    let sessions: Vec<serde_json::Value> = rows.iter().map(|(id, m)| summary(id, m)).collect();
    Ok(axum::Json(serde_json::json!({ "sessions": sessions, "next_cursor": next })))
}

fn summary(id: &SessionId, m: &agentfleet::store::Meta) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "agent": m.agent,
        "tenant": (!m.tenant.is_empty()).then_some(&m.tenant),
        "status": m.status,
        "step": m.step,
        "created_at_ms": m.created_ms,
        "updated_at_ms": m.updated_ms,
        "result": m.result,
        "error": m.error,
    })
}

pub(crate) async fn get(State(s): State<AppState>, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let id = path_id(&id)?;
    let view = load(&s, &id).await?;
    Ok(axum::Json(render(&id, &view)))
}

fn usd(micro: u64) -> f64 {
    micro as f64 / 1_000_000.0
}

fn render(id: &SessionId, v: &SessionView) -> serde_json::Value {
    let m = &v.meta;
    let messages: Vec<Box<RawValue>> =
        v.messages.iter().filter_map(|raw| RawValue::from_string(raw.clone()).ok()).collect();
    let escalation = m.escalation.as_deref().and_then(|e| serde_json::from_str::<serde_json::Value>(e).ok());
    let metadata = serde_json::from_str::<serde_json::Value>(&m.metadata).unwrap_or_default();
    let l = &m.limits;
    // Steps done: the current one counts once its model call is in (phase tools, or the end).
    let steps_used = if m.phase == agentfleet::domain::Phase::Llm { m.step - 1 } else { m.step }.min(l.max_steps);
    serde_json::json!({
        "id": id,
        "agent": m.agent,
        "tenant": (!m.tenant.is_empty()).then_some(&m.tenant),
        "status": m.status,
        "step": m.step,
        "phase": m.phase,
        "created_at_ms": m.created_ms,
        "updated_at_ms": m.updated_ms,
        "result": m.result,
        "error": m.error,
        "escalation": escalation,
        "metadata": metadata,
        "callback_url": m.callback_url,
        "cancel_requested": m.cancel_requested,
        "usage": {
            "input_tokens": v.usage.input_tokens,
            "output_tokens": v.usage.output_tokens,
            "cache_creation_input_tokens": v.usage.cache_creation_input_tokens,
            "cache_read_input_tokens": v.usage.cache_read_input_tokens,
            "total_tokens": v.usage.total_tokens(),
            "cost_micro_usd": v.usage.cost_micro_usd,
            "cost_usd": usd(v.usage.cost_micro_usd),
            "model_calls": v.usage.model_calls,
            "unreconciled_calls": v.usage.unreconciled_calls,
            "model_errors": v.usage.model_errors,
            "steps": steps_used,
        },
        "limits": {
            "max_steps": l.max_steps,
            "max_cost_usd": l.max_cost.as_usd(),
            "max_cost_per_step_usd": l.max_cost_per_step.as_usd(),
            "max_tokens": l.max_tokens,
            "alert_threshold": f64::from(l.alert_permille) / 1000.0,
        },
        "remaining": {
            "steps": l.max_steps.saturating_sub(steps_used),
            "cost_usd": usd(l.max_cost.0.saturating_sub(v.usage.cost_micro_usd)),
            "tokens": l.max_tokens.saturating_sub(v.usage.total_tokens()),
        },
        "budget_alert": m.alerted,
        "messages": messages,
    })
}
