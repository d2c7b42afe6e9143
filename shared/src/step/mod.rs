//! The step engine: one step of one session per message (DESIGN §3).
//!
//! 1. claim: decide what the message means and take the session's lease, in one round trip;
//! 2. model phase: call the model, then one fenced script appends the reply and records usage;
//! 3. tool phase: run each `tool_use` not yet in the ledger, writing each result at once; then one
//!    fenced script appends all `tool_result`s and moves to the next step;
//! 4. publish the next step, wait for the broker's confirm, and only then ack this one.
//!
//! A crash anywhere is a redelivery of the same step, which resumes from the stored phase and
//! ledger. An error whose outcome is unknown is never acked without a copy of the step in the broker.

mod model;
mod tools;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use crate::amqp::StepPublisher;
use crate::breaker::Breakers;
use crate::config::{BudgetConfig, Config, OnModelFailure, Price, ProviderConfig, WaitConfig};
use crate::domain::{MicroUsd, Name, Phase, SessionId, SessionStatus, StepMessage};
use crate::llm::{self, Block, ModelClients, Provider, ToolUse};
use crate::ratelimit::RateLimiter;
use crate::store::{Claim, SessionState, SessionStore, StepEnd, StoreError};
use crate::telemetry::{TraceRecord, metric, now_ms};
use crate::tools::{ToolLimits, ToolSet, ToolSetupError};

/// What the consumer does with the delivery once the engine is done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Done with it: the next message (if any) is confirmed in the broker.
    Ack,
    /// Its outcome is unknown and no copy could be published: let the broker deliver it again.
    Requeue,
}

/// What a step decided when it could not finish now.
#[derive(Debug)]
enum StepError {
    /// Run this step again later, through a delay tier.
    Retry { after: Duration, reason: &'static str },
    /// Redis failed: the outcome of the last write is unknown. Re-read later; the fencing decides.
    Unknown(StoreError),
}

impl From<StoreError> for StepError {
    fn from(e: StoreError) -> Self {
        Self::Unknown(e)
    }
}

/// What is left to do after a step's state changes.
enum After {
    Publish(u32),
    /// Run this step again after a while (a daily cap, an open breaker, a rate limit), and why.
    Postpone(Duration, &'static str),
    Nothing,
}

/// An agent as the engine runs it: config resolved, tools built, prices known.
pub struct Agent {
    /// Its name.
    pub name: Name,
    /// The model id.
    pub model: String,
    /// The API the model speaks.
    pub provider: Provider,
    /// The system prompt.
    pub system: String,
    /// `max_tokens` per call.
    pub max_tokens: u32,
    /// The worker pool.
    pub pool: Name,
    /// Its tools.
    pub tools: ToolSet,
    /// The model's price.
    pub price: Price,
    /// The agent's budget settings (limits, daily cap, what to do at the cap).
    pub budget: BudgetConfig,
    /// What to do when the model cannot be reached.
    pub on_model_failure: OnModelFailure,
    /// The wait for a human's reply.
    pub human_wait: WaitConfig,
    /// The wait for an approval.
    pub approval_wait: WaitConfig,
}

impl Agent {
    /// Seconds a session of this agent waits in `status` before its deadline.
    pub fn wait_deadline_s(&self, status: SessionStatus) -> u64 {
        if status == SessionStatus::AwaitingApproval {
            self.approval_wait.deadline_s
        } else {
            self.human_wait.deadline_s
        }
    }
}

/// Every configured agent, by name, the tenants' daily caps, and the providers' protections.
pub struct Agents {
    agents: HashMap<String, Arc<Agent>>,
    tenant_caps: HashMap<String, u64>,
    providers: std::collections::BTreeMap<Provider, ProviderConfig>,
}

impl Agents {
    /// Builds every agent of `cfg`; `env` supplies tool header values.
    pub fn build(cfg: &Config, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ToolSetupError> {
        let mut agents = HashMap::new();
        for (name, a) in &cfg.agents {
            let agent = Agent {
                name: name.clone(),
                model: a.model.clone(),
                provider: a.provider,
                system: a.system_prompt.clone(),
                max_tokens: a.max_tokens,
                pool: a.pool.clone(),
                tools: ToolSet::build(&a.tools, &cfg.tools, env, tool_limits(cfg))?,
                // Config validation rejects an agent whose model has no price.
                price: cfg.price(&a.model).copied().unwrap_or(FREE),
                budget: a.budget.clone(),
                on_model_failure: a.on_model_failure,
                human_wait: a.human_wait,
                approval_wait: a.approval_wait,
            };
            agents.insert(name.to_string(), Arc::new(agent));
        }
        let tenant_caps = cfg
            .tenants
            .iter()
            .filter_map(|(n, t)| Some((n.to_string(), MicroUsd::from_usd(t.daily_cap_usd?).ok()?.get())))
            .collect();
        Ok(Self { agents, tenant_caps, providers: cfg.providers.clone() })
    }

    /// The protections of `provider` (defaults when not configured).
    pub fn provider(&self, provider: Provider) -> ProviderConfig {
        self.providers.get(&provider).cloned().unwrap_or_default()
    }

    /// The agent named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Agent>> {
        self.agents.get(name)
    }

