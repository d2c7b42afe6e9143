//! Logs, trace records and metrics.
//!
//! Logs are JSON lines (tracing). Each action of a step is one [`TraceRecord`], written as a log line
//! and to the session's `trace` stream. Metrics go through the typed helpers in [`metric`], so names
//! and labels are defined once and session ids never become labels.

pub mod otel;

use serde::Serialize;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::TelemetryConfig;

/// What [`init`] set up. [`Telemetry::shutdown`] sends the spans still buffered.
#[must_use = "dropping it skips the final flush of spans"]
pub struct Telemetry {
    otel: Option<otel::OtelGuard>,
}

impl Telemetry {
    /// Flushes and stops the span export, if any. It blocks up to the export timeout: call it from
    /// a blocking context, or use [`Telemetry::flush`] on the runtime.
    pub fn shutdown(self) {
        if let Some(otel) = self.otel {
            otel.shutdown();
        }
    }

    /// [`Telemetry::shutdown`] on a blocking thread, so the runtime's workers never wait on it.
    pub async fn flush(self) {
        let _ = tokio::task::spawn_blocking(move || self.shutdown()).await;
    }
}

/// Installs the process's subscriber: JSON log lines filtered by `RUST_LOG` (default `info`), and,
/// when `[telemetry.otlp]` has an endpoint, OpenTelemetry spans of agentfleet's own code (and of
/// the HTTP layer) exported as `service` (see [`otel`]).
pub fn init(cfg: &TelemetryConfig, service: &str) -> Result<Telemetry, otel::OtelError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer().json().with_current_span(false).with_filter(filter);
    if !cfg.otlp.enabled() {
        let _ = tracing_subscriber::registry().with(logs).try_init();
        return Ok(Telemetry { otel: None });
    }
    let (tracer, guard) = otel::install(&cfg.otlp, service)?;
    let spans = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        // Targets match by prefix (`agentfleet` covers `agentfleet_worker`, …) and give tracing a
        // static answer per call site, so debug events elsewhere cost nothing.
        .with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target("agentfleet", tracing::Level::INFO)
                .with_target("tower_http", tracing::Level::INFO),
        );
    let _ = tracing_subscriber::registry().with(logs).with(spans).try_init();
    Ok(Telemetry { otel: Some(guard) })
}

/// One action of a session, as recorded in its trace.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TraceRecord<'a> {
    /// When the action ended, Unix ms (it began `duration_ms` earlier).
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
    /// Input tokens written to the prompt cache (model calls; not part of `input_tokens`).
    #[serde(skip_serializing_if = "is_zero")]
    pub cache_creation_input_tokens: u64,
    /// Input tokens read from the prompt cache (model calls; not part of `input_tokens`).
    #[serde(skip_serializing_if = "is_zero")]
    pub cache_read_input_tokens: u64,
    /// Cost in USD (model calls).
    pub cost_usd: f64,
    /// Cost in micro-USD, exact: the trace's sum equals the session's recorded cost.
    pub cost_micro_usd: u64,
    /// The cost by kind of token, micro-USD, summing to `cost_micro_usd` (reconciled model calls;
    /// absent for a call counted at its worst case).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_parts: Option<crate::budget::Bill>,
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
    /// Logs the record as a JSON line and returns it as JSON text for the trace stream. The error,
    /// if any, goes through [`redact_error`] first.
    pub fn emit(&self) -> String {
        let redacted;
        let record = match &self.error {
            Some(e) => {
                redacted = TraceRecord { error: Some(redact_error(e)), ..self.clone() };
                &redacted
            }
            None => self,
        };
        let json =
            serde_json::to_string(record).unwrap_or_else(|e| format!(r#"{{"error":"unserializable trace: {e}"}}"#));
        tracing::info!(target: "agentfleet::trace", record = %json, "trace");
        otel::record_span(record);
        json
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

static REDACTION: std::sync::OnceLock<Redaction> = std::sync::OnceLock::new();

/// What is never written to a log line, a trace or an error text: secret values (API keys, tool
/// header values) wherever they appear, and the values of configured sensitive JSON fields.
#[derive(Debug, Default)]
pub struct Redaction {
    secrets: Vec<String>,
    fields: Vec<String>,
}

/// Sets the process's redaction once (at start); later calls are ignored.
pub fn set_redaction(secrets: Vec<String>, fields: Vec<String>) {
    let secrets = secrets.into_iter().filter(|s| s.len() >= 6).collect();
    let _ = REDACTION.set(Redaction { secrets, fields });
}

/// `text` with every secret replaced by `[redacted]`, and, when it is JSON, the values of the
/// sensitive fields too.
pub fn redact(text: &str) -> String {
    let Some(r) = REDACTION.get() else { return text.to_owned() };
    let mut out = text.to_owned();
    for secret in &r.secrets {
        if out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), "[redacted]");
        }
    }
    if !r.fields.is_empty()
        && let Ok(mut json) = serde_json::from_str::<serde_json::Value>(&out)
    {
        redact_fields(&mut json, &r.fields);
        out = json.to_string();
    }
    out
}

