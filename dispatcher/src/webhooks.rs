//! The webhook deliverer: POSTs every `session.*` event, signed, to the session's `callback_url`
//! or else its agent's `webhook_url` — at least once, retried through the queues.
//!
//! It has its own AMQP connection and queue, `<prefix>.webhooks`, bound to `<prefix>.events` with
//! `session.#`, so nothing that publishes an event ever waits for a receiver. A failed attempt
//! (no answer within `webhooks.timeout_ms`, a connection error, any status but 2xx) is published
//! again to a retry tier `<prefix>.webhooks.retry.<tier>` — a quorum queue whose TTL dead-letters
//! back to `<prefix>.webhooks` through the default exchange — and acked: the consumer never sleeps.
//! The `x-agentfleet-attempt` header counts the attempts; past `webhooks.max_attempts` the event
//! goes to `<prefix>.dead` with the reason. Signing and the header format are in
//! [`agentfleet::webhooks`].
//!
//! Where an event may go is checked on every attempt ([`agentfleet::webhooks::address`]): a
//! `callback_url` against its tenant's prefixes, and every URL's address — the IP host here, each
//! resolved name in the client's resolver — against the refused ranges. A refused destination is
//! dead-lettered with the reason at once, never retried.
//!
//! `Dispatcher::build` declares these queues before the dispatcher serves, so no event of a
//! session it creates is published while nothing is bound to keep it; the deliverer declares them
//! again on every reconnect.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentfleet::amqp::consumer::{self, Handler, QueueTag, Settings};
use agentfleet::amqp::{AmqpPublisher, DeclareError, PublishError, Topology, declare_queue};
use agentfleet::config::Config;
use agentfleet::domain::SessionId;
use agentfleet::scrub;
use agentfleet::store::{SessionStore, StoreError};
use agentfleet::telemetry::redact_error;
use agentfleet::webhooks::address::{self, CallbackError, GuardedResolver};
use agentfleet::webhooks::{self as wh, Destination, Signer};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// Deliveries in flight at once (also the AMQP prefetch).
const CONCURRENCY: u16 = 32;
/// Deliveries of one message (connection losses, crashes) before the broker dead-letters it.
const DELIVERY_LIMIT: u32 = 20;
/// The consumer tag (for the cancel at shutdown) and the connection's name.
const CONSUMER_TAG: &str = "dispatcher/webhooks";

/// Delivers webhooks until `shutdown`, reconnecting to the broker as needed.
pub(crate) async fn run(cfg: Arc<Config>, store: Arc<dyn SessionStore>, shutdown: CancellationToken) {
    let deliverer = match Deliverer::new(cfg, store) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            error!(error = %e, "webhooks are disabled: cannot build the HTTP client");
            return;
        }
    };
    for missing in deliverer.signer.missing() {
        warn!(env = %missing.0, "no webhook signing secret: events it would sign are dead-lettered, not sent");
    }
    let settings = Settings {
        url: deliverer.cfg.amqp.url.clone(),
        connection_name: CONSUMER_TAG.into(),
        prefetch: CONCURRENCY,
        queues: vec![QueueTag { queue: deliverer.queue.clone(), consumer_tag: CONSUMER_TAG.into(), key: () }],
        // In-flight POSTs get their timeout, and a little; the rest go to another dispatcher.
        grace: Duration::from_millis(deliverer.cfg.webhooks.timeout_ms) + Duration::from_secs(2),
        consuming: Default::default(),
    };
    consumer::run(settings, deliverer, shutdown).await;
    info!("webhook deliverer stopped");
}

/// What one attempt came to.
enum Outcome {
    /// A receiver answered 2xx.
    Delivered,
    /// Nobody wants this event: no callback URL and no agent webhook.
    NoReceiver,
    /// Worth another attempt later.
    Failed(String),
    /// Never deliverable: straight to the dead-letter queue.
    Poison(String),
}

/// Where an event goes, and as which tenant it is signed.
struct Receiver {
    /// The URL, normalized: POSTed to and signed.
    url: url::Url,
    /// The session's tenant, or `""`.
    tenant: String,
}