    /// The daily cap of `tenant`, micro-USD.
    pub fn tenant_cap(&self, tenant: &str) -> Option<u64> {
        self.tenant_caps.get(tenant).copied()
    }

    /// The pools of all agents, each once.
    pub fn pools(&self) -> Vec<Name> {
        let mut pools: Vec<Name> = self.agents.values().map(|a| a.pool.clone()).collect();
        pools.sort();
        pools.dedup();
        pools
    }
}

fn tool_limits(cfg: &Config) -> ToolLimits {
    ToolLimits {
        max_inline_wait: Duration::from_millis(cfg.worker.max_inline_retry_ms),
        max_result_bytes: cfg.worker.max_tool_result_bytes,
        max_input_bytes: cfg.worker.max_tool_input_bytes,
    }
}

const FREE: Price = Price { input: 0.0, output: 0.0, cache_write: None, cache_read: None };

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// This worker's id, in leases and traces.
    pub worker_id: String,
    /// Lease time-to-live.
    pub lease: Duration,
    /// Model call attempts per step before the session fails.
    pub max_model_attempts: u32,
    /// Delay-queue deferrals of a step for a tool's long retry before the call counts as failed.
    pub max_tool_deferrals: u32,
}

/// What an engine is built from.
pub struct EngineParts {
    /// Session state.
    pub store: Arc<dyn SessionStore>,
    /// Step messages and events.
    pub publisher: Arc<dyn StepPublisher>,
    /// The model clients.
    pub llm: ModelClients,
    /// The agents, tenants and providers.
    pub agents: Agents,
    /// The fleet-wide circuit breakers.
    pub breakers: Breakers,
    /// The fleet-wide rate limits.
    pub limiter: RateLimiter,
    /// Settings.
    pub settings: EngineSettings,
}

/// Runs steps. One per worker process, shared by all in-flight steps.
pub struct Engine {
    store: Arc<dyn SessionStore>,
    publisher: Arc<dyn StepPublisher>,
    llm: ModelClients,
    agents: Agents,
    breakers: Breakers,
    limiter: RateLimiter,
    settings: EngineSettings,
}

impl Engine {
    /// An engine over these parts.
    pub fn new(p: EngineParts) -> Self {
        Self {
            store: p.store,
            publisher: p.publisher,
            llm: p.llm,
            agents: p.agents,
            breakers: p.breakers,
            limiter: p.limiter,
            settings: p.settings,
        }
    }

    /// Handles one delivery of the step queue of `pool`.
    pub async fn handle(&self, body: &[u8], pool: &str) -> Disposition {
        let msg = match StepMessage::parse(body) {
            Ok(m) => m,
            Err(e) => return self.dead_letter(body, "malformed", &e.to_string()).await,
        };
        let span = info_span!("step", otel.kind = "consumer", session = %msg.session_id, step = msg.step, attempt = msg.attempt);
        crate::telemetry::otel::adopt(&span, &msg.session_id);
        self.handle_step(msg, pool).instrument(span).await
    }

    async fn handle_step(&self, msg: StepMessage, pool: &str) -> Disposition {
        let token = format!("{}|{}|{}", msg.step, self.settings.worker_id, ulid::Ulid::new());
        let lease_ms = self.settings.lease.as_millis() as u64;
        let claim = match self.store.claim(&msg, &token, lease_ms, now_ms()).await {
            Ok(c) => c,
            Err(e) => return self.later(&msg, pool, Duration::from_secs(1), &e.to_string()).await,
        };
        match claim {
            Claim::Run(state) => self.run_leased(msg, pool, &token, *state).await,
            Claim::Missing => self.dead_letter(&body_of(&msg), "unknown_session", "no such session").await,
            Claim::Future { current } => {
                let why = format!("step {} is ahead of the session (at {current})", msg.step);
                self.dead_letter(&body_of(&msg), "future_step", &why).await
            }
            Claim::Busy => {
                metric::step_handled("busy");
                self.later(&msg, pool, Duration::from_secs(1), "another worker holds the lease").await
            }
            Claim::Republish { current, agent } => self.republish(&msg.session_id, current, &agent, pool).await,
            Claim::Cancelled(meta) => {
                self.cancelled(&msg, &meta).await;
                Disposition::Ack
            }
            Claim::Terminal(_) | Claim::Paused(_) | Claim::Stale => {
                metric::step_handled("stale");
                Disposition::Ack
            }
        }
    }

