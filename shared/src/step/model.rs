//! The model phase of a step: plan the call against the budget, reserve its worst case (in the
//! session and in the fleet-wide daily caps), call the model, reconcile the reservation with the
//! actual usage, then checkpoint the reply.
//!
//! Reconciling comes before the checkpoint and is not fenced: a call that was billed is counted
//! even when its checkpoint is lost. A crash between the call and the reconciliation leaves the
//! reservation open; the next claim of the session counts it at its worst case, once.

use std::time::{Duration, Instant};

use serde_json::value::RawValue;

use super::{After, StepCtx, StepError};
use crate::breaker::Permit;
use crate::budget::{self, LimitHit, Plan, Rates, Reservation, SUMMARY_PROMPT, Spent};
use crate::config::{OnDailyCap, OnModelFailure};
use crate::domain::{MicroUsd, Phase, SessionStatus, StepMessage};
use crate::failpoint;
use crate::llm::{self, Block, CallSpec, LlmError, ModelReply, StopReason, Usage};
use crate::ratelimit::{Acquire, Tokens};
use crate::store::{CallUsage, DailyCaps, DailyVerdict, ModelCommit, ModelOutcome, SessionState, StepEnd, UsageTotals};
use crate::telemetry::{TraceRecord, metric, now_ms, summarize};

/// How long a session waits at a daily cap before it tries again.
const DAILY_CAP_RETRY: Duration = Duration::from_secs(600);

/// The provider protections a call passed through.
struct Guard {
    breaker: String,
    breaker_cfg: crate::breaker::BreakerConfig,
    rate_key: String,
    rate: Option<crate::ratelimit::RateLimit>,
    probe: bool,
}

/// One planned model call.
struct Call {
    messages: Vec<Box<RawValue>>,
    max_tokens: u32,
    reserve: Reservation,
    /// Set for the final summary call: the limit that was reached.
    summary: Option<LimitHit>,
}

