//! Settling an [`Ending`]: one fenced write, then the session's metrics, indexes and event.

use tracing::warn;

use super::{Agent, Engine, Next, StepError};
use crate::domain::{Phase, SessionId, StepMessage};
use crate::lifecycle::{self, Ending, session_ended};
use crate::store::{Fence, Meta};
use crate::telemetry::{TraceRecord, metric, now_ms, summary_of};

impl Engine {
    /// Ends or pauses the session at this step and phase (fenced), and announces it when the write
    /// applied. A pause is tried again after a while.
    pub(super) async fn settle(
        &self,
        msg: &StepMessage,
        token: &str,
        meta: &Meta,
        agent: Option<&Agent>,
        phase: Phase,
        ending: Ending,
    ) -> Result<Next, StepError> {
        let trace = self.ending_trace(msg, meta, &ending).emit();
        let at = Fence { id: &msg.session_id, step: msg.step, token };
        let applied = self.store.end_step(&at, phase, &ending.step_end(trace), now_ms()).await?;
        if applied {
            self.announce(msg, meta, agent, &ending).await;
        }
        Ok(match ending {
            Ending::Paused { .. } => Next::Postpone(lifecycle::PAUSE_RETRY, "waiting for a daily spend cap"),
            _ => Next::Nothing,
        })
    }

    /// A session this step ended or left waiting: metrics, the indexes, and its event. A pause
    /// only moves the session's listing index: the session goes on by itself.
    pub(super) async fn announce(&self, msg: &StepMessage, meta: &Meta, agent: Option<&Agent>, ending: &Ending) {
        let (id, status) = (&msg.session_id, ending.status());
        if matches!(ending, Ending::Paused { .. }) {
            self.reindex(id).await;
            return;
        }
        session_ended(id, meta, status, ending.line());
        self.reindex(id).await;
        if let (Some(kind), Some(agent)) = (ending.escalation_kind(), agent) {
            metric::escalation(agent.name.as_str(), kind);
            let deadline = now_ms() + agent.wait_deadline_s(status) * 1000;
            if let Err(e) = self.store.wait_until(id, deadline).await {
                warn!(error = %e, "indexing the wait failed; its deadline will not be enforced");
            }
        }
        if let Ending::Exhausted { limit, .. } = ending {
            metric::budget_exhausted(meta.agent.as_str(), limit);
        }
        if let Some((kind, detail)) = ending.event() {
            lifecycle::publish(self.publisher.as_ref(), meta, id, msg.step, kind, ending.line(), detail).await;
        }
    }

    /// Moves the session into the listing indexes of its new status; an ended one also leaves the
    /// live and waiting indexes, and its retention starts (best effort: the janitor repeats it).
    pub(super) async fn reindex(&self, id: &SessionId) {
        if let Err(e) = self.store.reindex(id, now_ms()).await {
            warn!(error = %e, "moving the session's indexes failed; the janitor will do it");
        }
    }

    /// The trace record of an ending written by `settle`.
    fn ending_trace<'a>(&'a self, msg: &'a StepMessage, meta: &'a Meta, ending: &'a Ending) -> TraceRecord<'a> {
        let base = TraceRecord {
            ts_ms: now_ms(),
            agent_id: meta.agent.as_str(),
            session_id: msg.session_id.as_str(),
            step: msg.step,
            worker: &self.settings.worker_id,
            ..Default::default()
        };
        match ending {
            Ending::AwaitingHuman { escalation, .. } if escalation["kind"] == "model_failure" => {
                let why = escalation["reason"].as_str().unwrap_or_default().to_owned();
                TraceRecord { action: "escalation", error: Some(why), ..base }
            }
            Ending::AwaitingHuman { escalation, .. } => TraceRecord {
                action: "escalation",
                tool_name: Some(crate::config::ESCALATE_TO_HUMAN),
                input_summary: summary_of(&escalation.to_string(), 200),
                success: true,
                ..base
            },
            Ending::AwaitingApproval { request, reason } => TraceRecord {
                action: "approval_requested",
                tool_name: request["tool"].as_str(),
                input_summary: summary_of(&request["input"].to_string(), 200),
                output_summary: reason.clone(),
                success: true,
                ..base
            },
            Ending::Exhausted { .. } | Ending::Paused { .. } => {
                TraceRecord { action: "budget", error: Some(ending.fields().1), ..base }
            }
            Ending::Completed { .. } | Ending::Failed { .. } => {
                TraceRecord { action: "error", error: Some(ending.fields().1), ..base }
            }
        }
    }
}