    async fn run_leased(&self, msg: StepMessage, pool: &str, token: &str, state: SessionState) -> Disposition {
        let stop = CancellationToken::new();
        let renewal = tokio::spawn(renew_lease(
            self.store.clone(),
            msg.session_id.clone(),
            token.to_owned(),
            self.settings.lease,
            stop.clone(),
        ));
        let started = std::time::Instant::now();
        let timings = Timings::default();
        let outcome = self.run(&msg, state, &timings).await;
        let total = started.elapsed();
        metric::step_duration(total, total.saturating_sub(timings.waited()));
        stop.cancel();
        let _ = renewal.await;
        match outcome {
            Ok(After::Publish(next)) => self.publish_next(&msg, pool, token, next).await,
            Ok(After::Nothing) => {
                self.release(&msg.session_id, token, 0).await;
                metric::step_handled("done");
                Disposition::Ack
            }
            Ok(After::Postpone(after, why)) => {
                self.release(&msg.session_id, token, 0).await;
                metric::step_handled("postponed");
                self.later(&msg, pool, after, why).await
            }
            Err(StepError::Retry { after, reason }) => {
                self.release(&msg.session_id, token, 0).await;
                metric::retry(reason);
                let retry = StepMessage { attempt: msg.attempt + 1, ..msg };
                self.later(&retry, pool, after, reason).await
            }
            Err(StepError::Unknown(e)) => {
                self.release(&msg.session_id, token, 0).await;
                self.later(&msg, pool, Duration::from_secs(1), &e.to_string()).await
            }
        }
    }

    async fn run(&self, msg: &StepMessage, state: SessionState, timings: &Timings) -> Result<After, StepError> {
        let Some(agent) = self.agents.get(state.meta.agent.as_str()).cloned() else {
            let why = format!("agent `{}` is not configured on this worker", state.meta.agent);
            self.end(msg, &state.meta, state.meta.phase, SessionStatus::Failed, why).await?;
            return Ok(After::Nothing);
        };
        let step = StepCtx { engine: self, agent: &agent, msg, meta: state.meta.clone(), timings };
        match state.meta.phase {
            Phase::Llm => step.model_phase(state).await,
            Phase::Tools => step.tool_phase(state).await,
            Phase::Done => Ok(After::Nothing),
        }
    }

    async fn end(
        &self,
        msg: &StepMessage,
        meta: &crate::store::Meta,
        phase: Phase,
        status: SessionStatus,
        error: String,
    ) -> Result<bool, StepError> {
        let trace = TraceRecord {
            ts_ms: now_ms(),
            agent_id: meta.agent.as_str(),
            session_id: msg.session_id.as_str(),
            step: msg.step,
            action: if status == SessionStatus::BudgetExhausted { "budget" } else { "error" },
            error: Some(error.clone()),
            worker: &self.settings.worker_id,
            ..Default::default()
        }
        .emit();
        let end = StepEnd { status, result: String::new(), error, escalation: String::new(), trace };
        let applied = self.store.end_step(&msg.session_id, msg.step, phase, &end, now_ms()).await?;
        if applied {
            self.ended(&msg.session_id, meta, status, &end.error).await;
        }
        Ok(applied)
    }

    /// A cancel took effect at this step boundary: index, metric and `session.cancelled`.
    async fn cancelled(&self, msg: &StepMessage, meta: &crate::store::Meta) {
        self.ended(&msg.session_id, meta, SessionStatus::Cancelled, "").await;
        let event = lifecycle_event(
            meta,
            &msg.session_id,
            msg.step,
            "session.cancelled",
            "cancelled by request",
            serde_json::json!({}),
        );
        if let Err(e) = self.publisher.publish_event("session.cancelled", &event).await {
            warn!(error = %e, "publishing session.cancelled failed");
        }
    }

