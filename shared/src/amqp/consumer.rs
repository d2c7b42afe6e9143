//! The one consumer loop: every queue the fleet reads (the worker's step queues, the dispatcher's
//! session requests and its webhook queue) is read by [`run`].
//!
//! Why one: each consumer had its own copy of connect-with-backoff, `basic_qos`, a semaphore, a
//! `select!` loop and a drain, and the copies drifted (one reset its backoff after a healthy
//! connection, one closed its connection on errors, the others did not). The shape is the one of
//! STYLE items 9 and 10, written once:
//!
//! 1. connect, reconnecting with a capped [`Backoff`] whenever the broker goes away;
//! 2. `basic_qos(prefetch)` first, then the caller's [`Handler::declare`] hook, then consume every
//!    queue of the [`Settings`] on one channel;
//! 3. a [`Semaphore`] of `prefetch` permits bounds the handlers in flight; `select!` waits on the
//!    shutdown token and on a permit, then on the token and the next delivery;
//! 4. each delivery goes to [`Handler::handle`] on a [`TaskTracker`]; the handler settles it (ack,
//!    nack, reject) itself, only once its work is safe: the loop never acks;
//! 5. on shutdown: cancel the consumers, wait for the handlers in flight up to `grace`, close the
//!    connection. What was not settled by then is redelivered by the broker.
//!
//! The connection is closed whatever ended it: a dropped connection would otherwise linger.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::Backoff;

/// A connection that lived this long starts the next one's backoff afresh.
const HEALTHY: Duration = Duration::from_secs(30);

/// One queue to consume: its name, the consumer tag (for the cancel at shutdown), and what the
/// caller wants handed back with each of its deliveries (the worker's pool; `()` elsewhere).
#[derive(Debug, Clone)]
pub struct QueueTag<K> {
    /// The queue's name.
    pub queue: String,
    /// The consumer tag on it.
    pub consumer_tag: String,
    /// The caller's key for this queue, passed to [`Handler::handle`].
    pub key: K,
}

/// Where and how much to consume.
#[derive(Debug, Clone)]
pub struct Settings<K> {
    /// The broker's URL.
    pub url: String,
    /// The connection's name in the management UI; also the `consumer` field of the logs.
    pub connection_name: String,
    /// `basic_qos` prefetch, and the handlers in flight at once.
    pub prefetch: u16,
    /// The queues consumed, all on one channel.
    pub queues: Vec<QueueTag<K>>,
    /// How long the handlers in flight may take to finish after shutdown.
    pub grace: Duration,
    /// Set while the consumers are subscribed and taking deliveries (a worker's readiness).
    pub consuming: Consuming,
}

/// Whether a consumer loop is taking deliveries: true from the subscription until the connection
/// is lost or the drain begins. Cheap to clone; every clone sees the same flag.
#[derive(Debug, Clone, Default)]
pub struct Consuming(Arc<AtomicBool>);

impl Consuming {
    /// True while deliveries are being taken.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, on: bool) {
        self.0.store(on, Ordering::Relaxed);
    }
}

/// What a consumer does with its deliveries.
pub trait Handler: Send + Sync + 'static {
    /// The caller's key of a queue (see [`QueueTag::key`]).
    type Key: Send + Sync + 'static;
    /// What a connection gives every handler of its deliveries besides the delivery: a publishing
    /// channel on the same connection, or `()`.
    type Link: Send + Sync + 'static;

    /// Declares what the queues need, on each fresh connection before consuming (idempotent), and
    /// returns the connection's link.
    fn declare(&self, conn: &Connection, ch: &Channel)
    -> impl Future<Output = Result<Self::Link, lapin::Error>> + Send;

    /// Handles one delivery of `queue` and settles it. Never panics: an error is logged, and the
    /// delivery nacked or left for the broker to deliver again.
    fn handle(
        &self,
        delivery: Delivery,
        queue: &QueueTag<Self::Key>,
        link: &Self::Link,
    ) -> impl Future<Output = ()> + Send;
}

