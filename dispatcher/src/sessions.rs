//! `POST /v1/sessions`, `GET /v1/sessions` and `GET /v1/sessions/{id}`.

use agentfleet::amqp::StepPublisher;
use agentfleet::budget::{Limits, Overrides};
use agentfleet::domain::{Name, Phase, SessionId, SessionStatus, StepMessage, TenantId};
use agentfleet::store::{Meta, NewSession, SessionView};
use agentfleet::telemetry::{metric, now_ms};
use agentfleet::webhooks::address::check_callback_for;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::Instrument as _;
use utoipa::{IntoParams, ToSchema};

use agentfleet::config::Role;
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiJson, ErrorBody};
use crate::session_ref::{event, load, load_for, path_id, session_span};
use crate::{actions, limits};

const MAX_METADATA_BYTES: usize = 16 * 1024;
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// The body of `POST /v1/sessions`, and of a session request over AMQP.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    /// The agent to run: a name from the config.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    agent: String,
    /// The first user message: a text (not blank), or 1-20 content blocks (text and images, as
    /// the Messages API takes them); at most `max_input_bytes` (64 KiB by default).
    #[schema(schema_with = crate::input::schema)]
    input: crate::input::Input,
    /// Any JSON object (at most 16 KiB), kept with the session and shown back.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// 1-255 printable characters: a repeated request with the same key returns the first session.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 255, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$")]
    idempotency_key: Option<String>,
    /// Whose budget the session spends: a name. Only an admin token may set it; otherwise the
    /// session belongs to the token's tenant.
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    tenant: Option<String>,
    /// Lower budget limits for this session.
    #[serde(default)]
    budget: Option<Overrides>,
    /// Where this session's events are POSTed (signed), instead of the agent's webhook; it must
    /// start with one of the tenant's `callback_prefixes`.
    #[serde(default)]
    #[schema(pattern = r"^[hH][tT][tT][pP][sS]?://[A-Za-z0-9.-]+(:[0-9]{1,4})?(/[!-~]*)?$")]
    callback_url: Option<String>,
}

/// A request that passed validation.
struct Valid {
    agent: Name,
    pool: Name,
    limits: Limits,
    input: crate::input::CheckedInput,
    metadata: serde_json::Value,
    idempotency_key: Option<String>,
    tenant: Option<TenantId>,
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

/// The answer to `POST /v1/sessions`.
#[derive(Serialize, ToSchema)]
pub(crate) struct SessionCreated {
    pub(crate) id: SessionId,
    /// `queued` when new; a replayed request shows the session's status now.
    pub(crate) status: SessionStatus,
}

/// Creates a session and queues its first step.
#[utoipa::path(
    post,
    path = "/v1/sessions",
    tag = "sessions",
    request_body = CreateSession,
    responses(
        (status = 202, description = "The session exists and its first step is queued", body = SessionCreated,
            headers(("idempotent-replayed" = String, description = "`true` when an `idempotency_key` returned an earlier session, else `false`"))),
        (status = 400, description = "The body is malformed or a field is invalid (the message names it)", body = ErrorBody),
        (status = 403, description = "The token lacks the `submit` role, or names a `tenant` without being an admin", body = ErrorBody),
        (status = 409, description = "The `idempotency_key` was used with a different request", body = ErrorBody),
        (status = 413, description = "The body, `input` or `metadata` is too large", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 429, description = "The tenant has `max_live_sessions` live sessions, or the token created `sessions_per_minute` this minute (see `Retry-After`)", body = ErrorBody),
        (status = 503, description = "Redis or RabbitMQ is down: retry with the same `idempotency_key`", body = ErrorBody),
    )
)]
pub(crate) async fn create(
    caller: Caller,
    State(s): State<AppState>,
    ApiJson(mut req): ApiJson<CreateSession>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Submit)?;
    req.tenant = Some(tenant_of(&caller, req.tenant)?);
    limits::check_rate(&s, &caller).await?;
    let c = create_session(&s, req).await?;
    let body = SessionCreated { id: c.id, status: c.status };
    let replayed = if c.created { "false" } else { "true" };
    Ok((StatusCode::ACCEPTED, [("idempotent-replayed", replayed)], axum::Json(body)))
}

