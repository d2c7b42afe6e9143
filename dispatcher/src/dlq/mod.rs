//! The dead letters: read them, re-drive them, discard them (`/v1/dlq`).
//!
//! RabbitMQ cannot browse a queue, so the dispatcher moves every message of `<prefix>.dead` into a
//! store in Redis ([`mover`], bounded by `[dead_letters]`), acking it only once stored; the API
//! reads the store. Each dead letter belongs to a tenant when that can be known (its session's,
//! or its publisher's) and is seen only by that tenant's `operate` tokens; one whose tenant cannot
//! be known is seen by admins only. A redrive re-publishes it as a new message, with a confirm,
//! and only then removes it ([`redrive`]); what it re-publishes goes through the same fencing as
//! any other message.

mod entry;
mod mover;
mod redrive;
mod store;

use std::time::Duration;

use agentfleet::config::Role;
use agentfleet::telemetry::{metric, now_ms};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use lapin::options::QueueDeclareOptions;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use utoipa::{IntoParams, ToSchema};

use self::entry::{Entry, Kind, ShownBody, shown_body};
use self::store::{Claim, Keys};
use crate::AppState;
use crate::actions::tenant_scope;
use crate::auth::Caller;
use crate::error::{ApiError, ApiJson, ErrorBody};

/// How long a redrive holds its entry against a second, concurrent redrive of it.
const REDRIVE_HOLD_MS: u64 = 30_000;
/// How often the stored-count gauge is refreshed.
const GAUGE_EVERY: Duration = Duration::from_secs(5);
/// The most dead letters one `POST /v1/dlq/redrive` re-drives.
const MAX_BULK: usize = 1000;

fn keys(s: &AppState) -> Keys {
    Keys::new(&s.cfg.redis.key_prefix)
}

/// The dispatcher's task: the mover (unless `dead_letters.store` is off) and the gauge of stored
/// dead letters, until `shutdown`.
pub(crate) async fn run(state: AppState, shutdown: CancellationToken) {
    let gauge = gauge(state.clone(), shutdown.clone());
    if state.cfg.dead_letters.store {
        tokio::join!(mover::run(state, shutdown), gauge);
    } else {
        gauge.await;
    }
}

/// Refreshes `agentfleet_dead_letters_stored` until `shutdown`.
async fn gauge(state: AppState, shutdown: CancellationToken) {
    let keys = keys(&state);
    loop {
        let mut conn = state.redis.clone();
        if let Ok(n) = keys.count(&mut conn, None).await {
            metric::dead_letters_stored(n);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(GAUGE_EVERY) => {}
        }
    }
}

/// Which dead letters: every filter given must match.
#[derive(Debug, Default)]
struct Filter {
    kind: Option<Kind>,
    reason: Option<String>,
    queue: Option<String>,
    session_id: Option<String>,
}

impl Filter {
    fn parse(
        kind: Option<&str>,
        reason: Option<String>,
        queue: Option<String>,
        session_id: Option<String>,
    ) -> Result<Self, ApiError> {
        let kind = kind
            .map(|k| serde_json::from_value::<Kind>(serde_json::Value::from(k)))
            .transpose()
            .map_err(|_| ApiError::invalid("kind: must be one of `step`, `request`, `webhook`, `unknown`"))?;
        Ok(Self { kind, reason, queue, session_id })
    }

    fn matches(&self, e: &Entry) -> bool {
        self.kind.is_none_or(|k| k == e.kind)
            && self.reason.as_deref().is_none_or(|r| r == e.reason)
            && self.queue.as_deref().is_none_or(|q| Some(q) == e.queue.as_deref())
            && self.session_id.as_deref().is_none_or(|s| Some(s) == e.session_id.as_deref())
    }
}

/// The order of a listing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Order {
    /// The most recently stored first.
    #[default]
    Newest,
    /// The longest stored first.
    Oldest,
}

/// The query of `GET /v1/dlq`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only dead letters of this kind.
    #[param(value_type = Option<Kind>)]
    kind: Option<String>,
    /// Only dead letters with this reason code (`delivery_limit`, `unknown_session`, `malformed`, …).
    reason: Option<String>,
    /// Only dead letters taken from this queue.
    queue: Option<String>,
    /// Only dead letters of this session.
    session_id: Option<String>,
    /// Only this tenant's dead letters (an admin token; others see only their own tenant's).
    #[param(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    tenant: Option<String>,
    /// `newest` (the default) or `oldest` first.
    #[param(value_type = Option<Order>)]
    order: Option<String>,
    /// Dead letters per page.
    #[param(minimum = 1, maximum = 500, default = 50)]
    limit: Option<usize>,
    /// The `next_cursor` of the previous page.
    #[param(pattern = "^d_[0-9A-HJKMNP-TV-Z]{26}$")]
    cursor: Option<String>,
}

