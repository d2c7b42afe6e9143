//! Fleet gauges the dispatcher reads every few seconds: queue depths and consumers (from RabbitMQ),
//! sessions waiting for people, and the state of every circuit breaker the config names.

use std::sync::Arc;
use std::time::Duration;

use agentfleet::amqp::Topology;
use agentfleet::breaker::Breakers;
use agentfleet::config::{Config, HandlerConfig};
use agentfleet::store::SessionStore;
use agentfleet::telemetry::{metric, now_ms};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

const EVERY: Duration = Duration::from_secs(5);

/// What the gauges are read from.
pub(crate) struct Gauges {
    pub(crate) cfg: Arc<Config>,
    pub(crate) store: Arc<dyn SessionStore>,
    pub(crate) breakers: Breakers,
    /// Where the readings are kept for `GET /v1/fleet`.
    pub(crate) readings: crate::fleet::Shared,
}

impl Gauges {
    /// Refreshes the gauges until `shutdown`.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let mut channel: Option<(lapin::Connection, lapin::Channel)> = None;
        loop {
            self.sessions_and_breakers().await;
            if let Err(e) = self.queues(&mut channel).await {
                tracing::debug!(error = %e, "reading queue depths failed; reconnecting next time");
                channel = None;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(EVERY) => {}
            }
        }
    }

    async fn sessions_and_breakers(&self) {
        if let Ok(waiting) = self.store.waiting(None, 100_000).await {
            metric::waiting_sessions(waiting.len());
        }
        let mut read = Vec::new();
        for name in self.breaker_names() {
            if let Ok(state) = self.breakers.state(&name, now_ms()).await {
                metric::breaker_state(&name, state.status.gauge());
                read.push(crate::fleet::BreakerState::new(name, state.status.as_str()));
            }
        }
        let mut readings = self.readings.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        readings.breakers = read;
        readings.at_ms = now_ms();
    }

    /// Every breaker the config implies: one per HTTP tool, one per provider in use.
    fn breaker_names(&self) -> Vec<String> {
        let tools = self.cfg.tools.iter().filter(|(_, t)| matches!(t.handler, HandlerConfig::Http { .. }));
        let mut names: Vec<String> = tools.map(|(n, _)| format!("tool:{n}")).collect();
        names.extend(self.cfg.agents.values().map(|a| format!("model:{}", a.provider.as_str())));
        names.sort();
        names.dedup();
        names
    }

    async fn queues(&self, link: &mut Option<(lapin::Connection, lapin::Channel)>) -> Result<(), lapin::Error> {
        if link.as_ref().is_none_or(|(c, ch)| !c.status().connected() || !ch.status().connected()) {
            let conn = agentfleet::amqp::connect(&self.cfg.amqp.url, "dispatcher/gauges").await?;
            let ch = conn.create_channel().await?;
            *link = Some((conn, ch));
        }
        let Some((_, ch)) = link.as_ref() else { return Ok(()) };
        let t = Topology::from_config(&self.cfg.amqp);
        let mut queues: Vec<String> = self.cfg.agents.values().map(|a| t.step_queue(&a.pool)).collect();
        queues.extend([t.dead(), t.requests_queue()]);
        queues.sort();
        queues.dedup();
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let mut read = Vec::new();
        for q in queues {
            let info = ch.queue_declare(q.as_str().into(), passive, FieldTable::default()).await?;
            metric::queue(&q, info.message_count(), info.consumer_count());
            read.push(crate::fleet::QueueDepth::new(q, info.message_count(), info.consumer_count()));
        }
        self.readings.lock().unwrap_or_else(std::sync::PoisonError::into_inner).queues = read;
        Ok(())
    }
}
