//! A minimal OpenTelemetry collector for tests: it accepts OTLP/HTTP trace exports
//! (`POST /v1/traces`, protobuf, as the fleet's exporter sends them), decodes them with the
//! protocol's own message types and keeps every span, flattened, for assertions.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message as _;
use tokio::net::TcpListener;

use crate::serve::Served;

/// One received span.
#[derive(Debug, Clone)]
pub struct CollectedSpan {
    /// `service.name` of the process that sent it.
    pub service: String,
    /// The span's name.
    pub name: String,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// 16 hex digits, empty for a root span.
    pub parent_span_id: String,
    /// OTLP span kind (1 internal, 2 server, 3 client, 4 producer, 5 consumer).
    pub kind: i32,
    /// Unix ns.
    pub start_ns: u64,
    /// Unix ns.
    pub end_ns: u64,
    /// Attributes, their values as text.
    pub attributes: BTreeMap<String, String>,
    /// OTLP status code (0 unset, 1 ok, 2 error).
    pub status_code: i32,
    /// `(trace_id, span_id)` of each linked span.
    pub links: Vec<(String, String)>,
}

impl CollectedSpan {
    /// An attribute's value as text, or "" when absent.
    pub fn attr(&self, key: &str) -> &str {
        self.attributes.get(key).map_or("", String::as_str)
    }
}

#[derive(Default)]
struct Received {
    spans: Vec<CollectedSpan>,
    requests: usize,
    rejected: usize,
}

/// A running collector; dropping it stops it.
pub struct Collector {
    /// Where it listens.
    pub addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    server: Served,
}

impl Collector {
    /// Serves on `listener` until dropped.
    pub async fn start(listener: TcpListener) -> anyhow::Result<Self> {
        let received = Arc::new(Mutex::new(Received::default()));
        let app = Router::new().route("/v1/traces", post(export)).with_state(received.clone());
        let server = Served::start("otlp collector", listener, app)?;
        Ok(Self { addr: server.addr, received, server })
    }

    /// The base URL to configure as `telemetry.otlp.endpoint`.
    pub fn endpoint(&self) -> String {
        self.server.base_url()
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.received.lock().map(|r| r.spans.clone()).unwrap_or_default()
    }

    /// Export requests received, and how many of them could not be decoded.
    pub fn requests(&self) -> (usize, usize) {
        self.received.lock().map(|r| (r.requests, r.rejected)).unwrap_or_default()
    }
}

async fn export(State(received): State<Arc<Mutex<Received>>>, headers: HeaderMap, body: Bytes) -> impl IntoResponse {
    let protobuf = headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes() == b"application/x-protobuf");
    let decoded = protobuf.then(|| ExportTraceServiceRequest::decode(body)).and_then(Result::ok);
    let Ok(mut r) = received.lock() else { return (StatusCode::INTERNAL_SERVER_ERROR, Vec::new()) };
    r.requests += 1;
    let Some(request) = decoded else {
        r.rejected += 1;
        return (StatusCode::BAD_REQUEST, Vec::new());
    };
    r.spans.extend(flatten(request));
    (StatusCode::OK, ExportTraceServiceResponse::default().encode_to_vec())
}

fn flatten(request: ExportTraceServiceRequest) -> Vec<CollectedSpan> {
    let mut out = Vec::new();
    for rs in request.resource_spans {
        let resource = rs.resource.map(|r| attributes(&r.attributes)).unwrap_or_default();
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
            out.push(CollectedSpan {
                service: service.clone(),
                name: span.name,
                trace_id: hex::encode(&span.trace_id),
                span_id: hex::encode(&span.span_id),
                parent_span_id: hex::encode(&span.parent_span_id),
                kind: span.kind,
                start_ns: span.start_time_unix_nano,
                end_ns: span.end_time_unix_nano,
                attributes: attributes(&span.attributes),
                status_code: span.status.map_or(0, |s| s.code),
                links: span.links.iter().map(|l| (hex::encode(&l.trace_id), hex::encode(&l.span_id))).collect(),
            });
        }
    }
    out
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter().map(|kv| (kv.key.clone(), kv.value.as_ref().map(text).unwrap_or_default())).collect()
}

fn text(v: &AnyValue) -> String {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}