/// A page of `GET /v1/dlq`.
#[derive(Serialize, ToSchema)]
pub(crate) struct DeadLetterList {
    dead_letters: Vec<DeadLetterSummary>,
    /// Pass as `cursor` for the next page; null on the last one.
    next_cursor: Option<String>,
    /// Dead letters stored that the caller may see (with `tenant`, that tenant's).
    stored: u64,
    /// Messages still in the dead-letter queue, not in the store yet (it is full, or off): an
    /// admin's answer only; null otherwise, or when the broker does not say.
    in_queue: Option<u64>,
}

/// A dead letter in a list.
#[derive(Serialize, ToSchema)]
pub(crate) struct DeadLetterSummary {
    /// `d_` and a ULID.
    #[schema(example = "d_01JD3Z8Q4X3V5T6Y7W8E9R0A1B")]
    id: String,
    kind: Kind,
    /// The reason's code: the fleet's (`unknown_session`, `future_step`, `malformed`, `oversized`,
    /// `invalid_request`, …) or the broker's (`delivery_limit`, `rejected`, `expired`).
    reason: String,
    /// What the fleet said beyond the code.
    detail: Option<String>,
    /// The queue it was taken from, when known.
    queue: Option<String>,
    session_id: Option<String>,
    step: Option<u32>,
    /// Null when it cannot be known (then only admins see it).
    tenant: Option<String>,
    /// When it died, Unix ms.
    dead_at_ms: u64,
    /// When the store took it, Unix ms.
    stored_at_ms: u64,
    /// Deliveries before it died, when the broker counted them.
    delivery_count: Option<u64>,
    /// Times it had been re-driven before.
    redriven: u32,
    /// The body's length.
    body_bytes: u64,
    /// False when a redrive would be refused (the detail says why).
    redrivable: bool,
}

impl DeadLetterSummary {
    fn of(e: &Entry) -> Self {
        Self {
            id: e.id.clone(),
            kind: e.kind,
            reason: e.reason.clone(),
            detail: e.detail.clone(),
            queue: e.queue.clone(),
            session_id: e.session_id.clone(),
            step: e.step,
            tenant: e.tenant.clone(),
            dead_at_ms: e.dead_at_ms,
            stored_at_ms: e.stored_at_ms,
            delivery_count: e.delivery_count,
            redriven: e.redriven,
            body_bytes: e.body_bytes,
            redrivable: redrive::refusal(e).is_none(),
        }
    }
}

/// A dead letter in full: `GET /v1/dlq/{id}`.
#[derive(Serialize, ToSchema)]
pub(crate) struct DeadLetterDetail {
    #[serde(flatten)]
    summary: DeadLetterSummary,
    /// The exchange it was first published to, when the broker says.
    exchange: Option<String>,
    /// The routing key it was published with.
    routing_key: Option<String>,
    /// Times the broker dead-lettered it (`x-death` count).
    deaths: u64,
    /// True when the body was longer than the store keeps (`dispatcher.max_body_bytes`).
    body_truncated: bool,
    /// Why a redrive would be refused; null when it would go.
    not_redrivable: Option<String>,
    /// The AMQP properties that were set.
    #[schema(value_type = Object)]
    properties: serde_json::Value,
    /// Every AMQP header (`x-death`, `x-agentfleet-reason`, …).
    #[schema(value_type = Object)]
    headers: serde_json::Value,
    body: ShownBody,
}

/// A dead letter re-published.
#[derive(Serialize, ToSchema)]
pub(crate) struct Redriven {
    id: String,
    kind: Kind,
    session_id: Option<String>,
    /// The exchange it was published to (`""`: the default exchange).
    exchange: String,
    /// The routing key it was published with (a pool, or a queue).
    routing_key: String,
    /// `x-agentfleet-redriven` of the new message.
    redriven: u32,
}

/// A dead letter discarded.
#[derive(Serialize, ToSchema)]
pub(crate) struct Discarded {
    id: String,
    /// Always `discarded`.
    #[schema(value_type = String, example = "discarded")]
    status: &'static str,
}

