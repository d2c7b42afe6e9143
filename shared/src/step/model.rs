//! The model phase of a step: plan the call against the budget, reserve its worst case (in the
//! session and in the fleet-wide daily caps), call the model, then reconcile the reservation with
//! the actual usage and checkpoint the reply in one write.
//!
//! The session's reservation is usually already held: the checkpoint that made this step current
//! planned its call, and the claim took that worst case under the lease (`SessionState::planned`).
//! Only when this step's own plan differs is it reserved again. Reconciling is not fenced: a call
//! that was billed is counted even when its checkpoint is refused. A crash between the call and the
//! checkpoint leaves the reservation open; the next claim of the session counts it at its worst
//! case, once.

use std::time::{Duration, Instant};

use super::{Next, StepCtx, StepError};
use crate::breaker::BreakerConfig;
use crate::budget::{self, Bill, LimitHit, Plan, Reservation, SUMMARY_PROMPT};
use crate::config::{OnDailyCap, OnModelFailure, ProviderConfig, RateLimit};
use crate::domain::{MicroUsd, Phase, TenantId};
use crate::failpoint;
use crate::guard::{Admission, Gate, Outcome, Pass, RateGate, WaitFor};
use crate::lifecycle::Ending;
use crate::llm::{self, Block, CallSpec, LlmError, ModelReply, StopReason, ToolUse, Usage};
use crate::ratelimit::Tokens;
use crate::store::{
    CallUsage, DailyCap, DailyCaps, DailyVerdict, ModelCommit, ModelOutcome, SessionState, UsageTotals,
};
use crate::telemetry::{TraceRecord, metric, now_ms, summarize};

/// Model call attempts per step when the provider answers 529 (overloaded) or 429 (rate limited),
/// counted with the other failed attempts. A storm only slows sessions down: at 30 % overload, 1000
/// steps fail one in ~10^23 times. (`worker.max_model_attempts` bounds the other failures.)
const MAX_OVERLOAD_ATTEMPTS: u32 = 50;
/// How long a step waits while a daily cap's room is only held by other calls' reservations before
/// it counts the cap as reached: a live call holds its reservation at most its timeout (120 s by
/// default); what a dead worker held is only given back when the day ends.
const HELD_ROOM_WAIT: Duration = Duration::from_secs(120);