/// The fields of an event the deliverer reads; the body is sent as received.
#[derive(Deserialize)]
struct Event {
    #[serde(rename = "type")]
    kind: String,
    session_id: String,
    #[serde(default)]
    agent: String,
}

struct Deliverer {
    cfg: Arc<Config>,
    store: Arc<dyn SessionStore>,
    http: reqwest::Client,
    signer: Signer,
    topology: Topology,
    queue: String,
}

impl Deliverer {
    fn new(cfg: Arc<Config>, store: Arc<dyn SessionStore>) -> reqwest::Result<Self> {
        let mut http = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.webhooks.timeout_ms.max(1)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("agentfleet-webhooks/", env!("CARGO_PKG_VERSION")));
        if !cfg.webhooks.allow_private_addresses {
            // No proxy either: a proxy would resolve the name itself, past the guarded resolver.
            http = http.dns_resolver(Arc::new(GuardedResolver)).no_proxy();
        }
        let http = http.build()?;
        let signer = Signer::from_config(&cfg);
        let topology = Topology::from_config(&cfg.amqp);
        let queue = wh::queue(&cfg.amqp.prefix);
        Ok(Self { cfg, store, http, signer, topology, queue })
    }

    /// Finds the receiver and POSTs the body, signed.
    async fn attempt(&self, body: &[u8], attempt: u32) -> Outcome {
        let event: Event = match serde_json::from_slice(body) {
            Ok(e) => e,
            Err(e) => return Outcome::Poison(format!("not a lifecycle event: {e}")),
        };
        let to = match self.receiver(&event).await {
            Ok(Some(Ok(to))) => to,
            Ok(Some(Err(refused))) => return Outcome::Poison(format!("refused webhook destination: {refused}")),
            Ok(None) => return Outcome::NoReceiver,
            Err(e) => return Outcome::Failed(format!("reading the session: {e}")),
        };
        let outcome = self.post(&to, &event, body, attempt).await;
        match &outcome {
            Outcome::Delivered => debug!(session = %event.session_id, kind = %event.kind, attempt, "webhook delivered"),
            Outcome::Failed(reason) => {
                warn!(session = %event.session_id, kind = %event.kind, attempt, reason, "webhook attempt failed")
            }
            _ => {}
        }
        outcome
    }

    /// The session's `callback_url` (checked again against its tenant's prefixes, which may have
    /// changed since), else its agent's `webhook_url`; either with its literal address checked.
    async fn receiver(&self, event: &Event) -> Result<Option<Result<Receiver, CallbackError>>, StoreError> {
        let meta = match SessionId::parse(&event.session_id) {
            Ok(id) => self.store.meta(&id).await?,
            Err(_) => None,
        };
        let tenant = meta.as_ref().and_then(|m| m.tenant.as_ref()).map(|t| t.as_str().to_owned()).unwrap_or_default();
        let callback = meta.and_then(|m| m.callback_url).filter(|u| !u.is_empty());
        let checked = match callback {
            Some(url) => address::check_callback_for(&self.cfg, Some(tenant.as_str()).filter(|t| !t.is_empty()), &url),
            None => match self.cfg.agent(&event.agent).and_then(|a| a.webhook_url.as_deref()) {
                Some(url) => self.agent_url(url),
                None => return Ok(None),
            },
        };
        Ok(Some(checked.map(|url| Receiver { url, tenant })))
    }

    /// An agent's `webhook_url` (from the config: no tenant prefix applies).
    fn agent_url(&self, url: &str) -> Result<url::Url, CallbackError> {
        let parsed = url::Url::parse(url).map_err(|_| CallbackError::NotHttp)?;
        address::check_destination(&parsed, self.cfg.webhooks.allow_private_addresses)?;
        Ok(parsed)
    }

    async fn post(&self, to: &Receiver, event: &Event, body: &[u8], attempt: u32) -> Outcome {
        let dest = Destination { url: to.url.as_str(), tenant: &to.tenant };
        let (timestamp, signature) = match self.signer.headers(unix_now(), &dest, body) {
            Ok(headers) => headers,
            Err(missing) => return Outcome::Poison(missing.to_string()),
        };
        let mut request = self.http.post(to.url.clone());
        if !to.tenant.is_empty() {
            request = request.header(wh::TENANT_HEADER, &to.tenant);
        }
        let url = dest.url;
        let request = request
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(wh::EVENT_HEADER, &event.kind)
            .header(wh::DELIVERY_HEADER, wh::delivery_id(body))
            .header(wh::TIMESTAMP_HEADER, timestamp)
            .header(wh::SIGNATURE_HEADER, signature)
            .header("x-agentfleet-attempt", attempt.to_string())
            .body(body.to_vec());
        match request.send().await {
            Ok(r) if r.status().is_success() => Outcome::Delivered,
            Ok(r) => Outcome::Failed(format!("the receiver answered {}", r.status())),
            Err(e) if e.is_timeout() => Outcome::Failed("no answer within the timeout".into()),
            Err(e) if e.is_builder() => {
                Outcome::Poison(format!("unusable webhook URL `{}`: {}", scrub::urls_in(url), scrub::error(&e)))
            }
            Err(e) if address::refused_in(&e).is_some() => {
                let refused = address::refused_in(&e).map(ToString::to_string).unwrap_or_default();
                Outcome::Poison(format!("refused webhook destination: {refused}"))
            }
            Err(e) => Outcome::Failed(format!("request failed: {}", scrub::error(&e))),
        }
    }

    /// Publishes the body unchanged to the retry tier for `attempt` failures, with the count.
    async fn retry(&self, ch: &Channel, d: &Delivery, attempt: u32, reason: &str) -> Result<(), lapin::Error> {
        let (tier, _) = wh::retry_tier(attempt);
        let queue = wh::retry_queue(&self.cfg.amqp.prefix, tier);
        let mut headers = FieldTable::default();
        headers.insert(wh::ATTEMPT_HEADER.into(), AMQPValue::LongLongInt(i64::from(attempt)));
        headers.insert("x-agentfleet-last-error".into(), long(&redact_error(reason)));
        publish_confirmed(ch, "", &queue, &d.data, event_props(d, headers)).await
    }

    /// Sends the event to `<prefix>.dead` with the reason in `x-agentfleet-reason`.
    async fn dead_letter(&self, ch: &Channel, d: &Delivery, attempt: u32, reason: &str) -> Result<(), lapin::Error> {
        error!(reason, "webhook dead-lettered");
        let mut headers = FieldTable::default();
        headers.insert(agentfleet::amqp::REASON_HEADER.into(), long(&redact_error(reason)));
        headers.insert(agentfleet::amqp::QUEUE_HEADER.into(), long(&self.queue));
        headers.insert(wh::ATTEMPT_HEADER.into(), AMQPValue::LongLongInt(i64::from(attempt)));
        publish_confirmed(ch, &self.topology.dead(), "", &d.data, event_props(d, headers)).await
    }
}

