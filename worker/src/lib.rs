//! The worker: AMQP consumers that run one step per message (DESIGN §3).
//!
//! It holds no session state between messages. `basic_qos` bounds what the broker pushes, a
//! semaphore bounds the steps in flight, and a delivery is acked only after the step's checkpoint
//! and the confirmed publish of its successor. When the broker goes away the consumer reconnects
//! with backoff; unacked deliveries come back to some worker. On SIGTERM it stops consuming, lets
//! in-flight steps finish within the grace period, then closes.

pub mod cli;

use std::sync::Arc;
use std::time::Duration;

use agentfleet::amqp::{self, AmqpPublisher, Topology};
use agentfleet::breaker::Breakers;
use agentfleet::config::Config;
use agentfleet::domain::Name;
use agentfleet::guard::FleetGuard;
use agentfleet::llm::ModelClients;
use agentfleet::ratelimit::RateLimiter;
use agentfleet::step::{Agents, Disposition, Engine, EngineParts, EngineSettings};
use agentfleet::store::RedisStore;
use anyhow::Context;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// A worker process's consumer and engine.
pub struct Worker {
    cfg: Config,
    id: String,
    engine: Arc<Engine>,
    topology: Topology,
}

/// A stable, readable id: the host (pod) name and the process id.
pub fn worker_id() -> String {
    let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}

impl Worker {
    /// Connects to Redis and RabbitMQ and builds the agents. `env` supplies tool header values.
    pub async fn build(cfg: Config, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let id = worker_id();
        let store = RedisStore::connect(&cfg.redis).await.context("connecting to Redis")?;
        let agents = Agents::build(&cfg, env).context("building the agents' tools")?;
        let topology = Topology::new(&cfg.amqp.prefix, cfg.amqp.delivery_limit);
        let pools = all_pools(&cfg, &agents);
        let publisher = AmqpPublisher::connect_patiently(
            &cfg.amqp.url,
            &format!("{id}/publish"),
            topology.clone(),
            pools,
            Duration::from_secs(60),
        )
        .await
        .context("connecting to RabbitMQ")?;
        let llm = ModelClients::new(&cfg).context("building the model clients")?;
        let settings = EngineSettings {
            worker_id: id.clone(),
            lease: Duration::from_millis(cfg.worker.lease_ms),
            max_model_attempts: cfg.worker.max_model_attempts,
            max_tool_deferrals: cfg.worker.max_tool_deferrals,
        };
        let prefix = cfg.redis.key_prefix.clone();
        let guard = FleetGuard::new(
            Breakers::new(store.connection(), prefix.clone()),
            RateLimiter::new(store.connection(), prefix),
        );
        let engine = Engine::new(EngineParts {
            guard: Arc::new(guard),
            store: Arc::new(store),
            publisher: Arc::new(publisher),
            llm,
            agents,
            settings,
        });
        Ok(Self { cfg, id, engine: Arc::new(engine), topology })
    }

    /// Consumes until `shutdown` is cancelled, reconnecting to the broker as needed.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut backoff = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            match self.consume(&shutdown).await {
                Ok(()) => break,
                Err(e) => {
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "broker connection lost; reconnecting");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        info!("worker stopped");
        Ok(())
    }

    async fn consume(&self, shutdown: &CancellationToken) -> Result<(), lapin::Error> {
        let conn = amqp::connect(&self.cfg.amqp.url, &format!("{}/consume", self.id)).await?;
        let ch = conn.create_channel().await?;
        self.topology.declare(&ch, &self.cfg.worker.pools).await?;
        ch.basic_qos(self.cfg.worker.concurrency, BasicQosOptions::default()).await?;
        let mut streams = Vec::new();
        for pool in &self.cfg.worker.pools {
            let tag = format!("{}/{pool}", self.id);
            let queue = self.topology.step_queue(pool);
            let consumer = ch
                .basic_consume(queue.into(), tag.into(), BasicConsumeOptions::default(), FieldTable::default())
                .await?;
            let pool = pool.clone();
            streams.push(consumer.map(move |d| (pool.clone(), d)));
        }
        info!(pools = ?self.cfg.worker.pools, concurrency = self.cfg.worker.concurrency, "consuming");
        let mut deliveries = futures::stream::select_all(streams);
        let tracker = TaskTracker::new();
        let permits = Arc::new(Semaphore::new(usize::from(self.cfg.worker.concurrency)));
        let ended = loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                p = permits.clone().acquire_owned() => p.map_err(|_| lapin::Error::from(std::io::Error::other("semaphore closed")))?,
            };
            let next = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                d = deliveries.next() => d,
            };
            match next {
                Some((pool, Ok(delivery))) => {
                    let engine = self.engine.clone();
                    tracker.spawn(async move {
                        handle_delivery(&engine, delivery, &pool).await;
                        drop(permit);
                    });
                }
                Some((_, Err(e))) => break Err(e),
                None => break Err(lapin::Error::from(std::io::Error::other("the broker cancelled the consumer"))),
            }
        };
        if ended.is_ok() {
            self.drain(&ch, &tracker).await;
            let _ = conn.close(200, "worker shutting down".into()).await;
        }
        ended
    }

    /// Stops new deliveries and waits, up to the grace period, for in-flight steps to finish.
    async fn drain(&self, ch: &lapin::Channel, tracker: &TaskTracker) {
        for pool in &self.cfg.worker.pools {
            let tag = format!("{}/{pool}", self.id);
            let _ = ch.basic_cancel(tag.into(), BasicCancelOptions::default()).await;
        }
        tracker.close();
        let grace = Duration::from_millis(self.cfg.worker.shutdown_grace_ms);
        info!(in_flight = tracker.len(), grace_ms = grace.as_millis() as u64, "draining");
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            warn!(in_flight = tracker.len(), "grace period over; unfinished steps will be redelivered");
        }
    }
}

async fn handle_delivery(engine: &Engine, delivery: Delivery, pool: &Name) {
    let result = match engine.handle(&delivery.data, pool).await {
        Disposition::Ack => delivery.ack(BasicAckOptions::default()).await,
        Disposition::Requeue => delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await,
    };
    if let Err(e) = result {
        warn!(error = %e, "could not settle the delivery; the broker will deliver it again");
    }
}

fn all_pools(cfg: &Config, agents: &Agents) -> Vec<Name> {
    let mut pools = agents.pools();
    pools.extend(cfg.worker.pools.iter().cloned());
    pools.sort();
    pools.dedup();
    pools
}
