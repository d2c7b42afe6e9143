//! The worker's operations endpoints, on `worker.metrics_listen`: `/metrics`, and the probes a
//! pod needs.
//!
//! - `/healthz`: the process serves HTTP (liveness). It answers from the start, also while the
//!   worker is still waiting for RabbitMQ or Redis, so a slow broker doesn't get the pod killed.
//! - `/readyz`: 200 while the worker takes deliveries; 503 before it consumes, while it reconnects
//!   to the broker, and from the moment a SIGTERM starts the drain. Nothing routes traffic to a
//!   worker, but a rollout and a PodDisruptionBudget count only ready pods.

use std::net::SocketAddr;

use agentfleet::amqp::consumer::Consuming;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct Ops {
    metrics: PrometheusHandle,
    consuming: Consuming,
}

/// Binds `listen` and serves the endpoints until `stop`.
pub(crate) async fn serve(
    listen: SocketAddr,
    metrics: PrometheusHandle,
    consuming: Consuming,
    stop: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("binding {listen}: {e}"))?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render))
        .with_state(Ops { metrics, consuming });
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await {
            tracing::error!(error = %e, "the operations endpoints stopped");
        }
    }))
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({ "status": "ok" }))
}

async fn readyz(State(ops): State<Ops>) -> impl IntoResponse {
    if ops.consuming.get() {
        (StatusCode::OK, axum::Json(json!({ "status": "ready" })))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({ "status": "not_ready" })))
    }
}

async fn render(State(ops): State<Ops>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], ops.metrics.render())
}