/// The tenant of a session `caller` creates: the token's, or (an admin only) the one it names.
fn tenant_of(caller: &Caller, named: Option<String>) -> Result<String, ApiError> {
    match named {
        Some(t) if caller.is_admin() => Ok(t),
        Some(_) => Err(ApiError::forbidden(format!(
            "tenant: only an admin token may name a tenant; this token's sessions belong to `{}`",
            caller.tenant
        ))),
        None => Ok(caller.tenant.to_string()),
    }
}

/// Validates a request, creates the session once (per idempotency key and tenant) within the
/// tenant's live-session limit, and queues its first step. The request's `tenant` is trusted: the
/// HTTP handler sets it from the caller's token.
pub async fn create_session(s: &AppState, req: CreateSession) -> Result<Created, ApiError> {
    let req = validate(s, req)?;
    let mut id = SessionId::generate();
    if let Some(key) = &req.idempotency_key {
        let scoped = format!("{}:{key}", req.tenant.as_ref().map_or("-", TenantId::as_str));
        let ttl = s.cfg.dispatcher.idempotency_ttl_s;
        let remembered = s.store.remember_idempotency_key(&scoped, &id, &fingerprint(&req), ttl).await;
        let (existing, same) = remembered.map_err(|e| ApiError::unavailable(&e))?;
        if !same {
            return Err(ApiError::conflict("idempotency_key: already used with a different request body"));
        }
        id = existing;
    }
    // A fresh id is a new session; only an idempotency key can name one that exists already.
    let exists = match &req.idempotency_key {
        Some(_) => s.store.meta(&id).await.map_err(|e| ApiError::unavailable(&e))?.is_some(),
        None => false,
    };
    if let Some(tenant) = &req.tenant
        && !exists
    {
        limits::admit_live(s, tenant, &id).await?;
    }
    let new = NewSession {
        first_call: None,
        id: id.clone(),
        agent: req.agent.clone(),
        tenant: req.tenant.clone(),
        messages: vec![req.input.message.clone()],
        origin: None,
        metadata: req.metadata.clone(),
        limits: req.limits,
        callback_url: req.callback_url.clone(),
    };
    let summary = agentfleet::telemetry::summarize(&req.input.text, 200);
    store_and_queue(s, new, &req.pool, &summary).instrument(session_span("session.create", &id)).await
}

/// The SHA-256 of a validated request, so a replayed idempotency key with another body is told apart.
fn fingerprint(req: &Valid) -> String {
    let normalized = serde_json::json!({
        "agent": req.agent.as_str(),
        "input": req.input.message,
        "metadata": req.metadata,
        "tenant": req.tenant.as_ref().map(TenantId::as_str),
        "callback_url": req.callback_url,
        "limits": format!("{:?}", req.limits),
    });
    hex::encode(Sha256::digest(normalized.to_string().as_bytes()))
}

/// Stores a new session (its first step's worst case planned here when the agent's shape is
/// known), then queues its first step and announces it with `summary`, unless a request before
/// this one did. Also the way a fork starts.
pub(crate) async fn store_and_queue(
    s: &AppState,
    mut new: NewSession,
    pool: &Name,
    summary: &str,
) -> Result<Created, ApiError> {
    let bytes = new.messages.iter().map(String::len).sum();
    let spent = agentfleet::store::UsageTotals::default().spent_before(1);
    new.first_call = s.shapes.get(&new.agent).and_then(|shape| shape.worst_case(&new.limits, &spent, 1, bytes));
    let id = new.id.clone();
    let created = s.store.create(&new, now_ms()).await.map_err(|e| ApiError::unavailable(&e))?;
    s.store.activate(&id, now_ms()).await.map_err(|e| ApiError::unavailable(&e))?;
    let view = load(s, &id).await?;
    if !created && view.meta.agent != new.agent {
        return Err(ApiError::conflict("idempotency_key: already used for a session of another agent"));
    }
    // The first step and the `session.created` event go out at once: each waits for its confirm.
    let first_step = async {
        if view.meta.status == SessionStatus::Queued && view.meta.published < 1 {
            publish_first_step(s, &id, pool).await?;
        }
        Ok::<(), ApiError>(())
    };
    let announced = async {
        if created {
            metric::session_created(new.agent.as_str());
            event(s, &view.meta, &id, "session.created", summary).await;
        }
    };
    let (first_step, ()) = tokio::join!(first_step, announced);
    first_step?;
    Ok(Created { id, status: view.meta.status, created })
}

