//! How a session ends or pauses, and what the fleet says when it does.
//!
//! A step, a cancel, a wait's deadline: each can end a session. They all describe the ending with
//! one type ([`Ending`]), count it and write its session span with [`session_ended`], and announce
//! it with [`lifecycle_event`] on the events exchange, so a dashboard, a webhook receiver and a trace
//! viewer see the same ending however it came about.

use serde_json::{Value, json};

/// How long a session paused at a daily spend cap waits before it tries again. The janitor revives
/// one whose delayed message was lost once this (and its stall threshold) have passed.
pub const PAUSE_RETRY: std::time::Duration = std::time::Duration::from_secs(600);

use crate::amqp::StepPublisher;
use crate::domain::{SessionId, SessionStatus, TenantId};
use crate::store::{Meta, StepEnd};
use crate::telemetry::{metric, now_ms, otel, redact_error, summarize};

/// The ways a step ends or pauses a session.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
    /// The model gave its final answer.
    Completed {
        /// The answer.
        result: String,
    },
    /// The session cannot go on.
    Failed {
        /// Why.
        reason: String,
        /// What the model said last, if anything.
        result: String,
    },
    /// A budget limit was reached; `summary` is the model's summary of the work.
    Exhausted {
        /// The limit's label (`steps`, `cost`, …).
        limit: &'static str,
        /// The limit, in words.
        reason: String,
        /// The summary call's answer; `None` when not even that call could be afforded.
        summary: Option<String>,
    },
    /// A person is asked to decide or reply.
    AwaitingHuman {
        /// The escalation record (JSON), shown to the person.
        escalation: Value,
        /// One line for events and logs.
        summary: String,
    },
    /// A tool call waits for a person's approval.
    AwaitingApproval {
        /// The approval request (JSON).
        request: Value,
        /// Why approval is needed.
        reason: String,
    },
    /// A daily spend cap is in the way; the step is tried again later.
    Paused {
        /// Which cap.
        reason: String,
    },
}

impl Ending {
    /// The status the session is left in.
    pub fn status(&self) -> SessionStatus {
        match self {
            Self::Completed { .. } => SessionStatus::Completed,
            Self::Failed { .. } => SessionStatus::Failed,
            Self::Exhausted { .. } => SessionStatus::BudgetExhausted,
            Self::AwaitingHuman { .. } => SessionStatus::AwaitingHuman,
            Self::AwaitingApproval { .. } => SessionStatus::AwaitingApproval,
            Self::Paused { .. } => SessionStatus::Paused,
        }
    }

    /// The stored fields: result, error (through [`redact_error`]), escalation.
    pub fn fields(&self) -> (String, String, String) {
        let none = String::new;
        match self {
            Self::Completed { result } => (result.clone(), none(), none()),
            Self::Failed { reason, result } => (result.clone(), redact_error(reason), none()),
            Self::Exhausted { reason, summary: Some(summary), .. } => (summary.clone(), redact_error(reason), none()),
            Self::Exhausted { reason, summary: None, .. } => {
                let why = format!("{reason}; not even the summary call could be afforded, so there is no summary");
                (none(), redact_error(&why), none())
            }
            Self::AwaitingHuman { escalation, .. } => (none(), none(), escalation.to_string()),
            Self::AwaitingApproval { request, .. } => (none(), none(), request.to_string()),
            Self::Paused { reason } => (none(), redact_error(reason), none()),
        }
    }

    /// What the store writes for this ending, with its trace record.
    pub fn step_end(&self, trace: String) -> StepEnd {
        let (result, error, escalation) = self.fields();
        StepEnd { status: self.status(), result, error, escalation, trace }
    }

    /// One line about the ending, for events and the session span.
    pub fn line(&self) -> &str {
        match self {
            Self::Completed { result } => result,
            Self::Failed { reason, .. } | Self::Exhausted { reason, .. } | Self::Paused { reason } => reason,
            Self::AwaitingHuman { summary, .. } => summary,
            Self::AwaitingApproval { reason, .. } => reason,
        }
    }