    /// Counts a session that ended or paused; takes an ended one out of the live index and writes
    /// its session span.
    async fn ended(&self, id: &SessionId, meta: &crate::store::Meta, status: SessionStatus, error: &str) {
        crate::telemetry::session_ended(id, meta, status, error);
        if status.is_terminal() {
            if let Err(e) = self.store.deactivate(id).await {
                warn!(error = %e, "removing the session from the live index failed; the janitor will skip it");
            }
            if let Err(e) = self.store.unwait(id).await {
                warn!(error = %e, "removing the session from the waiting index failed");
            }
        }
    }

    async fn publish_next(&self, msg: &StepMessage, pool: &str, token: &str, next: u32) -> Disposition {
        let next_msg = StepMessage { session_id: msg.session_id.clone(), step: next, attempt: 0 };
        let pool_name = Name::parse(pool).unwrap_or_else(|_| self.fallback_pool());
        match self.publisher.publish_step(&pool_name, &next_msg, None).await {
            Ok(()) => {
                self.release(&msg.session_id, token, next).await;
                metric::step_handled("advanced");
                Disposition::Ack
            }
            Err(e) => {
                warn!(error = %e, "publishing the next step failed; the redelivery will publish it");
                self.release(&msg.session_id, token, 0).await;
                Disposition::Requeue
            }
        }
    }

