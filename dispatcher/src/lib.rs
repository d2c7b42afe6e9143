//! The dispatcher: the HTTP API that creates sessions, publishes their first step and shows them.
//!
//! Requests are validated once here, at the edge; everything past this point handles typed values.

mod actions;
mod error;
mod gauges;
mod intake;
mod janitor;
mod openapi;
mod session_ref;
pub mod sessions;
mod trace;
mod webhooks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agentfleet::amqp::{AmqpPublisher, Topology};
use agentfleet::config::Config;
use agentfleet::domain::Name;
use agentfleet::store::{RedisStore, SessionStore};
use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

pub use error::ApiError;
pub use janitor::Janitor;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    cfg: Arc<Config>,
    store: Arc<dyn SessionStore>,
    publisher: Arc<AmqpPublisher>,
    metrics: Option<PrometheusHandle>,
}

/// The dispatcher, bound and connected, ready to serve.
pub struct Dispatcher {
    listener: TcpListener,
    state: AppState,
    breakers: agentfleet::breaker::Breakers,
}

impl Dispatcher {
    /// Connects to Redis and RabbitMQ (declaring the topology) and binds `listener`, or the
    /// configured address when `None`.
    pub async fn build(
        cfg: Config,
        listener: Option<TcpListener>,
        metrics: Option<PrometheusHandle>,
    ) -> anyhow::Result<Self> {
        let listener = match listener {
            Some(l) => l,
            None => TcpListener::bind(&cfg.dispatcher.listen)
                .await
                .with_context(|| format!("binding {}", cfg.dispatcher.listen))?,
        };
        let store = RedisStore::connect(&cfg.redis).await.context("connecting to Redis")?;
        let topology = Topology::new(&cfg.amqp.prefix, cfg.amqp.delivery_limit);
        let pools = agent_pools(&cfg);
        let publisher =
            AmqpPublisher::connect_patiently(&cfg.amqp.url, "dispatcher", topology, pools, Duration::from_secs(60))
                .await
                .context("connecting to RabbitMQ")?;
        webhooks::declare(&publisher, &cfg.amqp.prefix).await.context("declaring the webhook queues")?;
        let breakers = agentfleet::breaker::Breakers::new(store.connection(), cfg.redis.key_prefix.clone());
        let state = AppState { cfg: Arc::new(cfg), store: Arc::new(store), publisher: Arc::new(publisher), metrics };
        Ok(Self { listener, state, breakers })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The janitor over this dispatcher's store and publisher.
    pub fn janitor(&self) -> Janitor {
        Janitor::new(self.state.store.clone(), self.state.publisher.clone(), self.state.cfg.clone())
    }

    /// Serves, with the janitor, the AMQP intake, the webhook deliverer and the gauges, until
    /// `shutdown`. Then in-flight requests finish and the tasks drain, all within
    /// `dispatcher.shutdown_grace_ms`; past it the rest is abandoned (unsettled deliveries are
    /// redelivered).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        // A child token, so a server that fails stops the tasks too.
        let stop = shutdown.child_token();
        let grace = Duration::from_millis(self.state.cfg.dispatcher.shutdown_grace_ms);
        let tasks = self.spawn_tasks(&stop);
        let app = router(self.state);
        let serve = axum::serve(self.listener, app).with_graceful_shutdown(stop.clone().cancelled_owned());
        let stopped = async {
            let served = serve.await;
            stop.cancel();
            tasks.wait().await;
            served
        };
        tokio::select! {
            served = stopped => served?,
            () = deadline(&stop, grace) => {
                warn!(tasks = tasks.len(), grace_ms = grace.as_millis() as u64, "shutdown grace period over; stopping anyway");
            }
        }
        Ok(())
    }

    /// The background tasks, on one tracker (closed: it only waits now).
    fn spawn_tasks(&self, stop: &CancellationToken) -> TaskTracker {
        let tasks = TaskTracker::new();
        let s = &self.state;
        tasks.spawn(self.janitor().run(stop.clone()));
        tasks.spawn(webhooks::run(s.cfg.clone(), s.store.clone(), stop.clone()));
        tasks.spawn(intake::run(s.clone(), stop.clone()));
        let gauges = gauges::Gauges { cfg: s.cfg.clone(), store: s.store.clone(), breakers: self.breakers.clone() };
        tasks.spawn(gauges.run(stop.clone()));
        tasks.close();
        tasks
    }
}

