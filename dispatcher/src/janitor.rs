//! The janitor: a safety net for step messages lost with a broker node (DESIGN §3).
//!
//! Every live session is in a sorted set scored by when it was last seen moving. Periodically the
//! janitor takes the ones that have not moved for `stall_after`, and for each that is still meant to
//! run (queued or running) re-publishes its current step. A duplicate is harmless: the claim drops a
//! copy whose step is done, and defers one whose step another worker is running.

use std::sync::Arc;
use std::time::Duration;

use agentfleet::amqp::StepPublisher;
use agentfleet::config::Config;
use agentfleet::domain::{SessionId, SessionStatus, StepMessage};
use agentfleet::store::SessionStore;
use agentfleet::telemetry::{metric, now_ms};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How many stalled sessions one sweep looks at.
const SWEEP_LIMIT: usize = 500;

/// The janitor's parts and settings.
pub struct Janitor {
    store: Arc<dyn SessionStore>,
    publisher: Arc<dyn StepPublisher>,
    cfg: Arc<Config>,
}

impl Janitor {
    /// A janitor over these parts; `cfg.dispatcher` holds its interval and threshold.
    pub fn new(store: Arc<dyn SessionStore>, publisher: Arc<dyn StepPublisher>, cfg: Arc<Config>) -> Self {
        Self { store, publisher, cfg }
    }

    /// Sweeps every `janitor_interval_s` until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let every = Duration::from_secs(self.cfg.dispatcher.janitor_interval_s.max(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            match self.sweep().await {
                Ok(0) => {}
                Ok(n) => info!(republished = n, "janitor re-published stalled sessions"),
                Err(e) => warn!(error = %e, "janitor sweep failed"),
            }
        }
    }

    /// One sweep; returns how many steps it re-published.
    pub async fn sweep(&self) -> Result<usize, agentfleet::store::StoreError> {
        let now = now_ms();
        let cutoff = now.saturating_sub(self.cfg.dispatcher.stall_after_s * 1000);
        let mut republished = 0;
        for id in self.store.stalled(cutoff, SWEEP_LIMIT).await? {
            republished += usize::from(self.revive(&id, cutoff, now).await?);
        }
        Ok(republished)
    }

    async fn revive(&self, id: &SessionId, cutoff: u64, now: u64) -> Result<bool, agentfleet::store::StoreError> {
        let Some(meta) = self.store.meta(id).await? else {
            self.store.deactivate(id).await?;
            return Ok(false);
        };
        if meta.status.is_terminal() {
            self.store.deactivate(id).await?;
            return Ok(false);
        }
        self.store.activate(id, now).await?;
        let runnable = matches!(meta.status, SessionStatus::Queued | SessionStatus::Running);
        if !runnable || meta.updated_ms > cutoff {
            return Ok(false);
        }
        let Some(agent) = self.cfg.agent(meta.agent.as_str()) else { return Ok(false) };
        let msg = StepMessage { session_id: id.clone(), step: meta.step, attempt: 0 };
        match self.publisher.publish_step(&agent.pool, &msg, None).await {
            Ok(()) => {
                metric::retry("janitor");
                Ok(true)
            }
            Err(e) => {
                warn!(error = %e, session = %id, "janitor could not re-publish");
                Ok(false)
            }
        }
    }
}