fn validate(s: &AppState, req: CreateSession) -> Result<Valid, ApiError> {
    let agent_cfg =
        s.cfg.agent(&req.agent).ok_or_else(|| ApiError::invalid(format!("agent: no agent named `{}`", req.agent)))?;
    let agent = Name::parse(&req.agent).map_err(|e| ApiError::invalid(format!("agent: {e}")))?;
    let input = req.input.check(s.cfg.dispatcher.max_input_bytes)?;
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
    let tenant = req.tenant.map(|t| TenantId::parse(&t)).transpose().map_err(|e| ApiError::invalid(e.to_string()))?;
    if let Some(url) = &req.callback_url {
        check_callback_for(&s.cfg, tenant.as_ref().map(TenantId::as_str), url)
            .map_err(|e| ApiError::invalid(format!("callback_url: {e}")))?;
    }
    Ok(Valid {
        agent,
        pool: agent_cfg.pool.clone(),
        limits: Limits::of(&agent_cfg.budget).lowered(&req.budget.unwrap_or_default()).map_err(ApiError::invalid)?,
        input,
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

/// The query of `GET /v1/sessions`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only sessions in this status.
    #[param(value_type = Option<SessionStatus>)]
    status: Option<String>,
    /// Only sessions of this agent (any text: one that names no agent matches nothing).
    agent: Option<String>,
    /// Only sessions of this tenant (an admin token; others see only their own tenant).
    #[param(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    tenant: Option<String>,
    /// Only sessions created at or after this time (Unix ms).
    #[param(maximum = 9223372036854775807_u64)]
    created_after_ms: Option<u64>,
    /// Only sessions created before this time (Unix ms).
    #[param(maximum = 9223372036854775807_u64)]
    created_before_ms: Option<u64>,
    /// Sessions per page.
    #[param(minimum = 1, maximum = 500, default = 50)]
    limit: Option<usize>,
    /// The `next_cursor` of the previous page: `<created_ms>:<session id>`.
    #[param(pattern = "^[0-9]{1,19}:")]
    cursor: Option<String>,
}

/// A page of `GET /v1/sessions`.
#[derive(Serialize, ToSchema)]
pub(crate) struct SessionList {
    sessions: Vec<SessionSummary>,
    /// Pass as `cursor` for the next page; null on the last one.
    next_cursor: Option<String>,
}

/// A session in a list: what it is and how it ended, without the conversation.
#[derive(Serialize, ToSchema)]
pub(crate) struct SessionSummary {
    id: SessionId,
    agent: Name,
    /// Null when the request named none.
    tenant: Option<String>,
    status: SessionStatus,
    /// The current step, from 1.
    step: u32,
    /// Unix ms.
    created_at_ms: u64,
    /// Unix ms.
    updated_at_ms: u64,
    /// The final answer, once completed.
    result: Option<String>,
    /// Why it failed or stopped.
    error: Option<String>,
    /// What it has cost so far, in US dollars (in a list; `usage` has it in full).
    #[serde(skip_serializing_if = "Option::is_none")]
    cost_usd: Option<f64>,
}

/// Lists sessions, newest first, filtered and paged.
#[utoipa::path(
    get,
    path = "/v1/sessions",
    tag = "sessions",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of sessions", body = SessionList),
        (status = 400, description = "A query parameter or the cursor is invalid", body = ErrorBody),
        (status = 403, description = "The token lacks the `read` role, or names another tenant", body = ErrorBody),
        (status = 503, description = "Redis is down", body = ErrorBody),
    )
)]
pub(crate) async fn list(
    caller: Caller,
    State(s): State<AppState>,
    query: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Read)?;
    let axum::extract::Query(q) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let tenant = actions::tenant_scope(&caller, q.tenant.as_deref())?;
    let status = match q.status.as_deref() {
        Some(st) => Some(st.parse::<SessionStatus>().map_err(|e| ApiError::invalid(format!("status: {e}")))?),
        None => None,
    };
    // The schema's maximum: JSON Schema tools read integers as signed 64-bit.
    for (name, ms) in [("created_after_ms", q.created_after_ms), ("created_before_ms", q.created_before_ms)] {
        if ms.is_some_and(|ms| ms > i64::MAX as u64) {
            return Err(ApiError::invalid(format!("{name}: at most {}", i64::MAX)));
        }
    }
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid("limit: must be between 1 and 500"));
    }
    let filter = agentfleet::store::ListFilter {
        status,
        agent: q.agent,
        tenant,
        created_after_ms: q.created_after_ms,
        created_before_ms: q.created_before_ms,
    };
    let (rows, next) = s.store.list(&filter, q.cursor.as_deref(), limit).await.map_err(|e| match e {
        agentfleet::store::StoreError::Corrupt(_) => ApiError::invalid("cursor: not a cursor from this API"),
        other => ApiError::unavailable(&other),
    })?;
    let ids: Vec<SessionId> = rows.iter().map(|(id, _)| id.clone()).collect();
    let costs = s.store.costs(&ids).await.map_err(|e| ApiError::unavailable(&e))?;
    let sessions = rows
        .iter()
        .zip(costs)
        .map(|((id, m), cost)| SessionSummary { cost_usd: Some(usd(cost)), ..summary(id, m) })
        .collect();
    Ok(axum::Json(SessionList { sessions, next_cursor: next }))
}

