//! OpenTelemetry export: one trace per session, a span per step, a child span per action.
//!
//! A session's steps run on many workers, one message each, and a session may wait days for a
//! person. No process can hold a session span open, so the trace is keyed by the session itself:
//! the trace id *is* the session's ULID, and the session span's id is derived from it. Every step
//! span names that span as its (remote) parent, as if the context had been propagated with the
//! message; the session span itself is written once, when the session ends, starting at the
//! session's creation. Each [`TraceRecord`] becomes a child span of its step, carrying the record's
//! fields and the GenAI semantic-convention attributes where they exist.
//!
//! Sampling is decided by the trace id (`sample_ratio`), so the dispatcher and every worker agree on
//! each session without talking to each other. Spans leave through a batch processor on its own
//! thread with a bounded queue: a slow or absent collector drops spans, it never slows a step.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    SamplingDecision, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, global};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, ShouldSample,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::TraceRecord;
use crate::config::OtlpConfig;
use crate::domain::SessionId;

/// The instrumentation scope of every span agentfleet writes itself.
const SCOPE: &str = "agentfleet";

static ENABLED: AtomicBool = AtomicBool::new(false);
static SAMPLER: std::sync::OnceLock<Sampler> = std::sync::OnceLock::new();

/// The export could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("OTLP export to `{endpoint}`: {source}")]
pub struct OtelError {
    endpoint: String,
    source: opentelemetry_otlp::ExporterBuildError,
}

/// The running export. [`OtelGuard::shutdown`] sends the spans still buffered.
pub struct OtelGuard {
    provider: SdkTracerProvider,
}

impl OtelGuard {
    /// Flushes and stops the exporter. It blocks (up to the export timeout): call it from a
    /// blocking context, e.g. `tokio::task::spawn_blocking`, or after the runtime has stopped.
    pub fn shutdown(self) {
        ENABLED.store(false, Ordering::Relaxed);
        if let Err(e) = self.provider.shutdown() {
            eprintln!("agentfleet: flushing OpenTelemetry spans failed: {e}");
        }
    }
}

/// Builds the exporter and installs the global tracer provider; returns the tracer the tracing
/// layer writes with. `service` is `service.name` unless `OTEL_SERVICE_NAME` says otherwise.
pub(super) fn install(cfg: &OtlpConfig, service: &str) -> Result<(SdkTracer, OtelGuard), OtelError> {
    let endpoint = cfg.traces_url();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint.clone())
        .with_timeout(Duration::from_millis(cfg.timeout_ms))
        .build()
        .map_err(|source| OtelError { endpoint, source })?;
    let batch = BatchConfigBuilder::default()
        .with_scheduled_delay(Duration::from_millis(cfg.batch_delay_ms))
        .with_max_queue_size(cfg.max_queue_size)
        .build();
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(cfg.sample_ratio)));
    let _ = SAMPLER.set(Sampler::TraceIdRatioBased(cfg.sample_ratio));
    let provider = SdkTracerProvider::builder()
        .with_span_processor(BatchSpanProcessor::builder(exporter).with_batch_config(batch).build())
        .with_sampler(sampler)
        .with_resource(resource(service))
        .build();
    global::set_tracer_provider(provider.clone());
    global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    ENABLED.store(true, Ordering::Relaxed);
    Ok((provider.tracer(SCOPE), OtelGuard { provider }))
}

fn resource(service: &str) -> opentelemetry_sdk::Resource {
    let builder = opentelemetry_sdk::Resource::builder();
    let builder = match std::env::var("OTEL_SERVICE_NAME") {
        Ok(name) if !name.is_empty() => builder,
        _ => builder.with_service_name(service.to_owned()),
    };
    let instance = std::env::var("HOSTNAME").unwrap_or_else(|_| format!("pid-{}", std::process::id()));
    builder.with_attribute(KeyValue::new("service.instance.id", instance)).build()
}

