//! RabbitMQ: the topology of DESIGN §4 and a confirming publisher that reconnects.
//!
//! Step messages go to the `<prefix>.steps` direct exchange with the agent's pool as routing key,
//! into one quorum queue per pool with a delivery limit that dead-letters to `<prefix>.dead`.
//! Delays go through per-tier fanout exchanges into quorum queues whose TTL dead-letters back to the
//! step exchange with the original routing key: no worker ever sleeps to wait.
//!
//! Every consumer of these queues runs the one loop in [`consumer`]; [`Backoff`] paces every
//! reconnect.

mod backoff;
pub mod consumer;

pub use backoff::Backoff;

use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use thiserror::Error;
use tokio::sync::Mutex;

use crate::config::AmqpConfig;
use crate::domain::{Name, StepMessage};

/// The delay tiers: name and TTL, shortest first.
///
/// A postponed step goes to the shortest tier at least as long as its wait ([`delay_tier`]), with
/// its own wait as the message's `expiration`. In a tier that holds only waits like its own (the
/// usual case: a breaker or a `retry-after` postpones many steps by the same time) it waits
/// exactly that. RabbitMQ expires messages at the head of a queue, so a short wait behind a longer
/// one in the same tier waits for it, but never longer than the tier's TTL: at most 1.5 times the
/// wait, as each tier is at most 1.5 times the one before; never less than the wait. The round
/// waits (1 s, 5 s, 30 s, 60 s, 2 min, 10 min) are tiers of their own. Waits under 1 s take the
/// 1 s tier; waits over 10 min take the 10 min tier (the step is looked at again then, and
/// postponed again if it must).
///
/// Each tier is a quorum queue (DESIGN §4), for its at-least-once dead-lettering back to the step
/// exchange: a classic queue dead-letters at most once, and a delayed step lost on the way back
/// would be a session stuck until the janitor finds it. 18 tiers, not more: every quorum queue costs
/// the broker file handles and memory, per prefix.
pub const DELAY_TIERS: [(&str, Duration); 18] = [
    ("1s", Duration::from_millis(1_000)),
    ("1500ms", Duration::from_millis(1_500)),
    ("2250ms", Duration::from_millis(2_250)),
    ("3350ms", Duration::from_millis(3_350)),
    ("5s", Duration::from_millis(5_000)),
    ("7500ms", Duration::from_millis(7_500)),
    ("11s", Duration::from_millis(11_000)),
    ("16s", Duration::from_millis(16_000)),
    ("22s", Duration::from_millis(22_000)),
    ("30s", Duration::from_millis(30_000)),
    ("45s", Duration::from_millis(45_000)),
    ("60s", Duration::from_millis(60_000)),
    ("90s", Duration::from_millis(90_000)),
    ("120s", Duration::from_millis(120_000)),
    ("180s", Duration::from_millis(180_000)),
    ("270s", Duration::from_millis(270_000)),
    ("400s", Duration::from_millis(400_000)),
    ("600s", Duration::from_millis(600_000)),
];

/// The most a tier adds to the wait it was given, as a fraction of that wait (for waits from 1 s
/// to the longest tier), when shorter waits share the tier with longer ones; none otherwise.
pub const DELAY_TIER_OVERSHOOT: f64 = 0.5;

/// The shortest tier at least as long as `wait` (the longest tier for longer waits).
pub fn delay_tier(wait: Duration) -> &'static str {
    let last = DELAY_TIERS[DELAY_TIERS.len() - 1].0;
    DELAY_TIERS.iter().find(|(_, ttl)| *ttl >= wait).map_or(last, |(name, _)| name)
}

/// The largest step message a worker reads: a step message is `{session_id, step, attempt}`, well
/// under 200 bytes. A bigger body is not a step message, and is dead-lettered (`oversized`) unread.
pub const MAX_STEP_MESSAGE_BYTES: usize = 4 * 1024;

/// The header of a dead letter the fleet publishes itself: why (`<reason>: <detail>`).
pub const REASON_HEADER: &str = "x-agentfleet-reason";
/// The header of a dead letter the fleet publishes itself: the queue it was taken from, when the
/// publisher knows it (the broker's own dead letters say it in `x-death`).
pub const QUEUE_HEADER: &str = "x-agentfleet-queue";
/// The header of a dead letter the fleet publishes itself: the tenant it belongs to, when known.
pub const TENANT_HEADER: &str = "x-agentfleet-tenant";
/// The header of a re-driven message: how many times it was taken out of the dead letters.
pub const REDRIVEN_HEADER: &str = "x-agentfleet-redriven";