    /// The event announcing this ending, with its detail; `None` for a pause.
    pub fn event(&self) -> Option<(&'static str, Value)> {
        match self {
            Self::Completed { result } => Some(("session.completed", json!({ "result": result }))),
            Self::Failed { reason, result } if result.is_empty() => {
                Some(("session.failed", json!({ "reason": reason })))
            }
            Self::Failed { result, .. } => Some(("session.failed", json!({ "result": result }))),
            Self::Exhausted { limit, reason, summary } => Some((
                "session.budget_exhausted",
                json!({ "limit": limit, "reason": reason, "result": summary.as_deref().unwrap_or_default() }),
            )),
            Self::AwaitingHuman { escalation, .. } => Some(("session.escalated", escalation.clone())),
            Self::AwaitingApproval { request, .. } => Some(("session.awaiting_approval", request.clone())),
            Self::Paused { .. } => None,
        }
    }

    /// For a wait for people: the kind of escalation, as counted in metrics.
    pub fn escalation_kind(&self) -> Option<&'static str> {
        match self {
            Self::AwaitingApproval { .. } => Some("approval"),
            Self::AwaitingHuman { escalation, .. } if escalation["kind"] == "model_failure" => Some("model_failure"),
            Self::AwaitingHuman { .. } => Some("human"),
            _ => None,
        }
    }
}

/// A session reached a final or waiting status: counts it by outcome and, when it is final, writes
/// its session span (a session that waits for people goes on in the same trace later).
pub fn session_ended(id: &SessionId, meta: &Meta, status: SessionStatus, error: &str) {
    metric::session_ended(meta.agent.as_str(), status.as_str());
    if status.is_terminal() {
        otel::session_ended(&otel::SessionEnd {
            id,
            agent: meta.agent.as_str(),
            tenant: meta.tenant.as_ref().map_or("", TenantId::as_str),
            status: status.as_str(),
            step: meta.step,
            created_ms: meta.created_ms,
            error,
        });
    }
}

/// A lifecycle event: the session, its agent, tenant and metadata, and a one-line summary.
pub fn lifecycle_event(meta: &Meta, id: &SessionId, step: u32, kind: &str, summary: &str, detail: Value) -> Value {
    let metadata: Value = serde_json::from_str(&meta.metadata).unwrap_or_default();
    json!({
        "type": kind,
        "session_id": id,
        "agent": meta.agent,
        "tenant": meta.tenant.as_ref().map_or("", TenantId::as_str),
        "metadata": metadata,
        "step": step,
        "summary": summarize(summary, 500),
        "detail": detail,
        "at_ms": now_ms(),
    })
}

/// Publishes a lifecycle event on the events exchange; a failure is logged, never returned: the
/// session's state is already stored, and an event is a notice of it.
pub async fn publish(
    publisher: &dyn StepPublisher,
    meta: &Meta,
    id: &SessionId,
    step: u32,
    kind: &str,
    summary: &str,
    detail: Value,
) {
    let event = lifecycle_event(meta, id, step, kind, summary, detail);
    if let Err(e) = publisher.publish_event(kind, &event).await {
        tracing::warn!(error = %e, kind, session = %id, "publishing an event failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_ending_has_its_status_fields_and_event() {
        let failed = Ending::Failed { reason: "why".into(), result: String::new() };
        assert_eq!(failed.status(), SessionStatus::Failed);
        assert_eq!(failed.fields().1, "why");
        assert_eq!(failed.event().map(|e| e.0), Some("session.failed"));
        let human = Ending::AwaitingHuman { escalation: json!({ "kind": "human" }), summary: "s".into() };
        assert_eq!(human.escalation_kind(), Some("human"));
        assert_eq!(human.fields().2, r#"{"kind":"human"}"#);
        let paused = Ending::Paused { reason: "cap".into() };
        assert!(paused.event().is_none() && paused.escalation_kind().is_none());
        let done = Ending::Exhausted { limit: "steps", reason: "r".into(), summary: Some("s".into()) };
        assert_eq!(done.fields(), ("s".into(), "r".into(), String::new()));
        let none = Ending::Exhausted { limit: "steps", reason: "r".into(), summary: None };
        assert!(none.fields().1.starts_with("r; not even the summary call"));
    }
}