    async fn republish(&self, id: &SessionId, current: u32, agent: &Name, routed: &str) -> Disposition {
        let pool = match self.agents.get(agent.as_str()) {
            Some(a) => a.pool.clone(),
            None => Name::parse(routed).unwrap_or_else(|_| self.fallback_pool()),
        };
        let msg = StepMessage { session_id: id.clone(), step: current, attempt: 0 };
        match self.publisher.publish_step(&pool, &msg, None).await {
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
    async fn later(&self, msg: &StepMessage, pool: &str, after: Duration, why: &str) -> Disposition {
        warn!(reason = why, after_ms = after.as_millis() as u64, "step postponed");
        let pool = Name::parse(pool).unwrap_or_else(|_| self.fallback_pool());
        match self.publisher.publish_step(&pool, msg, Some(after)).await {
            Ok(()) => Disposition::Ack,
            Err(e) => {
                warn!(error = %e, "could not postpone the step; requeueing it");
                Disposition::Requeue
            }
        }
    }

    async fn dead_letter(&self, body: &[u8], reason: &'static str, detail: &str) -> Disposition {
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

    async fn release(&self, id: &SessionId, token: &str, published: u32) {
        if let Err(e) = self.store.release(id, token, published).await {
            warn!(error = %e, "releasing the lease failed; it will expire");
        }
    }

    fn fallback_pool(&self) -> Name {
        self.agents
            .pools()
            .into_iter()
            .next()
            .unwrap_or_else(|| Name::parse("default").unwrap_or_else(|_| unreachable!()))
    }
}

fn body_of(msg: &StepMessage) -> Vec<u8> {
    serde_json::to_vec(msg).unwrap_or_default()
}

async fn renew_lease(
    store: Arc<dyn SessionStore>,
    id: SessionId,
    token: String,
    lease: Duration,
    stop: CancellationToken,
) {
    let every = lease / 3;
    let lease_ms = lease.as_millis() as u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match store.renew(&id, &token, lease_ms).await {
            Ok(true) => {}
            Ok(false) => {
                warn!(session = %id, "lease lost; the fencing will reject this worker's late writes");
                return;
            }
            Err(e) => warn!(session = %id, error = %e, "lease renewal failed"),
        }
    }
}

/// One step of one session, with its agent.
struct StepCtx<'a> {
    engine: &'a Engine,
    agent: &'a Agent,
    msg: &'a StepMessage,
    /// The session's meta as the claim loaded it.
    meta: crate::store::Meta,
    /// Time spent waiting on the model and the tools, to tell the orchestration overhead apart.
    timings: &'a Timings,
}

/// Time a step spent outside the worker (model and tool calls), in microseconds.
#[derive(Default)]
struct Timings(std::sync::atomic::AtomicU64);

impl Timings {
    fn add(&self, d: Duration) {
        self.0.fetch_add(d.as_micros() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn waited(&self) -> Duration {
        Duration::from_micros(self.0.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl StepCtx<'_> {
    fn id(&self) -> &SessionId {
        &self.msg.session_id
    }

    fn trace(&self, action: &'static str) -> TraceRecord<'_> {
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

    async fn pause_for_human(&self, escalation: serde_json::Value) -> Result<After, StepError> {
        let trace = TraceRecord {
            tool_name: Some(crate::config::ESCALATE_TO_HUMAN),
            input_summary: crate::telemetry::summary_of(&escalation.to_string(), 200),
            success: true,
            ..self.trace("escalation")
        }
        .emit();
        let end = StepEnd {
            status: SessionStatus::AwaitingHuman,
            result: String::new(),
            error: String::new(),
            escalation: escalation.to_string(),
            trace,
        };
        if self.engine.store.end_step(self.id(), self.msg.step, Phase::Tools, &end, now_ms()).await? {
            let summary = escalation["input"]["reason"].as_str().unwrap_or("the agent asked for a human").to_owned();
            self.finished(SessionStatus::AwaitingHuman, &summary, escalation).await;
        }
        Ok(After::Nothing)
    }

    /// Publishes a lifecycle event about this session; a failure is logged, never fatal.
    async fn event(&self, kind: &str, summary: &str, detail: serde_json::Value) {
        let event = lifecycle_event(&self.meta, self.id(), self.msg.step, kind, summary, detail);
        if let Err(e) = self.engine.publisher.publish_event(kind, &event).await {
            warn!(error = %e, kind, "publishing an event failed");
        }
    }

    /// A session this step ended or paused: metrics, the live and waiting indexes, and its event.
    async fn finished(&self, status: SessionStatus, summary: &str, detail: serde_json::Value) {
        self.engine.ended(self.id(), &self.meta, status, summary).await;
        if matches!(status, SessionStatus::AwaitingHuman | SessionStatus::AwaitingApproval) {
            let kind = match detail["kind"].as_str() {
                Some("approval") => "approval",
                Some("model_failure") => "model_failure",
                _ => "human",
            };
            metric::escalation(self.agent.name.as_str(), kind);
            let deadline = now_ms() + self.agent.wait_deadline_s(status) * 1000;
            if let Err(e) = self.engine.store.wait_until(self.id(), deadline).await {
                warn!(error = %e, "indexing the wait failed; its deadline will not be enforced");
            }
        }
        if let Some(kind) = event_kind(status) {
            self.event(kind, summary, detail).await;
        }
    }

    /// Ends or pauses the session from this step; `finished` runs when the change applied.
    async fn end(&self, phase: Phase, status: SessionStatus, why: String) -> Result<After, StepError> {
        if self.engine.end(self.msg, &self.meta, phase, status, why.clone()).await? {
            self.finished(status, &why, serde_json::json!({ "reason": why })).await;
        }
        Ok(After::Nothing)
    }

    async fn fail_tools(&self, why: String) -> Result<After, StepError> {
        self.end(Phase::Tools, SessionStatus::Failed, why).await
    }
}

/// The state gauge value after a breaker transition: 2 open, 0 closed.
fn transition_state(t: crate::breaker::Transition) -> f64 {
    match t {
        crate::breaker::Transition::Closed => 0.0,
        _ => 2.0,
    }
}

/// The event published when a step leaves a session in `status`; budget exhaustion has its own.
fn event_kind(status: SessionStatus) -> Option<&'static str> {
    match status {
        SessionStatus::Completed => Some("session.completed"),
        SessionStatus::Failed => Some("session.failed"),
        SessionStatus::Cancelled => Some("session.cancelled"),
        SessionStatus::AwaitingHuman => Some("session.escalated"),
        SessionStatus::AwaitingApproval => Some("session.awaiting_approval"),
        SessionStatus::BudgetExhausted | SessionStatus::Paused | SessionStatus::Queued | SessionStatus::Running => None,
    }
}

/// A lifecycle event: the session, its agent, tenant and metadata, and a one-line summary.
pub fn lifecycle_event(
    meta: &crate::store::Meta,
    id: &SessionId,
    step: u32,
    kind: &str,
    summary: &str,
    detail: serde_json::Value,
) -> serde_json::Value {
    let metadata: serde_json::Value = serde_json::from_str(&meta.metadata).unwrap_or_default();
    serde_json::json!({
        "type": kind,
        "session_id": id,
        "agent": meta.agent,
        "tenant": meta.tenant,
        "metadata": metadata,
        "step": step,
        "summary": crate::telemetry::summarize(summary, 500),
        "detail": detail,
        "at_ms": now_ms(),
    })
}

fn last_tool_uses(messages: &[String]) -> Result<Vec<ToolUse>, String> {
    let last = messages.last().ok_or("the conversation is empty")?;
    let content = llm::stored_content(last).map_err(|e| format!("the last message is unreadable: {e}"))?;
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