/// The length limits of the queues that anyone outside the fleet can fill: the session requests
/// (business systems publish there) and the dead letters (every failure ends there). From `[amqp]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Deliveries of one step message before the broker dead-letters it.
    pub step_delivery_limit: u32,
    /// Deliveries of one session request before the broker dead-letters it.
    pub requests_delivery_limit: u32,
    /// `x-max-length` of the requests queue.
    pub requests_max_length: u64,
    /// `x-max-length-bytes` of the requests queue.
    pub requests_max_bytes: u64,
    /// `x-max-length` of the dead-letter queue.
    pub dead_max_length: u64,
    /// `x-max-length-bytes` of the dead-letter queue.
    pub dead_max_bytes: u64,
}

impl QueueLimits {
    /// The limits of the `[amqp]` config.
    pub fn from_config(cfg: &AmqpConfig) -> Self {
        Self {
            step_delivery_limit: cfg.delivery_limit,
            requests_delivery_limit: cfg.requests_delivery_limit,
            requests_max_length: cfg.requests_max_length,
            requests_max_bytes: cfg.requests_max_bytes,
            dead_max_length: cfg.dead_max_length,
            dead_max_bytes: cfg.dead_max_bytes,
        }
    }
}

impl Default for QueueLimits {
    /// The `[amqp]` defaults.
    fn default() -> Self {
        Self::from_config(&AmqpConfig::default())
    }
}

/// Names of every exchange and queue, under one prefix, and the queues' limits.
#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
    limits: QueueLimits,
}

impl Topology {
    /// The topology under `prefix` (`agentfleet` in production), with the default limits except
    /// the step messages' `delivery_limit`.
    pub fn new(prefix: &str, delivery_limit: u32) -> Self {
        let limits = QueueLimits { step_delivery_limit: delivery_limit, ..QueueLimits::default() };
        Self { prefix: prefix.to_owned(), limits }
    }

    /// The topology of the `[amqp]` config: its prefix and its limits. Every process of a fleet
    /// must declare the same arguments, so every process builds its topology here.
    pub fn from_config(cfg: &AmqpConfig) -> Self {
        Self { prefix: cfg.prefix.clone(), limits: QueueLimits::from_config(cfg) }
    }

    /// The step exchange.
    pub fn steps_exchange(&self) -> String {
        format!("{}.steps", self.prefix)
    }

    /// The step queue of a pool.
    pub fn step_queue(&self, pool: &Name) -> String {
        format!("{}.steps.{pool}", self.prefix)
    }

