//! What every phase of one step shares: the engine, the agent, the message and the session's meta.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::claim::Lease;
use super::{Agent, Engine};
use crate::domain::{SessionId, StepMessage};
use crate::lifecycle;
use crate::store::{Fence, Meta};
use crate::telemetry::{TraceRecord, metric, now_ms};

/// One step of one session, with its agent.
pub(super) struct StepCtx<'a> {
    pub(super) engine: &'a Engine,
    pub(super) agent: &'a Agent,
    pub(super) msg: &'a StepMessage,
    /// The session's meta as the claim loaded it.
    pub(super) meta: Meta,
    /// Time spent waiting on the model and the tools, to tell the orchestration overhead apart.
    pub(super) timings: &'a Timings,
    /// The session's lease, which every write of this step is fenced on.
    pub(super) lease: &'a Lease,
}

impl StepCtx<'_> {
    pub(super) fn id(&self) -> &SessionId {
        &self.msg.session_id
    }

    /// What this step's writes are fenced on.
    pub(super) fn fence(&self) -> Fence<'_> {
        Fence { id: &self.msg.session_id, step: self.msg.step, token: self.lease.token() }
    }

    /// A trace record of this step, for `action`.
    pub(super) fn trace(&self, action: &'static str) -> TraceRecord<'_> {
        TraceRecord {
            ts_ms: now_ms(),
            agent_id: self.agent.name.as_str(),
            session_id: self.id().as_str(),
            step: self.msg.step,
            action,
            worker: &self.engine.settings.worker_id,
            ..Default::default()
        }
    }

    /// Publishes a lifecycle event about this session; a failure is logged, never fatal.
    pub(super) async fn event(&self, kind: &str, summary: &str, detail: serde_json::Value) {
        let publisher = self.engine.publisher.as_ref();
        lifecycle::publish(publisher, &self.meta, self.id(), self.msg.step, kind, summary, detail).await;
    }
}

/// A step's wall time, and the part of it spent outside the worker (model and tool calls).
pub(super) struct Timings {
    started: Instant,
    waited_us: AtomicU64,
}

impl Default for Timings {
    fn default() -> Self {
        Self { started: Instant::now(), waited_us: AtomicU64::new(0) }
    }
}

impl Timings {
    /// Adds time spent waiting on the model or the tools.
    pub(super) fn add(&self, d: Duration) {
        self.waited_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Records the step's duration and its orchestration overhead.
    pub(super) fn record(&self) {
        let total = self.started.elapsed();
        let waited = Duration::from_micros(self.waited_us.load(Ordering::Relaxed));
        metric::step_duration(total, total.saturating_sub(waited));
    }
}

impl StepCtx<'_> {
    /// Ends or pauses the session from this step's `phase`.
    pub(super) async fn settle(
        &self,
        phase: crate::domain::Phase,
        ending: crate::lifecycle::Ending,
    ) -> Result<super::Next, super::StepError> {
        self.engine.settle(self.msg, self.lease.token(), &self.meta, Some(self.agent), phase, ending).await
    }
}
