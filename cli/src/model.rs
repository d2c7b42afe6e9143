//! Typed views of the API's answers, for text output.
//!
//! Every field has a default, so a dispatcher that adds fields (or leaves one out) never breaks the
//! CLI; `--json` bypasses these views and prints what the API said.

use serde::Deserialize;
use serde_json::Value;

/// `GET /v1/sessions/{id}`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Session {
    pub(crate) id: String,
    pub(crate) agent: String,
    pub(crate) tenant: Option<String>,
    pub(crate) status: String,
    pub(crate) step: u64,
    pub(crate) phase: Option<String>,
    pub(crate) updated_at_ms: u64,
    pub(crate) result: Option<String>,
    pub(crate) error: Option<String>,
    pub(crate) escalation: Option<Escalation>,
    pub(crate) cancel_requested: bool,
    pub(crate) usage: Usage,
    pub(crate) remaining: Option<Remaining>,
    pub(crate) forked_from: Option<ForkedFrom>,
    pub(crate) messages: Vec<Value>,
}

/// The session and step a fork came from.
#[derive(Debug, Deserialize)]
pub(crate) struct ForkedFrom {
    pub(crate) session: String,
    pub(crate) step: u64,
}

/// A session's usage so far.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Usage {
    pub(crate) input_tokens: u64,
    pub(crate) output_tokens: u64,
    pub(crate) cache_creation_input_tokens: u64,
    pub(crate) cache_read_input_tokens: u64,
    pub(crate) total_tokens: u64,
    pub(crate) cost_usd: f64,
    pub(crate) model_calls: u64,
}

/// What a session's budget has left.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Remaining {
    pub(crate) steps: u64,
    pub(crate) cost_usd: f64,
    pub(crate) tokens: u64,
}

/// What a session waits for, in `GET /v1/sessions/{id}` and in `GET /v1/escalations`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Escalation {
    /// Only in the escalations queue.
    pub(crate) session_id: String,
    pub(crate) agent: String,
    /// `human`, `approval`, `approval_timeout` or `model_failure`.
    pub(crate) kind: Option<String>,
    pub(crate) tool: Option<String>,
    pub(crate) input: Value,
    pub(crate) reason: Option<String>,
    pub(crate) since_ms: u64,
    pub(crate) deadline_ms: Option<u64>,
}

impl Escalation {
    /// Why it waits: its reason, or the escalating tool's `reason` input.
    pub(crate) fn why(&self) -> &str {
        let from_input = self.input.get("reason").and_then(Value::as_str);
        self.reason.as_deref().or(from_input).unwrap_or("")
    }

    /// True when it waits for approve/reject rather than a reply.
    pub(crate) fn wants_approval(&self) -> bool {
        self.kind.as_deref().is_some_and(|k| k.starts_with("approval"))
    }
}

/// A row of `GET /v1/sessions`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Summary {
    pub(crate) id: String,
    pub(crate) agent: String,
    pub(crate) tenant: Option<String>,
    pub(crate) status: String,
    pub(crate) step: u64,
    pub(crate) created_at_ms: u64,
    pub(crate) updated_at_ms: u64,
}

/// A page of `GET /v1/sessions`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Page {
    pub(crate) sessions: Vec<Value>,
    pub(crate) next_cursor: Option<String>,
}

/// True once a session moves no more by itself: it ended, or waits for people.
///
/// `paused` (a fleet-wide daily cap) counts: it may last hours, so followers stop and say so.
pub(crate) fn is_settled(status: &str) -> bool {
    !matches!(status, "queued" | "running")
}

/// Reads a typed view out of an answer.
pub(crate) fn read<T: serde::de::DeserializeOwned>(v: &Value) -> anyhow::Result<T> {
    T::deserialize(v).map_err(|e| anyhow::anyhow!("the API answered an unexpected shape: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_session_reads_from_a_partial_document() -> anyhow::Result<()> {
        let s: Session = read(&json!({"id": "s_1", "status": "running", "usage": {"total_tokens": 5}, "new": 1}))?;
        assert_eq!((s.id.as_str(), s.status.as_str(), s.usage.total_tokens), ("s_1", "running", 5));
        assert!(s.escalation.is_none());
        assert!(read::<Session>(&json!({"step": "three"})).is_err());
        Ok(())
    }

    #[test]
    fn an_escalation_says_why_and_what_it_wants() -> anyhow::Result<()> {
        let human: Escalation = read(&json!({"kind": "human", "input": {"reason": "asked for a human"}}))?;
        assert_eq!(human.why(), "asked for a human");
        assert!(!human.wants_approval());
        let approval: Escalation = read(&json!({"kind": "approval_timeout", "reason": "amount > 100"}))?;
        assert_eq!(approval.why(), "amount > 100");
        assert!(approval.wants_approval());
        Ok(())
    }

    #[test]
    fn only_queued_and_running_sessions_move_by_themselves() {
        assert!(!is_settled("queued"));
        assert!(!is_settled("running"));
        assert!(is_settled("awaiting_human"));
        assert!(is_settled("paused"));
        assert!(is_settled("completed"));
    }
}