/// Resolves `grace` after `stop` is cancelled.
async fn deadline(stop: &CancellationToken, grace: Duration) {
    stop.cancelled().await;
    tokio::time::sleep(grace).await;
}

/// The API's routes. A new route goes in [`routes`] too, and its handler in `openapi::ApiDoc`.
pub fn router(state: AppState) -> Router {
    let body_limit = state.cfg.dispatcher.max_body_bytes;
    Router::new()
        .route("/v1/sessions", post(sessions::create).get(sessions::list))
        .route("/v1/sessions/{id}", get(sessions::get))
        .route("/v1/sessions/{id}/cancel", post(actions::cancel))
        .route("/v1/sessions/{id}/reply", post(actions::reply))
        .route("/v1/sessions/{id}/approve", post(actions::approve))
        .route("/v1/sessions/{id}/reject", post(actions::reject))
        .route("/v1/escalations", get(actions::escalations))
        .route("/v1/sessions/{id}/trace", get(trace::trace))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi::serve))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(tower_http::trace::TraceLayer::new_for_http().make_span_with(request_span))
        .with_state(state)
}

/// Each request's span, named after its route (not its path: ids stay out of span names).
fn request_span(req: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let route = req.extensions().get::<axum::extract::MatchedPath>().map_or("unmatched", |m| m.as_str());
    agentfleet::telemetry::otel::http_request_span(req.method().as_str(), route, req.headers())
}

/// Every `(method, path)` that [`router`] serves, as the OpenAPI document writes them. Kept beside
/// the router by hand: the `openapi` integration test checks that the router serves each of them and
/// that the document lists exactly these.
pub fn routes() -> Vec<(&'static str, &'static str)> {
    vec![
        ("post", "/v1/sessions"),
        ("get", "/v1/sessions"),
        ("get", "/v1/sessions/{id}"),
        ("post", "/v1/sessions/{id}/cancel"),
        ("post", "/v1/sessions/{id}/reply"),
        ("post", "/v1/sessions/{id}/approve"),
        ("post", "/v1/sessions/{id}/reject"),
        ("get", "/v1/escalations"),
        ("get", "/v1/sessions/{id}/trace"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
    ]
}

/// `GET /healthz`.
#[derive(Serialize, utoipa::ToSchema)]
struct Health {
    /// Always `ok`.
    #[schema(value_type = String, example = "ok")]
    status: &'static str,
}

/// `GET /readyz`.
#[derive(Serialize, utoipa::ToSchema)]
struct Readiness {
    /// `ready` or `not_ready`.
    #[schema(value_type = String, example = "ready")]
    status: &'static str,
    checks: Checks,
}

/// Whether each dependency answers.
#[derive(Serialize, utoipa::ToSchema)]
struct Checks {
    redis: bool,
    rabbitmq: bool,
}

/// Liveness: the process serves HTTP.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "Alive", body = Health)))]
async fn healthz() -> impl IntoResponse {
    axum::Json(Health { status: "ok" })
}

/// Readiness: Redis and RabbitMQ both answer.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "A dependency is down (see `checks`)", body = Readiness),
    )
)]
async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let redis = s.store.ping().await.is_ok();
    let rabbitmq = s.publisher.is_connected().await;
    let status = if redis && rabbitmq { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = Readiness {
        status: if status == StatusCode::OK { "ready" } else { "not_ready" },
        checks: Checks { redis, rabbitmq },
    };
    (status, axum::Json(body))
}

/// The process's Prometheus metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain"),
        (status = 404, description = "Metrics are not enabled in this process", body = crate::error::ErrorBody),
    )
)]
async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    match &s.metrics {
        Some(h) => (StatusCode::OK, h.render()).into_response(),
        None => ApiError::not_found("metrics are not enabled in this process").into_response(),
    }
}

fn agent_pools(cfg: &Config) -> Vec<Name> {
    let mut pools: Vec<Name> = cfg.agents.values().map(|a| a.pool.clone()).collect();
    pools.sort();
    pools.dedup();
    pools
}