/// The body of `POST /v1/dlq/redrive`: which dead letters, oldest first, and how many at most.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RedriveMany {
    /// Only dead letters of this kind.
    #[schema(value_type = Option<Kind>)]
    kind: Option<String>,
    /// Only dead letters with this reason code.
    reason: Option<String>,
    /// Only dead letters taken from this queue.
    queue: Option<String>,
    /// Only dead letters of this session.
    session_id: Option<String>,
    /// Only this tenant's (an admin token; others re-drive only their own tenant's).
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    tenant: Option<String>,
    /// The most to re-drive (default 100). (A number, so that `5.0`, an integer to JSON Schema, is
    /// taken too.)
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 1000)]
    limit: Option<serde_json::Number>,
}

/// What `POST /v1/dlq/redrive` did.
#[derive(Serialize, ToSchema)]
pub(crate) struct RedriveReport {
    redriven: Vec<Redriven>,
    /// Matching dead letters that cannot be re-driven, and why (they stay stored).
    refused: Vec<Refused>,
    /// True when more dead letters may match than `limit` covered.
    more: bool,
}

/// A dead letter a bulk redrive left alone.
#[derive(Serialize, ToSchema)]
pub(crate) struct Refused {
    id: String,
    error: String,
}

/// Lists the dead letters the caller may see, newest (or oldest) first, filtered and paged.
#[utoipa::path(
    get,
    path = "/v1/dlq",
    operation_id = "dlq_list",
    tag = "dead letters",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of dead letters", body = DeadLetterList),
        (status = 400, description = "A query parameter or the cursor is invalid", body = ErrorBody),
        (status = 403, description = "The token lacks the `operate` role, or names another tenant", body = ErrorBody),
        (status = 503, description = "Redis is down", body = ErrorBody),
    )
)]
pub(crate) async fn list(
    caller: Caller,
    State(s): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Operate)?;
    let Query(q) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let scope = tenant_scope(&caller, q.tenant.as_deref())?.map(String::from);
    let filter = Filter::parse(q.kind.as_deref(), q.reason, q.queue, q.session_id)?;
    let order = match q.order.as_deref() {
        None | Some("newest") => Order::Newest,
        Some("oldest") => Order::Oldest,
        Some(_) => return Err(ApiError::invalid("order: must be `newest` or `oldest`")),
    };
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid("limit: must be between 1 and 500"));
    }
    if let Some(c) = &q.cursor {
        check_id(c).map_err(|_| ApiError::invalid("cursor: not a cursor from this API"))?;
    }
    let page = Scan { scope: scope.as_deref(), filter: &filter, newest_first: order == Order::Newest };
    let (entries, next_cursor) = page.run(&s, q.cursor, limit).await?;
    let stored = keys(&s).count(&mut s.redis.clone(), scope.as_deref()).await.map_err(|e| ApiError::unavailable(&e))?;
    let in_queue = if caller.is_admin() { in_queue(&s).await } else { None };
    let dead_letters = entries.iter().map(DeadLetterSummary::of).collect();
    Ok(axum::Json(DeadLetterList { dead_letters, next_cursor, stored, in_queue }))
}

/// The messages ready in the dead-letter queue, as the broker counts them.
async fn in_queue(s: &AppState) -> Option<u64> {
    let ch = s.publisher.channel().await.ok()?;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let queue = s.publisher.topology().dead();
    let q = ch.queue_declare(queue.as_str().into(), passive, lapin::types::FieldTable::default()).await.ok()?;
    Some(u64::from(q.message_count()))
}

/// One pass over an index: the entries that match, up to a page, and where to go on.
struct Scan<'a> {
    scope: Option<&'a str>,
    filter: &'a Filter,
    newest_first: bool,
}

impl Scan<'_> {
    /// Up to `want` matching entries after `cursor`, reading at most `max(2 × want, 100)` ids;
    /// the cursor of what comes next (also when the page is short), or `None` at the end.
    async fn run(
        &self,
        s: &AppState,
        mut cursor: Option<String>,
        want: usize,
    ) -> Result<(Vec<Entry>, Option<String>), ApiError> {
        let keys = keys(s);
        let mut conn = s.redis.clone();
        let budget = (2 * want).max(100);
        let batch = want.clamp(50, 500);
        let (mut found, mut read) = (Vec::new(), 0);
        loop {
            let ids = keys
                .ids(&mut conn, self.scope, cursor.as_deref(), self.newest_first, batch)
                .await
                .map_err(|e| ApiError::unavailable(&e))?;
            let entries = keys.entries(&mut conn, &ids).await.map_err(|e| ApiError::unavailable(&e))?;
            for e in entries {
                let id = e.id.clone();
                if self.filter.matches(&e) {
                    found.push(e);
                }
                if found.len() == want {
                    return Ok((found, Some(id)));
                }
            }
            read += ids.len();
            cursor = ids.last().cloned();
            if ids.len() < batch {
                return Ok((found, None));
            }
            if read >= budget {
                return Ok((found, cursor));
            }
        }
    }
}