    /// The dead-letter queue (and its fanout exchange, of the same name).
    pub fn dead(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// A delay tier's exchange and queue (same name).
    pub fn delay(&self, tier: &str) -> String {
        format!("{}.delay.{tier}", self.prefix)
    }

    /// The lifecycle events exchange.
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    /// The session request queue.
    pub fn requests_queue(&self) -> String {
        format!("{}.requests", self.prefix)
    }

    /// Declares everything, with the step queues of `pools`. Idempotent while the arguments stay
    /// the same; a queue that exists with other arguments is a [`DeclareError::Mismatch`].
    pub async fn declare(&self, ch: &Channel, pools: &[Name]) -> Result<(), DeclareError> {
        self.declare_dead(ch).await?;
        exchange(ch, &self.steps_exchange(), ExchangeKind::Direct).await?;
        exchange(ch, &self.events_exchange(), ExchangeKind::Topic).await?;
        for pool in pools {
            self.declare_step_queue(ch, pool).await?;
        }
        for (tier, ttl) in DELAY_TIERS {
            self.declare_delay(ch, tier, ttl).await?;
        }
        declare_queue(ch, &self.requests_queue(), self.requests_args()).await
    }

    /// The dead-letter queue: bounded, and `reject-publish` when full.
    ///
    /// Why `reject-publish` and not `drop-head`: nothing is dropped silently. A direct publish to a
    /// full dead-letter queue (`StepPublisher::dead_letter`) is nacked, and its publisher keeps the
    /// message (it requeues the delivery it came from). The broker's own dead-lettering into it (a
    /// step or a request over its delivery limit, a rejected request) is at-least-once from every
    /// queue that dead-letters here, so a message that finds the dead-letter queue full stays in its
    /// source queue (not deliverable, kept aside) and moves once there is room; the source queues'
    /// own limits bound that. With `drop-head` the oldest dead letters would vanish unseen; with
    /// at-most-once dead-lettering (the default) the broker drops a message that a full queue
    /// refuses. `x-max-length-bytes` bounds the broker's disk as well as the count.
    fn dead_args(&self) -> FieldTable {
        let mut args = quorum();
        args.insert("x-max-length".into(), count(self.limits.dead_max_length));
        args.insert("x-max-length-bytes".into(), count(self.limits.dead_max_bytes));
        args.insert("x-overflow".into(), long("reject-publish"));
        args
    }

    /// The session requests: bounded with `reject-publish`, so a business system publishing into a
    /// full queue gets a nack (its publisher confirm fails) instead of a silent loss; and a
    /// delivery limit, so a request that makes the intake fail over and over (requeued on every
    /// attempt) ends in the dead-letter queue, with `x-death` reason `delivery_limit`, instead of
    /// looping forever.
    fn requests_args(&self) -> FieldTable {
        let mut args = self.dead_lettering_args(self.limits.requests_delivery_limit);
        args.insert("x-max-length".into(), count(self.limits.requests_max_length));
        args.insert("x-max-length-bytes".into(), count(self.limits.requests_max_bytes));
        args
    }

    /// A quorum queue with a delivery limit that dead-letters to `<prefix>.dead`, at least once.
    ///
    /// `x-overflow = reject-publish` is what at-least-once dead-lettering requires of its source
    /// queue (with `drop-head`, the default, RabbitMQ falls back to at-most-once); on a queue
    /// without `x-max-length` it limits nothing else.
    pub fn dead_lettering_args(&self, delivery_limit: u32) -> FieldTable {
        let mut args = quorum();
        args.insert("x-delivery-limit".into(), count(u64::from(delivery_limit)));
        args.insert("x-dead-letter-exchange".into(), long(&self.dead()));
        args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
        args.insert("x-overflow".into(), long("reject-publish"));
        args
    }

    async fn declare_dead(&self, ch: &Channel) -> Result<(), DeclareError> {
        exchange(ch, &self.dead(), ExchangeKind::Fanout).await?;
        declare_queue(ch, &self.dead(), self.dead_args()).await?;
        Ok(bind(ch, &self.dead(), &self.dead(), "").await?)
    }

    async fn declare_step_queue(&self, ch: &Channel, pool: &Name) -> Result<(), DeclareError> {
        let q = self.step_queue(pool);
        declare_queue(ch, &q, self.dead_lettering_args(self.limits.step_delivery_limit)).await?;
        Ok(bind(ch, &q, &self.steps_exchange(), pool.as_str()).await?)
    }

    async fn declare_delay(&self, ch: &Channel, tier: &str, ttl: Duration) -> Result<(), DeclareError> {
        let name = self.delay(tier);
        let mut args = quorum();
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl.as_millis() as i64));
        args.insert("x-dead-letter-exchange".into(), long(&self.steps_exchange()));
        // At-least-once back to the step exchange; `reject-publish` is its precondition (see
        // `dead_lettering_args`), not a length limit.
        args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
        args.insert("x-overflow".into(), long("reject-publish"));
        exchange(ch, &name, ExchangeKind::Fanout).await?;
        declare_queue(ch, &name, args).await?;
        Ok(bind(ch, &name, &name, "").await?)
    }
}

/// A queue that could not be declared.
#[derive(Debug, Error)]
pub enum DeclareError {
    /// The queue exists with other arguments.
    #[error(transparent)]
    Mismatch(#[from] QueueMismatch),
    /// The broker or the connection failed.
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
}

impl From<DeclareError> for lapin::Error {
    /// For the consumer loop's declare hook, which reconnects on any error (and logs the text).
    fn from(e: DeclareError) -> Self {
        match e {
            DeclareError::Broker(e) => e,
            DeclareError::Mismatch(m) => lapin::Error::from(std::io::Error::other(m.to_string())),
        }
    }
}

/// A queue exists with arguments other than the ones this fleet declares. RabbitMQ cannot change a
/// queue's arguments in place: it refuses the declaration (`PRECONDITION_FAILED`) and closes the
/// channel. Nothing can run on such a topology, so the processes stop at start with this error.
#[derive(Debug, Clone, Error)]
#[error(
    "RabbitMQ queue `{queue}` exists with other arguments than this fleet declares (argument `{argument}`; \
     the broker says: {detail}). A queue's arguments cannot change in place. Either drain and delete the \
     queue (e.g. `rabbitmqctl delete_queue {queue}`; the fleet declares it again at start), or set another \
     `[amqp] prefix` to start on fresh queues"
)]
pub struct QueueMismatch {
    /// The queue.
    pub queue: String,
    /// The argument the broker named (`x-max-length`, …), or `?` when it named none.
    pub argument: String,
    /// The broker's message.
    pub detail: String,
}

