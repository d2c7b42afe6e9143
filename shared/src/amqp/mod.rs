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

use crate::domain::{Name, StepMessage};

/// The delay tiers: name and TTL.
pub const DELAY_TIERS: [(&str, Duration); 5] = [
    ("1s", Duration::from_secs(1)),
    ("5s", Duration::from_secs(5)),
    ("30s", Duration::from_secs(30)),
    ("2m", Duration::from_secs(120)),
    ("10m", Duration::from_secs(600)),
];

/// The smallest tier at least as long as `wait` (the longest tier for longer waits).
pub fn delay_tier(wait: Duration) -> &'static str {
    DELAY_TIERS.iter().find(|(_, ttl)| *ttl >= wait).map_or(DELAY_TIERS[4].0, |(name, _)| name)
}

/// Names of every exchange and queue, under one prefix.
#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
    delivery_limit: u32,
}

impl Topology {
    /// The topology under `prefix` (`agentfleet` in production).
    pub fn new(prefix: &str, delivery_limit: u32) -> Self {
        Self { prefix: prefix.to_owned(), delivery_limit }
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

    /// Declares everything, with the step queues of `pools`. Idempotent.
    pub async fn declare(&self, ch: &Channel, pools: &[Name]) -> Result<(), lapin::Error> {
        self.declare_dead(ch).await?;
        exchange(ch, &self.steps_exchange(), ExchangeKind::Direct).await?;
        exchange(ch, &self.events_exchange(), ExchangeKind::Topic).await?;
        for pool in pools {
            self.declare_step_queue(ch, pool).await?;
        }
        for (tier, ttl) in DELAY_TIERS {
            self.declare_delay(ch, tier, ttl).await?;
        }
        let mut args = quorum();
        args.insert("x-dead-letter-exchange".into(), long(&self.dead()));
        queue(ch, &self.requests_queue(), args).await?;
        Ok(())
    }

    async fn declare_dead(&self, ch: &Channel) -> Result<(), lapin::Error> {
        exchange(ch, &self.dead(), ExchangeKind::Fanout).await?;
        queue(ch, &self.dead(), quorum()).await?;
        bind(ch, &self.dead(), &self.dead(), "").await
    }

    async fn declare_step_queue(&self, ch: &Channel, pool: &Name) -> Result<(), lapin::Error> {
        let mut args = quorum();
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(i64::from(self.delivery_limit)));
        args.insert("x-dead-letter-exchange".into(), long(&self.dead()));
        let q = self.step_queue(pool);
        queue(ch, &q, args).await?;
        bind(ch, &q, &self.steps_exchange(), pool.as_str()).await
    }

    async fn declare_delay(&self, ch: &Channel, tier: &str, ttl: Duration) -> Result<(), lapin::Error> {
        let name = self.delay(tier);
        let mut args = quorum();
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl.as_millis() as i64));
        args.insert("x-dead-letter-exchange".into(), long(&self.steps_exchange()));
        args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
        args.insert("x-overflow".into(), long("reject-publish"));
        exchange(ch, &name, ExchangeKind::Fanout).await?;
        queue(ch, &name, args).await?;
        bind(ch, &name, &name, "").await
    }
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.as_bytes().to_vec().into())
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

async fn queue(ch: &Channel, name: &str, args: FieldTable) -> Result<(), lapin::Error> {
    let opts = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare(name.into(), opts, args).await.map(|_| ())
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
        let props = persistent_json().with_message_id(msg.message_id().into());
        let exchange = match delay {
            Some(d) => self.topology.delay(delay_tier(d)),
            None => self.topology.steps_exchange(),
        };
        self.publish(&exchange, pool.as_str(), &body, props).await
    }

    async fn dead_letter(&self, body: &[u8], reason: &str) -> Result<(), PublishError> {
        let mut headers = FieldTable::default();
        headers.insert("x-agentfleet-reason".into(), long(&crate::telemetry::redact_error(reason)));
        let props = BasicProperties::default().with_delivery_mode(2).with_headers(headers);
        self.publish(&self.topology.dead(), "", body, props).await
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
    fn delays_round_up_to_a_tier() {
        assert_eq!(delay_tier(Duration::from_millis(200)), "1s");
        assert_eq!(delay_tier(Duration::from_secs(1)), "1s");
        assert_eq!(delay_tier(Duration::from_secs(6)), "30s");
        assert_eq!(delay_tier(Duration::from_secs(3600)), "10m");
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
