//! `GET /v1/sessions/{id}/trace`: every action of a session, and a summary that adds up.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use serde_json::Value;

use agentfleet::config::Role;

use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::session_ref::{load_for, path_id};

/// The most records one answer returns (the stream keeps about 10,000).
const MAX_RECORDS: usize = 20_000;

/// Every recorded action of a session, and totals over them.
#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/trace",
    tag = "sessions",
    params(("id" = String, Path, description = "The session id", pattern = "^s_[0-9A-HJKMNP-TV-Z]{26}$")),
    responses(
        (status = 200, description = "`session_id`, `status`, `otel_trace_id` (the session's OpenTelemetry trace), `summary` and `records`", body = Object),
        (status = 400, description = "`id` is not a session id", body = crate::error::ErrorBody),
        (status = 404, description = "No such session", body = crate::error::ErrorBody),
        (status = 503, description = "Redis is down", body = crate::error::ErrorBody),
    )
)]
pub(crate) async fn trace(
    caller: Caller,
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Read)?;
    let id = path_id(&id)?;
    let view = load_for(&s, &caller, &id).await?;
    let raw = s.store.trace(&id, MAX_RECORDS).await.map_err(|e| ApiError::unavailable(&e))?;
    let records: Vec<Value> = raw.iter().filter_map(|r| serde_json::from_str(r).ok()).collect();
    let summary = summarize(&records, view.meta.step);
    Ok(axum::Json(serde_json::json!({
        "session_id": id,
        "status": view.meta.status,
        "otel_trace_id": agentfleet::telemetry::otel::trace_id(&id).to_string(),
        "summary": summary,
        "records": records,
    })))
}

/// Totals over the records: steps, tokens, cost, duration, errors and tools used.
///
/// A worst-case record of a call (`reservation`) that a late reconcile replaced (`supersedes`) is
/// left out of the totals, as it was taken out of the usage.
pub(crate) fn summarize(records: &[Value], step: u32) -> Value {
    let superseded: std::collections::HashSet<&str> = records.iter().filter_map(|r| r["supersedes"].as_str()).collect();
    let counted: Vec<&Value> =
        records.iter().filter(|r| !r["reservation"].as_str().is_some_and(|id| superseded.contains(id))).collect();
    let sum = |field: &str| counted.iter().filter_map(|r| r[field].as_u64()).sum::<u64>();
    let calls = |action: &str| counted.iter().filter(|r| r["action"] == action).count();
    let mut tools: BTreeMap<String, u64> = BTreeMap::new();
    for r in records.iter().filter(|r| r["action"] == "tool_call") {
        *tools.entry(r["tool_name"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
    }
    // A record's `ts_ms` is when its action ended.
    let first = records
        .iter()
        .filter_map(|r| Some(r["ts_ms"].as_u64()?.saturating_sub(r["duration_ms"].as_u64().unwrap_or(0))))
        .min()
        .unwrap_or(0);
    let last = records.iter().filter_map(|r| r["ts_ms"].as_u64()).max();
    let steps = records.iter().filter_map(|r| r["step"].as_u64()).max().unwrap_or(u64::from(step));
    serde_json::json!({
        "steps": steps,
        "model_calls": calls("model_call") + calls("summary_call"),
        "tool_calls": calls("tool_call"),
        "input_tokens": sum("input_tokens"),
        "output_tokens": sum("output_tokens"),
        "cache_creation_input_tokens": sum("cache_creation_input_tokens"),
        "cache_read_input_tokens": sum("cache_read_input_tokens"),
        "cost_micro_usd": sum("cost_micro_usd"),
        "cost_usd": sum("cost_micro_usd") as f64 / 1_000_000.0,
        "duration_ms": last.map_or(0, |l| l.saturating_sub(first)),
        "errors": records.iter().filter(|r| r["success"] == false).count(),
        "tools_used": tools,
    })
}