/// Shows one dead letter: its headers, properties and body (escaped when not UTF-8).
#[utoipa::path(
    get,
    path = "/v1/dlq/{id}",
    operation_id = "dlq_show",
    tag = "dead letters",
    params(("id" = String, Path, description = "The dead letter's id", pattern = "^d_[0-9A-HJKMNP-TV-Z]{26}$")),
    responses(
        (status = 200, description = "The dead letter", body = DeadLetterDetail),
        (status = 400, description = "`id` is not a dead letter id", body = ErrorBody),
        (status = 404, description = "No such dead letter (or it was re-driven or discarded)", body = ErrorBody),
        (status = 503, description = "Redis is down", body = ErrorBody),
    )
)]
pub(crate) async fn show(
    caller: Caller,
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Operate)?;
    let (e, body) = load(&s, &caller, &id).await?;
    let detail = DeadLetterDetail {
        summary: DeadLetterSummary::of(&e),
        exchange: e.exchange.clone(),
        routing_key: e.routing_key.clone(),
        deaths: e.deaths,
        body_truncated: e.body_truncated,
        not_redrivable: redrive::refusal(&e),
        properties: e.properties.clone(),
        headers: e.headers.clone(),
        body: shown_body(&body),
    };
    Ok(axum::Json(detail))
}

/// Re-drives one dead letter: re-publishes it as a new message where its kind is consumed, then
/// removes it.
#[utoipa::path(
    post,
    path = "/v1/dlq/{id}/redrive",
    operation_id = "dlq_redrive",
    tag = "dead letters",
    params(("id" = String, Path, description = "The dead letter's id", pattern = "^d_[0-9A-HJKMNP-TV-Z]{26}$")),
    responses(
        (status = 202, description = "Published again (confirmed by the broker) and removed from the store", body = Redriven),
        (status = 400, description = "`id` is not a dead letter id", body = ErrorBody),
        (status = 404, description = "No such dead letter (or it was re-driven or discarded already)", body = ErrorBody),
        (status = 409, description = "It cannot be re-driven (the message says why), or another redrive of it is under way", body = ErrorBody),
        (status = 503, description = "Redis or RabbitMQ is down; the dead letter stays stored", body = ErrorBody),
    )
)]
pub(crate) async fn redrive_one(
    caller: Caller,
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Operate)?;
    let (e, body) = load(&s, &caller, &id).await?;
    let done = redrive(&s, &e, &body).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(done)))
}

/// Claims, publishes, removes.
async fn redrive(s: &AppState, e: &Entry, body: &[u8]) -> Result<Redriven, ApiError> {
    let target = redrive::target(s, e, body).await?;
    let keys = keys(s);
    let mut conn = s.redis.clone();
    match keys.claim(&mut conn, &e.id, now_ms(), REDRIVE_HOLD_MS).await.map_err(|err| ApiError::unavailable(&err))? {
        Claim::Claimed => {}
        Claim::Missing => return Err(gone(&e.id)),
        Claim::Held => return Err(ApiError::conflict(format!("dead letter `{}` is being re-driven right now", e.id))),
    }
    if let Err(err) = redrive::publish(s, &target, body).await {
        let _ = keys.unclaim(&mut conn, &e.id).await;
        return Err(err);
    }
    // Published: from here a failure leaves the entry, and a second redrive a copy (fenced).
    keys.delete(&mut conn, e).await.map_err(|err| ApiError::unavailable(&err))?;
    metric::dead_letter_action("redriven", e.kind.as_str());
    tracing::info!(id = %e.id, kind = e.kind.as_str(), session = ?e.session_id, routing_key = %target.routing_key, "dead letter re-driven");
    Ok(Redriven {
        id: e.id.clone(),
        kind: e.kind,
        session_id: redrive::session_of(e).map(String::from),
        exchange: target.exchange,
        routing_key: target.routing_key,
        redriven: e.redriven + 1,
    })
}

