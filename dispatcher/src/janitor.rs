//! The janitor: a safety net for step messages lost with a broker node (DESIGN §3).
//!
//! Every live session is in a sorted set scored by when it was last seen moving. Periodically the
//! janitor takes the ones that have not moved for `stall_after`, and for each that is still meant to
//! run (queued or running) re-publishes its current step. A duplicate is harmless: the claim drops a
//! copy whose step is done, and defers one whose step another worker is running.

use std::sync::Arc;
use std::time::Duration;

use agentfleet::amqp::StepPublisher;
use agentfleet::config::{Config, OnDeadline};
use agentfleet::domain::{SessionId, SessionStatus, StepMessage};
use agentfleet::llm::ToolOutcome;
use agentfleet::store::SessionStore;
use agentfleet::store::{Meta, ResumeOutcome};
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

    /// One sweep; returns how many steps it re-published (stalled sessions and expired waits).
    /// It also forgets up to [`SWEEP_LIMIT`] sessions whose retention ended.
    pub async fn sweep(&self) -> Result<usize, agentfleet::store::StoreError> {
        let revived = self.revive_stalled().await?;
        let republished = revived + self.expire_waits().await?;
        let purged = self.store.purge_expired(now_ms(), SWEEP_LIMIT).await?;
        if purged > 0 {
            info!(purged, "janitor forgot sessions past their retention");
        }
        Ok(republished)
    }

    async fn revive_stalled(&self) -> Result<usize, agentfleet::store::StoreError> {
        let now = now_ms();
        let cutoff = now.saturating_sub(self.cfg.dispatcher.stall_after_s * 1000);
        let mut republished = 0;
        for id in self.store.stalled(cutoff, SWEEP_LIMIT).await? {
            republished += usize::from(self.revive(&id, cutoff, now).await?);
        }
        Ok(republished)
    }

    /// Applies the deadline of every wait for people that passed it: fail the session, reject the
    /// tool call (the step is published again), or hand the approval to a human.
    async fn expire_waits(&self) -> Result<usize, agentfleet::store::StoreError> {
        let now = now_ms();
        let mut republished = 0;
        for (id, _) in self.store.waiting(Some(now), SWEEP_LIMIT).await? {
            republished += usize::from(self.expire(&id, now).await?);
        }
        Ok(republished)
    }

    /// Applies one expired wait. The wait leaves the index only once the session is known not to
    /// wait any more, so a Redis error on the way leaves it for the next sweep.
    async fn expire(&self, id: &SessionId, now: u64) -> Result<bool, agentfleet::store::StoreError> {
        let Some(meta) = self.store.meta(id).await? else {
            self.store.unwait(id).await?;
            return Ok(false);
        };
        let Some(agent) = self.cfg.agent(meta.agent.as_str()) else {
            warn!(session = %id, agent = %meta.agent, "a wait expired for an agent this dispatcher does not know");
            return Ok(false);
        };
        let escalated = meta.status == SessionStatus::AwaitingApproval
            && matches!(agent.approval_wait.on_deadline, OnDeadline::Escalate);
        let republished = self.apply_deadline(id, &meta, agent, now).await?;
        if !escalated {
            // An escalated approval waits again, under a new deadline set by `apply_deadline`.
            self.store.unwait(id).await?;
        }
        Ok(republished)
    }

    async fn apply_deadline(
        &self,
        id: &SessionId,
        meta: &Meta,
        agent: &agentfleet::config::AgentConfig,
        now: u64,
    ) -> Result<bool, agentfleet::store::StoreError> {
        let escalation: serde_json::Value =
            meta.escalation.as_deref().and_then(|e| serde_json::from_str(e).ok()).unwrap_or_default();
        let tool_use_id = escalation["tool_use_id"].as_str().unwrap_or_default().to_owned();
        let (wait, what) = match meta.status {
            SessionStatus::AwaitingHuman => (agent.human_wait, "a human reply"),
            SessionStatus::AwaitingApproval => (agent.approval_wait, "an approval"),
            _ => return Ok(false),
        };
        let why = format!("no {what} before the deadline ({} s)", wait.deadline_s);
        info!(session = %id, reason = why, "a wait for people expired");
        agentfleet::telemetry::metric::human_decision("expired");
        match wait.on_deadline {
            OnDeadline::Reject if !tool_use_id.is_empty() => {
                let result = ToolOutcome::error(format!("This call was not approved: {why}."));
                let expected = meta.status;
                match self.store.resume(id, expected, &tool_use_id, Some(&result), false, now).await? {
                    ResumeOutcome::Resumed { step } => {
                        let published = self.publish(id, meta, step, &agent.pool).await;
                        self.store.reindex(id, now).await?;
                        Ok(published)
                    }
                    ResumeOutcome::NotWaiting(_) => Ok(false),
                }
            }
            OnDeadline::Escalate if meta.status == SessionStatus::AwaitingApproval => {
                let handover = serde_json::json!({ "kind": "approval_timeout", "tool_use_id": tool_use_id,
                    "tool": escalation["tool"], "input": escalation["input"], "reason": why });
                let expected = SessionStatus::AwaitingApproval;
                if self
                    .store
                    .expire_wait(id, expected, SessionStatus::AwaitingHuman, &why, &handover.to_string(), now)
                    .await?
                {
                    self.store.wait_until(id, now + agent.human_wait.deadline_s * 1000).await?;
                    self.store.reindex(id, now).await?;
                    self.event(meta, id, "session.escalated", &why).await;
                }
                Ok(false)
            }
            _ => {
                if self.store.expire_wait(id, meta.status, SessionStatus::Failed, &why, "", now).await? {
                    agentfleet::lifecycle::session_ended(id, meta, SessionStatus::Failed, &why);
                    self.store.reindex(id, now).await?;
                    self.event(meta, id, "session.failed", &why).await;
                }
                Ok(false)
            }
        }
    }

    async fn publish(&self, id: &SessionId, _meta: &Meta, step: u32, pool: &agentfleet::domain::Name) -> bool {
        let msg = StepMessage { session_id: id.clone(), step, attempt: 0 };
        match self.publisher.publish_step(pool, &msg, None).await {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, session = %id, "publishing the resumed step failed; the next sweep revives it");
                false
            }
        }
    }

    async fn event(&self, meta: &Meta, id: &SessionId, kind: &str, summary: &str) {
        let publisher = self.publisher.as_ref();
        agentfleet::lifecycle::publish(publisher, meta, id, meta.step, kind, summary, serde_json::json!({})).await;
    }

    async fn revive(&self, id: &SessionId, cutoff: u64, now: u64) -> Result<bool, agentfleet::store::StoreError> {
        let Some(meta) = self.store.meta(id).await? else {
            self.store.deactivate(id).await?;
            return Ok(false);
        };
        // A status change whose reindex was lost is indexed here; an ended session leaves the live
        // index this way, its retention started.
        self.store.reindex(id, now).await?;
        if meta.status.is_terminal() {
            self.store.deactivate(id).await?;
            return Ok(false);
        }
        self.store.activate(id, now).await?;
        // A session paused at a daily cap tries again through a delayed message; if that message
        // was lost, it would stay paused for ever: revive it once its retry is well overdue.
        let paused_cutoff = cutoff.saturating_sub(agentfleet::lifecycle::PAUSE_RETRY.as_millis() as u64);
        let stalled = match meta.status {
            SessionStatus::Queued | SessionStatus::Running => meta.updated_ms <= cutoff,
            SessionStatus::Paused => meta.updated_ms <= paused_cutoff,
            _ => false,
        };
        if !stalled {
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
