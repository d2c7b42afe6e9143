//! The worker: AMQP consumers that run one step per message (DESIGN §3).
//!
//! It holds no session state between messages. The loop is the fleet's one consumer,
//! [`agentfleet::amqp::consumer`]: `basic_qos` bounds what the broker pushes, a semaphore bounds
//! the steps in flight, the broker's loss means a reconnect with backoff (unacked deliveries come
//! back to some worker), and SIGTERM means stop consuming, let in-flight steps finish within
//! `worker.shutdown_grace_ms`, then close. What is the worker's own is `Steps`: a delivery is
//! acked only after the step's checkpoint and the confirmed publish of its successor.

pub mod cli;
mod ops;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use agentfleet::amqp::consumer::{self, Consuming, Handler, QueueTag, Settings};
use agentfleet::amqp::{AmqpPublisher, Topology};
use agentfleet::breaker::Breakers;
use agentfleet::config::Config;
use agentfleet::domain::Name;
use agentfleet::guard::FleetGuard;
use agentfleet::llm::ModelClients;
use agentfleet::ratelimit::RateLimiter;
use agentfleet::step::{Agents, Disposition, Engine, EngineParts, EngineSettings};
use agentfleet::store::{RedisStore, durability};
use anyhow::Context;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A worker process's consumer and engine.
pub struct Worker {
    cfg: Config,
    id: String,
    engine: Arc<Engine>,
    topology: Topology,
    consuming: Consuming,
    /// Where the pulse is written.
    redis: agentfleet::redis_conn::RedisConn,
}

/// How often a worker writes its pulse.
const PULSE: Duration = Duration::from_secs(5);

/// A stable, readable id: the host (pod) name and the process id.
pub fn worker_id() -> String {
    let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}

impl Worker {
    /// Connects to Redis (checking that it is durable) and RabbitMQ, and builds the agents. `env`
    /// supplies tool header values.
    pub async fn build(cfg: Config, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let id = worker_id();
        let store = RedisStore::connect(&cfg.redis)
            .await
            .context("connecting to Redis")?
            .with_retention_ms(cfg.sessions.retention_ms);
        durability::check(&store.connection(), &cfg.redis).await.context("checking Redis durability")?;
        let redis = store.connection();
        let agents = Agents::build(&cfg, env).context("building the agents' tools")?;
        let topology = Topology::from_config(&cfg.amqp);
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
        Ok(Self { cfg, id, engine: Arc::new(engine), topology, consuming: Consuming::default(), redis })
    }

    /// Reports whether the worker takes deliveries to `consuming` (its `/readyz`).
    pub fn reporting(self, consuming: Consuming) -> Self {
        Self { consuming, ..self }
    }

    /// Consumes until `shutdown` is cancelled, reconnecting to the broker as needed.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let queues = self
            .cfg
            .worker
            .pools
            .iter()
            .map(|pool| QueueTag {
                queue: self.topology.step_queue(pool),
                consumer_tag: format!("{}/{pool}", self.id),
                key: pool.clone(),
            })
            .collect();
        let settings = Settings {
            url: self.cfg.amqp.url.clone(),
            connection_name: format!("{}/consume", self.id),
            prefetch: self.cfg.worker.concurrency,
            queues,
            grace: Duration::from_millis(self.cfg.worker.shutdown_grace_ms),
            consuming: self.consuming,
        };
        let engine = self.engine.clone();
        let handled = Arc::new(AtomicU64::new(0));
        let key = agentfleet::store::pulse_key(&self.cfg.redis.key_prefix);
        let pulse = tokio::spawn(pulse(self.redis, key, self.id.clone(), handled.clone(), shutdown.clone()));
        let steps = Steps { engine: self.engine, topology: self.topology, pools: self.cfg.worker.pools, handled };
        consumer::run(settings, Arc::new(steps), shutdown).await;
        pulse.abort();
        engine.flush().await;
        info!("worker stopped");
        Ok(())
    }
}

/// The worker's handler: one step per delivery of a pool's step queue.
struct Steps {
    engine: Arc<Engine>,
    topology: Topology,
    pools: Vec<Name>,
    /// Deliveries handled, for the pulse.
    handled: Arc<AtomicU64>,
}

/// Every [`PULSE`], writes this worker's steps per second since the last pulse into the fleet's
/// pulse hash (field: the worker id; value: `<steps/s> <unix ms>`), which the dispatcher's
/// `GET /v1/fleet` sums over the fresh entries. Off the step path: one write per pulse; a failed
/// write is only logged.
async fn pulse(
    mut redis: agentfleet::redis_conn::RedisConn,
    key: String,
    id: String,
    handled: Arc<AtomicU64>,
    shutdown: CancellationToken,
) {
    let mut last = (0, std::time::Instant::now());
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(PULSE) => {}
        }
        let (count, now) = (handled.load(Ordering::Relaxed), std::time::Instant::now());
        let rate = (count - last.0) as f64 / now.duration_since(last.1).as_secs_f64().max(0.001);
        last = (count, now);
        let value = format!("{rate:.2} {}", agentfleet::telemetry::now_ms());
        let written: redis::RedisResult<()> =
            redis::pipe().hset(&key, &id, value).ignore().pexpire(&key, 60_000).ignore().query_async(&mut redis).await;
        if let Err(e) = written {
            tracing::debug!(error = %e, "writing the pulse failed");
        }
    }
    let _: redis::RedisResult<()> = redis::cmd("HDEL").arg(&key).arg(&id).query_async(&mut redis).await;
}

impl Handler for Steps {
    type Key = Name;
    type Link = ();

    async fn declare(&self, _conn: &Connection, ch: &Channel) -> Result<(), lapin::Error> {
        Ok(self.topology.declare(ch, &self.pools).await?)
    }

    /// Runs the step and settles the delivery as the engine decided.
    async fn handle(&self, delivery: Delivery, queue: &QueueTag<Name>, _link: &()) {
        self.handled.fetch_add(1, Ordering::Relaxed);
        let result = match self.engine.handle(&delivery.data, &queue.key).await {
            Disposition::Ack => delivery.ack(BasicAckOptions::default()).await,
            Disposition::Requeue => delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await,
        };
        if let Err(e) = result {
            warn!(error = %e, "could not settle the delivery; the broker will deliver it again");
        }
    }
}

fn all_pools(cfg: &Config, agents: &Agents) -> Vec<Name> {
    let mut pools = agents.pools();
    pools.extend(cfg.worker.pools.iter().cloned());
    pools.sort();
    pools.dedup();
    pools
}
