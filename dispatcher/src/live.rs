//! `GET /v1/events`: the lifecycle events of every session of the caller's tenant, live.
//!
//! A dispatcher binds one queue of its own to the events exchange with `session.#` once the first
//! such stream opens: `<prefix>.live.<id>`, exclusive and auto-deleted with its connection,
//! holding at most [`MAX_QUEUED`] events for at most a minute (nothing grows while no stream reads
//! it). Each event goes to every stream open on the dispatcher (a broadcast channel), which keeps
//! the caller's tenant (an admin sees every tenant, or the one it names) and the asked-for agent
//! and kinds. A stream too slow to keep up gets a `lagged` event saying how many it missed.
//!
//! These are notices, not a log: there is no resume. A client that reconnects reads the sessions'
//! state from `GET /v1/sessions`; one session's own stream (`GET /v1/sessions/{id}/events`)
//! resumes with `Last-Event-ID`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agentfleet::amqp::Topology;
use agentfleet::amqp::consumer::{self, Consuming, Handler, QueueTag, Settings};
use agentfleet::config::{Config, Role};
use axum::extract::{Query, State};
use axum::response::Response;
use axum::response::sse::Event;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use serde::Deserialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use utoipa::IntoParams;

use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;

/// Events the dispatcher's queue holds while its streams are slow; older ones are dropped.
const MAX_QUEUED: i64 = 10_000;
/// Events a stream may fall behind the newest before it misses some.
const CHANNEL: usize = 4096;
/// How long a new stream waits for the queue to be bound before answering 503.
const BIND_WAIT: Duration = Duration::from_secs(5);
/// How often an idle stream checks whether the dispatcher drains.
const TICK: Duration = Duration::from_secs(1);

/// One lifecycle event as the streams filter it.
#[derive(Debug)]
struct Notice {
    kind: String,
    tenant: String,
    agent: String,
    /// The event as published (JSON).
    data: String,
}

/// The fields of a lifecycle event the streams filter on.
#[derive(Deserialize)]
struct Head {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    tenant: String,
    #[serde(default)]
    agent: String,
}

/// The dispatcher's end of the events exchange: started by the first stream, stopped with the
/// dispatcher.
pub(crate) struct Hub {
    tx: broadcast::Sender<Arc<Notice>>,
    started: AtomicBool,
    consuming: Consuming,
    cfg: Arc<Config>,
    queue: String,
    stop: CancellationToken,
}

impl Hub {
    pub(crate) fn new(cfg: Arc<Config>) -> Arc<Self> {
        let queue = format!("{}.live.{}", cfg.amqp.prefix, ulid::Ulid::new().to_string().to_lowercase());
        let (tx, _) = broadcast::channel(CHANNEL);
        let stop = CancellationToken::new();
        Arc::new(Self { tx, started: AtomicBool::new(false), consuming: Consuming::default(), cfg, queue, stop })
    }

