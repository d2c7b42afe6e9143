//! Finish: publish what comes next with a confirm, give the lease back, and only then ack.

use std::time::Duration;

use tracing::warn;

use super::{Disposition, Engine, Next, StepError};
use crate::domain::{Name, SessionId, StepMessage};
use crate::store::Attempt;
use crate::telemetry::metric;

/// The lease a finished step gives back.
#[derive(Clone, Copy)]
struct Release<'a> {
    id: &'a SessionId,
    token: &'a str,
    /// The step made no model call: drop the reservation held for it.
    unused: bool,
}

impl Engine {
    /// Settles the delivery of a step that held the lease, by what its phases left to do.
    pub(super) async fn finish(
        &self,
        msg: &StepMessage,
        pool: &Name,
        token: &str,
        next: Result<Next, StepError>,
        unused: bool,
    ) -> Disposition {
        let release = Release { id: &msg.session_id, token, unused };
        match next {
            Ok(Next::Publish(step)) => self.publish_next(msg, pool, release, step).await,
            // A phase never leaves tools to run for `finish`; treat it as nothing to do.
            Ok(Next::Nothing | Next::Tools(..)) => {
                self.release(release, 0).await;
                metric::step_handled("done");
                Disposition::Ack
            }
            Ok(Next::Postpone(after, why)) => {
                self.release(release, 0).await;
                metric::step_handled("postponed");
                self.later(msg, pool, after, why).await
            }
            Err(StepError::Retry { after, reason, tried }) => {
                // The count goes into the session under the lease; the message only mirrors it.
                let attempt = Attempt { step: msg.step, count: tried };
                self.release_for_retry(release, attempt).await;
                metric::retry(reason);
                let retry = StepMessage { attempt: tried, ..msg.clone() };
                self.later(&retry, pool, after, reason).await
            }
            Err(StepError::Unknown(e)) => {
                self.release(release, 0).await;
                self.later(msg, pool, Duration::from_secs(1), &e.to_string()).await
            }
            Err(StepError::LeaseLost) => {
                // Another delivery owns the step now, or will once the lease expires: nothing of
                // this one is written. A copy of the message makes sure some delivery runs it; the
                // claim drops it if the step is done by then.
                warn!("the lease was lost during the step; it stopped without writing");
                metric::step_handled("lease_lost");
                self.later(msg, pool, Duration::from_secs(1), "lease lost").await
            }
        }
    }

    async fn publish_next(&self, msg: &StepMessage, pool: &Name, release: Release<'_>, next: u32) -> Disposition {
        let next_msg = StepMessage { session_id: msg.session_id.clone(), step: next, attempt: 0 };
        match self.publisher.publish_step(pool, &next_msg, None).await {
            Ok(()) => {
                self.release(release, next).await;
                metric::step_handled("advanced");
                Disposition::Ack
            }
            Err(e) => {
                warn!(error = %e, "publishing the next step failed; the redelivery will publish it");
                self.release(release, 0).await;
                Disposition::Requeue
            }
        }
    }

    /// Publishes the session's current step, whose predecessor's worker died before publishing it.
    pub(super) async fn republish(&self, id: &SessionId, current: u32, agent: &Name, routed: &Name) -> Disposition {
        let pool = self.agents.get(agent.as_str()).map_or(routed, |a| &a.pool);
        let msg = StepMessage { session_id: id.clone(), step: current, attempt: 0 };
        match self.publisher.publish_step(pool, &msg, None).await {
            Ok(()) => {
                if let Err(e) = self.store.mark_published(id, current).await {
                    warn!(error = %e, "marking the republished step failed");
                }
                metric::step_handled("republished");
                Disposition::Ack
            }
            Err(e) => {
                warn!(error = %e, "republishing the current step failed");
                Disposition::Requeue
            }
        }
    }

    /// Sends a copy of `msg` through a delay tier and acks; requeues when even that fails.
    pub(super) async fn later(&self, msg: &StepMessage, pool: &Name, after: Duration, why: &str) -> Disposition {
        warn!(reason = why, after_ms = after.as_millis() as u64, "step postponed");
        match self.publisher.publish_step(pool, msg, Some(after)).await {
            Ok(()) => Disposition::Ack,
            Err(e) => {
                warn!(error = %e, "could not postpone the step; requeueing it");
                Disposition::Requeue
            }
        }
    }

    /// Sends a message that can never run to the dead-letter queue, with the reason.
    pub(super) async fn dead_letter(&self, body: &[u8], reason: &'static str, detail: &str) -> Disposition {
        warn!(reason, detail, "dead-lettering a step message");
        match self.publisher.dead_letter(body, &format!("{reason}: {detail}")).await {
            Ok(()) => {
                metric::dead_lettered(reason);
                Disposition::Ack
            }
            Err(e) => {
                warn!(error = %e, "dead-lettering failed; requeueing");
                Disposition::Requeue
            }
        }
    }

    async fn release(&self, r: Release<'_>, published: u32) {
        if let Err(e) = self.store.release(r.id, r.token, published, None, r.unused).await {
            warn!(error = %e, "releasing the lease failed; it will expire");
        }
    }

    /// Releases the lease and records the step's tries so far in the session.
    async fn release_for_retry(&self, r: Release<'_>, attempt: Attempt) {
        if let Err(e) = self.store.release(r.id, r.token, 0, Some(attempt), r.unused).await {
            warn!(error = %e, "releasing the lease failed; it will expire and this try is not counted");
        }
    }
}
