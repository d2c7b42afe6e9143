//! The step engine: one step of one session per message (DESIGN §3).
//!
//! [`Engine::handle`] reads as the step's order, each part a named function that returns what
//! comes next and never calls the next part itself:
//!
//! 1. **claim** (`claim.rs`): decide what the message means and take the session's lease, in one
//!    round trip;
//! 2. **model** (`model.rs`): plan the call against the budget, call the model, then one fenced
//!    checkpoint appends the reply and records usage;
//! 3. **tools** (`tools.rs`): run each `tool_use` not yet in the ledger, writing each result at
//!    once; then one fenced checkpoint appends all `tool_result`s and moves to the next step;
//! 4. **publish** the next step, wait for the broker's confirm, release the lease, and only then
//!    **ack** this one (`finish.rs`).
//!
//! A session that ends or pauses does so through one type ([`Ending`]) settled in one place
//! (`ending.rs`). A crash anywhere is a redelivery of the same step, which resumes from the stored
//! phase and ledger. An error whose outcome is unknown is never acked without a copy of the step in
//! the broker.

mod agents;
mod claim;
mod ctx;
mod ending;
mod finish;
mod model;
mod tools;

use std::sync::Arc;
use std::time::Duration;

use tracing::{Instrument, info_span};

pub use self::agents::{Agent, Agents, call_shape};
use self::claim::{Claimed, Lease};
use self::ctx::{StepCtx, Timings};
use crate::amqp::StepPublisher;
use crate::domain::{Name, Phase, StepMessage};
use crate::guard::Guard;
pub use crate::lifecycle::Ending;
use crate::llm::{ModelClients, ToolUse};
use crate::store::{SessionState, StepStore, StoreError};

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
    /// Run this step again later, through a delay tier, as try number `tried + 1`.
    Retry { after: Duration, reason: &'static str, tried: u32 },
    /// Redis failed: the outcome of the last write is unknown. Re-read later; the fencing decides.
    Unknown(StoreError),
    /// This worker no longer holds the session's lease: it stopped, and wrote nothing more.
    LeaseLost,
}

impl From<StoreError> for StepError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::LeaseLost => Self::LeaseLost,
            e => Self::Unknown(e),
        }
    }
}

/// What a phase leaves to do.
#[derive(Debug)]
enum Next {
    /// The model asked for these tools: run the tool phase on this state.
    Tools(Box<SessionState>, Vec<ToolUse>),
    /// The step is checkpointed: publish this one next.
    Publish(u32),
    /// Run this step again after a while (a daily cap, an open breaker, a rate limit), and why.
    Postpone(Duration, &'static str),
    /// Nothing: the session ended or paused, or this worker was fenced out.
    Nothing,
}

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
    /// Session state, as a step needs it.
    pub store: Arc<dyn StepStore>,
    /// Step messages and events.
    pub publisher: Arc<dyn StepPublisher>,
    /// The model clients.
    pub llm: ModelClients,
    /// The agents, tenants and providers.
    pub agents: Agents,
    /// Admission to the model providers and tools (breakers and rate limits).
    pub guard: Arc<dyn Guard>,
    /// Settings.
    pub settings: EngineSettings,
}

/// Runs steps. One per worker process, shared by all in-flight steps.
pub struct Engine {
    store: Arc<dyn StepStore>,
    publisher: Arc<dyn StepPublisher>,
    llm: ModelClients,
    agents: Agents,
    guard: Arc<dyn Guard>,
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
            guard: p.guard,
            settings: p.settings,
        }
    }

    /// Writes what the store holds in-process (the daily counters' allowances); at shutdown, once
    /// no step runs.
    pub async fn flush(&self) {
        if let Err(e) = self.store.flush().await {
            tracing::warn!(error = %e, "writing back the daily allowances failed; the caps stay stricter until the day ends");
        }
    }

    /// Handles one delivery of the step queue of `pool`. A body over
    /// [`MAX_STEP_MESSAGE_BYTES`](crate::amqp::MAX_STEP_MESSAGE_BYTES) is dead-lettered unread.
    pub async fn handle(&self, body: &[u8], pool: &Name) -> Disposition {
        if body.len() > crate::amqp::MAX_STEP_MESSAGE_BYTES {
            let limit = crate::amqp::MAX_STEP_MESSAGE_BYTES;
            let detail = format!("{} bytes; a step message is at most {limit} bytes", body.len());
            return self.dead_letter(body, "oversized", &detail).await;
        }
        let msg = match StepMessage::parse(body) {
            Ok(m) => m,
            Err(e) => return self.dead_letter(body, "malformed", &e.to_string()).await,
        };
        let span = info_span!("step", otel.kind = "consumer", session = %msg.session_id, step = msg.step, attempt = msg.attempt);
        crate::telemetry::otel::adopt(&span, &msg.session_id);
        self.step(msg, pool).instrument(span).await
    }

    /// One step, in its order: claim → model → checkpoint → tools → checkpoint → publish → ack.
    async fn step(&self, msg: StepMessage, pool: &Name) -> Disposition {
        let (token, state) = match self.claim(&msg, pool).await {
            Claimed::Run { token, state } => (token, state),
            Claimed::Settled(disposition) => return disposition,
        };
        // The tries so far are the session's count, never the message's.
        let msg = StepMessage { attempt: state.meta.attempt, ..msg };
        let hold = self.hold_lease(&msg, &token);
        let timings = Timings::default();
        let next = self.phases(&msg, *state, &timings, hold.lease()).await;
        timings.record();
        // Without a model call, the reservation the claim (or the plan) held is given back.
        let unused_reservation = !hold.lease().called();
        hold.stop().await;
        self.finish(&msg, pool, &token, next, unused_reservation).await
    }

    /// The model phase and its checkpoint, then the tool phase and its checkpoint, from wherever
    /// the stored phase says the step is.
    async fn phases(
        &self,
        msg: &StepMessage,
        state: SessionState,
        timings: &Timings,
        lease: &Lease,
    ) -> Result<Next, StepError> {
        let Some(agent) = self.agents.get(state.meta.agent.as_str()).cloned() else {
            let reason = format!("agent `{}` is not configured on this worker", state.meta.agent);
            let failed = Ending::Failed { reason, result: String::new() };
            return self.settle(msg, lease.token(), &state.meta, None, state.meta.phase, failed).await;
        };
        let step = StepCtx { engine: self, agent: &agent, msg, meta: state.meta.clone(), timings, lease };
        let (state, calls) = match state.meta.phase {
            Phase::Llm => match step.model_phase(state).await? {
                Next::Tools(state, calls) => (*state, Some(calls)),
                next => return Ok(next),
            },
            Phase::Tools => (state, None),
            Phase::Done => return Ok(Next::Nothing),
        };
        // Straight after a model call, the tool phase counts its own deferrals from zero: model
        // retries must not use them up.
        let fresh = StepMessage { attempt: 0, ..msg.clone() };
        let msg = if calls.is_some() { &fresh } else { msg };
        StepCtx { msg, ..step }.tool_phase(state, calls).await
    }
}