impl StepCtx<'_> {
    pub(super) async fn model_phase(&self, state: SessionState) -> Result<After, StepError> {
        let messages = match raw_messages(&state.messages) {
            Ok(m) => m,
            Err(why) => return self.end_llm(SessionStatus::Failed, why).await,
        };
        let spent = Spent {
            steps: self.msg.step.saturating_sub(1),
            tokens: state.usage.total_tokens(),
            cost: MicroUsd::new(state.usage.cost_micro_usd),
        };
        let input = budget::estimate_input_tokens(self.request_bytes(&state.messages));
        let rates = Rates::of(&self.agent.price);
        match budget::plan(&state.meta.limits, &spent, self.msg.step, input, self.agent.max_tokens, rates) {
            Plan::Call { max_tokens, reserve } => {
                self.call(&state, Call { messages, max_tokens, reserve, summary: None }).await
            }
            Plan::Summarize { max_tokens, reserve, hit } => {
                let messages = match with_summary_prompt(messages) {
                    Ok(m) => m,
                    Err(e) => {
                        return self.end_llm(SessionStatus::Failed, format!("unreadable conversation: {e}")).await;
                    }
                };
                self.call(&state, Call { messages, max_tokens, reserve, summary: Some(hit) }).await
            }
            Plan::Stop { hit } => {
                let why = format!("{hit}; not even the summary call could be afforded, so there is no summary");
                self.exhausted(hit, why).await
            }
        }
    }

    fn request_bytes(&self, messages: &[String]) -> usize {
        let tools = self.agent.tools.definitions().get().len();
        messages.iter().map(String::len).sum::<usize>() + self.agent.system.len() + tools + 256
    }

    fn daily_caps<'s>(&'s self, state: &'s SessionState) -> DailyCaps<'s> {
        DailyCaps {
            agent: self.agent.name.as_str(),
            tenant: &state.meta.tenant,
            day: now_ms() / 86_400_000,
            agent_cap: self.agent.budget.daily_cap_usd.and_then(|c| MicroUsd::from_usd(c).ok()).map(MicroUsd::get),
            tenant_cap: self.engine.agents.tenant_cap(&state.meta.tenant),
        }
    }

    async fn call(&self, state: &SessionState, call: Call) -> Result<After, StepError> {
        let guard = match self.admit(&call).await {
            Ok(guard) => guard,
            Err((wait, why)) => return Ok(After::Postpone(wait, why)),
        };
        let caps = self.daily_caps(state);
        let verdict = self.engine.store.daily_reserve(&caps, call.reserve.cost).await?;
        if verdict != DailyVerdict::Reserved {
            return self.daily_cap_reached(state, verdict).await;
        }
        let reservation = ulid::Ulid::new().to_string();
        self.engine.store.reserve(self.id(), &reservation, &call.reserve).await?;
        let spec = CallSpec {
            model: &self.agent.model,
            system: &self.agent.system,
            max_tokens: call.max_tokens,
            tools: (!self.agent.tools.is_empty()).then(|| self.agent.tools.definitions()),
            tool_choice: call.summary.map(|_| "none"),
        };
        let started = Instant::now();
        let reply = self.engine.llm.create_message(self.agent.provider, &spec, &call.messages).await;
        let took = started.elapsed();
        metric::phase_duration("llm", took);
        self.timings.add(took);
        self.report(&guard, &call, &reply).await;
        match reply {
            Ok(reply) => {
                failpoint::hit("after_model_call");
                self.reconcile(state, &caps, &reservation, &call, &reply, took).await?;
                failpoint::hit("after_model_reconcile");
                self.model_replied(state.clone(), reply, call.summary).await
            }
            Err(e) => {
                self.settle_failed_call(&caps, &reservation, &call, &e, took).await?;
                self.model_failed(e, took).await
            }
        }
    }

    /// The provider's breaker and rate limit, before anything is reserved: `Err(wait)` when the step
    /// must wait (in the delay queues) for the breaker's cool-down or for the rate limit.
    async fn admit(&self, call: &Call) -> Result<Guard, (Duration, &'static str)> {
        let provider = self.engine.agents.provider(self.agent.provider);
        let guard = Guard {
            breaker: format!("model:{}", self.agent.provider.as_str()),
            breaker_cfg: provider.breaker(),
            rate_key: format!("{}:{}", self.agent.provider.as_str(), self.agent.model),
            rate: provider.rate_limits.get(&self.agent.model).cloned(),
            probe: false,
        };
        let permit =
            self.engine.breakers.check(&guard.breaker, &guard.breaker_cfg, now_ms()).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "model breaker check failed; letting the call through");
                Permit::Allow
            });
        if let Permit::Deny { retry_after } = permit {
            metric::breaker_rejected(&guard.breaker);
            return Err((retry_after.max(Duration::from_secs(1)), "the model provider's breaker is open"));
        }
        if let Some(limit) = &guard.rate {
            let estimate = Tokens { input: call.reserve.input_tokens, output: call.reserve.output_tokens };
            match self.engine.limiter.acquire(&guard.rate_key, limit, 1, estimate, now_ms()).await {
                Ok(Acquire::Wait { retry_after }) => {
                    metric::retry("rate_limit");
                    return Err((retry_after.max(Duration::from_millis(200)), "waiting for the provider rate limit"));
                }
                Ok(Acquire::Granted) => {}
                Err(e) => tracing::warn!(error = %e, "rate limiter unavailable; letting the call through"),
            }
        }
        Ok(Guard { probe: permit.is_probe(), ..guard })
    }

    /// Feeds the outcome of a call to the provider's breaker and rate limiter (best effort).
    async fn report(&self, guard: &Guard, call: &Call, reply: &Result<ModelReply, LlmError>) {
        let failed = reply.as_ref().err().is_some_and(LlmError::is_provider_failure);
        let (b, now) = (&self.engine.breakers, now_ms());
        match b.record(&guard.breaker, &guard.breaker_cfg, guard.probe, !failed, now).await {
            Ok(Some(t)) => {
                tracing::warn!(breaker = guard.breaker, transition = t.as_str(), "circuit breaker changed state");
                metric::breaker_transition(&guard.breaker, t.as_str());
                metric::breaker_state(&guard.breaker, super::transition_state(t));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "recording the model breaker outcome failed"),
        }
        let Some(limit) = &guard.rate else { return };
        let estimate = Tokens { input: call.reserve.input_tokens, output: call.reserve.output_tokens };
        let actual = match reply {
            Ok(r) => Tokens {
                input: r.usage.input_tokens + r.usage.cache_creation_input_tokens,
                output: r.usage.output_tokens,
            },
            Err(e) if e.is_unbilled() => Tokens::default(),
            Err(_) => estimate,
        };
        let limiter = &self.engine.limiter;
        if let Err(e) = limiter.settle(&guard.rate_key, limit, estimate, actual, now).await {
            tracing::warn!(error = %e, "settling the rate limit failed");
        }
        if let Ok(r) = reply
            && let Err(e) = limiter.observe_headers(&guard.rate_key, limit, &r.rate_headers, now).await
        {
            tracing::warn!(error = %e, "applying the rate-limit headers failed");
        }
    }

    async fn reconcile(
        &self,
        state: &SessionState,
        caps: &DailyCaps<'_>,
        reservation: &str,
        call: &Call,
        reply: &ModelReply,
        took: Duration,
    ) -> Result<(), StepError> {
        let cost = budget::cost(&self.agent.price, &reply.usage);
        let agent = self.agent.name.as_str();
        metric::model_call(agent, &self.agent.model, reply.stop_reason.label(), took);
        metric::model_usage(agent, &self.agent.model, reply.usage.input_tokens, reply.usage.output_tokens, cost.get());
        let u = &reply.usage;
        metric::cache_tokens(agent, &self.agent.model, u.cache_read_input_tokens, u.cache_creation_input_tokens);
        let trace = TraceRecord {
            input_summary: format!("{} messages, max_tokens {}", call.messages.len(), call.max_tokens),
            output_summary: format!("stop_reason={} {}", reply.stop_reason.as_str(), summarize(&reply.text(), 200)),
            input_tokens: reply.usage.input_tokens,
            output_tokens: reply.usage.output_tokens,
            cost_usd: cost.as_usd(),
            cost_micro_usd: cost.get(),
            duration_ms: took.as_millis() as u64,
            success: true,
            ..self.trace(if call.summary.is_some() { "summary_call" } else { "model_call" })
        }
        .emit();
        let usage = CallUsage { usage: reply.usage, cost_micro_usd: cost.get(), trace: &trace };
        // `None`: another worker already counted this call's worst case (we had lost the lease).
        if let Some(totals) = self.engine.store.reconcile(self.id(), reservation, &usage).await? {
            let delta = cost.get() as i64 - call.reserve.cost as i64;
            self.engine.store.daily_settle(caps, delta).await?;
            self.maybe_alert(state, &totals).await;
        }
        Ok(())
    }

    /// An API error was certainly not billed: drop the reservation. Anything else (a timeout, an
    /// unreadable 2xx) may have been: count its worst case.
    async fn settle_failed_call(
        &self,
        caps: &DailyCaps<'_>,
        reservation: &str,
        call: &Call,
        e: &LlmError,
        took: Duration,
    ) -> Result<(), StepError> {
        metric::model_call(self.agent.name.as_str(), &self.agent.model, "error", took);
        let trace = TraceRecord {
            error: Some(e.to_string()),
            duration_ms: took.as_millis() as u64,
            input_tokens: if e.is_unbilled() { 0 } else { call.reserve.input_tokens },
            output_tokens: if e.is_unbilled() { 0 } else { call.reserve.output_tokens },
            cost_usd: if e.is_unbilled() { 0.0 } else { MicroUsd::new(call.reserve.cost).as_usd() },
            cost_micro_usd: if e.is_unbilled() { 0 } else { call.reserve.cost },
            ..self.trace("model_call")
        }
        .emit();
        if e.is_unbilled() {
            self.engine.store.cancel_reservation(self.id(), reservation, &trace).await?;
            self.engine.store.daily_settle(caps, -(call.reserve.cost as i64)).await?;
        } else {
            let usage = Usage {
                input_tokens: call.reserve.input_tokens,
                output_tokens: call.reserve.output_tokens,
                ..Default::default()
            };
            let worst = CallUsage { usage, cost_micro_usd: call.reserve.cost, trace: &trace };
            self.engine.store.reconcile(self.id(), reservation, &worst).await?;
        }
        Ok(())
    }

    async fn maybe_alert(&self, state: &SessionState, totals: &UsageTotals) {
        if state.meta.alerted.is_some() {
            return;
        }
        let spent =
            Spent { steps: self.msg.step, tokens: totals.total_tokens(), cost: MicroUsd::new(totals.cost_micro_usd) };
        let Some(limit) = budget::alert_crossed(&state.meta.limits, &spent) else { return };
        match self.engine.store.mark_alert(self.id(), limit).await {
            Ok(true) => {
                metric::budget_alert(self.agent.name.as_str(), limit);
                let detail = serde_json::json!({
                    "limit": limit,
                    "threshold": f64::from(state.meta.limits.alert_permille) / 1000.0,
                    "steps": spent.steps,
                    "tokens": spent.tokens,
                    "cost_usd": spent.cost.as_usd(),
                });
                let line =
                    format!("{limit} passed {:.0}% of its limit", f64::from(state.meta.limits.alert_permille) / 10.0);
                self.event("session.budget_alert", &line, detail).await;
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "marking the budget alert failed; it may fire later"),
        }
    }

    async fn model_replied(
        &self,
        mut state: SessionState,
        reply: ModelReply,
        summary: Option<LimitHit>,
    ) -> Result<After, StepError> {
        let blocks = reply.blocks();
        let text = llm::text_of(&blocks);
        let has_tools = blocks.iter().any(|b| matches!(b, Block::ToolUse(_)));
        let (outcome, nudge) = match summary {
            Some(hit) => {
                let done = ModelOutcome::Done {
                    status: SessionStatus::BudgetExhausted,
                    result: text.clone(),
                    error: hit.to_string(),
                };
                (done, None)
            }
            None => decide(&reply.stop_reason, has_tools, &text),
        };
        let assistant = reply.assistant_message();
        let mut messages: Vec<String> = summary.map(|_| llm::user_message(SUMMARY_PROMPT)).into_iter().collect();
        messages.push(assistant.clone());
        messages.extend(nudge.map(llm::user_message));
        let commit = ModelCommit { messages, outcome: outcome.clone() };
        if !self.engine.store.commit_model(self.id(), self.msg.step, &commit, now_ms()).await? {
            return Ok(After::Nothing);
        }
        match outcome {
            ModelOutcome::Tools => {
                state.messages.push(assistant);
                state.meta.phase = Phase::Tools;
                // The tool phase counts its own deferrals: model retries must not use them up.
                let fresh = StepMessage { attempt: 0, ..self.msg.clone() };
                StepCtx { msg: &fresh, meta: self.meta.clone(), ..*self }.tool_phase(state).await
            }
            ModelOutcome::Next => Ok(After::Publish(self.msg.step + 1)),
            ModelOutcome::Done { status, error, .. } => {
                let line = if error.is_empty() { text.clone() } else { error };
                self.finished(status, &line, serde_json::json!({ "result": text })).await;
                if let Some(hit) = summary {
                    self.exhausted_event(hit, &text).await;
                }
                Ok(After::Nothing)
            }
        }
    }

    async fn model_failed(&self, e: LlmError, took: Duration) -> Result<After, StepError> {
        let attempts_left = self.msg.attempt + 1 < self.engine.settings.max_model_attempts;
        if e.is_retryable() && attempts_left {
            let after = e.retry_after().unwrap_or_else(|| backoff(self.msg.attempt));
            return Err(StepError::Retry { after, reason: "model_api" });
        }
        let why = if e.is_retryable() {
            format!("the model API kept failing after {} attempts ({took:?} the last): {e}", self.msg.attempt + 1)
        } else {
            e.to_string()
        };
        match self.agent.on_model_failure {
            OnModelFailure::Fail => self.end_llm(SessionStatus::Failed, why).await,
            OnModelFailure::Escalate => {
                let escalation = serde_json::json!({ "kind": "model_failure", "reason": why });
                let trace = TraceRecord { error: Some(why.clone()), ..self.trace("escalation") }.emit();
                let end = StepEnd {
                    status: SessionStatus::AwaitingHuman,
                    result: String::new(),
                    error: why,
                    escalation: escalation.to_string(),
                    trace,
                };
                if self.engine.store.end_step(self.id(), self.msg.step, Phase::Llm, &end, now_ms()).await? {
                    let summary = "the model API is failing; a human is asked to decide";
                    self.finished(SessionStatus::AwaitingHuman, summary, escalation).await;
                }
                Ok(After::Nothing)
            }
        }
    }

    async fn end_llm(&self, status: SessionStatus, why: String) -> Result<After, StepError> {
        self.end(Phase::Llm, status, why).await
    }

    /// Ends the session `budget_exhausted` without a summary.
    async fn exhausted(&self, hit: LimitHit, why: String) -> Result<After, StepError> {
        let after = self.end_llm(SessionStatus::BudgetExhausted, why).await?;
        self.exhausted_event(hit, "").await;
        Ok(after)
    }

    async fn exhausted_event(&self, hit: LimitHit, summary: &str) {
        metric::budget_exhausted(self.agent.name.as_str(), hit.label());
        let detail = serde_json::json!({ "limit": hit.label(), "reason": hit.to_string(), "result": summary });
        self.event("session.budget_exhausted", &hit.to_string(), detail).await;
    }

    async fn daily_cap_reached(&self, state: &SessionState, verdict: DailyVerdict) -> Result<After, StepError> {
        let who = match verdict {
            DailyVerdict::TenantCap => format!("tenant `{}`", state.meta.tenant),
            _ => format!("agent `{}`", self.agent.name),
        };
        let why = format!("the daily spend cap of {who} is reached");
        metric::daily_cap_reached(self.agent.name.as_str());
        match self.agent.budget.on_daily_cap {
            OnDailyCap::Fail => self.end_llm(SessionStatus::Failed, why).await,
            OnDailyCap::Pause => {
                let trace = TraceRecord { error: Some(why.clone()), ..self.trace("budget") }.emit();
                let end = StepEnd {
                    status: SessionStatus::Paused,
                    result: String::new(),
                    error: why,
                    escalation: String::new(),
                    trace,
                };
                self.engine.store.end_step(self.id(), self.msg.step, Phase::Llm, &end, now_ms()).await?;
                Ok(After::Postpone(DAILY_CAP_RETRY, "waiting for a daily spend cap"))
            }
        }
    }
}