fn redact_fields(v: &mut serde_json::Value, fields: &[String]) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                if fields.iter().any(|f| f.eq_ignore_ascii_case(k)) {
                    *val = serde_json::Value::String("[redacted]".into());
                } else {
                    redact_fields(val, fields);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|i| redact_fields(i, fields)),
        _ => {}
    }
}

/// An error text fit for a log line, a trace, a session's `error` field or a dead-letter header:
/// every URL cut to scheme, host and path ([`crate::scrub::urls_in`]), then [`redact`]ed.
pub fn redact_error(text: &str) -> String {
    redact(&crate::scrub::urls_in(text))
}

/// A redacted summary of `text` (redacted whole, before it is cut, so JSON fields are found).
pub fn summary_of(text: &str, max: usize) -> String {
    summarize(&redact(text), max)
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

/// The Prometheus recorder could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The exporter refused its settings or could not bind its listener.
    #[error("prometheus exporter: {0}")]
    Exporter(#[from] metrics_exporter_prometheus::BuildError),
    /// Another recorder is installed in this process already.
    #[error("a metrics recorder is already installed")]
    AlreadyInstalled,
}

/// The buckets of `agentfleet_step_overhead_seconds`. Its targets are a p50 of 2 ms and a p99 of
/// 10 ms (docs/BENCHMARKS.md), below or at the first of the other histograms' buckets (5 ms), so
/// it has buckets of its own from 0.25 ms: a quantile interpolated in them is off by at most one
/// bucket's width, 1 ms or less up to 5 ms.
const OVERHEAD_SECONDS: [f64; 18] = [
    0.000_25, 0.000_5, 0.000_75, 0.001, 0.001_5, 0.002, 0.003, 0.004, 0.005, 0.007_5, 0.01, 0.015, 0.02, 0.05, 0.1,
    0.5, 1.0, 5.0,
];

/// Installs the Prometheus recorder with explicit buckets, serving `/metrics` on `listen`.
pub fn install_metrics(
    listen: Option<std::net::SocketAddr>,
) -> Result<metrics_exporter_prometheus::PrometheusHandle, MetricsError> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let seconds = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)?
        .set_buckets_for_metric(Matcher::Full("agentfleet_step_overhead_seconds".into()), &OVERHEAD_SECONDS)?;
    match listen {
        Some(addr) => {
            let builder = builder.with_http_listener(addr);
            let (recorder, exporter) = builder.build()?;
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|_| MetricsError::AlreadyInstalled)?;
            tokio::spawn(exporter);
            metric::describe();
            Ok(handle)
        }
        None => {
            let handle = builder.install_recorder()?;
            metric::describe();
            Ok(handle)
        }
    }
}

