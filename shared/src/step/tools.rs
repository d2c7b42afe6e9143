//! The tool phase of a step: run every `tool_use` not yet in the ledger, each behind its tool's
//! fleet-wide circuit breaker, write each result to the ledger the moment it exists, then append all
//! `tool_result`s in one fenced checkpoint.

use std::time::{Duration, Instant};

use super::{After, StepCtx, StepError, last_tool_uses, transition_state};
use crate::breaker::Permit;
use crate::domain::{Phase, SessionStatus};
use crate::llm::{self, ToolOutcome, ToolUse};
use crate::telemetry::{TraceRecord, metric, now_ms, summary_of};
use crate::tools::{Health, ToolRun};

impl StepCtx<'_> {
    pub(super) async fn tool_phase(&self, state: crate::store::SessionState) -> Result<After, StepError> {
        let calls = match last_tool_uses(&state.messages) {
            Ok(calls) if !calls.is_empty() => calls,
            Ok(_) => return self.fail_tools("the last assistant message has no tool_use".into()).await,
            Err(why) => return self.fail_tools(why).await,
        };
        let pending: Vec<&ToolUse> = calls.iter().filter(|c| !state.ledger.contains_key(&c.id)).collect();
        if let Some((call, why)) = self.first_unapproved(&pending) {
            return self.pause_for_approval(call, why).await;
        }
        let started = Instant::now();
        let runs = futures::future::join_all(pending.iter().map(|c| self.run_tool(c))).await;
        metric::phase_duration("tools", started.elapsed());
        self.timings.add(started.elapsed());
        let mut ledger = state.ledger;
        let mut escalation = None;
        let mut later: Option<Duration> = None;
        for (call, run) in pending.into_iter().zip(runs) {
            match run? {
                ToolRun::Done(outcome, _) => {
                    ledger.insert(call.id.clone(), outcome);
                }
                ToolRun::Escalate(input) => {
                    escalation = Some(serde_json::json!({ "kind": "human", "tool_use_id": call.id, "input": input }));
                }
                ToolRun::Later(after, _) => later = Some(later.unwrap_or_default().max(after)),
            }
        }
        if let Some(escalation) = escalation {
            return self.pause_for_human(escalation).await;
        }
        if let Some(after) = later {
            // The finished calls are in the ledger; the redelivery runs only the one that waits.
            return Err(StepError::Retry { after, reason: "tool_retry" });
        }
        let ordered: Vec<(String, ToolOutcome)> = calls
            .iter()
            .map(|c| {
                let lost = || ToolOutcome::error("The result of this call was lost.");
                (c.id.clone(), ledger.remove(&c.id).unwrap_or_else(lost))
            })
            .collect();
        let user = llm::tool_results_message(&ordered);
        let applied = self.engine.store.commit_tools(self.id(), self.msg.step, &user, now_ms()).await?;
        Ok(if applied { After::Publish(self.msg.step + 1) } else { After::Nothing })
    }

    /// The first call that must wait for a person and has not been approved yet.
    fn first_unapproved<'c>(&self, pending: &[&'c ToolUse]) -> Option<(&'c ToolUse, String)> {
        pending.iter().find_map(|call| {
            let approved = self.meta.approved.iter().any(|id| id == &call.id);
            let why = self.agent.tools.needs_approval(call).filter(|_| !approved)?;
            Some((*call, why))
        })
    }

    async fn pause_for_approval(&self, call: &ToolUse, why: String) -> Result<After, StepError> {
        let request = serde_json::json!({
            "kind": "approval",
            "tool_use_id": call.id,
            "tool": call.name,
            "input": call.input,
            "reason": why,
        });
        let trace = TraceRecord {
            tool_name: Some(&call.name),
            input_summary: summary_of(&call.input.to_string(), 200),
            output_summary: why.clone(),
            success: true,
            ..self.trace("approval_requested")
        }
        .emit();
        let end = crate::store::StepEnd {
            status: SessionStatus::AwaitingApproval,
            result: String::new(),
            error: String::new(),
            escalation: request.to_string(),
            trace,
        };
        if self.engine.store.end_step(self.id(), self.msg.step, Phase::Tools, &end, now_ms()).await? {
            self.finished(SessionStatus::AwaitingApproval, &why, request).await;
        }
        Ok(After::Nothing)
    }

    async fn run_tool(&self, call: &ToolUse) -> Result<ToolRun, StepError> {
        let key = format!("{}:{}", self.id(), call.id);
        let started = Instant::now();
        let run = match self.guarded_run(call, &key, true).await {
            ToolRun::Later(_, why) if self.msg.attempt >= self.engine.settings.max_tool_deferrals => {
                let why = format!(
                    "Tool `{}` kept asking to wait ({why}); gave up after {} tries.",
                    call.name,
                    self.msg.attempt + 1
                );
                ToolRun::Done(ToolOutcome::error(why), Health::Down)
            }
            run => run,
        };
        let ToolRun::Done(outcome, _) = &run else { return Ok(run) };
        let took = started.elapsed();
        metric::tool_call(&call.name, !outcome.is_error, took);
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
        self.engine.store.record_tool(self.id(), &call.id, outcome, &trace).await?;
        Ok(run)
    }

    /// Runs the call behind its tool's circuit breaker. While the breaker is open the fallback tool
    /// (if any, and only one level deep) runs instead; without one the model is told when to retry.
    async fn guarded_run(&self, call: &ToolUse, key: &str, may_fall_back: bool) -> ToolRun {
        let tools = &self.agent.tools;
        let Some((cfg, fallback)) = tools.breaker(&call.name) else { return tools.run(call, key).await };
        let name = format!("tool:{}", call.name);
        let permit = self.engine.breakers.check(&name, cfg, now_ms()).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, breaker = name, "breaker check failed; letting the call through");
            Permit::Allow
        });
        if let Permit::Deny { retry_after } = permit {
            metric::breaker_rejected(&name);
            return match fallback.filter(|_| may_fall_back) {
                Some(fb) => {
                    let alternative = ToolUse { name: fb.to_owned(), ..call.clone() };
                    Box::pin(self.guarded_run(&alternative, key, false)).await
                }
                None => {
                    let secs = retry_after.as_secs().max(1);
                    let why = format!("Tool `{}` is temporarily unavailable; retry after {secs} s.", call.name);
                    ToolRun::Done(ToolOutcome::error(why), Health::Unrated)
                }
            };
        }
        let run = tools.run(call, key).await;
        let health = match &run {
            ToolRun::Done(_, health) => *health,
            // A deferral only follows timeouts, connection errors, 408, 429 and 5xx.
            ToolRun::Later(..) => Health::Down,
            ToolRun::Escalate(_) => Health::Up,
        };
        if health != Health::Unrated {
            match self.engine.breakers.record(&name, cfg, permit.is_probe(), health == Health::Up, now_ms()).await {
                Ok(Some(t)) => {
                    tracing::warn!(breaker = name, transition = t.as_str(), "circuit breaker changed state");
                    metric::breaker_transition(&name, t.as_str());
                    metric::breaker_state(&name, transition_state(t));
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, breaker = name, "recording a breaker outcome failed"),
            }
        }
        run
    }
}