/// The deliverer consumes `<prefix>.webhooks`; its link is a confirming channel on the same
/// connection for the re-publishes.
impl Handler for Deliverer {
    type Key = ();
    type Link = Channel;

    /// The fleet topology, then the webhook queue and its retry tiers (idempotent); and the
    /// confirming channel that retries and dead letters are published on.
    async fn declare(&self, conn: &Connection, ch: &Channel) -> Result<Channel, lapin::Error> {
        let publish = conn.create_channel().await?;
        publish.confirm_select(ConfirmSelectOptions::default()).await?;
        self.topology.declare(ch, &[]).await?;
        declare_queues(ch, &self.topology, &self.cfg.amqp.prefix).await?;
        Ok(publish)
    }

    /// Attempts one delivery and settles the message: acked once it was delivered, skipped,
    /// handed to a retry tier or dead-lettered; requeued only when none of that could be done.
    async fn handle(&self, delivery: Delivery, _queue: &QueueTag<()>, publish: &Channel) {
        let attempt = attempts_made(&delivery) + 1;
        use agentfleet::telemetry::metric::webhook_delivery;
        let settled = match self.attempt(&delivery.data, attempt).await {
            Outcome::Delivered => {
                webhook_delivery("delivered");
                Ok(())
            }
            Outcome::NoReceiver => Ok(()),
            Outcome::Failed(reason) if attempt < self.cfg.webhooks.max_attempts.max(1) => {
                webhook_delivery("retry");
                self.retry(publish, &delivery, attempt, &reason).await
            }
            Outcome::Failed(reason) => {
                webhook_delivery("gave_up");
                let reason = format!("webhook not delivered after {attempt} attempts: {reason}");
                self.dead_letter(publish, &delivery, attempt, &reason).await
            }
            Outcome::Poison(reason) => {
                webhook_delivery("gave_up");
                self.dead_letter(publish, &delivery, attempt, &reason).await
            }
        };
        let result = match settled {
            Ok(()) => delivery.ack(BasicAckOptions::default()).await,
            Err(e) => {
                warn!(error = %e, "webhooks: could not re-publish a failed delivery; requeueing it");
                delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await
            }
        };
        if let Err(e) = result {
            warn!(error = %e, "webhooks: could not settle a delivery; the broker will deliver it again");
        }
    }
}