impl QueueMismatch {
    /// The mismatch in a declaration's error, when it is one: a `PRECONDITION_FAILED` channel
    /// close, which names the argument (`inequivalent arg 'x-max-length' for queue …`).
    pub fn of(queue: &str, e: &lapin::Error) -> Option<Self> {
        use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
        let lapin::ErrorKind::ProtocolError(amqp) = e.kind() else { return None };
        if *amqp.kind() != AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) {
            return None;
        }
        let detail = amqp.get_message().as_str().to_owned();
        let argument = detail
            .split_once("inequivalent arg '")
            .and_then(|(_, rest)| rest.split_once('\''))
            .map_or("?", |(arg, _)| arg)
            .to_owned();
        Some(Self { queue: queue.to_owned(), argument, detail })
    }
}

/// Declares a durable queue with `args`; a queue that exists with other arguments is a
/// [`DeclareError::Mismatch`] naming it. (The channel is closed then: open another one.)
pub async fn declare_queue(ch: &Channel, name: &str, args: FieldTable) -> Result<(), DeclareError> {
    let opts = QueueDeclareOptions { durable: true, ..Default::default() };
    match ch.queue_declare(name.into(), opts, args).await {
        Ok(_) => Ok(()),
        Err(e) => Err(QueueMismatch::of(name, &e).map_or(DeclareError::Broker(e), DeclareError::Mismatch)),
    }
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.as_bytes().to_vec().into())
}

fn count(n: u64) -> AMQPValue {
    AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX))
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long("quorum"));
    args
}

async fn exchange(ch: &Channel, name: &str, kind: ExchangeKind) -> Result<(), lapin::Error> {
    let opts = ExchangeDeclareOptions { durable: true, ..Default::default() };
    ch.exchange_declare(name.into(), kind, opts, FieldTable::default()).await
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) -> Result<(), lapin::Error> {
    ch.queue_bind(queue.into(), exchange.into(), key.into(), QueueBindOptions::default(), FieldTable::default()).await
}

/// Connects to the broker, naming the connection after the process for the management UI.
pub async fn connect(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    let cp = ConnectionProperties::default().with_connection_name(name.as_bytes().to_vec().into());
    Connection::connect(url, cp).await
}

/// A publish that did not reach a queue for sure.
#[derive(Debug, Error)]
pub enum PublishError {
    /// No queue is bound for the routing key.
    #[error("unroutable: no queue for `{0}`")]
    Unroutable(String),
    /// The broker refused to take responsibility for the message.
    #[error("the broker nacked the message")]
    Nacked,
    /// The connection or channel failed; the message may or may not have been stored.
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    /// A queue of the topology exists with other arguments: nothing will work until an operator
    /// deletes it or changes the prefix, so this is never retried.
    #[error(transparent)]
    Topology(QueueMismatch),
}

impl From<DeclareError> for PublishError {
    fn from(e: DeclareError) -> Self {
        match e {
            DeclareError::Mismatch(m) => Self::Topology(m),
            DeclareError::Broker(e) => Self::Broker(e),
        }
    }
}

/// Publishes step messages. RabbitMQ in production; the trait is the seam for tests in memory.
#[async_trait]
pub trait StepPublisher: Send + Sync {
    /// Publishes `msg` to `pool`, now or after `delay`, and waits for the broker's confirm.
    async fn publish_step(&self, pool: &Name, msg: &StepMessage, delay: Option<Duration>) -> Result<(), PublishError>;
    /// Sends an unusable message to the dead-letter queue with the reason in its headers.
    async fn dead_letter(&self, body: &[u8], reason: &str) -> Result<(), PublishError>;
    /// Publishes a lifecycle event (`session.budget_alert`, …) to the events exchange, with the
    /// event type as routing key.
    async fn publish_event(&self, kind: &str, event: &serde_json::Value) -> Result<(), PublishError>;
}