/// True while spans are exported.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The OpenTelemetry trace id of a session: its ULID, as 32 hex digits.
pub fn trace_id(id: &SessionId) -> TraceId {
    let ulid = id.as_str().strip_prefix("s_").and_then(|u| ulid::Ulid::from_string(u).ok()).unwrap_or_default();
    TraceId::from_bytes(ulid.to_bytes())
}

/// The span id of a session's root span: the random low half of its ULID (never zero).
fn session_span_id(trace: TraceId) -> SpanId {
    let bytes = trace.to_bytes();
    let mut low = [0u8; 8];
    low.copy_from_slice(&bytes[8..]);
    if low == [0; 8] {
        low[7] = 1;
    }
    SpanId::from_bytes(low)
}

/// Whether a session's spans are kept, decided from its trace id alone.
fn sampled(trace: TraceId) -> bool {
    let Some(sampler) = SAMPLER.get() else { return false };
    let r = sampler.should_sample(None, trace, "session", &SpanKind::Internal, &[], &[]);
    r.decision == SamplingDecision::RecordAndSample
}

/// The context of a session's root span, for a span of that session to name as its parent.
pub fn session_context(id: &SessionId) -> Context {
    if !enabled() {
        return Context::new();
    }
    let trace = trace_id(id);
    let flags = if sampled(trace) { TraceFlags::SAMPLED } else { TraceFlags::default() };
    let span = SpanContext::new(trace, session_span_id(trace), flags, true, TraceState::default());
    Context::new().with_remote_span_context(span)
}

/// Puts a tracing span (before it is entered) into its session's trace, under the session span.
pub fn adopt(span: &tracing::Span, id: &SessionId) {
    if enabled() {
        let _ = span.set_parent(session_context(id));
    }
}

/// Like [`adopt`], and links the span to the one it was started from (an HTTP request, an AMQP
/// delivery), which lives in a trace of its own.
pub fn adopt_linked(span: &tracing::Span, id: &SessionId) {
    if enabled() {
        let from = tracing::Span::current().context().span().span_context().clone();
        adopt(span, id);
        span.add_link(from);
    }
}

/// The span of one HTTP request to the API, named after its route, continuing the caller's trace
/// when the request carries a W3C `traceparent` header.
pub fn http_request_span(method: &str, route: &str, headers: &reqwest::header::HeaderMap) -> tracing::Span {
    let span = tracing::info_span!(
        "request",
        otel.kind = "server",
        otel.name = %format!("{method} {route}"),
        http.request.method = %method,
        http.route = %route,
    );
    if enabled() {
        let parent = global::get_text_map_propagator(|p| p.extract(&Headers(headers)));
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
    span
}

/// Reads trace context from HTTP headers.
struct Headers<'a>(&'a reqwest::header::HeaderMap);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(reqwest::header::HeaderName::as_str).collect()
    }
}

/// What the session span says about the session that ended.
pub struct SessionEnd<'a> {
    /// The session.
    pub id: &'a SessionId,
    /// Its agent.
    pub agent: &'a str,
    /// Its tenant (empty when none).
    pub tenant: &'a str,
    /// The final status.
    pub status: &'a str,
    /// The step it ended at.
    pub step: u32,
    /// When it was created, Unix ms.
    pub created_ms: u64,
    /// Why it ended; the span's error message when the status is a failure, unused otherwise.
    pub error: &'a str,
}

/// Writes the session's root span, from its creation until now.
pub fn session_ended(end: &SessionEnd<'_>) {
    if !enabled() {
        return;
    }
    let tracer = global::tracer(SCOPE);
    let trace = trace_id(end.id);
    let attributes = vec![
        KeyValue::new("agentfleet.session_id", end.id.to_string()),
        KeyValue::new("agentfleet.agent_id", end.agent.to_owned()),
        KeyValue::new("agentfleet.tenant", end.tenant.to_owned()),
        KeyValue::new("agentfleet.status", end.status.to_owned()),
        KeyValue::new("agentfleet.steps", i64::from(end.step)),
    ];
    let span = tracer
        .span_builder("session")
        .with_trace_id(trace)
        .with_span_id(session_span_id(trace))
        .with_kind(SpanKind::Internal)
        .with_start_time(at_ms(end.created_ms))
        .with_attributes(attributes)
        .start_with_context(&tracer, &Context::new());
    finish(span, end.status != "completed" && end.status != "cancelled", end.error, SystemTime::now());
}

