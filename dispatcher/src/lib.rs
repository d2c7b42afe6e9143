//! The dispatcher: the HTTP API that creates sessions, publishes their first step and shows them.
//!
//! Requests are validated once here, at the edge; everything past this point handles typed values.

mod actions;
mod auth;
pub mod cli;
mod console;
mod dlq;
mod error;
mod events;
mod fleet;
mod fork;
mod gauges;
pub mod input;
mod intake;
mod janitor;
mod limits;
mod live;
mod openapi;
mod session_ref;
pub mod sessions;
mod trace;
mod webhooks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agentfleet::amqp::{AmqpPublisher, Topology};
use agentfleet::config::Config;
use agentfleet::domain::Name;
use agentfleet::store::{RedisStore, SessionStore, durability};
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
use tracing::{info, warn};

pub use error::ApiError;
pub use janitor::Janitor;
pub use webhooks::declare as declare_webhook_queues;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    cfg: Arc<Config>,
    store: Arc<dyn SessionStore>,
    publisher: Arc<AmqpPublisher>,
    metrics: Option<PrometheusHandle>,
    /// For the per-tenant limits (the `limits` module).
    redis: agentfleet::redis_conn::RedisConn,
    /// Set at SIGTERM: `/readyz` answers 503 from then on.
    draining: Arc<AtomicBool>,
    /// Each agent's call shape, to plan a session's first call as its worker will.
    shapes: Arc<std::collections::HashMap<Name, agentfleet::budget::CallShape>>,
    /// The event streams that may be open at once (the `events` and `live` modules).
    event_streams: Arc<tokio::sync::Semaphore>,
    /// The lifecycle events of every session, for `GET /v1/events` (the `live` module).
    live: Arc<live::Hub>,
    /// What the gauges read last, for `GET /v1/fleet`.
    readings: fleet::Shared,
}

/// The two listeners a dispatcher serves: the API, and the operations endpoints (`/healthz`,
/// `/readyz`, `/metrics`, `/openapi.json`) apart from it.
pub struct Listeners {
    /// Where the API is served.
    pub api: TcpListener,
    /// Where the operations endpoints are served.
    pub ops: TcpListener,
}

impl Listeners {
    /// Binds `dispatcher.listen` and `dispatcher.ops_listen`.
    pub async fn bind(cfg: &Config) -> anyhow::Result<Self> {
        let bind =
            |addr: String| async move { TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}")) };
        let api = bind(cfg.dispatcher.listen.clone()).await?;
        let ops = bind(cfg.dispatcher.ops_listen.clone()).await?;
        Ok(Self { api, ops })
    }
}

/// The dispatcher, bound and connected, ready to serve.
pub struct Dispatcher {
    listener: TcpListener,
    ops_listener: TcpListener,
    state: AppState,
    breakers: agentfleet::breaker::Breakers,
}

impl Dispatcher {
    /// Connects to Redis (checking that it is durable) and RabbitMQ (declaring the topology) and
    /// serves on `listeners`, or binds the configured addresses when `None`.
    pub async fn build(
        cfg: Config,
        listeners: Option<Listeners>,
        metrics: Option<PrometheusHandle>,
    ) -> anyhow::Result<Self> {
        let Listeners { api: listener, ops: ops_listener } = match listeners {
            Some(l) => l,
            None => Listeners::bind(&cfg).await?,
        };
        warn_if_open(&cfg);
        let store = RedisStore::connect(&cfg.redis)
            .await
            .context("connecting to Redis")?
            .with_retention_ms(cfg.sessions.retention_ms);
        durability::check(&store.connection(), &cfg.redis).await.context("checking Redis durability")?;
        let topology = Topology::from_config(&cfg.amqp);
        let pools = agent_pools(&cfg);
        let publisher =
            AmqpPublisher::connect_patiently(&cfg.amqp.url, "dispatcher", topology, pools, Duration::from_secs(60))
                .await
                .context("connecting to RabbitMQ")?;
        webhooks::declare(&publisher, &cfg.amqp.prefix).await.context("declaring the webhook queues")?;
        let breakers = agentfleet::breaker::Breakers::new(store.connection(), cfg.redis.key_prefix.clone());
        let redis = store.connection();
        let draining = Arc::default();
        let shapes = cfg
            .agents
            .iter()
            .filter_map(|(name, a)| Some((name.clone(), agentfleet::step::call_shape(&cfg, a)?)))
            .collect();
        let cfg = Arc::new(cfg);
        let state = AppState {
            shapes: Arc::new(shapes),
            live: live::Hub::new(cfg.clone()),
            readings: fleet::Shared::default(),
            cfg,
            store: Arc::new(store),
            publisher: Arc::new(publisher),
            metrics,
            redis,
            draining,
            event_streams: events::slots(),
        };
        Ok(Self { listener, ops_listener, state, breakers })
    }

