//! The tool phase of a step: run every `tool_use` not yet in the ledger, each behind its tool's
//! fleet-wide circuit breaker, write each result to the ledger the moment it exists, then append all
//! `tool_result`s in one fenced checkpoint. The result that finishes last goes into the ledger with
//! that checkpoint, in the same write: a step with one tool call writes once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::{Next, StepCtx, StepError};
use crate::domain::Phase;
use crate::guard::{Admission, Gate, Outcome};
use crate::lifecycle::Ending;
use crate::llm::{self, Block, ToolOutcome, ToolUse};
use crate::store::{SessionState, ToolCommit, ToolRecord};
use crate::telemetry::{TraceRecord, metric, now_ms, summary_of};
use crate::tools::{Health, ToolRun};

impl StepCtx<'_> {
    /// Runs the tool calls of this step and checkpoints their results. `calls` are the model's, when
    /// the model phase ran in this delivery; otherwise they are read from the stored conversation.
    pub(super) async fn tool_phase(&self, state: SessionState, calls: Option<Vec<ToolUse>>) -> Result<Next, StepError> {
        let calls = match calls.map_or_else(|| last_tool_uses(&state.messages), Ok) {
            Ok(calls) if !calls.is_empty() => calls,
            Ok(_) => return self.fail_tools("the last assistant message has no tool_use".into()).await,
            Err(why) => return self.fail_tools(why.to_string()).await,
        };
        let pending: Vec<&ToolUse> = calls.iter().filter(|c| !state.ledger.contains_key(&c.id)).collect();
        let session = self.session_calls(&state.messages, &calls);
        if let Some((call, why)) = self.first_unapproved(&pending, &session) {
            return self.pause_for_approval(call, why).await;
        }
        let started = Instant::now();
        let left = AtomicUsize::new(pending.len());
        let runs = futures::future::join_all(pending.iter().map(|c| self.run_tool(c, &session, &left))).await;
        metric::phase_duration("tools", started.elapsed());
        self.timings.add(started.elapsed());
        let (usage, conversation_bytes) = (state.usage, state.conversation_bytes);
        let mut ledger = state.ledger;
        let mut escalation = None;
        let mut approval = None;
        let mut later: Option<Duration> = None;
        let mut held = Vec::new();
        for (call, run) in pending.into_iter().zip(runs) {
            let (run, record) = run?;
            held.extend(record);
            match run {
                ToolRun::Done(outcome, _) => {
                    ledger.insert(call.id.clone(), outcome);
                }
                ToolRun::Escalate(input) => {
                    escalation = Some(serde_json::json!({ "kind": "human", "tool_use_id": call.id, "input": input }));
                }
                ToolRun::Later(after, _) => later = Some(later.unwrap_or_default().max(after)),
                ToolRun::NeedsApproval { tool, reason } => {
                    approval = approval.or(Some((ToolUse { name: tool, ..call.clone() }, reason)));
                }
            }
        }
        if escalation.is_some() || approval.is_some() || later.is_some() {
            // No checkpoint: the result held for it goes into the ledger now.
            for r in &held {
                self.engine.store.record_tool(&self.fence(), &r.tool_use_id, &r.outcome, &r.trace).await?;
            }
        }
        if let Some(escalation) = escalation {
            let summary = escalation["input"]["reason"].as_str().unwrap_or("the agent asked for a human").to_owned();
            return self.settle(Phase::Tools, Ending::AwaitingHuman { escalation, summary }).await;
        }
        if let Some((call, reason)) = approval {
            // The calls that did run are in the ledger; after the approval only this one runs.
            return self.pause_for_approval(&call, reason).await;
        }
        if let Some(after) = later {
            // The finished calls are in the ledger; the redelivery runs only the one that waits.
            return Err(StepError::Retry { after, reason: "tool_retry", tried: self.msg.attempt.saturating_add(1) });
        }
        let ordered: Vec<(String, ToolOutcome)> = calls
            .iter()
            .map(|c| {
                let lost = || ToolOutcome::error("The result of this call was lost.");
                (c.id.clone(), ledger.remove(&c.id).unwrap_or_else(lost))
            })
            .collect();
        let user = llm::tool_results_message(&ordered);
        let next = self.plan_next(&usage, self.msg.step + 1, conversation_bytes + user.len());
        let commit = ToolCommit { user_message: &user, results: &held, next };
        let applied = self.engine.store.commit_tools(&self.fence(), &commit, now_ms()).await?;
        Ok(if applied { Next::Publish(self.msg.step + 1) } else { Next::Nothing })
    }

    /// The first call that must wait for a person and has not been approved yet.
    fn first_unapproved<'c>(&self, pending: &[&'c ToolUse], session: &[ToolUse]) -> Option<(&'c ToolUse, String)> {
        pending.iter().find_map(|call| Some((*call, self.unapproved(call, session)?)))
    }

    /// Why `call` must wait for a person, unless its id has been approved.
    fn unapproved(&self, call: &ToolUse, session: &[ToolUse]) -> Option<String> {
        let approved = self.meta.approved.iter().any(|id| id == &call.id);
        self.agent.tools.needs_approval(call, session).filter(|_| !approved)
    }

    /// Every tool call of the session — the stored conversation's and this step's — once each, for
    /// the `sum(..)` approval rules. Empty when no tool of the agent has such a rule.
    fn session_calls(&self, messages: &[String], step: &[ToolUse]) -> Vec<ToolUse> {
        if !self.agent.tools.has_session_rules() {
            return Vec::new();
        }
        let mut all: Vec<ToolUse> = messages.iter().flat_map(|m| tool_uses(m).unwrap_or_default()).collect();
        let fresh: Vec<ToolUse> = step.iter().filter(|c| !all.iter().any(|a| a.id == c.id)).cloned().collect();
        all.extend(fresh);
        all
    }

    async fn pause_for_approval(&self, call: &ToolUse, reason: String) -> Result<Next, StepError> {
        let request = serde_json::json!({
            "kind": "approval",
            "tool_use_id": call.id,
            "tool": call.name,
            "input": call.input,
            "reason": reason,
        });
        self.settle(Phase::Tools, Ending::AwaitingApproval { request, reason }).await
    }

    async fn fail_tools(&self, reason: String) -> Result<Next, StepError> {
        self.settle(Phase::Tools, Ending::Failed { reason, result: String::new() }).await
    }

    /// Runs one call and traces it. Its result goes into the ledger at once, unless it is the last of
    /// the step's calls to finish (`left` counts them down): that one is returned for the checkpoint.
    async fn run_tool(
        &self,
        call: &ToolUse,
        session: &[ToolUse],
        left: &AtomicUsize,
    ) -> Result<(ToolRun, Option<ToolRecord>), StepError> {
        let key = format!("{}:{}", self.id(), call.id);
        let started = Instant::now();
        // A lost lease cancels the call; the next holder runs it again under the same key.
        let run = match self.lease.guard(self.guarded_run(call, &key, Some(session))).await? {
            ToolRun::Later(_, why) if self.msg.attempt >= self.engine.settings.max_tool_deferrals => {
                let why = format!(
                    "Tool `{}` kept asking to wait ({why}); gave up after {} tries.",
                    call.name,
                    self.msg.attempt.saturating_add(1)
                );
                ToolRun::Done(ToolOutcome::error(why), Health::Down)
            }
            run => run,
        };
        let last = left.fetch_sub(1, Ordering::AcqRel) == 1;
        let ToolRun::Done(outcome, _) = &run else { return Ok((run, None)) };
        let took = started.elapsed();
        let known = self.agent.tools.contains(&call.name).then_some(call.name.as_str());
        metric::tool_call(known, !outcome.is_error, took);
        let trace = TraceRecord {
            tool_name: Some(&call.name),
            input_summary: summary_of(&call.input.to_string(), 200),
            output_summary: summary_of(&outcome.content, 200),
            duration_ms: took.as_millis() as u64,
            success: !outcome.is_error,
            error: outcome.is_error.then(|| summary_of(&outcome.content, 200)),
            ..self.trace("tool_call")
        }
        .emit();
        if last {
            let record = ToolRecord { tool_use_id: call.id.clone(), outcome: outcome.clone(), trace };
            return Ok((run, Some(record)));
        }
        self.engine.store.record_tool(&self.fence(), &call.id, outcome, &trace).await?;
        Ok((run, None))
    }

    /// Runs the call behind its tool's circuit breaker. While the breaker is open the fallback tool
    /// (if any, and only one level deep) runs instead — unless the fallback's own approval rule
    /// holds the call for a person; without one the model is told when to retry. `session` (the
    /// session's calls, for approval rules) is `None` for the fallback, which cannot fall back.
    async fn guarded_run(&self, call: &ToolUse, key: &str, session: Option<&[ToolUse]>) -> ToolRun {
        let tools = &self.agent.tools;
        let Some((cfg, fallback)) = tools.breaker(&call.name) else { return tools.run(call, key).await };
        let gate = Gate { breaker: format!("tool:{}", call.name), breaker_cfg: cfg, rate: None };
        let pass = match self.engine.guard.admit(&gate, now_ms()).await {
            Admission::Pass(pass) => pass,
            Admission::Wait { after, .. } => {
                return match fallback.zip(session) {
                    Some((fb, session)) => {
                        let alternative = ToolUse { name: fb.to_owned(), ..call.clone() };
                        if let Some(reason) = self.unapproved(&alternative, session) {
                            return ToolRun::NeedsApproval { tool: alternative.name, reason };
                        }
                        Box::pin(self.guarded_run(&alternative, key, None)).await
                    }
                    None => {
                        let secs = after.as_secs().max(1);
                        let why = format!("Tool `{}` is temporarily unavailable; retry after {secs} s.", call.name);
                        ToolRun::Done(ToolOutcome::error(why), Health::Unrated)
                    }
                };
            }
        };
        let run = tools.run(call, key).await;
        let healthy = match &run {
            ToolRun::Done(_, Health::Unrated) => None,
            ToolRun::Done(_, health) => Some(*health == Health::Up),
            // A deferral only follows timeouts, connection errors, 408, 429 and 5xx.
            ToolRun::Later(..) => Some(false),
            ToolRun::Escalate(_) => Some(true),
            ToolRun::NeedsApproval { .. } => None,
        };
        if !self.lease.is_lost() {
            // A call that outlived the lease (a paused worker) says nothing about the tool.
            let outcome = Outcome { healthy, ..Outcome::default() };
            self.engine.guard.report(&gate, pass, &outcome, now_ms()).await;
        }
        run
    }
}