/// Writes one trace record as a span under the current step span (or, outside one, under its
/// session's span), ending when the record was made.
pub(super) fn record_span(r: &TraceRecord<'_>) {
    if !enabled() {
        return;
    }
    let mut parent = tracing::Span::current().context();
    if !parent.has_active_span()
        && let Ok(id) = SessionId::parse(r.session_id)
    {
        parent = session_context(&id);
    }
    let tracer = global::tracer(SCOPE);
    let end = at_ms(r.ts_ms);
    let start = end.checked_sub(Duration::from_millis(r.duration_ms)).unwrap_or(end);
    let (name, kind) = match (r.action, r.tool_name) {
        ("model_call" | "summary_call", _) => (format!("chat {}", r.action), SpanKind::Client),
        ("tool_call", Some(tool)) => (format!("execute_tool {tool}"), SpanKind::Client),
        (action, _) => (action.to_owned(), SpanKind::Internal),
    };
    let span = tracer
        .span_builder(name)
        .with_kind(kind)
        .with_start_time(start)
        .with_attributes(record_attributes(r))
        .start_with_context(&tracer, &parent);
    finish(span, !r.success && r.error.is_some(), r.error.as_deref().unwrap_or_default(), end);
}

fn record_attributes(r: &TraceRecord<'_>) -> Vec<KeyValue> {
    let mut a = vec![
        KeyValue::new("agentfleet.session_id", r.session_id.to_owned()),
        KeyValue::new("agentfleet.agent_id", r.agent_id.to_owned()),
        KeyValue::new("agentfleet.step", i64::from(r.step)),
        KeyValue::new("agentfleet.action", r.action.to_owned()),
        KeyValue::new("agentfleet.worker", r.worker.to_owned()),
        KeyValue::new("agentfleet.input_summary", r.input_summary.clone()),
        KeyValue::new("agentfleet.output_summary", r.output_summary.clone()),
        KeyValue::new("agentfleet.success", r.success),
        KeyValue::new("agentfleet.duration_ms", r.duration_ms as i64),
        KeyValue::new("agentfleet.cost_micro_usd", r.cost_micro_usd as i64),
        KeyValue::new("agentfleet.cost_usd", r.cost_usd),
    ];
    match (r.action, r.tool_name) {
        ("model_call" | "summary_call", _) => a.extend([
            KeyValue::new("gen_ai.operation.name", "chat"),
            KeyValue::new("gen_ai.usage.input_tokens", r.input_tokens as i64),
            KeyValue::new("gen_ai.usage.output_tokens", r.output_tokens as i64),
        ]),
        ("tool_call", Some(tool)) => a.extend([
            KeyValue::new("gen_ai.operation.name", "execute_tool"),
            KeyValue::new("gen_ai.tool.name", tool.to_owned()),
        ]),
        (_, Some(tool)) => a.push(KeyValue::new("agentfleet.tool_name", tool.to_owned())),
        _ => {}
    }
    a
}

fn finish(mut span: impl opentelemetry::trace::Span, failed: bool, error: &str, end: SystemTime) {
    if failed {
        span.set_status(Status::error(error.to_owned()));
    }
    span.end_with_timestamp(end);
}

fn at_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sessions_trace_id_is_its_ulid() {
        let id = SessionId::parse("s_01JDQ7ZK3H4W5X6Y7Z8A9BCDEF").expect("valid id");
        let ulid = ulid::Ulid::from_string("01JDQ7ZK3H4W5X6Y7Z8A9BCDEF").expect("valid ulid");
        assert_eq!(trace_id(&id).to_string(), format!("{:032x}", ulid.0));
        let span = session_span_id(trace_id(&id));
        assert_eq!(span.to_string(), format!("{:016x}", ulid.0 as u64));
    }
}