/// The conversation with the summary prompt added to its last user message (or as a new one), so
/// the roles still alternate.
fn with_summary_prompt(mut messages: Vec<Box<RawValue>>) -> Result<Vec<Box<RawValue>>, serde_json::Error> {
    let prompt = serde_json::json!({ "type": "text", "text": SUMMARY_PROMPT });
    let last: Option<serde_json::Value> = messages.last().map(|m| serde_json::from_str(m.get())).transpose()?;
    match last {
        Some(mut last) if last["role"] == "user" => {
            let content = match last["content"].take() {
                serde_json::Value::String(text) => vec![serde_json::json!({ "type": "text", "text": text })],
                serde_json::Value::Array(blocks) => blocks,
                _ => Vec::new(),
            };
            last["content"] = serde_json::Value::Array(content.into_iter().chain([prompt]).collect());
            messages.pop();
            messages.push(serde_json::value::to_raw_value(&last)?);
        }
        _ => messages.push(RawValue::from_string(llm::user_message(SUMMARY_PROMPT))?),
    }
    Ok(messages)
}

fn raw_messages(stored: &[String]) -> Result<Vec<Box<RawValue>>, String> {
    stored
        .iter()
        .enumerate()
        .map(|(i, m)| RawValue::from_string(m.clone()).map_err(|e| format!("stored message {i} is not JSON: {e}")))
        .collect()
}