/// Declares the webhook queue, bound to the events, and its retry tiers on the publisher's
/// connection. `Dispatcher::build` calls it, so the queue exists (and collects events) before the
/// dispatcher serves, whenever the deliverer itself gets to consume.
pub async fn declare(publisher: &AmqpPublisher, prefix: &str) -> Result<(), PublishError> {
    let ch = publisher.channel().await?;
    Ok(declare_queues(&ch, publisher.topology(), prefix).await?)
}

async fn declare_queues(ch: &Channel, topology: &Topology, prefix: &str) -> Result<(), DeclareError> {
    let queue = wh::queue(prefix);
    for (tier, ttl) in wh::RETRY_TIERS {
        let mut args = quorum();
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl.as_millis() as i64));
        args.insert("x-dead-letter-exchange".into(), long(""));
        args.insert("x-dead-letter-routing-key".into(), long(&queue));
        // At-least-once back to the webhook queue; `reject-publish` is its precondition, not a
        // length limit (see `Topology::dead_lettering_args`).
        args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
        args.insert("x-overflow".into(), long("reject-publish"));
        declare_queue(ch, &wh::retry_queue(prefix, tier), args).await?;
    }
    declare_queue(ch, &queue, topology.dead_lettering_args(DELIVERY_LIMIT)).await?;
    let opts = QueueBindOptions::default();
    let exchange = topology.events_exchange();
    ch.queue_bind(queue.as_str().into(), exchange.as_str().into(), "session.#".into(), opts, FieldTable::default())
        .await?;
    Ok(())
}

/// Attempts already made, from the `x-agentfleet-attempt` header (none on a fresh event).
fn attempts_made(d: &Delivery) -> u32 {
    let value = d.properties.headers().as_ref().and_then(|h| h.inner().get(wh::ATTEMPT_HEADER));
    let n = match value {
        Some(AMQPValue::LongLongInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => i64::from(*n),
        Some(AMQPValue::LongUInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortInt(n)) => i64::from(*n),
        _ => 0,
    };
    u32::try_from(n).unwrap_or(0)
}

fn event_props(d: &Delivery, headers: FieldTable) -> BasicProperties {
    let kind = d.properties.kind().clone().unwrap_or_else(|| d.routing_key.clone());
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_type(kind)
        .with_headers(headers)
}

async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<(), lapin::Error> {
    let opts = BasicPublishOptions { mandatory: true, ..Default::default() };
    match ch.basic_publish(exchange.into(), key.into(), opts, body, props).await?.await? {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_)) => Err(closed(&format!("unroutable: no queue for `{exchange}/{key}`"))),
        Confirmation::Nack(_) => Err(closed("the broker nacked the message")),
    }
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long("quorum"));
    args
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.as_bytes().to_vec().into())
}

fn closed(why: &str) -> lapin::Error {
    lapin::Error::from(std::io::Error::other(why.to_owned()))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
