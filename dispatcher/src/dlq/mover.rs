//! The mover: consumes `<prefix>.dead` and moves each dead letter into the store, acking it only
//! once Redis has it (nothing is lost between the two; a crash in between stores it twice, which a
//! redrive's fencing makes harmless).
//!
//! Bounded: when the store holds `dead_letters.max_stored` entries (or `max_stored_bytes`), the
//! deliveries in hand wait, unacked, for room; with all of them waiting the consumer takes no more,
//! so the rest stay in the queue (bounded by `amqp.dead_max_*`), and `agentfleet_dead_letter_store_full`
//! is 1 until there is room again (a redrive or a discard makes it).

use std::sync::Arc;
use std::time::Duration;

use agentfleet::amqp::consumer::{self, Handler, QueueTag, Settings};
use agentfleet::amqp::{Backoff, Topology};
use agentfleet::domain::SessionId;
use agentfleet::store::StoreError;
use agentfleet::telemetry::{metric, now_ms};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::entry::{Arrival, Entry};
use crate::AppState;

/// Dead letters in hand at once (the prefetch): one, so a full store holds back one message per
/// dispatcher and the broker counts the rest as ready in the queue.
const PREFETCH: u16 = 1;
/// How long a stopping mover waits for the deliveries in hand.
const GRACE: Duration = Duration::from_secs(5);
/// How often a full store is looked at again.
const FULL_RETRY: Duration = Duration::from_secs(2);
const CONSUMER_TAG: &str = "dispatcher-dead-letters";

/// Moves dead letters into the store until `shutdown`.
pub(crate) async fn run(state: AppState, shutdown: CancellationToken) {
    let topology = Topology::from_config(&state.cfg.amqp);
    let settings = Settings {
        url: state.cfg.amqp.url.clone(),
        connection_name: "dispatcher/dead-letters".into(),
        prefetch: PREFETCH,
        queues: vec![QueueTag { queue: topology.dead(), consumer_tag: CONSUMER_TAG.into(), key: () }],
        grace: GRACE,
        consuming: Default::default(),
    };
    let mover = Mover { state, topology, shutdown: shutdown.clone() };
    consumer::run(settings, Arc::new(mover), shutdown).await;
    info!("dead-letter mover stopped");
}

struct Mover {
    state: AppState,
    topology: Topology,
    shutdown: CancellationToken,
}

/// What became of one attempt to store a dead letter.
enum Put {
    Stored,
    Full,
    Failed(String),
}

impl Handler for Mover {
    type Key = ();
    type Link = ();

    async fn declare(&self, _conn: &Connection, ch: &Channel) -> Result<(), lapin::Error> {
        Ok(self.topology.declare(ch, &crate::agent_pools(&self.state.cfg)).await?)
    }

    async fn handle(&self, delivery: Delivery, _queue: &QueueTag<()>, _link: &()) {
        let stored = self.store(&delivery).await;
        let settled = if stored {
            delivery.ack(BasicAckOptions::default()).await
        } else {
            delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await
        };
        if let Err(e) = settled {
            warn!(error = %e, "could not settle a dead letter; the broker will deliver it again");
        }
    }
}

impl Mover {
    /// Stores the dead letter, waiting while the store is full or Redis is down; false when it
    /// gave up (shutdown, or the delivery can no longer be settled).
    async fn store(&self, d: &Delivery) -> bool {
        let mut backoff = Backoff::default();
        let mut full_logged = false;
        loop {
            let wait = match self.try_store(d).await {
                Put::Stored => return true,
                Put::Full => {
                    metric::dead_letter_store_full(true);
                    if !full_logged {
                        warn!(
                            max_stored = self.state.cfg.dead_letters.max_stored,
                            "the dead-letter store is full: dead letters wait in the queue until some are re-driven or discarded"
                        );
                        full_logged = true;
                    }
                    FULL_RETRY
                }
                Put::Failed(e) => {
                    warn!(error = %e, "storing a dead letter failed; retrying");
                    backoff.next_wait()
                }
            };
            if !d.acker.usable() {
                return false;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return false,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn try_store(&self, d: &Delivery) -> Put {
        let cfg = &self.state.cfg;
        let kept = d.data.len().min(cfg.dispatcher.max_body_bytes);
        let arrival = Arrival {
            body: &d.data,
            properties: &d.properties,
            routing_key: d.routing_key.as_str(),
            kept_bytes: kept,
            now_ms: now_ms(),
        };
        let mut entry = Entry::of(&arrival, &self.topology, &cfg.amqp.prefix);
        entry.tenant = match self.tenant(&entry, &d.data).await {
            Ok(t) => t,
            Err(e) => return Put::Failed(e.to_string()),
        };
        let keys = super::keys(&self.state);
        let mut conn = self.state.redis.clone();
        let limits = &cfg.dead_letters;
        match keys.put(&mut conn, &entry, &d.data[..kept], limits.max_stored, limits.max_stored_bytes).await {
            Ok(true) => {
                metric::dead_letter_store_full(false);
                metric::dead_letter_action("stored", entry.kind.as_str());
                info!(id = %entry.id, kind = entry.kind.as_str(), reason = %entry.reason, session = ?entry.session_id, "dead letter stored");
                Put::Stored
            }
            Ok(false) => Put::Full,
            Err(e) => Put::Failed(e.to_string()),
        }
    }

    /// Whose dead letter it is: the fleet's header, else its session's tenant, else its
    /// publisher's (a request's RabbitMQ user), else an event's own `tenant`.
    async fn tenant(&self, entry: &Entry, body: &[u8]) -> Result<Option<String>, StoreError> {
        if let Some(t) = entry.tenant_header() {
            return Ok(Some(t));
        }
        if let Some(id) = entry.session_id.as_deref().and_then(|s| SessionId::parse(s).ok())
            && let Some(meta) = self.state.store.meta(&id).await?
        {
            return Ok(meta.tenant.map(String::from));
        }
        if let Some(t) = entry.user_id().and_then(|u| self.state.cfg.auth.amqp_tenant(u)) {
            return Ok(Some(t.to_string()));
        }
        let event: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let named = event.as_ref().and_then(|e| e.get("tenant")).and_then(|t| t.as_str()).filter(|t| !t.is_empty());
        Ok(named.filter(|_| entry.kind == super::entry::Kind::Webhook).map(str::to_owned))
    }
}