fn summary(id: &SessionId, m: &Meta) -> SessionSummary {
    SessionSummary {
        id: id.clone(),
        agent: m.agent.clone(),
        tenant: m.tenant.clone().map(String::from),
        status: m.status,
        step: m.step,
        created_at_ms: m.created_ms,
        updated_at_ms: m.updated_ms,
        result: m.result.clone(),
        error: m.error.clone(),
        cost_usd: None,
    }
}

/// Shows a session: its state, usage, limits and the whole conversation.
#[utoipa::path(
    get,
    path = "/v1/sessions/{id}",
    tag = "sessions",
    params(("id" = String, Path, description = "The session id, `s_` and a ULID", pattern = "^s_[0-9A-HJKMNP-TV-Z]{26}$")),
    responses(
        (status = 200, description = "The session", body = SessionDetail),
        (status = 400, description = "`id` is not a session id", body = ErrorBody),
        (status = 404, description = "No such session", body = ErrorBody),
        (status = 503, description = "Redis is down", body = ErrorBody),
    )
)]
pub(crate) async fn get(
    caller: Caller,
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Read)?;
    let id = path_id(&id)?;
    let view = load_for(&s, &caller, &id).await?;
    Ok(axum::Json(render(&id, &view)))
}

fn usd(micro: u64) -> f64 {
    micro as f64 / 1_000_000.0
}

/// A session in full: `GET /v1/sessions/{id}`.
#[derive(Serialize, ToSchema)]
pub(crate) struct SessionDetail {
    #[serde(flatten)]
    summary: SessionSummary,
    phase: Phase,
    /// What the session waits for, while it waits for people (`kind`, `tool_use_id`, `tool`, `input`).
    #[schema(value_type = Option<Object>)]
    escalation: Option<serde_json::Value>,
    /// The request's `metadata`.
    #[schema(value_type = Object)]
    metadata: serde_json::Value,
    /// Where this session's events are POSTed, if the request named a URL.
    callback_url: Option<String>,
    /// True once a cancel was asked for.
    cancel_requested: bool,
    usage: SessionUsage,
    limits: SessionLimits,
    remaining: Remaining,
    /// The limit whose alert threshold was crossed, once one was.
    budget_alert: Option<String>,
    /// The session and step this one was forked from; null unless it is a fork.
    forked_from: Option<ForkedFrom>,
    /// The conversation, as Messages API messages (`role`, `content`).
    #[schema(value_type = Vec<Object>)]
    messages: Vec<Box<RawValue>>,
}

/// Where a fork came from: its conversation is `session`'s as `step` began.
#[derive(Serialize, ToSchema)]
pub(crate) struct ForkedFrom {
    session: SessionId,
    /// From 1.
    step: u32,
}