    /// The bound address of the API.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The bound address of the operations endpoints.
    pub fn ops_addr(&self) -> std::io::Result<SocketAddr> {
        self.ops_listener.local_addr()
    }

    /// The janitor over this dispatcher's store and publisher.
    pub fn janitor(&self) -> Janitor {
        Janitor::new(self.state.store.clone(), self.state.publisher.clone(), self.state.cfg.clone())
    }

    /// Serves, with the janitor, the AMQP intake, the webhook deliverer, the dead-letter mover and
    /// the gauges, until `shutdown`. Then `/readyz` answers 503 while the API serves on for
    /// `dispatcher.drain_delay_ms`; then in-flight requests finish and the tasks drain, all within
    /// `dispatcher.shutdown_grace_ms`; past it the rest is abandoned (unsettled deliveries are
    /// redelivered).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        // Its own token, cancelled after the drain delay, or by a server that fails.
        let stop = CancellationToken::new();
        let drain_delay = Duration::from_millis(self.state.cfg.dispatcher.drain_delay_ms);
        let _draining = tokio::spawn(drain_then_stop(shutdown, self.state.draining.clone(), drain_delay, stop.clone()));
        let grace = Duration::from_millis(self.state.cfg.dispatcher.shutdown_grace_ms);
        let tasks = self.spawn_tasks(&stop);
        let ops = axum::serve(self.ops_listener, ops_router(self.state.clone()))
            .with_graceful_shutdown(stop.clone().cancelled_owned());
        let app = router(self.state);
        let serve = axum::serve(self.listener, app).with_graceful_shutdown(stop.clone().cancelled_owned());
        let stopped = async {
            let (served, ops_served) = tokio::join!(serve, ops);
            let served = served.and(ops_served);
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
        tasks.spawn(dlq::run(s.clone(), stop.clone()));
        let gauges = gauges::Gauges {
            cfg: s.cfg.clone(),
            store: s.store.clone(),
            breakers: self.breakers.clone(),
            readings: s.readings.clone(),
        };
        tasks.spawn(gauges.run(stop.clone()));
        let (live, stopped) = (s.live.clone(), stop.clone());
        tasks.spawn(async move {
            stopped.cancelled().await;
            live.stop();
        });
        tasks.close();
        tasks
    }
}

/// At `shutdown`: marks the dispatcher draining (not ready), waits `delay`, then cancels `stop`.
async fn drain_then_stop(
    shutdown: CancellationToken,
    draining: Arc<AtomicBool>,
    delay: Duration,
    stop: CancellationToken,
) {
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = stop.cancelled() => return,
    }
    draining.store(true, Ordering::Relaxed);
    if !delay.is_zero() {
        info!(
            delay_ms = delay.as_millis() as u64,
            "draining: /readyz answers 503; the API serves on until the delay is over"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => {}
        }
    }
    stop.cancel();
}

/// Resolves `grace` after `stop` is cancelled.
async fn deadline(stop: &CancellationToken, grace: Duration) {
    stop.cancelled().await;
    tokio::time::sleep(grace).await;
}

/// Logs loudly when no token is configured: the API then refuses every request.
fn warn_if_open(cfg: &Config) {
    if cfg.auth.tokens.is_empty() {
        tracing::error!(
            "no API tokens are configured ([[auth.tokens]]): every API request will be answered 401; \
             see README `Tokens, roles, tenants and limits`"
        );
    }
}