/// Consumes until `shutdown` is cancelled, reconnecting to the broker as needed; returns once the
/// handlers in flight finished (or the grace period ran out) and the connection is closed.
pub async fn run<H: Handler>(settings: Settings<H::Key>, handler: Arc<H>, shutdown: CancellationToken) {
    let consumer = Consumer::new(settings, handler);
    let mut backoff = Backoff::default();
    while !shutdown.is_cancelled() {
        let started = Instant::now();
        let Err(e) = consumer.connection(&shutdown).await else { break };
        if started.elapsed() > HEALTHY {
            backoff.reset();
        }
        let wait = backoff.next_wait();
        warn!(consumer = %consumer.name, error = %e, retry_in_ms = wait.as_millis() as u64, "broker connection lost; reconnecting");
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    info!(consumer = %consumer.name, "consumer stopped");
}

/// The settings with the queues shared by the deliveries' tasks.
struct Consumer<H: Handler> {
    name: String,
    url: String,
    prefetch: u16,
    grace: Duration,
    queues: Vec<Arc<QueueTag<H::Key>>>,
    handler: Arc<H>,
    consuming: Consuming,
}

type Deliveries<K> =
    futures::stream::SelectAll<futures::stream::BoxStream<'static, (Arc<QueueTag<K>>, lapin::Result<Delivery>)>>;

impl<H: Handler> Consumer<H> {
    fn new(s: Settings<H::Key>, handler: Arc<H>) -> Self {
        let queues = s.queues.into_iter().map(Arc::new).collect();
        let (name, consuming) = (s.connection_name, s.consuming);
        Self { name, url: s.url, prefetch: s.prefetch, grace: s.grace, queues, handler, consuming }
    }

    /// One connection's life, closed whatever ended it. `Ok` after a shutdown, `Err` when the
    /// broker went away.
    async fn connection(&self, shutdown: &CancellationToken) -> Result<(), lapin::Error> {
        let conn = super::connect(&self.url, &self.name).await?;
        let result = self.consume(&conn, shutdown).await;
        let _ = conn.close(200, "consumer stopping".into()).await;
        result
    }

    /// `basic_qos`, declare, consume; hand each delivery to a task; drain on shutdown.
    async fn consume(&self, conn: &Connection, shutdown: &CancellationToken) -> Result<(), lapin::Error> {
        let ch = conn.create_channel().await?;
        ch.basic_qos(self.prefetch, BasicQosOptions::default()).await?;
        let link = Arc::new(self.handler.declare(conn, &ch).await?);
        let mut deliveries = self.subscribe(&ch).await?;
        let queues: Vec<&str> = self.queues.iter().map(|q| q.queue.as_str()).collect();
        info!(consumer = %self.name, ?queues, prefetch = self.prefetch, "consuming");
        let tracker = TaskTracker::new();
        self.consuming.set(true);
        let ended = self.dispatch(&mut deliveries, &link, &tracker, shutdown).await;
        self.consuming.set(false);
        if ended.is_ok() {
            self.drain(&ch, &tracker).await;
        }
        ended
    }

    /// Starts a consumer on every queue, merged into one stream.
    async fn subscribe(&self, ch: &Channel) -> Result<Deliveries<H::Key>, lapin::Error> {
        let mut streams = Vec::new();
        for q in &self.queues {
            let (queue, tag) = (q.queue.as_str().into(), q.consumer_tag.as_str().into());
            let consumer = ch.basic_consume(queue, tag, BasicConsumeOptions::default(), FieldTable::default()).await?;
            let q = q.clone();
            streams.push(consumer.map(move |d| (q.clone(), d)).boxed());
        }
        Ok(futures::stream::select_all(streams))
    }

    /// Hands deliveries to tasks, at most `prefetch` at once, until shutdown (`Ok`) or until the
    /// broker fails or cancels a consumer (`Err`).
    async fn dispatch(
        &self,
        deliveries: &mut Deliveries<H::Key>,
        link: &Arc<H::Link>,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Result<(), lapin::Error> {
        let permits = Arc::new(Semaphore::new(usize::from(self.prefetch)));
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                p = permits.clone().acquire_owned() => p.map_err(|_| broken("semaphore closed"))?,
            };
            let next = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                d = deliveries.next() => d,
            };
            let (queue, delivery) = match next {
                Some((queue, Ok(delivery))) => (queue, delivery),
                Some((_, Err(e))) => return Err(e),
                None => return Err(broken("the broker cancelled the consumer")),
            };
            let (handler, link) = (self.handler.clone(), link.clone());
            tracker.spawn(async move {
                handler.handle(delivery, &queue, &link).await;
                drop(permit);
            });
        }
    }

    /// Stops new deliveries and waits, up to the grace period, for the handlers in flight.
    async fn drain(&self, ch: &Channel, tracker: &TaskTracker) {
        for q in &self.queues {
            let _ = ch.basic_cancel(q.consumer_tag.as_str().into(), BasicCancelOptions::default()).await;
        }
        tracker.close();
        let grace_ms = self.grace.as_millis() as u64;
        info!(consumer = %self.name, in_flight = tracker.len(), grace_ms, "draining");
        if tokio::time::timeout(self.grace, tracker.wait()).await.is_err() {
            warn!(consumer = %self.name, in_flight = tracker.len(), "grace period over; unsettled deliveries will be redelivered");
        }
    }
}

fn broken(why: &'static str) -> lapin::Error {
    lapin::Error::from(std::io::Error::other(why))
}
