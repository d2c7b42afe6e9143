//! The model phase of a step: plan the call against the budget, reserve its worst case (in the
//! session and in the fleet-wide daily caps), call the model, reconcile the reservation with the
//! actual usage, then checkpoint the reply.
//!
//! Reconciling comes before the checkpoint and is not fenced: a call that was billed is counted
//! even when its checkpoint is lost. A crash between the call and the reconciliation leaves the
//! reservation open; the next claim of the session counts it at its worst case, once.

use std::time::{Duration, Instant};

use serde_json::value::RawValue;

use super::{Next, StepCtx, StepError};
use crate::breaker::BreakerConfig;
use crate::budget::{self, LimitHit, Plan, Rates, Reservation, SUMMARY_PROMPT, Spent};
use crate::config::{OnDailyCap, OnModelFailure, ProviderConfig, RateLimit};
use crate::domain::{MicroUsd, Phase, TenantId};
use crate::failpoint;
use crate::guard::{Admission, Gate, Outcome, Pass, RateGate, WaitFor};
use crate::lifecycle::Ending;
use crate::llm::{self, Block, CallSpec, LlmError, ModelReply, StopReason, ToolUse, Usage};
use crate::ratelimit::Tokens;
use crate::store::{CallUsage, DailyCaps, DailyVerdict, ModelCommit, ModelOutcome, SessionState, UsageTotals};
use crate::telemetry::{TraceRecord, metric, now_ms, summarize};

/// Model call attempts per step when the provider answers 529 (overloaded) or 429 (rate limited),
/// counted with the other failed attempts. A storm only slows sessions down: at 30 % overload, 1000
/// steps fail one in ~10^23 times. (`worker.max_model_attempts` bounds the other failures.)
const MAX_OVERLOAD_ATTEMPTS: u32 = 50;

/// One planned model call.
struct Call {
    messages: Vec<Box<RawValue>>,
    max_tokens: u32,
    reserve: Reservation,
    /// Set for the final summary call: the limit that was reached.
    summary: Option<LimitHit>,
}