/// The API's routes. A new route goes in [`routes`] too, and its handler in `openapi::ApiDoc`.
/// Every route authenticates its caller (the `auth` module).
pub fn router(state: AppState) -> Router {
    let body_limit = state.cfg.dispatcher.max_body_bytes;
    let timeout_ms = state.cfg.dispatcher.request_timeout_ms;
    Router::new()
        .route("/v1/sessions", post(sessions::create).get(sessions::list))
        .route("/v1/sessions/{id}", get(sessions::get))
        .route("/v1/sessions/{id}/cancel", post(actions::cancel))
        .route("/v1/sessions/{id}/fork", post(fork::fork))
        .route("/v1/sessions/{id}/reply", post(actions::reply))
        .route("/v1/sessions/{id}/approve", post(actions::approve))
        .route("/v1/sessions/{id}/reject", post(actions::reject))
        .route("/v1/escalations", get(actions::escalations))
        .route("/v1/sessions/{id}/trace", get(trace::trace))
        .route("/v1/sessions/{id}/events", get(events::events))
        .route("/v1/events", get(live::tenant_events))
        .route("/v1/fleet", get(fleet::fleet))
        .route("/v1/dlq", get(dlq::list))
        .route("/v1/dlq/redrive", post(dlq::redrive_many))
        .route("/v1/dlq/{id}", get(dlq::show).delete(dlq::discard))
        .route("/v1/dlq/{id}/redrive", post(dlq::redrive_one))
        .merge(console::router())
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(move |req, next| within(timeout_ms, req, next)))
        .layer(tower_http::trace::TraceLayer::new_for_http().make_span_with(request_span))
        .with_state(state)
}

/// The operations endpoints, served on `dispatcher.ops_listen` without authentication: keep that
/// address off the public network. A new route goes in [`ops_routes`] too.
pub fn ops_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi::serve))
        .fallback(|| async { ApiError::not_found("no such route") })
        .with_state(state)
}

/// Runs the request, or answers 503 (JSON) once `timeout_ms` has passed.
async fn within(
    timeout_ms: u64,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match tokio::time::timeout(Duration::from_millis(timeout_ms), next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::timed_out(timeout_ms).into_response(),
    }
}

/// Each request's span, named after its route (not its path: ids stay out of span names).
fn request_span(req: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let route = req.extensions().get::<axum::extract::MatchedPath>().map_or("unmatched", |m| m.as_str());
    agentfleet::telemetry::otel::http_request_span(req.method().as_str(), route, req.headers())
}

/// Every `(method, path)` that [`router`] serves, as the OpenAPI document writes them. Kept beside
/// the router by hand: the `openapi` integration test checks that the routers serve each of these
/// and of [`ops_routes`], and that the document lists exactly those.
pub fn routes() -> Vec<(&'static str, &'static str)> {
    vec![
        ("post", "/v1/sessions"),
        ("get", "/v1/sessions"),
        ("get", "/v1/sessions/{id}"),
        ("post", "/v1/sessions/{id}/cancel"),
        ("post", "/v1/sessions/{id}/fork"),
        ("post", "/v1/sessions/{id}/reply"),
        ("post", "/v1/sessions/{id}/approve"),
        ("post", "/v1/sessions/{id}/reject"),
        ("get", "/v1/escalations"),
        ("get", "/v1/sessions/{id}/trace"),
        ("get", "/v1/sessions/{id}/events"),
        ("get", "/v1/events"),
        ("get", "/v1/fleet"),
        ("get", "/v1/dlq"),
        ("post", "/v1/dlq/redrive"),
        ("get", "/v1/dlq/{id}"),
        ("delete", "/v1/dlq/{id}"),
        ("post", "/v1/dlq/{id}/redrive"),
    ]
}

/// Every `(method, path)` that [`ops_router`] serves.
pub fn ops_routes() -> Vec<(&'static str, &'static str)> {
    vec![("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics"), ("get", "/openapi.json")]
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
    /// `ready`, `not_ready`, or `draining` (after SIGTERM).
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
        (status = 503, description = "A dependency is down (see `checks`), or the dispatcher is draining after SIGTERM", body = Readiness),
    )
)]
async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let redis = s.store.ping().await.is_ok();
    let rabbitmq = s.publisher.is_connected().await;
    let draining = s.draining.load(Ordering::Relaxed);
    let (status, word) = match (draining, redis && rabbitmq) {
        (true, _) => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
        (false, true) => (StatusCode::OK, "ready"),
        (false, false) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
    };
    (status, axum::Json(Readiness { status: word, checks: Checks { redis, rabbitmq } }))
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