/// A confirming publisher on its own connection, reconnecting on the next publish after a failure.
pub struct AmqpPublisher {
    url: String,
    name: String,
    topology: Topology,
    pools: Vec<Name>,
    link: Mutex<Option<(Connection, Channel)>>,
}

impl AmqpPublisher {
    /// Connects, enables confirms and declares the topology with the step queues of `pools`.
    pub async fn connect(url: &str, name: &str, topology: Topology, pools: Vec<Name>) -> Result<Self, PublishError> {
        let p = Self { url: url.to_owned(), name: name.to_owned(), topology, pools, link: Mutex::new(None) };
        p.channel().await?;
        Ok(p)
    }

    /// Like [`connect`](Self::connect), retrying with backoff for up to `patience`: a broker that is
    /// starting (or recovering its quorum queues after a restart) refuses connections for a while.
    /// A queue that exists with other arguments ([`PublishError::Topology`]) fails at once.
    pub async fn connect_patiently(
        url: &str,
        name: &str,
        topology: Topology,
        pools: Vec<Name>,
        patience: Duration,
    ) -> Result<Self, PublishError> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut backoff = Backoff::default();
        loop {
            let wait = backoff.peek();
            match Self::connect(url, name, topology.clone(), pools.clone()).await {
                Ok(p) => return Ok(p),
                Err(e @ PublishError::Topology(_)) => return Err(e),
                Err(e) if tokio::time::Instant::now() + wait < deadline => {
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "broker not ready; retrying");
                    tokio::time::sleep(backoff.next_wait()).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The topology this publisher declared.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// A live confirming channel, reconnecting when the last one died.
    pub async fn channel(&self) -> Result<Channel, PublishError> {
        let mut link = self.link.lock().await;
        if let Some((conn, ch)) = link.as_ref()
            && conn.status().connected()
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        *link = None;
        let conn = connect(&self.url, &self.name).await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        self.topology.declare(&ch, &self.pools).await?;
        *link = Some((conn, ch.clone()));
        Ok(ch)
    }

    /// True when the connection is up (for readiness checks).
    pub async fn is_connected(&self) -> bool {
        self.channel().await.is_ok()
    }

    /// Sends an unusable message to the dead-letter queue with the reason in its headers, and the
    /// queue it was taken from and its tenant when they are known (the dead-letter store reads
    /// them: see the dispatcher's `dlq` module).
    pub async fn dead_letter_from(
        &self,
        body: &[u8],
        reason: &str,
        queue: Option<&str>,
        tenant: Option<&str>,
    ) -> Result<(), PublishError> {
        let mut headers = FieldTable::default();
        headers.insert(REASON_HEADER.into(), long(&crate::telemetry::redact_error(reason)));
        for (name, value) in [(QUEUE_HEADER, queue), (TENANT_HEADER, tenant)] {
            if let Some(v) = value {
                headers.insert(name.into(), long(v));
            }
        }
        let props = BasicProperties::default().with_delivery_mode(2).with_headers(headers);
        self.publish(&self.topology.dead(), "", body, props).await
    }

    /// Publishes `body` and waits for the confirm; retries once on a fresh connection when the
    /// channel had died before the publish went out.
    pub async fn publish(
        &self,
        exchange: &str,
        key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), PublishError> {
        match self.publish_once(exchange, key, body, props.clone()).await {
            Err(PublishError::Broker(_)) => self.publish_once(exchange, key, body, props).await,
            other => other,
        }
    }

    async fn publish_once(
        &self,
        exchange: &str,
        key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), PublishError> {
        let ch = self.channel().await?;
        let opts = BasicPublishOptions { mandatory: true, ..Default::default() };
        let confirm = ch.basic_publish(exchange.into(), key.into(), opts, body, props).await?.await?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable(format!("{exchange}/{key}"))),
            Confirmation::Nack(_) => Err(PublishError::Nacked),
        }
    }
}

fn persistent_json() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2).with_content_type(ShortString::from("application/json"))
}

#[async_trait]
impl StepPublisher for AmqpPublisher {
    async fn publish_step(&self, pool: &Name, msg: &StepMessage, delay: Option<Duration>) -> Result<(), PublishError> {
        let body =
            serde_json::to_vec(msg).map_err(|e| PublishError::Broker(lapin::Error::from(std::io::Error::other(e))))?;
        let mut props = persistent_json().with_message_id(msg.message_id().into());
        let exchange = match delay {
            Some(d) => {
                // The step's own wait; the tier's TTL (at most 1.5 times it) bounds the rest.
                props = props.with_expiration(d.max(Duration::from_millis(1)).as_millis().to_string().into());
                self.topology.delay(delay_tier(d))
            }
            None => self.topology.steps_exchange(),
        };
        self.publish(&exchange, pool.as_str(), &body, props).await
    }

