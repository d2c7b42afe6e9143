//! Logs, trace records and metrics.
//!
//! Logs are JSON lines (tracing). Each action of a step is one [`TraceRecord`], written as a log line
//! and to the session's `trace` stream. Metrics go through the typed helpers in [`metric`], so names
//! and labels are defined once and session ids never become labels.

use serde::Serialize;
use tracing_subscriber::EnvFilter;

/// Installs the JSON log subscriber; `RUST_LOG` filters (default `info`).
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().json().with_env_filter(filter).with_current_span(false).try_init();
}

/// One action of a session, as recorded in its trace.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TraceRecord<'a> {
    /// Unix ms.
    pub ts_ms: u64,
    /// The agent.
    pub agent_id: &'a str,
    /// The session.
    pub session_id: &'a str,
    /// The step.
    pub step: u32,
    /// `model_call`, `tool_call`, `escalation`, `budget`, `error`, …
    pub action: &'a str,
    /// The tool, for tool actions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_name: Option<&'a str>,
    /// A short summary of the input.
    pub input_summary: String,
    /// A short summary of the output.
    pub output_summary: String,
    /// Input tokens (model calls).
    pub input_tokens: u64,
    /// Output tokens (model calls).
    pub output_tokens: u64,
    /// Cost in USD (model calls).
    pub cost_usd: f64,
    /// How long the action took.
    pub duration_ms: u64,
    /// Whether it succeeded.
    pub success: bool,
    /// The error, when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The worker that ran it.
    pub worker: &'a str,
}

impl TraceRecord<'_> {
    /// Logs the record as a JSON line and returns it as JSON text for the trace stream.
    pub fn emit(&self) -> String {
        let json =
            serde_json::to_string(self).unwrap_or_else(|e| format!(r#"{{"error":"unserializable trace: {e}"}}"#));
        tracing::info!(target: "agentfleet::trace", record = %json, "trace");
        json
    }
}

/// A summary of `text` for traces: at most `max` characters.
pub fn summarize(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// Unix time in ms.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Installs the Prometheus recorder with explicit buckets, serving `/metrics` on `listen`.
pub fn install_metrics(
    listen: Option<std::net::SocketAddr>,
) -> Result<metrics_exporter_prometheus::PrometheusHandle, String> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let seconds = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
        .map_err(|e| e.to_string())?;
    match listen {
        Some(addr) => {
            let builder = builder.with_http_listener(addr);
            let (recorder, exporter) = builder.build().map_err(|e| e.to_string())?;
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
            tokio::spawn(exporter);
            Ok(handle)
        }
        None => builder.install_recorder().map_err(|e| e.to_string()),
    }
}

/// Typed metric helpers: every metric name and label lives here.
pub mod metric {
    use std::time::Duration;

    /// A step message handled, by what it turned out to be.
    pub fn step_handled(outcome: &'static str) {
        metrics::counter!("agentfleet_step_messages_total", "outcome" => outcome).increment(1);
    }

    /// Time spent in one phase of a step.
    pub fn phase_duration(phase: &'static str, d: Duration) {
        metrics::histogram!("agentfleet_step_phase_duration_seconds", "phase" => phase).record(d.as_secs_f64());
    }

    /// A model call and its outcome.
    pub fn model_call(agent: &str, model: &str, outcome: &'static str, d: Duration) {
        let labels = [("agent", agent.to_owned()), ("model", model.to_owned()), ("outcome", outcome.to_owned())];
        metrics::counter!("agentfleet_model_calls_total", &labels).increment(1);
        metrics::histogram!("agentfleet_model_call_duration_seconds", &labels[..2]).record(d.as_secs_f64());
    }

    /// Tokens and cost of a model call.
    pub fn model_usage(agent: &str, model: &str, input: u64, output: u64, cost_micro_usd: u64) {
        let labels = [("agent", agent.to_owned()), ("model", model.to_owned())];
        metrics::counter!("agentfleet_model_input_tokens_total", &labels).increment(input);
        metrics::counter!("agentfleet_model_output_tokens_total", &labels).increment(output);
        metrics::counter!("agentfleet_cost_micro_usd_total", &labels).increment(cost_micro_usd);
    }

    /// A tool call and its outcome.
    pub fn tool_call(tool: &str, success: bool, d: Duration) {
        let outcome = if success { "success" } else { "error" };
        let labels = [("tool", tool.to_owned()), ("outcome", outcome.to_owned())];
        metrics::counter!("agentfleet_tool_calls_total", &labels).increment(1);
        metrics::histogram!("agentfleet_tool_call_duration_seconds", &labels[..1]).record(d.as_secs_f64());
    }

    /// A session that reached a final or waiting status.
    pub fn session_ended(agent: &str, status: &'static str) {
        let labels = [("agent", agent.to_owned()), ("status", status.to_owned())];
        metrics::counter!("agentfleet_sessions_finished_total", &labels).increment(1);
    }

    /// A session created by the dispatcher.
    pub fn session_created(agent: &str) {
        metrics::counter!("agentfleet_sessions_created_total", "agent" => agent.to_owned()).increment(1);
    }

    /// A session crossed its budget alert threshold (once per session).
    pub fn budget_alert(agent: &str, limit: &'static str) {
        let labels = [("agent", agent.to_owned()), ("limit", limit.to_owned())];
        metrics::counter!("agentfleet_budget_alerts_total", &labels).increment(1);
    }

    /// A session ended `budget_exhausted`.
    pub fn budget_exhausted(agent: &str, limit: &'static str) {
        let labels = [("agent", agent.to_owned()), ("limit", limit.to_owned())];
        metrics::counter!("agentfleet_budget_exhaustions_total", &labels).increment(1);
    }

    /// A step found a fleet-wide daily cap in its way.
    pub fn daily_cap_reached(agent: &str) {
        metrics::counter!("agentfleet_daily_cap_hits_total", "agent" => agent.to_owned()).increment(1);
    }

    /// A message sent to the dead-letter queue.
    pub fn dead_lettered(reason: &'static str) {
        metrics::counter!("agentfleet_dead_lettered_total", "reason" => reason).increment(1);
    }

    /// A worker slept in-process before retrying a tool call (bounded by `max_inline_retry_ms`).
    pub fn inline_retry_sleep(d: Duration) {
        metrics::histogram!("agentfleet_inline_retry_sleep_seconds").record(d.as_secs_f64());
    }

    /// A circuit breaker changed state.
    pub fn breaker_transition(name: &str, transition: &'static str) {
        let labels = [("breaker", name.to_owned()), ("transition", transition.to_owned())];
        metrics::counter!("agentfleet_breaker_transitions_total", &labels).increment(1);
    }

    /// A call refused because its circuit breaker is open.
    pub fn breaker_rejected(name: &str) {
        metrics::counter!("agentfleet_breaker_rejections_total", "breaker" => name.to_owned()).increment(1);
    }

    /// A step retried later through a delay tier.
    pub fn retry(reason: &'static str) {
        metrics::counter!("agentfleet_retries_total", "reason" => reason).increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_cut_on_characters() {
        assert_eq!(summarize("héllo", 2), "hé…");
        assert_eq!(summarize("hi", 5), "hi");
    }
}