/// One planned model call.
struct Call {
    messages: llm::MessagePlan,
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
        let plan = self.plan(&state.meta.limits, &state.usage, self.msg.step, state.conversation_bytes);
        match plan {
            Plan::Call { max_tokens, reserve } => {
                self.call(state, Call { messages, max_tokens, reserve, summary: None }).await
            }
            Plan::Summarize { max_tokens, reserve, hit } => {
                let messages = match with_summary_prompt(&state.messages) {
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

    /// The call of `step` against the session's limits, with `usage` spent so far and a
    /// conversation of `conversation_bytes`.
    fn plan(&self, limits: &budget::Limits, usage: &UsageTotals, step: u32, conversation_bytes: usize) -> Plan {
        self.agent.shape.plan(limits, &usage.spent_before(step), step, conversation_bytes)
    }

    /// The worst case of the call of `step`, for the checkpoint that makes it current (`None`: no
    /// call fits, the step ends the session).
    pub(super) fn plan_next(&self, usage: &UsageTotals, step: u32, conversation_bytes: usize) -> Option<Reservation> {
        self.agent.shape.worst_case(&self.meta.limits, &usage.spent_before(step), step, conversation_bytes)
    }

    fn daily_caps(&self) -> DailyCaps<'_> {
        DailyCaps {
            agent: self.agent.name.as_str(),
            tenant: self.meta.tenant.as_ref(),
            day: crate::store::utc_day(now_ms()),
            agent_cap: self.agent.budget.daily_cap_usd.and_then(|c| MicroUsd::from_usd(c).ok()).map(MicroUsd::get),
            tenant_cap: self.meta.tenant.as_ref().and_then(|t| self.engine.agents.tenant_cap(t)),
        }
    }

    async fn call(&self, mut state: SessionState, call: Call) -> Result<Next, StepError> {
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
        let caps = self.daily_caps();
        let verdict = self.engine.store.daily_reserve(&caps, call.reserve.cost).await?;
        if let DailyVerdict::Refused { cap, held } = verdict {
            // Room held by other calls in flight comes back within seconds: wait for it, a while.
            if held && now_ms().saturating_sub(state.meta.updated_ms) < HELD_ROOM_WAIT.as_millis() as u64 {
                return Ok(Next::Postpone(
                    Duration::from_secs(1),
                    "waiting for daily-cap room held by calls in flight",
                ));
            }
            return self.daily_cap_reached(&state, cap).await;
        }
        // The reservation is held under the lease token: by the claim when it was planned as this
        // step's plan is, else now.
        let reservation = self.lease.token();
        if state.planned != Some(call.reserve)
            && let Err(e) = self.engine.store.reserve(&self.fence(), reservation, &call.reserve).await
        {
            // No call is made: give the daily reservation back (best effort; a failure only makes
            // the cap stricter until the day ends).
            let _ = self.engine.store.daily_settle(&caps, call.reserve.cost, 0).await;
            return Err(e.into());
        }
        let spec = CallSpec {
            model: &self.agent.model,
            system: &self.agent.system,
            max_tokens: call.max_tokens,
            tools: (!self.agent.tools.is_empty()).then(|| self.agent.tools.definitions()),
            tool_choice: call.summary.map(|_| "none"),
            cache: self.agent.cache,
        };
        let started = Instant::now();
        self.lease.calling();
        let body = self.engine.llm.request_body(self.agent.provider, &spec, call.messages.over(&state.messages));
        if !self.agent.tools.has_session_rules() {
            // The body holds the conversation now: while thousands of calls wait on the model, each
            // holds one copy of it, not two. (Approval rules over the session's calls read it later.)
            state.messages = Vec::new();
        }
        // A lost lease cancels the call: its reservation stays open, and the claim that took the
        // lease counts it at its worst case (it may have been billed).
        let reply = match body {
            Ok(body) => self.lease.guard(self.engine.llm.send(body)).await?,
            Err(e) => Err(e),
        };
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
                self.model_replied(state, &caps, &call, reply, took).await
            }
            Err(e) => {
                self.settle_failed_call(&caps, reservation, &call, &e, took).await?;
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
            self.engine.store.daily_settle(caps, call.reserve.cost, 0).await?;
        } else {
            let usage = Usage {
                input_tokens: call.reserve.input_tokens,
                output_tokens: call.reserve.output_tokens,
                ..Default::default()
            };
            let worst = CallUsage { usage, cost_micro_usd: call.reserve.cost, bill: None, trace: &trace };
            self.engine.store.reconcile(self.id(), reservation, &worst).await?;
        }
        Ok(())
    }

    async fn maybe_alert(&self, state: &SessionState, totals: &UsageTotals) {
        if state.meta.alerted.is_some() {
            return;
        }
        let spent = totals.spent_before(self.msg.step + 1);
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

    /// The call's bill and trace record, with its metrics.
    fn priced(&self, call: &Call, reply: &ModelReply, took: Duration) -> (Bill, String) {
        let bill = budget::bill(&self.agent.price, &reply.usage);
        let cost = bill.total();
        let agent = self.agent.name.as_str();
        metric::model_call(agent, &self.agent.model, reply.stop_reason.label(), took);
        metric::model_usage(agent, &self.agent.model, reply.usage.input_tokens, reply.usage.output_tokens, cost.get());
        let u = &reply.usage;
        metric::cache_tokens(agent, &self.agent.model, u.cache_read_input_tokens, u.cache_creation_input_tokens);
        metric::cost_by_kind(agent, &self.agent.model, &bill);
        let trace = TraceRecord {
            input_summary: format!("{} messages, max_tokens {}", call.messages.len(), call.max_tokens),
            output_summary: format!("stop_reason={} {}", reply.stop_reason.as_str(), summarize(&reply.text(), 200)),
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            cache_creation_input_tokens: u.cache_creation_input_tokens,
            cache_read_input_tokens: u.cache_read_input_tokens,
            cost_usd: cost.as_usd(),
            cost_micro_usd: cost.get(),
            cost_parts: Some(bill),
            duration_ms: took.as_millis() as u64,
            success: true,
            ..self.trace(if call.summary.is_some() { "summary_call" } else { "model_call" })
        }
        .emit();
        (bill, trace)
    }

    /// Reconciles the call and checkpoints the reply, in one write: what the model decided, and
    /// the messages to append. Then settles the daily caps with what the call really cost.
    async fn model_replied(
        &self,
        mut state: SessionState,
        caps: &DailyCaps<'_>,
        call: &Call,
        reply: ModelReply,
        took: Duration,
    ) -> Result<Next, StepError> {
        let (bill, trace) = self.priced(call, &reply, took);
        let cost = bill.total();
        let text = llm::text_of(reply.block_views());
        let calls: Vec<ToolUse> = reply
            .block_views()
            .iter()
            .filter_map(|b| match b {
                Block::ToolUse(t) => Some(t.clone()),
                _ => None,
            })
            .collect();
        let (decision, nudge) = match call.summary {
            Some(hit) => {
                let ending = Ending::Exhausted { limit: hit.label(), reason: hit.to_string(), summary: Some(text) };
                (Decision::End(ending), None)
            }
            None => decide(&reply.stop_reason, !calls.is_empty(), text),
        };
        let assistant = reply.assistant_message();
        let mut messages: Vec<String> = call.summary.map(|_| llm::user_message(SUMMARY_PROMPT)).into_iter().collect();
        messages.push(assistant.clone());
        messages.extend(nudge.map(llm::user_message));
        let usage = CallUsage { usage: reply.usage, cost_micro_usd: cost.get(), bill: Some(bill), trace: &trace };
        // What the session will have spent once this call is counted, for the next step's plan.
        let mut after = state.usage;
        after.add_call(&usage);
        let next = matches!(decision, Decision::Next).then(|| {
            let appended: usize = messages.iter().map(String::len).sum();
            self.plan_next(&after, self.msg.step + 1, state.conversation_bytes + appended)
        });
        let commit = ModelCommit { messages, outcome: decision.outcome(), next: next.flatten() };
        let done = self.engine.store.commit_model(&self.fence(), &usage, &commit, now_ms()).await?;
        // `None`: another worker already counted this call's worst case (we had lost the lease).
        if let Some(totals) = done.totals {
            self.engine.store.daily_settle(caps, call.reserve.cost, cost.get()).await?;
            self.maybe_alert(&state, &totals).await;
            state.usage = totals;
        }
        failpoint::hit("after_model_checkpoint");
        if !done.checkpoint.applied()? {
            return Ok(Next::Nothing);
        }
        match decision {
            Decision::Tools => {
                state.append(assistant);
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

    async fn daily_cap_reached(&self, state: &SessionState, cap: DailyCap) -> Result<Next, StepError> {
        let who = match cap {
            DailyCap::Tenant => format!("tenant `{}`", state.meta.tenant.as_ref().map_or("", TenantId::as_str)),
            DailyCap::Agent => format!("agent `{}`", self.agent.name),
        };
        let why = format!("the daily spend cap of {who} is reached");
        metric::daily_cap_reached(self.agent.name.as_str());
        match self.agent.budget.on_daily_cap {
            OnDailyCap::Fail => self.fail_llm(why).await,
            OnDailyCap::Pause => self.settle(Phase::Llm, Ending::Paused { reason: why }).await,
        }
    }
}

/// The summary call's messages: the conversation with the summary prompt added to its last user
/// message (or as a new one), so the roles still alternate. Only the last message is read.
fn with_summary_prompt(stored: &[String]) -> Result<llm::MessagePlan, serde_json::Error> {
    let prompt = serde_json::json!({ "type": "text", "text": SUMMARY_PROMPT });
    let last: Option<serde_json::Value> = stored.last().map(|m| serde_json::from_str(m)).transpose()?;
    match last {
        Some(mut last) if last["role"] == "user" => {
            let content = match last["content"].take() {
                serde_json::Value::String(text) => vec![serde_json::json!({ "type": "text", "text": text })],
                serde_json::Value::Array(blocks) => blocks,
                _ => Vec::new(),
            };
            last["content"] = serde_json::Value::Array(content.into_iter().chain([prompt]).collect());
            Ok(llm::MessagePlan::ending_with(stored.len() - 1, last.to_string()))
        }
        _ => Ok(llm::MessagePlan::ending_with(stored.len(), llm::user_message(SUMMARY_PROMPT))),
    }
}

/// A stored message that is not JSON.
#[derive(Debug, thiserror::Error)]
#[error("stored message {index} is not JSON: {source}")]
struct NotJson {
    index: usize,
    source: serde_json::Error,
}

/// The call's messages: the stored ones as they are, each checked to be JSON first (a scan that
/// copies nothing), since the client writes them into the request verbatim.
fn raw_messages(stored: &[String]) -> Result<llm::MessagePlan, NotJson> {
    for (index, message) in stored.iter().enumerate() {
        serde_json::from_str::<serde::de::IgnoredAny>(message).map_err(|source| NotJson { index, source })?;
    }
    Ok(llm::MessagePlan::stored(stored.len()))
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
        let stored: Vec<String> = [
            r#"{"role":"user","content":"goal"}"#,
            r#"{"role":"assistant","content":[{"type":"text","text":"x"}]}"#,
            r#"{"role":"user","content":[{"type":"tool_result","tool_use_id":"a","content":"r"}]}"#,
        ]
        .map(str::to_owned)
        .into();
        let plan = with_summary_prompt(&stored).expect("joins");
        let out: Vec<&str> = plan.over(&stored).iter().collect();
        assert_eq!(out.len(), 3);
        assert_eq!(out[..2], [stored[0].as_str(), stored[1].as_str()], "the rest goes as stored");
        let last: serde_json::Value = serde_json::from_str(out[2]).expect("json");
        assert_eq!(last["content"][0]["type"], "tool_result");
        assert_eq!(last["content"][1]["text"], SUMMARY_PROMPT);
        let after_assistant = with_summary_prompt(&stored[..2]).expect("appends");
        let out: Vec<&str> = after_assistant.over(&stored[..2]).iter().collect();
        assert_eq!(out[..2], [stored[0].as_str(), stored[1].as_str()]);
        assert_eq!(out[2], llm::user_message(SUMMARY_PROMPT));
    }

    #[test]
    fn a_stored_message_that_is_not_json_is_named() {
        let stored: Vec<String> =
            [r#"{"role":"user","content":"goal"}"#, r#"{"role":"assistant","content":[}"#].map(str::to_owned).into();
        let e = raw_messages(&stored).expect_err("not json");
        assert!(e.to_string().starts_with("stored message 1 is not JSON: "), "{e}");
        assert_eq!(raw_messages(&stored[..1]).expect("json").len(), 1);
    }
}