    async fn dead_letter(&self, body: &[u8], reason: &str) -> Result<(), PublishError> {
        self.dead_letter_from(body, reason, None, None).await
    }

    async fn publish_event(&self, kind: &str, event: &serde_json::Value) -> Result<(), PublishError> {
        let body = serde_json::to_vec(event)
            .map_err(|e| PublishError::Broker(lapin::Error::from(std::io::Error::other(e))))?;
        let props = persistent_json().with_type(kind.into());
        match self.publish(&self.topology.events_exchange(), kind, &body, props).await {
            // Nobody has bound a queue for this event type yet: there is no one to tell.
            Err(PublishError::Unroutable(_)) => Ok(()),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_waits_have_tiers_of_their_own() {
        assert_eq!(delay_tier(Duration::from_millis(200)), "1s");
        assert_eq!(delay_tier(Duration::from_secs(1)), "1s");
        assert_eq!(delay_tier(Duration::from_secs(5)), "5s");
        assert_eq!(delay_tier(Duration::from_secs(6)), "7500ms");
        assert_eq!(delay_tier(Duration::from_secs(30)), "30s");
        assert_eq!(delay_tier(Duration::from_secs(60)), "60s");
        assert_eq!(delay_tier(Duration::from_secs(61)), "90s");
        assert_eq!(delay_tier(Duration::from_secs(120)), "120s");
        assert_eq!(delay_tier(Duration::from_secs(600)), "600s");
        assert_eq!(delay_tier(Duration::from_secs(3600)), "600s");
    }

    #[test]
    fn every_wait_from_1s_to_10min_waits_at_most_half_as_long_again() {
        let ttl = |name: &str| DELAY_TIERS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t).expect("a tier");
        for ms in (1_000..=600_000u64).step_by(7) {
            let wait = Duration::from_millis(ms);
            let got = ttl(delay_tier(wait));
            assert!(got >= wait, "{wait:?} waits only {got:?}");
            assert!(got.as_secs_f64() <= wait.as_secs_f64() * (1.0 + DELAY_TIER_OVERSHOOT), "{wait:?} waits {got:?}");
        }
    }

    #[test]
    fn tiers_grow_by_at_most_half_and_are_named_by_their_ttl() {
        for pair in DELAY_TIERS.windows(2) {
            let ((_, a), (_, b)) = (pair[0], pair[1]);
            assert!(b > a && b.as_secs_f64() <= a.as_secs_f64() * 1.5, "{a:?} then {b:?}");
        }
        for (name, ttl) in DELAY_TIERS {
            let ms = ttl.as_millis();
            let expected = if ms % 1000 == 0 { format!("{}s", ms / 1000) } else { format!("{ms}ms") };
            assert_eq!(name, expected);
        }
    }

    #[test]
    fn a_precondition_failure_names_the_queue_and_the_argument() {
        use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPSoftError};
        let text = "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'af.dead' in vhost '/': \
                    received the value '100000' of type 'signedint' but current is none";
        let amqp = AMQPError::new(AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED), text.into());
        let e = lapin::Error::from(lapin::ErrorKind::ProtocolError(amqp));
        let m = QueueMismatch::of("af.dead", &e).expect("a mismatch");
        assert_eq!((m.queue.as_str(), m.argument.as_str()), ("af.dead", "x-max-length"));
        let shown = m.to_string();
        assert!(shown.contains("`af.dead`") && shown.contains("rabbitmqctl delete_queue af.dead"), "{shown}");
        assert!(shown.contains("[amqp] prefix"), "{shown}");
        let other = lapin::Error::from(std::io::Error::other("reset"));
        assert!(QueueMismatch::of("af.dead", &other).is_none());
    }

    #[test]
    fn names_share_the_prefix() {
        let t = Topology::new("t1", 5);
        let pool = Name::parse("default").expect("name");
        assert_eq!(t.step_queue(&pool), "t1.steps.default");
        assert_eq!(t.delay("5s"), "t1.delay.5s");
        assert_eq!(t.dead(), "t1.dead");
    }
}