impl StepCtx<'_> {
    /// Plans, calls and checkpoints the model call of this step; what comes next is the tool phase
    /// (when the model asked for tools), the next step, or nothing (the session ended).
    pub(super) async fn model_phase(&self, state: SessionState) -> Result<Next, StepError> {
        let messages = match raw_messages(&state.messages) {
            Ok(m) => m,
            Err(why) => return self.fail_llm(why.to_string()).await,
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
                self.call(state, Call { messages, max_tokens, reserve, summary: None }).await
            }
            Plan::Summarize { max_tokens, reserve, hit } => {
                let messages = match with_summary_prompt(messages) {
                    Ok(m) => m,
                    Err(e) => return self.fail_llm(format!("unreadable conversation: {e}")).await,
                };
                self.call(state, Call { messages, max_tokens, reserve, summary: Some(hit) }).await
            }
            Plan::Stop { hit } => {
                let ending = Ending::Exhausted { limit: hit.label(), reason: hit.to_string(), summary: None };
                self.settle(Phase::Llm, ending).await
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
            tenant: state.meta.tenant.as_ref(),
            day: now_ms() / 86_400_000,
            agent_cap: self.agent.budget.daily_cap_usd.and_then(|c| MicroUsd::from_usd(c).ok()).map(MicroUsd::get),
            tenant_cap: state.meta.tenant.as_ref().and_then(|t| self.engine.agents.tenant_cap(t)),
        }
    }

    async fn call(&self, state: SessionState, call: Call) -> Result<Next, StepError> {
        let provider = self.engine.agents.provider(self.agent.provider);
        let breaker_cfg = provider.breaker();
        let gate = self.gate(&provider, &breaker_cfg, &call);
        let pass = match self.engine.guard.admit(&gate, now_ms()).await {
            Admission::Pass(pass) => pass,
            Admission::Wait { after, why: WaitFor::Breaker } => {
                return Ok(Next::Postpone(after.max(Duration::from_secs(1)), "the model provider's breaker is open"));
            }
            Admission::Wait { after, why: WaitFor::RateLimit } => {
                let after = after.max(Duration::from_millis(200));
                return Ok(Next::Postpone(after, "waiting for the provider rate limit"));
            }
        };
        let caps = self.daily_caps(&state);
        let verdict = self.engine.store.daily_reserve(&caps, call.reserve.cost).await?;
        if verdict != DailyVerdict::Reserved {
            return self.daily_cap_reached(&state, verdict).await;
        }
        let reservation = ulid::Ulid::new().to_string();
        if let Err(e) = self.engine.store.reserve(&self.fence(), &reservation, &call.reserve).await {
            // No call is made: give the daily reservation back (best effort; a failure only makes
            // the cap stricter until the day ends).
            let _ = self.engine.store.daily_settle(&caps, -(call.reserve.cost as i64)).await;
            return Err(e.into());
        }
        let spec = CallSpec {
            model: &self.agent.model,
            system: &self.agent.system,
            max_tokens: call.max_tokens,
            tools: (!self.agent.tools.is_empty()).then(|| self.agent.tools.definitions()),
            tool_choice: call.summary.map(|_| "none"),
        };
        let started = Instant::now();
        // A lost lease cancels the call: its reservation stays open, and the claim that took the
        // lease counts it at its worst case (it may have been billed).
        let reply =
            self.lease.guard(self.engine.llm.create_message(self.agent.provider, &spec, &call.messages)).await?;
        let took = started.elapsed();
        metric::phase_duration("llm", took);
        self.timings.add(took);
        if !self.lease.is_lost() {
            // A call that outlived the lease (a paused worker) says nothing about the provider.
            self.report(&gate, pass, &call, &reply).await;
        }
        match reply {
            Ok(reply) => {
                failpoint::hit("after_model_call");
                self.reconcile(&state, &caps, &reservation, &call, &reply, took).await?;
                failpoint::hit("after_model_reconcile");
                self.model_replied(state, reply, call.summary).await
            }
            Err(e) => {
                self.settle_failed_call(&caps, &reservation, &call, &e, took).await?;
                self.model_failed(e, took).await
            }
        }
    }

    /// The provider's breaker and rate limit, as one gate. Every model has a rate gate: without a
    /// configured limit it is unlimited until overloads make it adaptive.
    fn gate<'g>(&self, provider: &'g ProviderConfig, breaker_cfg: &'g BreakerConfig, call: &Call) -> Gate<'g> {
        let estimate = Tokens { input: call.reserve.input_tokens, output: call.reserve.output_tokens };
        let limit = provider.rate_limits.get(&self.agent.model).unwrap_or(&RateLimit::UNLIMITED);
        let adaptive = provider.adaptive.enabled.then_some(&provider.adaptive);
        let rate = (adaptive.is_some() || !limit.is_unlimited()).then(|| RateGate {
            key: format!("{}:{}", self.agent.provider.as_str(), self.agent.model),
            limit,
            estimate,
            adaptive,
        });
        Gate { breaker: format!("model:{}", self.agent.provider.as_str()), breaker_cfg, rate }
    }

    /// Tells the guard how the call went: what is evidence about the provider for its breaker,
    /// whether it was overloaded (AIMD), and the tokens used for the rate limit.
    async fn report(&self, gate: &Gate<'_>, pass: Pass, call: &Call, reply: &Result<ModelReply, LlmError>) {
        let healthy = match reply {
            Ok(_) => Some(true),
            Err(e) => evidence(e),
        };
        let overloaded = reply.as_ref().err().is_some_and(is_overload);
        let estimate = Tokens { input: call.reserve.input_tokens, output: call.reserve.output_tokens };
        let actual = match reply {
            Ok(r) => Tokens {
                input: r.usage.input_tokens + r.usage.cache_creation_input_tokens,
                output: r.usage.output_tokens,
            },
            Err(e) if e.is_unbilled() => Tokens::default(),
            Err(_) => estimate,
        };
        let headers = reply.as_ref().ok().map(|r| &r.rate_headers);
        let outcome = Outcome { healthy, overloaded, actual, headers };
        self.engine.guard.report(gate, pass, &outcome, now_ms()).await;
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
        match self.engine.store.mark_alert(&self.fence(), limit).await {
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

    /// Checkpoints the reply: what the model decided, and the messages to append.
    async fn model_replied(
        &self,
        mut state: SessionState,
        reply: ModelReply,
        summary: Option<LimitHit>,
    ) -> Result<Next, StepError> {
        let blocks = reply.blocks();
        let text = llm::text_of(&blocks);
        let calls: Vec<ToolUse> = blocks
            .into_iter()
            .filter_map(|b| match b {
                Block::ToolUse(t) => Some(t),
                _ => None,
            })
            .collect();
        let (decision, nudge) = match summary {
            Some(hit) => {
                let ending = Ending::Exhausted { limit: hit.label(), reason: hit.to_string(), summary: Some(text) };
                (Decision::End(ending), None)
            }
            None => decide(&reply.stop_reason, !calls.is_empty(), text),
        };
        let assistant = reply.assistant_message();
        let mut messages: Vec<String> = summary.map(|_| llm::user_message(SUMMARY_PROMPT)).into_iter().collect();
        messages.push(assistant.clone());
        messages.extend(nudge.map(llm::user_message));
        let commit = ModelCommit { messages, outcome: decision.outcome() };
        if !self.engine.store.commit_model(&self.fence(), &commit, now_ms()).await? {
            return Ok(Next::Nothing);
        }
        match decision {
            Decision::Tools => {
                state.messages.push(assistant);
                state.meta.phase = Phase::Tools;
                Ok(Next::Tools(Box::new(state), calls))
            }
            Decision::Next => Ok(Next::Publish(self.msg.step + 1)),
            Decision::End(ending) => {
                self.engine.announce(self.msg, &self.meta, Some(self.agent), &ending).await;
                Ok(Next::Nothing)
            }
        }
    }

    async fn model_failed(&self, e: LlmError, took: Duration) -> Result<Next, StepError> {
        let max_attempts = self.engine.settings.max_model_attempts;
        let attempts_left = self.msg.attempt.saturating_add(1) < attempt_limit(&e, max_attempts);
        if e.is_retryable() && attempts_left {
            if is_overload(&e) {
                // The guard shrank the fleet's rate; the retry waits its turn at the rate limiter.
                let after = e.retry_after().unwrap_or(OVERLOAD_RETRY);
                let tried = self.msg.attempt.saturating_add(1);
                return Err(StepError::Retry { after, reason: "model_overloaded", tried });
            }
            let after = e.retry_after().unwrap_or_else(|| backoff(self.msg.attempt));
            return Err(StepError::Retry { after, reason: "model_api", tried: self.msg.attempt.saturating_add(1) });
        }
        let why = if e.is_retryable() {
            let attempts = self.msg.attempt.saturating_add(1);
            format!("the model API kept failing after {attempts} attempts ({took:?} the last): {e}")
        } else {
            e.to_string()
        };
        match self.agent.on_model_failure {
            OnModelFailure::Fail => self.fail_llm(why).await,
            OnModelFailure::Escalate => {
                let escalation = serde_json::json!({ "kind": "model_failure", "reason": why });
                let summary = "the model API is failing; a human is asked to decide".to_owned();
                self.settle(Phase::Llm, Ending::AwaitingHuman { escalation, summary }).await
            }
        }
    }

    async fn fail_llm(&self, reason: String) -> Result<Next, StepError> {
        self.settle(Phase::Llm, Ending::Failed { reason, result: String::new() }).await
    }

    async fn daily_cap_reached(&self, state: &SessionState, verdict: DailyVerdict) -> Result<Next, StepError> {
        let who = match verdict {
            DailyVerdict::TenantCap => format!("tenant `{}`", state.meta.tenant.as_ref().map_or("", TenantId::as_str)),
            _ => format!("agent `{}`", self.agent.name),
        };
        let why = format!("the daily spend cap of {who} is reached");
        metric::daily_cap_reached(self.agent.name.as_str());
        match self.agent.budget.on_daily_cap {
            OnDailyCap::Fail => self.fail_llm(why).await,
            OnDailyCap::Pause => self.settle(Phase::Llm, Ending::Paused { reason: why }).await,
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

/// A stored message that is not JSON.
#[derive(Debug, thiserror::Error)]
#[error("stored message {index} is not JSON: {source}")]
struct NotJson {
    index: usize,
    source: serde_json::Error,
}

fn raw_messages(stored: &[String]) -> Result<Vec<Box<RawValue>>, NotJson> {
    stored
        .iter()
        .enumerate()
        .map(|(index, m)| RawValue::from_string(m.clone()).map_err(|source| NotJson { index, source }))
        .collect()
}

/// What a model reply decides for the session.
#[derive(Debug)]
enum Decision {
    /// Run the tools it asked for.
    Tools,
    /// Go on to the next step's model call.
    Next,
    /// The session ends.
    End(Ending),
}

impl Decision {
    /// The checkpoint's outcome.
    fn outcome(&self) -> ModelOutcome {
        match self {
            Self::Tools => ModelOutcome::Tools,
            Self::Next => ModelOutcome::Next,
            Self::End(ending) => {
                let (result, error, _) = ending.fields();
                ModelOutcome::Done { status: ending.status(), result, error }
            }
        }
    }
}

/// What a reply's stop reason means for the session, and the user nudge to append, if any.
fn decide(stop: &StopReason, has_tools: bool, text: String) -> (Decision, Option<&'static str>) {
    let failed = |reason: String, result: String| Decision::End(Ending::Failed { reason, result });
    match stop {
        StopReason::ToolUse | StopReason::EndTurn | StopReason::StopSequence | StopReason::MaxTokens if has_tools => {
            (Decision::Tools, None)
        }
        StopReason::EndTurn if text.trim().is_empty() => {
            (Decision::Next, Some("Your last response was empty. Continue with the task, or give your final answer."))
        }
        StopReason::EndTurn | StopReason::StopSequence => (Decision::End(Ending::Completed { result: text }), None),
        StopReason::ToolUse => (Decision::Next, Some("You stopped to use a tool but sent no tool call. Continue.")),
        StopReason::MaxTokens => (
            Decision::Next,
            Some(
                "Your previous response was cut off by the output token limit. Continue from where you stopped, more briefly.",
            ),
        ),
        StopReason::PauseTurn => (Decision::Next, None),
        StopReason::Refusal => (failed("the model refused to continue".into(), text), None),
        StopReason::Other(s) => (failed(format!("unknown stop_reason `{s}`"), text), None),
    }
}

/// The wait before a step whose call was overloaded asks the rate limiter again, when the provider
/// sent no `retry-after`.
const OVERLOAD_RETRY: Duration = Duration::from_secs(1);

/// A 529 (overloaded) or a 429 that waiting cures (not a spend limit): the provider is working but
/// wants fewer requests. It shrinks the fleet's rate and says nothing to the breaker.
fn is_overload(e: &LlmError) -> bool {
    matches!(e, LlmError::Api { status: 429 | 529, .. }) && e.is_retryable()
}

/// What a failed call says about the provider, for its breaker: `None` for overloads (they slow the
/// fleet instead), `Some(false)` for what the provider did (5xx other than 529, a connection
/// refused, a timeout, an unreadable answer), `Some(true)` for any other answer (a 4xx is a working
/// provider's answer). A call whose step lost its lease is never reported at all (`call`).
fn evidence(e: &LlmError) -> Option<bool> {
    if is_overload(e) { None } else { Some(!e.is_provider_failure()) }
}

/// How many attempts a step gets for a call that failed with `e`: overloads get their own, generous
/// bound, everything else `max_model_attempts`.
fn attempt_limit(e: &LlmError, max_model_attempts: u32) -> u32 {
    if is_overload(e) { MAX_OVERLOAD_ATTEMPTS.max(max_model_attempts) } else { max_model_attempts }
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
        use crate::domain::SessionStatus;
        let tools = |s| matches!(decide(&s, true, String::new()).0, Decision::Tools);
        assert!(tools(StopReason::ToolUse));
        assert!(tools(StopReason::MaxTokens));
        let done = |s| match decide(&s, false, "answer".into()).0 {
            Decision::End(ending) => Some(ending.status()),
            _ => None,
        };
        assert_eq!(done(StopReason::EndTurn), Some(SessionStatus::Completed));
        assert_eq!(done(StopReason::StopSequence), Some(SessionStatus::Completed));
        assert_eq!(done(StopReason::Refusal), Some(SessionStatus::Failed));
        assert_eq!(done(StopReason::Other("x".into())), Some(SessionStatus::Failed));
        assert!(matches!(decide(&StopReason::PauseTurn, false, String::new()).0, Decision::Next));
        let (next, nudge) = decide(&StopReason::MaxTokens, false, "cut".into());
        assert!(matches!(next, Decision::Next) && nudge.is_some());
    }

    fn api(status: u16, kind: &str, message: &str) -> LlmError {
        LlmError::Api { status, kind: kind.into(), message: message.into(), retry_after: None }
    }

    #[test]
    fn only_evidence_about_the_provider_reaches_its_breaker() {
        let overloaded = api(529, "overloaded_error", "Overloaded");
        let limited = api(429, "rate_limit_error", "Rate limited");
        let spend = api(429, "rate_limit_error", "You have reached your spend limit");
        assert_eq!(evidence(&overloaded), None, "529 slows the fleet instead");
        assert_eq!(evidence(&limited), None, "429 slows the fleet instead");
        assert!(is_overload(&overloaded) && is_overload(&limited) && !is_overload(&spend));
        assert_eq!(evidence(&spend), Some(true), "a spend limit is a working provider's answer");
        assert_eq!(evidence(&api(500, "api_error", "boom")), Some(false));
        assert_eq!(evidence(&api(503, "api_error", "boom")), Some(false));
        assert_eq!(evidence(&api(400, "invalid_request_error", "bad")), Some(true));
        let refused = LlmError::Transport { sent: false, detail: "connection failed".into() };
        assert_eq!(evidence(&refused), Some(false));
        let timed_out = LlmError::Transport { sent: true, detail: "timed out".into() };
        assert_eq!(evidence(&timed_out), Some(false));
        assert_eq!(evidence(&LlmError::Decode("garbage".into())), Some(false));
    }

    #[test]
    fn overloads_get_their_own_generous_bound() {
        let overloaded = api(529, "overloaded_error", "Overloaded");
        assert_eq!(attempt_limit(&overloaded, 8), MAX_OVERLOAD_ATTEMPTS);
        assert_eq!(attempt_limit(&overloaded, 80), 80);
        assert_eq!(attempt_limit(&api(500, "api_error", "boom"), 8), 8);
        // At 30 % overload per call, 1000 steps all get through within the bound.
        let p_step_fails = 0.3_f64.powi(MAX_OVERLOAD_ATTEMPTS as i32);
        assert!(1000.0 * p_step_fails < 1e-20, "{p_step_fails}");
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
