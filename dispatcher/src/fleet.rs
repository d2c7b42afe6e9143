//! `GET /v1/fleet`: how the fleet is doing, for the console's fleet page and for scripts.
//!
//! Steps per second come from the workers' pulse (each writes its own rate every few seconds;
//! entries older than [`FRESH_MS`] are a worker gone). Queue depths and breakers are what the
//! gauges read last (every few seconds). Spend today is the daily counters': the caller's tenant
//! against its cap, and for an admin every tenant the config names and every agent's fleet-wide
//! spend against the agent's cap.

use std::sync::{Arc, Mutex, PoisonError};

use agentfleet::config::Role;
use agentfleet::telemetry::now_ms;
use axum::extract::State;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;

/// A pulse older than this is a worker that stopped.
const FRESH_MS: u64 = 15_000;

/// What the gauges read last.
#[derive(Debug, Default, Clone)]
pub(crate) struct Readings {
    /// Step and request queues, and the dead-letter queue.
    pub(crate) queues: Vec<QueueDepth>,
    /// Every breaker the config implies.
    pub(crate) breakers: Vec<BreakerState>,
    /// When, Unix ms (0: not yet).
    pub(crate) at_ms: u64,
}

/// The last readings, shared by the gauges (writing) and the handler (reading).
pub(crate) type Shared = Arc<Mutex<Readings>>;

/// One queue.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct QueueDepth {
    queue: String,
    /// Ready messages.
    messages: u32,
    consumers: u32,
}

impl QueueDepth {
    pub(crate) fn new(queue: String, messages: u32, consumers: u32) -> Self {
        Self { queue, messages, consumers }
    }
}

/// One circuit breaker.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct BreakerState {
    /// `model:<provider>` or `tool:<name>`.
    name: String,
    /// `closed`, `open` or `half_open`.
    status: String,
}

impl BreakerState {
    pub(crate) fn new(name: String, status: &str) -> Self {
        Self { name, status: status.to_owned() }
    }
}

/// Spend today (UTC) against a daily cap.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Spend {
    /// `tenant` or `agent`.
    scope: &'static str,
    name: String,
    /// What counts against the cap: spent today, plus what calls in flight and the workers'
    /// unspent allowances hold (given back within seconds of use or idleness).
    counted_usd: f64,
    /// Null: no cap.
    cap_usd: Option<f64>,
}

/// The answer of `GET /v1/fleet`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Fleet {
    /// Steps handled per second by the workers alive, over their last few seconds.
    steps_per_second: f64,
    /// Workers that reported in the last 15 s.
    workers: usize,
    queues: Vec<QueueDepth>,
    /// Messages in the dead-letter queue.
    dead_letters: u32,
    breakers: Vec<BreakerState>,
    /// Only the open and half-open breakers' names.
    open_breakers: Vec<String>,
    spend_today: Vec<Spend>,
    /// When the queues and breakers were read, Unix ms (0: not yet).
    read_at_ms: u64,
}

/// The fleet at a glance.
#[utoipa::path(
    get,
    path = "/v1/fleet",
    tag = "fleet",
    responses(
        (status = 200, description = "Steps per second, queues, dead letters, breakers and spend today", body = Fleet),
        (status = 403, description = "The token lacks the `read` role", body = crate::error::ErrorBody),
        (status = 503, description = "Redis is down", body = crate::error::ErrorBody),
    )
)]
pub(crate) async fn fleet(caller: Caller, State(s): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Read)?;
    let key = agentfleet::store::pulse_key(&s.cfg.redis.key_prefix);
    let pulse: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(&key)
        .query_async(&mut s.redis.clone())
        .await
        .map_err(|e| ApiError::unavailable(&e))?;
    let now = now_ms();
    let fresh: Vec<f64> = pulse
        .values()
        .filter_map(|v| {
            let (rate, at) = v.split_once(' ')?;
            let at: u64 = at.parse().ok()?;
            (now.saturating_sub(at) < FRESH_MS).then(|| rate.parse::<f64>().ok()).flatten()
        })
        .collect();
    let readings = s.readings.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let dead = agentfleet::amqp::Topology::from_config(&s.cfg.amqp).dead();
    let dead_letters = readings.queues.iter().find(|q| q.queue == dead).map_or(0, |q| q.messages);
    let open_breakers = readings.breakers.iter().filter(|b| b.status != "closed").map(|b| b.name.clone()).collect();
    Ok(axum::Json(Fleet {
        steps_per_second: (fresh.iter().sum::<f64>() * 100.0).round() / 100.0,
        workers: fresh.len(),
        queues: readings.queues,
        dead_letters,
        breakers: readings.breakers,
        open_breakers,
        spend_today: spend_today(&s, &caller, agentfleet::store::utc_day(now)).await?,
        read_at_ms: readings.at_ms,
    }))
}

/// The caller's tenant's spend today; for an admin, every configured tenant's and every agent's.
async fn spend_today(s: &AppState, caller: &Caller, day: u64) -> Result<Vec<Spend>, ApiError> {
    let usd = |micro: u64| micro as f64 / 1_000_000.0;
    let mut tenants = vec![caller.tenant.to_string()];
    if caller.is_admin() {
        tenants.extend(s.cfg.tenants.keys().map(ToString::to_string));
        tenants.sort();
        tenants.dedup();
    }
    let mut out = Vec::new();
    for tenant in tenants {
        let (_, spent) = s.store.daily_spend("-", &tenant, day).await.map_err(|e| ApiError::unavailable(&e))?;
        out.push(Spend {
            scope: "tenant",
            cap_usd: Some(s.cfg.tenant_daily_cap(&tenant)),
            name: tenant,
            counted_usd: usd(spent),
        });
    }
    if caller.is_admin() {
        for (name, agent) in &s.cfg.agents {
            let (spent, _) =
                s.store.daily_spend(name.as_str(), "-", day).await.map_err(|e| ApiError::unavailable(&e))?;
            out.push(Spend {
                scope: "agent",
                name: name.to_string(),
                counted_usd: usd(spent),
                cap_usd: agent.budget.daily_cap_usd,
            });
        }
    }
    Ok(out)
}