/// The stored conversation does not end with a readable assistant message.
#[derive(Debug, thiserror::Error)]
enum Unreadable {
    #[error("the conversation is empty")]
    Empty,
    #[error("the last message is unreadable: {0}")]
    Json(#[from] serde_json::Error),
}

/// The tool calls of the stored conversation's last (assistant) message.
fn last_tool_uses(messages: &[String]) -> Result<Vec<ToolUse>, Unreadable> {
    tool_uses(messages.last().ok_or(Unreadable::Empty)?)
}

/// The tool calls of one stored message (none in a user message whose content is a string).
fn tool_uses(message: &str) -> Result<Vec<ToolUse>, Unreadable> {
    if !message.contains("tool_use") {
        return Ok(Vec::new());
    }
    let content = llm::stored_content(message)?;
    Ok(content
        .iter()
        .filter_map(|b| match Block::view(b) {
            Block::ToolUse(t) => Some(t),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_tool_uses_are_read_from_the_stored_message() {
        let msg = r#"{"role":"assistant","content":[{"type":"thinking","thinking":"t","signature":"s"},{"type":"tool_use","id":"a","name":"x","input":{}},{"type":"tool_use","id":"b","name":"y","input":{"q":1}}]}"#;
        let calls = last_tool_uses(&[msg.to_owned()]).expect("reads");
        assert_eq!(calls.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert!(last_tool_uses(&[]).is_err());
    }
}
