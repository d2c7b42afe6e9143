//! Claim: what a step message means, decided with taking the lease in one round trip, and the
//! lease's renewal while the step runs.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{Disposition, Engine};
use crate::domain::{Name, SessionId, StepMessage};
use crate::lifecycle::{self, session_ended};
use crate::store::{Claim, Meta, SessionState, StepStore};
use crate::telemetry::{metric, now_ms};

/// What the claim left to do.
pub(super) enum Claimed {
    /// The lease is ours: run the step on this state.
    Run {
        /// The lease token.
        token: String,
        /// The session as loaded.
        state: Box<SessionState>,
    },
    /// Nothing to run: the delivery is settled like this.
    Settled(Disposition),
}

impl Engine {
    /// Claims the step of `msg`; every verdict but `run` is settled here.
    pub(super) async fn claim(&self, msg: &StepMessage, pool: &Name) -> Claimed {
        let token = format!("{}|{}|{}", msg.step, self.settings.worker_id, ulid::Ulid::new());
        let lease_ms = self.settings.lease.as_millis() as u64;
        let claim = match self.store.claim(msg, &token, lease_ms, now_ms()).await {
            Ok(c) => c,
            Err(e) => return Claimed::Settled(self.later(msg, pool, Duration::from_secs(1), &e.to_string()).await),
        };
        let settled = match claim {
            Claim::Run(state) => return Claimed::Run { token, state },
            Claim::Missing => self.dead_letter(&body_of(msg), "unknown_session", "no such session").await,
            Claim::Future { current } => {
                let why = format!("step {} is ahead of the session (at {current})", msg.step);
                self.dead_letter(&body_of(msg), "future_step", &why).await
            }
            Claim::Busy => {
                metric::step_handled("busy");
                self.later(msg, pool, Duration::from_secs(1), "another worker holds the lease").await
            }
            Claim::Republish { current, agent } => self.republish(&msg.session_id, current, &agent, pool).await,
            Claim::Cancelled(meta) => {
                self.cancelled(msg, &meta).await;
                Disposition::Ack
            }
            Claim::Terminal(_) | Claim::Paused(_) | Claim::Stale => {
                metric::step_handled("stale");
                Disposition::Ack
            }
        };
        Claimed::Settled(settled)
    }

    /// A cancel took effect at this step boundary: index, metric and `session.cancelled`.
    async fn cancelled(&self, msg: &StepMessage, meta: &Meta) {
        let status = crate::domain::SessionStatus::Cancelled;
        session_ended(&msg.session_id, meta, status, "");
        self.reindex(&msg.session_id).await;
        let (kind, detail) = ("session.cancelled", serde_json::json!({}));
        let why = "cancelled by request";
        lifecycle::publish(self.publisher.as_ref(), meta, &msg.session_id, msg.step, kind, why, detail).await;
    }

    /// Starts renewing the lease every third of its time-to-live while the step runs.
    pub(super) fn hold_lease(&self, msg: &StepMessage, token: &str) -> LeaseHold {
        let stop = CancellationToken::new();
        let task = tokio::spawn(renew_lease(
            self.store.clone(),
            msg.session_id.clone(),
            token.to_owned(),
            self.settings.lease,
            stop.clone(),
        ));
        LeaseHold { stop, task }
    }
}

/// The renewal of a lease, while the step holds it.
pub(super) struct LeaseHold {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl LeaseHold {
    /// Stops renewing (the release, or the expiry, ends the lease).
    pub(super) async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

fn body_of(msg: &StepMessage) -> Vec<u8> {
    serde_json::to_vec(msg).unwrap_or_default()
}

async fn renew_lease(
    store: Arc<dyn StepStore>,
    id: SessionId,
    token: String,
    lease: Duration,
    stop: CancellationToken,
) {
    let every = lease / 3;
    let lease_ms = lease.as_millis() as u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match store.renew(&id, &token, lease_ms).await {
            Ok(true) => {}
            Ok(false) => {
                warn!(session = %id, "lease lost; the fencing will reject this worker's late writes");
                return;
            }
            Err(e) => warn!(session = %id, error = %e, "lease renewal failed"),
        }
    }
}