    /// Stops the consumer (at the dispatcher's shutdown); open streams end.
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }

    /// A receiver of every event from now on, once the queue is bound (at most [`BIND_WAIT`]).
    async fn subscribe(self: &Arc<Self>) -> Result<broadcast::Receiver<Arc<Notice>>, ApiError> {
        let rx = self.tx.subscribe();
        if !self.started.swap(true, Ordering::AcqRel) {
            let settings = Settings {
                url: self.cfg.amqp.url.clone(),
                connection_name: "dispatcher/live".into(),
                prefetch: 256,
                queues: vec![QueueTag { queue: self.queue.clone(), consumer_tag: "dispatcher/live".into(), key: () }],
                grace: Duration::from_secs(1),
                consuming: self.consuming.clone(),
            };
            tokio::spawn(consumer::run(settings, self.clone(), self.stop.clone()));
        }
        let deadline = tokio::time::Instant::now() + BIND_WAIT;
        while !self.consuming.get() {
            if tokio::time::Instant::now() >= deadline || self.stop.is_cancelled() {
                return Err(ApiError::unavailable(&"the event feed is not connected to RabbitMQ"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(rx)
    }
}

impl Handler for Hub {
    type Key = ();
    type Link = ();

    async fn declare(&self, _conn: &Connection, ch: &Channel) -> Result<(), lapin::Error> {
        let topology = Topology::from_config(&self.cfg.amqp);
        topology.declare(ch, &[]).await?;
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(MAX_QUEUED));
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(60_000));
        let opts = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        ch.queue_declare(self.queue.as_str().into(), opts, args).await?;
        let exchange = topology.events_exchange();
        ch.queue_bind(
            self.queue.as_str().into(),
            exchange.as_str().into(),
            "session.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    }

    async fn handle(&self, delivery: Delivery, _queue: &QueueTag<()>, _link: &()) {
        match serde_json::from_slice::<Head>(&delivery.data) {
            Ok(head) => {
                let data = String::from_utf8_lossy(&delivery.data).into_owned();
                let notice = Notice { kind: head.kind, tenant: head.tenant, agent: head.agent, data };
                // No stream open: nobody to tell.
                let _ = self.tx.send(Arc::new(notice));
            }
            Err(e) => tracing::warn!(error = %e, "live events: not a lifecycle event; skipped"),
        }
        if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
            tracing::debug!(error = %e, "live events: ack failed");
        }
    }
}

/// The query of `GET /v1/events`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct EventsQuery {
    /// Only events of this agent.
    #[param(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    agent: Option<String>,
    /// Only events of these kinds, comma-separated (`session.created`, `session.completed`,
    /// `session.failed`, `session.escalated`, `session.awaiting_approval`, `session.cancelled`,
    /// `session.budget_exhausted`, `session.budget_alert`, …).
    #[param(pattern = "^[a-z._,]{1,500}$")]
    kind: Option<String>,
    /// Only events of this tenant (an admin token; others see only their own tenant).
    #[param(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    tenant: Option<String>,
}

/// What one stream keeps.
struct Filter {
    /// `None`: every tenant (an admin that named none).
    tenant: Option<String>,
    agent: Option<String>,
    kinds: Vec<String>,
}

impl Filter {
    fn of(caller: &Caller, q: EventsQuery) -> Result<Self, ApiError> {
        let tenant = match q.tenant {
            Some(t) if caller.is_admin() || t == caller.tenant.as_str() => Some(t),
            Some(_) => return Err(ApiError::forbidden("tenant: only an admin token may read another tenant's events")),
            None if caller.is_admin() => None,
            None => Some(caller.tenant.to_string()),
        };
        let kinds: Vec<String> =
            q.kind.iter().flat_map(|k| k.split(',')).filter(|k| !k.is_empty()).map(str::to_owned).collect();
        if let Some(bad) = kinds.iter().find(|k| !k.starts_with("session.")) {
            return Err(ApiError::invalid(format!("kind: `{bad}` is not an event kind (they start with `session.`)")));
        }
        Ok(Self { tenant, agent: q.agent, kinds })
    }

    fn keeps(&self, n: &Notice) -> bool {
        self.tenant.as_ref().is_none_or(|t| *t == n.tenant)
            && self.agent.as_ref().is_none_or(|a| *a == n.agent)
            && (self.kinds.is_empty() || self.kinds.contains(&n.kind))
    }
}

/// Every session's lifecycle events, live.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "sessions",
    params(EventsQuery),
    responses(
        (status = 200, description = "`text/event-stream`: one event per lifecycle event of a session of the tenant (`event` is its `type`, `data` the event as webhooks get it), `lagged` with `{\"missed\": n}` when the client fell behind; a comment every 15 s while idle", content_type = "text/event-stream", body = crate::events::SseEvent),
        (status = 400, description = "A query parameter is invalid", body = crate::error::ErrorBody),
        (status = 403, description = "The token lacks the `read` role, or names another tenant", body = crate::error::ErrorBody),
        (status = 503, description = "RabbitMQ is down, or too many streams are open", body = crate::error::ErrorBody),
    )
)]
pub(crate) async fn tenant_events(
    caller: Caller,
    State(s): State<AppState>,
    Query(q): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    caller.require(Role::Read)?;
    let filter = Filter::of(&caller, q)?;
    let permit = crate::events::slot(&s)?;
    let rx = s.live.subscribe().await?;
    let listener = Listener { rx, filter, draining: s.draining.clone(), stop: s.live.stop.clone(), _permit: permit };
    let stream = futures::stream::unfold(listener, |mut l| async move {
        let event = l.next().await?;
        Some((Ok::<_, Infallible>(event), l))
    });
    Ok(crate::events::respond(stream))
}

/// One client's stream.
struct Listener {
    rx: broadcast::Receiver<Arc<Notice>>,
    filter: Filter,
    draining: Arc<AtomicBool>,
    stop: CancellationToken,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Listener {
    /// The next event it keeps; `None` when the dispatcher drains or stops.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if self.draining.load(Ordering::Relaxed) || self.stop.is_cancelled() {
                return None;
            }
            return Some(match tokio::time::timeout(TICK, self.rx.recv()).await {
                Err(_) => continue,
                Ok(Ok(n)) if self.filter.keeps(&n) => Event::default().event(n.kind.as_str()).data(n.data.as_str()),
                Ok(Ok(_)) => continue,
                Ok(Err(broadcast::error::RecvError::Lagged(missed))) => {
                    Event::default().event("lagged").data(serde_json::json!({ "missed": missed }).to_string())
                }
                Ok(Err(broadcast::error::RecvError::Closed)) => return None,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(kind: &str, tenant: &str, agent: &str) -> Notice {
        Notice { kind: kind.into(), tenant: tenant.into(), agent: agent.into(), data: String::new() }
    }

    #[test]
    fn a_stream_keeps_its_tenant_its_agent_and_its_kinds() {
        let acme = Filter { tenant: Some("acme".into()), agent: None, kinds: Vec::new() };
        assert!(acme.keeps(&notice("session.created", "acme", "support")));
        assert!(!acme.keeps(&notice("session.created", "globex", "support")));
        let narrow = Filter {
            tenant: Some("acme".into()),
            agent: Some("support".into()),
            kinds: vec!["session.completed".into(), "session.failed".into()],
        };
        assert!(narrow.keeps(&notice("session.failed", "acme", "support")));
        assert!(!narrow.keeps(&notice("session.created", "acme", "support")));
        assert!(!narrow.keeps(&notice("session.failed", "acme", "billing")));
        // An admin that names no tenant sees them all.
        let admin = Filter { tenant: None, agent: None, kinds: Vec::new() };
        assert!(admin.keeps(&notice("session.created", "globex", "billing")));
    }
}