/// What a reply's stop reason means for the session, and the user nudge to append, if any.
fn decide(stop: &StopReason, has_tools: bool, text: &str) -> (ModelOutcome, Option<&'static str>) {
    let done = |status: SessionStatus, error: String| ModelOutcome::Done { status, result: text.to_owned(), error };
    match stop {
        StopReason::ToolUse | StopReason::EndTurn | StopReason::StopSequence | StopReason::MaxTokens if has_tools => {
            (ModelOutcome::Tools, None)
        }
        StopReason::EndTurn if text.trim().is_empty() => (
            ModelOutcome::Next,
            Some("Your last response was empty. Continue with the task, or give your final answer."),
        ),
        StopReason::EndTurn | StopReason::StopSequence => (done(SessionStatus::Completed, String::new()), None),
        StopReason::ToolUse => (ModelOutcome::Next, Some("You stopped to use a tool but sent no tool call. Continue.")),
        StopReason::MaxTokens => (
            ModelOutcome::Next,
            Some(
                "Your previous response was cut off by the output token limit. Continue from where you stopped, more briefly.",
            ),
        ),
        StopReason::PauseTurn => (ModelOutcome::Next, None),
        StopReason::Refusal => (done(SessionStatus::Failed, "the model refused to continue".into()), None),
        StopReason::Other(s) => (done(SessionStatus::Failed, format!("unknown stop_reason `{s}`")), None),
    }
}

