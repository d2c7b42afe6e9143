//! Claim: what a step message means, decided with taking the lease in one round trip, and the
//! lease's renewal while the step runs.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{Disposition, Engine};
use crate::domain::{Name, SessionId, StepMessage};
use crate::lifecycle::{self, session_ended};
use crate::store::{Claim, Meta, SessionState, StepStore, StoreError};
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
        let lease = Arc::new(Lease::new(token.to_owned(), self.settings.lease));
        let stop = CancellationToken::new();
        let task = tokio::spawn(renew_lease(self.store.clone(), msg.session_id.clone(), lease.clone(), stop.clone()));
        LeaseHold { lease, stop, task }
    }
}

/// The lease a step holds: its token, and whether it may have been lost.
///
/// A worker paused past its lease (GC, SIGSTOP, a network partition) must not act on what it
/// learns when it wakes up: another worker may be running the step. The renewal notices the loss
/// and cancels the step's calls; until it does, [`Lease::is_lost`] also says so by the clock alone
/// (no renewal for a whole time-to-live), and every write script refuses the token anyway.
pub(super) struct Lease {
    token: String,
    ttl: Duration,
    started: Instant,
    /// When the last successful renewal was sent, in ms since `started`.
    renewed_ms: AtomicU64,
    lost: CancellationToken,
    /// A model call was started under this lease: its reservation must stay until reconciled.
    called: AtomicBool,
}

impl Lease {
    fn new(token: String, ttl: Duration) -> Self {
        let (renewed_ms, lost, called) = (AtomicU64::new(0), CancellationToken::new(), AtomicBool::new(false));
        Self { token, ttl, started: Instant::now(), renewed_ms, lost, called }
    }

    /// Notes that the step's model call starts now.
    pub(super) fn calling(&self) {
        self.called.store(true, Ordering::Relaxed);
    }

    /// Whether the step started a model call.
    pub(super) fn called(&self) -> bool {
        self.called.load(Ordering::Relaxed)
    }

    /// The token the claim took the lease with.
    pub(super) fn token(&self) -> &str {
        &self.token
    }

    /// Whether the lease may be another worker's now: the renewal found it gone, or it has not been
    /// renewed for a whole time-to-live (Redis counts its expiry from later than we do).
    pub(super) fn is_lost(&self) -> bool {
        let renewed = Duration::from_millis(self.renewed_ms.load(Ordering::Relaxed));
        self.lost.is_cancelled() || self.started.elapsed().saturating_sub(renewed) >= self.ttl
    }

    /// Runs `call` (a model or tool call) unless the lease is lost first: then the call gets
    /// [`LOST_LEASE_GRACE`] to finish, and is dropped after it, which cancels its HTTP request. A
    /// call that was sent is billed whatever happens: one whose answer is arriving (already in the
    /// socket of a worker that was paused, still in the HTTP/2 connection's buffers) must be
    /// counted, not thrown away.
    pub(super) async fn guard<F: Future>(&self, call: F) -> Result<F::Output, StoreError> {
        if self.is_lost() {
            return Err(StoreError::LeaseLost);
        }
        tokio::pin!(call);
        tokio::select! {
            biased;
            out = &mut call => return Ok(out),
            _ = self.lost.cancelled() => {}
        }
        tokio::time::timeout(LOST_LEASE_GRACE, call).await.map_err(|_| StoreError::LeaseLost)
    }

    fn renewed(&self, sent: Duration) {
        self.renewed_ms.store(sent.as_millis() as u64, Ordering::Relaxed);
    }
}

/// How long a call in flight may still finish once its step's lease is lost.
const LOST_LEASE_GRACE: Duration = Duration::from_secs(2);

/// The renewal of a lease, while the step holds it.
pub(super) struct LeaseHold {
    lease: Arc<Lease>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl LeaseHold {
    /// The lease.
    pub(super) fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Stops renewing (the release, or the expiry, ends the lease).
    pub(super) async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

fn body_of(msg: &StepMessage) -> Vec<u8> {
    serde_json::to_vec(msg).unwrap_or_default()
}

async fn renew_lease(store: Arc<dyn StepStore>, id: SessionId, lease: Arc<Lease>, stop: CancellationToken) {
    let every = lease.ttl / 3;
    let lease_ms = lease.ttl.as_millis() as u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let sent = lease.started.elapsed();
        match store.renew(&id, &lease.token, lease_ms).await {
            Ok(true) => lease.renewed(sent),
            Ok(false) => {
                warn!(session = %id, "lease lost; the step stops and its writes are refused");
                lease.lost.cancel();
                return;
            }
            Err(e) if lease.is_lost() => {
                warn!(session = %id, error = %e, "lease renewal failed for a whole lease; the step stops");
                lease.lost.cancel();
                return;
            }
            Err(e) => warn!(session = %id, error = %e, "lease renewal failed"),
        }
    }
}