/// Typed metric helpers: every metric name and label lives here.
pub mod metric {
    /// Every metric with its help text, so `/metrics` carries `# HELP` for each (promtool asks).
    const HELP: [(&str, &str, char); 34] = [
        ("agentfleet_step_messages_total", "Step messages handled, by what they turned out to be.", 'c'),
        ("agentfleet_step_phase_duration_seconds", "Time in one phase of a step (llm, tools).", 'h'),
        ("agentfleet_step_duration_seconds", "Time to handle one step message.", 'h'),
        ("agentfleet_step_overhead_seconds", "Step time outside the model call and the tool calls.", 'h'),
        ("agentfleet_model_calls_total", "Model calls by agent, model and outcome (stop reason or error).", 'c'),
        ("agentfleet_model_call_duration_seconds", "Model call latency.", 'h'),
        ("agentfleet_model_input_tokens_total", "Uncached input tokens billed.", 'c'),
        ("agentfleet_model_output_tokens_total", "Output tokens billed.", 'c'),
        ("agentfleet_model_cache_tokens_total", "Prompt-cache tokens billed, by kind (read, write).", 'c'),
        ("agentfleet_cost_micro_usd_total", "Model spend in micro-USD, by agent and model.", 'c'),
        (
            "agentfleet_cost_by_kind_micro_usd_total",
            "Model spend of reconciled calls in micro-USD, by agent, model and kind of token (input, output, cache_write, cache_read).",
            'c',
        ),
        ("agentfleet_tool_calls_total", "Tool calls by tool and outcome.", 'c'),
        ("agentfleet_tool_call_duration_seconds", "Tool call latency, retries included.", 'h'),
        ("agentfleet_sessions_created_total", "Sessions created, by agent.", 'c'),
        ("agentfleet_sessions_finished_total", "Sessions that ended or paused, by agent and status.", 'c'),
        ("agentfleet_budget_alerts_total", "Sessions that crossed their budget alert threshold.", 'c'),
        ("agentfleet_budget_exhaustions_total", "Sessions ended by a budget limit, by limit.", 'c'),
        ("agentfleet_daily_cap_hits_total", "Steps refused by a fleet-wide daily spend cap.", 'c'),
        ("agentfleet_dead_lettered_total", "Messages sent to the dead-letter queue, by reason.", 'c'),
        ("agentfleet_inline_retry_sleep_seconds", "In-process waits before tool retries.", 'h'),
        ("agentfleet_breaker_transitions_total", "Circuit breaker transitions, by breaker.", 'c'),
        ("agentfleet_breaker_rejections_total", "Calls refused by an open circuit breaker.", 'c'),
        ("agentfleet_breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open.", 'g'),
        ("agentfleet_rate_limit_adaptive_rpm", "Requests per minute left by provider overloads (0: none).", 'g'),
        ("agentfleet_retries_total", "Steps sent through the delay queues, by reason.", 'c'),
        ("agentfleet_escalations_total", "Sessions paused for people, by kind.", 'c'),
        ("agentfleet_human_decisions_total", "Replies, approvals, rejections and expired waits.", 'c'),
        ("agentfleet_queue_messages", "Messages ready in a queue.", 'g'),
        ("agentfleet_queue_consumers", "Consumers of a queue.", 'g'),
        ("agentfleet_sessions_waiting", "Sessions waiting for people now.", 'g'),
        ("agentfleet_webhook_deliveries_total", "Webhook delivery attempts, by outcome.", 'c'),
        ("agentfleet_dead_letters_stored", "Dead letters kept in the dead-letter store, fleet-wide.", 'g'),
        ("agentfleet_dead_letter_store_full", "1 while the dead-letter store is full.", 'g'),
        ("agentfleet_dead_letter_actions_total", "Dead letters stored, re-driven, discarded.", 'c'),
    ];

    /// Registers the help text of every metric with the installed recorder.
    pub fn describe() {
        for (name, help, kind) in HELP {
            match kind {
                'c' => metrics::describe_counter!(name, help),
                'h' => metrics::describe_histogram!(name, help),
                _ => metrics::describe_gauge!(name, help),
            }
        }
    }

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

    /// The `tool` label of a call to a tool the agent does not have.
    pub const UNKNOWN_TOOL: &str = "unknown";