/// Re-drives the dead letters that match, oldest first, up to `limit`; those that cannot be
/// re-driven are reported and stay stored.
#[utoipa::path(
    post,
    path = "/v1/dlq/redrive",
    operation_id = "dlq_redrive_many",
    tag = "dead letters",
    request_body = RedriveMany,
    responses(
        (status = 200, description = "What was re-driven and what was refused", body = RedriveReport),
        (status = 400, description = "The body is malformed or a field is invalid", body = ErrorBody),
        (status = 403, description = "The token lacks the `operate` role, or names another tenant", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 503, description = "Redis or RabbitMQ is down (what was re-driven before stays re-driven)", body = ErrorBody),
    )
)]
pub(crate) async fn redrive_many(
    caller: Caller,
    State(s): State<AppState>,
    ApiJson(body): ApiJson<RedriveMany>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Operate)?;
    let scope = tenant_scope(&caller, body.tenant.as_deref())?.map(String::from);
    let filter = Filter::parse(body.kind.as_deref(), body.reason, body.queue, body.session_id)?;
    let limit = match &body.limit {
        None => 100,
        Some(n) => whole(n)
            .filter(|l| (1..=MAX_BULK).contains(l))
            .ok_or_else(|| ApiError::invalid(format!("limit: must be a whole number between 1 and {MAX_BULK}")))?,
    };
    let scan = Scan { scope: scope.as_deref(), filter: &filter, newest_first: false };
    let mut report = RedriveReport { redriven: Vec::new(), refused: Vec::new(), more: false };
    let mut cursor = None;
    loop {
        let (entries, next) = scan.run(&s, cursor, limit - report.redriven.len()).await?;
        for e in entries {
            let Some((e, data)) =
                keys(&s).get(&mut s.redis.clone(), &e.id).await.map_err(|err| ApiError::unavailable(&err))?
            else {
                continue;
            };
            match redrive(&s, &e, &data).await {
                Ok(done) => report.redriven.push(done),
                Err(err) if err.status().is_client_error() => {
                    report.refused.push(Refused { id: e.id.clone(), error: err.message().to_owned() });
                }
                Err(err) => return Err(err),
            }
        }
        cursor = next;
        if cursor.is_none() || report.redriven.len() >= limit {
            report.more = cursor.is_some();
            return Ok(axum::Json(report));
        }
    }
}

/// `n` when it is a whole number (`5` or `5.0`).
fn whole(n: &serde_json::Number) -> Option<usize> {
    let f = n.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= MAX_BULK as f64);
    n.as_u64().or(f.map(|f| f as u64)).and_then(|u| usize::try_from(u).ok())
}

/// Discards one dead letter: removes it from the store for good.
#[utoipa::path(
    delete,
    path = "/v1/dlq/{id}",
    operation_id = "dlq_discard",
    tag = "dead letters",
    params(("id" = String, Path, description = "The dead letter's id", pattern = "^d_[0-9A-HJKMNP-TV-Z]{26}$")),
    responses(
        (status = 200, description = "Discarded", body = Discarded),
        (status = 400, description = "`id` is not a dead letter id", body = ErrorBody),
        (status = 404, description = "No such dead letter (or it was re-driven or discarded already)", body = ErrorBody),
        (status = 503, description = "Redis is down", body = ErrorBody),
    )
)]
pub(crate) async fn discard(
    caller: Caller,
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Operate)?;
    let (e, _) = load(&s, &caller, &id).await?;
    if !keys(&s).delete(&mut s.redis.clone(), &e).await.map_err(|err| ApiError::unavailable(&err))? {
        return Err(gone(&e.id));
    }
    metric::dead_letter_action("discarded", e.kind.as_str());
    tracing::info!(id = %e.id, kind = e.kind.as_str(), reason = %e.reason, "dead letter discarded");
    Ok(axum::Json(Discarded { id: e.id, status: "discarded" }))
}

/// The dead letter `id` and its body, as `caller` may see it: another tenant's is 404, like a
/// missing one.
async fn load(s: &AppState, caller: &Caller, id: &str) -> Result<(Entry, Vec<u8>), ApiError> {
    check_id(id)?;
    let found = keys(s).get(&mut s.redis.clone(), id).await.map_err(|e| ApiError::unavailable(&e))?;
    match found {
        Some((e, body)) if caller.is_admin() || e.tenant.as_deref() == Some(caller.tenant.as_str()) => Ok((e, body)),
        _ => Err(gone(id)),
    }
}

fn gone(id: &str) -> ApiError {
    ApiError::not_found(format!("no dead letter `{id}` (re-driven or discarded already, or never stored)"))
}

/// Checks the `d_<ULID>` shape (Crockford base 32, upper case).
fn check_id(id: &str) -> Result<(), ApiError> {
    let ulid = id.strip_prefix("d_").unwrap_or_default();
    let crockford = |c: char| c.is_ascii_digit() || (c.is_ascii_uppercase() && !matches!(c, 'I' | 'L' | 'O' | 'U'));
    if ulid.len() == 26 && ulid.chars().all(crockford) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!("id: `{id}` is not a dead letter id (`d_` and a ULID)")))
    }
}