/// The wait before retrying a failed model call: 1, 2, 4, then 5 s at most. A provider that stays
/// down is the provider breaker's job, so per-step waits need not grow further (longer ones would
/// also round up to the 2- and 10-minute delay tiers).
fn backoff(attempt: u32) -> Duration {
    Duration::from_secs((1u64 << attempt.min(9)).min(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stop_reason_has_a_decision() {
        let tools = |s| matches!(decide(&s, true, "").0, ModelOutcome::Tools);
        assert!(tools(StopReason::ToolUse));
        assert!(tools(StopReason::MaxTokens));
        let done = |s| match decide(&s, false, "answer").0 {
            ModelOutcome::Done { status, .. } => Some(status),
            _ => None,
        };
        assert_eq!(done(StopReason::EndTurn), Some(SessionStatus::Completed));
        assert_eq!(done(StopReason::StopSequence), Some(SessionStatus::Completed));
        assert_eq!(done(StopReason::Refusal), Some(SessionStatus::Failed));
        assert_eq!(done(StopReason::Other("x".into())), Some(SessionStatus::Failed));
        assert!(matches!(decide(&StopReason::PauseTurn, false, "").0, ModelOutcome::Next));
        let (next, nudge) = decide(&StopReason::MaxTokens, false, "cut");
        assert!(matches!(next, ModelOutcome::Next) && nudge.is_some());
    }

    #[test]
    fn the_summary_prompt_joins_the_last_user_message() {
        let msgs = [
            r#"{"role":"user","content":"goal"}"#,
            r#"{"role":"assistant","content":[{"type":"text","text":"x"}]}"#,
            r#"{"role":"user","content":[{"type":"tool_result","tool_use_id":"a","content":"r"}]}"#,
        ];
        let raw: Vec<Box<RawValue>> =
            msgs.iter().map(|m| RawValue::from_string((*m).to_owned()).expect("json")).collect();
        let out = with_summary_prompt(raw).expect("joins");
        assert_eq!(out.len(), 3);
        let last: serde_json::Value = serde_json::from_str(out[2].get()).expect("json");
        assert_eq!(last["content"][0]["type"], "tool_result");
        assert_eq!(last["content"][1]["text"], SUMMARY_PROMPT);
        let after_assistant = with_summary_prompt(out[..2].to_vec()).expect("appends");
        assert_eq!(after_assistant.len(), 3);
    }
}