    /// A tool call and its outcome. `tool` is `None` when the agent has no tool by the name the
    /// model used: that name is the model's to choose, and as a label value a hostile model could
    /// grow series without bound, so it is counted as [`UNKNOWN_TOOL`].
    pub fn tool_call(tool: Option<&str>, success: bool, d: Duration) {
        let outcome = if success { "success" } else { "error" };
        let labels = [("tool", tool.unwrap_or(UNKNOWN_TOOL).to_owned()), ("outcome", outcome.to_owned())];
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

    /// A reconciled call's cost by kind of token.
    pub fn cost_by_kind(agent: &str, model: &str, bill: &crate::budget::Bill) {
        let kinds = [
            ("input", bill.input),
            ("output", bill.output),
            ("cache_write", bill.cache_write),
            ("cache_read", bill.cache_read),
        ];
        for (kind, n) in kinds {
            let labels = [("agent", agent.to_owned()), ("model", model.to_owned()), ("kind", kind.to_owned())];
            metrics::counter!("agentfleet_cost_by_kind_micro_usd_total", &labels).increment(n);
        }
    }

    /// Cache tokens of a model call, by kind (`read`, `write`).
    pub fn cache_tokens(agent: &str, model: &str, read: u64, write: u64) {
        for (kind, n) in [("read", read), ("write", write)] {
            let labels = [("agent", agent.to_owned()), ("model", model.to_owned()), ("kind", kind.to_owned())];
            metrics::counter!("agentfleet_model_cache_tokens_total", &labels).increment(n);
        }
    }

    /// A whole step's time, and the part of it that was neither the model nor the tools.
    pub fn step_duration(total: Duration, overhead: Duration) {
        metrics::histogram!("agentfleet_step_duration_seconds").record(total.as_secs_f64());
        metrics::histogram!("agentfleet_step_overhead_seconds").record(overhead.as_secs_f64());
    }

    /// A session paused for people (`human`, `approval`, `model_failure`).
    pub fn escalation(agent: &str, kind: &'static str) {
        let labels = [("agent", agent.to_owned()), ("kind", kind.to_owned())];
        metrics::counter!("agentfleet_escalations_total", &labels).increment(1);
    }

    /// A person's decision on a waiting session (`replied`, `approved`, `rejected`, `expired`).
    pub fn human_decision(decision: &'static str) {
        metrics::counter!("agentfleet_human_decisions_total", "decision" => decision).increment(1);
    }

    /// A breaker's state: 0 closed, 1 half-open, 2 open.
    pub fn breaker_state(name: &str, state: f64) {
        metrics::gauge!("agentfleet_breaker_state", "breaker" => name.to_owned()).set(state);
    }

    /// The adaptive request rate of a rate limiter (`provider:model`, from the config); 0 for none.
    pub fn adaptive_rate(limiter: &str, per_minute: f64) {
        metrics::gauge!("agentfleet_rate_limit_adaptive_rpm", "limiter" => limiter.to_owned()).set(per_minute);
    }

    /// A queue's depth and consumers, as the broker reports them.
    pub fn queue(queue: &str, messages: u32, consumers: u32) {
        metrics::gauge!("agentfleet_queue_messages", "queue" => queue.to_owned()).set(f64::from(messages));
        metrics::gauge!("agentfleet_queue_consumers", "queue" => queue.to_owned()).set(f64::from(consumers));
    }

    /// Dead letters in the dead-letter store now.
    pub fn dead_letters_stored(n: u64) {
        metrics::gauge!("agentfleet_dead_letters_stored").set(n as f64);
    }

    /// Whether the dead-letter store is full, so that dead letters wait in the queue.
    pub fn dead_letter_store_full(full: bool) {
        metrics::gauge!("agentfleet_dead_letter_store_full").set(if full { 1.0 } else { 0.0 });
    }

    /// A dead letter `stored`, `redriven` or `discarded`, of `kind` (`step`, `request`, `webhook`,
    /// `unknown`).
    pub fn dead_letter_action(action: &'static str, kind: &'static str) {
        metrics::counter!("agentfleet_dead_letter_actions_total", "action" => action, "kind" => kind).increment(1);
    }

    /// Sessions waiting for people right now.
    pub fn waiting_sessions(n: usize) {
        metrics::gauge!("agentfleet_sessions_waiting").set(n as f64);
    }

    /// A webhook delivery attempt and its outcome (`delivered`, `retry`, `gave_up`).
    pub fn webhook_delivery(outcome: &'static str) {
        metrics::counter!("agentfleet_webhook_deliveries_total", "outcome" => outcome).increment(1);
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
    fn redaction_hides_secrets_and_sensitive_fields() {
        set_redaction(vec!["sk-ant-secret-123".into()], vec!["card_number".into()]);
        assert_eq!(redact("key sk-ant-secret-123 leaked"), "key [redacted] leaked");
        let json = redact(r#"{"card_number":"4111","nested":[{"Card_Number":"x"}],"ok":1}"#);
        assert!(!json.contains("4111") && !json.contains("\"x\"") && json.contains("\"ok\":1"), "{json}");
    }

    #[test]
    fn error_texts_lose_url_secrets() {
        let text = redact_error("request failed: error sending request for url (http://user:pass@host/p?token=x)");
        assert!(!text.contains("pass") && !text.contains("token=x"), "{text}");
        assert!(text.contains("http://[redacted]@host/p?[redacted]"), "{text}");
    }

    #[test]
    fn summaries_cut_on_characters() {
        assert_eq!(summarize("héllo", 2), "hé…");
        assert_eq!(summarize("hi", 5), "hi");
    }
}