/// What a session has used so far.
#[derive(Serialize, ToSchema)]
pub(crate) struct SessionUsage {
    input_tokens: u64,
    output_tokens: u64,
    cache_creation_input_tokens: u64,
    cache_read_input_tokens: u64,
    /// Input (with cache reads and writes) plus output tokens.
    total_tokens: u64,
    cost_micro_usd: u64,
    cost_usd: f64,
    /// The cost by kind of token; the parts add up to `cost_micro_usd`.
    cost_breakdown: CostBreakdown,
    model_calls: u64,
    /// Calls whose usage was lost with their worker, counted at their reserved worst case.
    unreconciled_calls: u64,
    model_errors: u64,
    /// Steps done.
    steps: u32,
}

/// A session's cost by kind of token, micro-USD: plain input, prompt-cache writes and reads, output,
/// and the worst case of calls whose usage was lost with their worker. They add up to the cost.
#[derive(Serialize, ToSchema)]
pub(crate) struct CostBreakdown {
    input_micro_usd: u64,
    cache_write_micro_usd: u64,
    cache_read_micro_usd: u64,
    output_micro_usd: u64,
    unreconciled_micro_usd: u64,
}

/// A session's budget limits.
#[derive(Serialize, ToSchema)]
pub(crate) struct SessionLimits {
    max_steps: u32,
    max_cost_usd: f64,
    max_cost_per_step_usd: f64,
    max_tokens: u64,
    /// The fraction of any limit at which a `session.budget_alert` event is sent.
    alert_threshold: f64,
}

/// What is left of a session's budget.
#[derive(Serialize, ToSchema)]
pub(crate) struct Remaining {
    steps: u32,
    cost_usd: f64,
    tokens: u64,
}

fn render(id: &SessionId, v: &SessionView) -> SessionDetail {
    let m = &v.meta;
    let messages = v.messages.iter().filter_map(|raw| RawValue::from_string(raw.clone()).ok()).collect();
    // Steps done: the current one counts once its model call is in (phase tools, or the end).
    let steps_used = if m.phase == Phase::Llm { m.step - 1 } else { m.step }.min(m.limits.max_steps);
    SessionDetail {
        summary: summary(id, m),
        phase: m.phase,
        escalation: m.escalation.as_deref().and_then(|e| serde_json::from_str(e).ok()),
        metadata: serde_json::from_str(&m.metadata).unwrap_or_default(),
        callback_url: m.callback_url.clone(),
        cancel_requested: m.cancel_requested,
        usage: usage(v, steps_used),
        limits: limits(&m.limits),
        remaining: remaining(v, steps_used),
        budget_alert: m.alerted.clone(),
        forked_from: m.origin.as_ref().map(|o| ForkedFrom { session: o.session.clone(), step: o.step }),
        messages,
    }
}

fn usage(v: &SessionView, steps: u32) -> SessionUsage {
    let u = &v.usage;
    SessionUsage {
        input_tokens: u.input_tokens,
        output_tokens: u.output_tokens,
        cache_creation_input_tokens: u.cache_creation_input_tokens,
        cache_read_input_tokens: u.cache_read_input_tokens,
        total_tokens: u.total_tokens(),
        cost_micro_usd: u.cost_micro_usd,
        cost_usd: usd(u.cost_micro_usd),
        cost_breakdown: CostBreakdown {
            input_micro_usd: u.cost_parts.input,
            cache_write_micro_usd: u.cost_parts.cache_write,
            cache_read_micro_usd: u.cost_parts.cache_read,
            output_micro_usd: u.cost_parts.output,
            unreconciled_micro_usd: u.cost_micro_usd.saturating_sub(u.cost_parts.total().get()),
        },
        model_calls: u.model_calls,
        unreconciled_calls: u.unreconciled_calls,
        model_errors: u.model_errors,
        steps,
    }
}

fn limits(l: &Limits) -> SessionLimits {
    SessionLimits {
        max_steps: l.max_steps,
        max_cost_usd: l.max_cost.as_usd(),
        max_cost_per_step_usd: l.max_cost_per_step.as_usd(),
        max_tokens: l.max_tokens,
        alert_threshold: f64::from(l.alert_permille) / 1000.0,
    }
}

fn remaining(v: &SessionView, steps_used: u32) -> Remaining {
    let l = &v.meta.limits;
    Remaining {
        steps: l.max_steps.saturating_sub(steps_used),
        cost_usd: usd(l.max_cost.get().saturating_sub(v.usage.cost_micro_usd)),
        tokens: l.max_tokens.saturating_sub(v.usage.total_tokens()),
    }
}
