//! The session store: a session's state in Redis (DESIGN §2), behind a small trait.
//!
//! Every write that moves a session forward is one Lua script fenced on `step` and `phase`, so a
//! worker that lost its lease, or a duplicate message, can never apply a step twice. Messages are
//! appended, never rewritten: a step's write cost does not grow with the conversation.

mod daily;
pub mod durability;
mod memory;
mod redis;

use std::collections::HashMap;

use async_trait::async_trait;
use thiserror::Error;

use crate::budget::{Bill, Limits, Reservation};
use crate::domain::{Name, Phase, SessionId, SessionStatus, StepMessage, TenantId};
use crate::llm::{ToolOutcome, Usage};

pub use self::memory::{MemoryStore, Snapshot};
pub use self::redis::{RedisStore, pulse_key, trace_key};

/// A store operation that failed.
#[derive(Debug, Error)]
pub enum StoreError {
    /// Redis did not answer or answered with an error. For a write the outcome is **unknown**: the
    /// script may have run. Re-read and let the fencing decide; never ack on it.
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// The store did not answer (an in-process store's injected fault): for a write, as unknown as
    /// a Redis error.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data that does not parse (a bug or a foreign writer).
    #[error("corrupt session data: {0}")]
    Corrupt(String),
    /// A fenced write was refused: this worker no longer holds the session's lease (it was paused
    /// past it, or could not renew it). Nothing was written; the step belongs to another delivery.
    #[error("the session's lease is no longer this worker's")]
    LeaseLost,
}

/// What every step write is fenced on: the session, the step, and the lease token of the worker
/// that claimed it. A script refuses the write unless the token still holds the lease.
#[derive(Debug, Clone, Copy)]
pub struct Fence<'a> {
    /// The session.
    pub id: &'a SessionId,
    /// The step the worker claimed.
    pub step: u32,
    /// The lease token the claim took.
    pub token: &'a str,
}

/// How many times a step (in its current phase) has been tried, as the session records it. The
/// count lives in the session, so a forged or corrupt message cannot end retries early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// The step.
    pub step: u32,
    /// Tries so far.
    pub count: u32,
}

impl std::fmt::Display for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.step, self.count)
    }
}

impl Attempt {
    /// Reads the stored `<step>:<count>`; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        let (step, count) = s.split_once(':')?;
        Some(Self { step: step.parse().ok()?, count: count.parse().ok()? })
    }
}

/// A session's `meta` hash, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Meta {
    /// The agent running the session.
    pub agent: Name,
    /// The tenant that asked for it, if any.
    pub tenant: Option<TenantId>,
    /// Lifecycle status.
    pub status: SessionStatus,
    /// The current step, from 1.
    pub step: u32,
    /// Where the current step is.
    pub phase: Phase,
    /// The highest step whose message is known to be in the broker.
    pub published: u32,
    /// The session's budget limits.
    pub limits: Limits,
    /// The limit whose alert threshold was crossed, once it was.
    pub alerted: Option<String>,
    /// Creation time, Unix ms.
    pub created_ms: u64,
    /// Last change, Unix ms.
    pub updated_ms: u64,
    /// The final answer, once completed.
    pub result: Option<String>,
    /// Why it failed or stopped.
    pub error: Option<String>,
    /// The pending escalation (JSON), while awaiting a human.
    pub escalation: Option<String>,
    /// Caller-supplied metadata (JSON object text).
    pub metadata: String,
    /// Tool calls a person approved, by `tool_use_id`.
    pub approved: Vec<String>,
    /// The URL this session's events are POSTed to, if any.
    pub callback_url: Option<String>,
    /// True once a cancel was asked for.
    pub cancel_requested: bool,
    /// Tries of the current step in its current phase (0 for the first).
    pub attempt: u32,
    /// The session and step it was forked from, if it was.
    pub origin: Option<Origin>,
}

/// Where a forked session came from: its conversation is `session`'s as `step` began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The session forked.
    pub session: SessionId,
    /// The step it was forked from, from 1.
    pub step: u32,
}

impl Origin {
    /// As stored in the meta hash: `<session id>/<step>`.
    pub fn text(&self) -> String {
        format!("{}/{}", self.session, self.step)
    }

    /// [`Origin::text`] read back.
    pub fn parse(text: &str) -> Option<Self> {
        let (session, step) = text.split_once('/')?;
        Some(Self { session: SessionId::parse(session).ok()?, step: step.parse().ok()? })
    }
}

/// A new session to store.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// Its id.
    pub id: SessionId,
    /// The agent.
    pub agent: Name,
    /// The tenant, if any.
    pub tenant: Option<TenantId>,
    /// The conversation it starts with, as stored: the first user message
    /// ([`crate::llm::user_message`] of a text, or [`crate::llm::user_blocks`] of content blocks),
    /// or a forked session's messages up to the step it was forked from, ending with a user turn.
    pub messages: Vec<String>,
    /// The session and step it was forked from, if it was.
    pub origin: Option<Origin>,
    /// Caller metadata, a JSON object.
    pub metadata: serde_json::Value,
    /// The budget limits.
    pub limits: Limits,
    /// Where this session's events are POSTed, if anywhere.
    pub callback_url: Option<String>,
    /// The worst case of the first step's call, as its worker will plan it (its claim holds it);
    /// `None` when not known here (the worker then reserves it itself).
    pub first_call: Option<Reservation>,
}

/// What a step needs: the session as the step found it.
#[derive(Debug, Clone)]
pub struct SessionState {
    /// The meta hash.
    pub meta: Meta,
    /// The conversation, one JSON message per element.
    pub messages: Vec<String>,
    /// Tool results already recorded, by `tool_use_id`.
    pub ledger: HashMap<String, ToolOutcome>,
    /// Usage so far, open reservations of dead workers included.
    pub usage: UsageTotals,
    /// The worst case of this step's model call as the previous checkpoint planned it, which the
    /// claim now holds under the lease token; `None` when nothing was planned for this step.
    pub planned: Option<Reservation>,
    /// The conversation's size in bytes, kept when the messages themselves are let go.
    pub conversation_bytes: usize,
}

impl SessionState {
    /// The state as loaded: `messages` and their size.
    pub fn loaded(
        meta: Meta,
        messages: Vec<String>,
        ledger: HashMap<String, ToolOutcome>,
        usage: UsageTotals,
        planned: Option<Reservation>,
    ) -> Self {
        let conversation_bytes = messages.iter().map(String::len).sum();
        Self { meta, messages, ledger, usage, planned, conversation_bytes }
    }

    /// Appends a message to the conversation (as its checkpoint did in the store).
    pub fn append(&mut self, message: String) {
        self.conversation_bytes += message.len();
        self.messages.push(message);
    }
}

/// What a step message means, decided atomically with taking the lease.
#[derive(Debug)]
pub enum Claim {
    /// No such session.
    Missing,
    /// The session has ended.
    Terminal(SessionStatus),
    /// The session waits for a human; the resume publishes its own message.
    Paused(SessionStatus),
    /// The message is ahead of the session: it cannot have been published by the protocol.
    Future {
        /// The session's step.
        current: u32,
    },
    /// Another live worker holds the lease.
    Busy,
    /// A duplicate of a step already done, whose successor is in the broker.
    Stale,
    /// A step already done whose successor may never have been published: publish `current`.
    Republish {
        /// The step to publish.
        current: u32,
        /// The session's agent (its pool is the routing key).
        agent: Name,
    },
    /// The lease is ours: run the step.
    Run(Box<SessionState>),
    /// A cancel asked for during the last step took effect now; the session is `cancelled`.
    Cancelled(Box<Meta>),
}

/// What a cancel request did.
#[derive(Debug, Clone, PartialEq)]
pub enum CancelOutcome {
    /// The session was not running: it is cancelled now.
    Cancelled,
    /// A step is running: the session stops at the next step boundary.
    Requested,
    /// The session had already ended, with this status.
    Ended(SessionStatus),
    /// No such session.
    Missing,
}

/// What a resume (reply, approve, reject) did.
#[derive(Debug, Clone, PartialEq)]
pub enum ResumeOutcome {
    /// The session runs again from `step`; publish it.
    Resumed {
        /// The step to publish.
        step: u32,
    },
    /// The session was not in the expected status (it has this one).
    NotWaiting(String),
}

/// Which sessions to list.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only this status.
    pub status: Option<SessionStatus>,
    /// Only this agent.
    pub agent: Option<String>,
    /// Only this tenant.
    pub tenant: Option<TenantId>,
    /// Created at or after (Unix ms).
    pub created_after_ms: Option<u64>,
    /// Created before (Unix ms).
    pub created_before_ms: Option<u64>,
}

/// How a model call ends the model phase.
#[derive(Debug, Clone)]
pub enum ModelOutcome {
    /// Run the tools it asked for next.
    Tools,
    /// Go on to the next step's model call (after `max_tokens` or `pause_turn`).
    Next,
    /// End the session.
    Done {
        /// The final status.
        status: SessionStatus,
        /// The result text.
        result: String,
        /// The reason, for a status other than completed.
        error: String,
    },
}

/// The model phase's checkpoint.
#[derive(Debug, Clone)]
pub struct ModelCommit {
    /// Messages to append: the assistant message, and maybe a user message before or after it.
    pub messages: Vec<String>,
    /// What comes next.
    pub outcome: ModelOutcome,
    /// For [`ModelOutcome::Next`]: the worst case of the next step's call, which its claim holds.
    pub next: Option<Reservation>,
}

/// Whether a fenced checkpoint applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpoint {
    /// It applied.
    Applied,
    /// The session had moved past this step or phase: nothing was written.
    Moved,
    /// This worker no longer holds the lease: nothing was written.
    LeaseLost,
}

impl Checkpoint {
    /// True when applied, false when the session moved on, [`StoreError::LeaseLost`] when fenced out.
    pub fn applied(self) -> Result<bool, StoreError> {
        match self {
            Self::Applied => Ok(true),
            Self::Moved => Ok(false),
            Self::LeaseLost => Err(StoreError::LeaseLost),
        }
    }
}

/// What the model checkpoint did: the call's reconciliation, then the fenced checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct ModelCheckpoint {
    /// The usage totals after the call; `None` when it had already been counted (another worker's
    /// claim took over after this one lost its lease, and counted the reservation already).
    pub totals: Option<UsageTotals>,
    /// Whether the reply was checkpointed.
    pub checkpoint: Checkpoint,
}

/// One tool call's result, for the ledger, with its trace record.
#[derive(Debug, Clone)]
pub struct ToolRecord {
    /// The `tool_use_id`.
    pub tool_use_id: String,
    /// The result.
    pub outcome: ToolOutcome,
    /// The trace record (JSON).
    pub trace: String,
}

/// The tool phase's checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct ToolCommit<'a> {
    /// The user message with every `tool_result`, in `tool_use` order.
    pub user_message: &'a str,
    /// Results not yet in the ledger: the checkpoint records them (the first write wins).
    pub results: &'a [ToolRecord],
    /// The worst case of the next step's call, which its claim holds.
    pub next: Option<Reservation>,
}

/// A reconciled call: its usage and cost, and its trace record.
#[derive(Debug, Clone)]
pub struct CallUsage<'a> {
    /// Tokens.
    pub usage: Usage,
    /// Cost, micro-USD.
    pub cost_micro_usd: u64,
    /// The cost by kind of token, summing to `cost_micro_usd`; `None` for a call counted at its
    /// worst case (its usage is unknown).
    pub bill: Option<Bill>,
    /// The trace record (JSON).
    pub trace: &'a str,
}

impl CallUsage<'_> {
    /// The cost as the usage scripts take it: `total`, or `total:input:output:cache write:cache
    /// read` with the bill.
    pub(crate) fn cost_arg(&self) -> String {
        match self.bill {
            Some(b) => format!("{}:{}:{}:{}:{}", self.cost_micro_usd, b.input, b.output, b.cache_write, b.cache_read),
            None => self.cost_micro_usd.to_string(),
        }
    }
}

/// The UTC day of `now_ms`, as days since the Unix epoch: the day the daily counters count.
pub fn utc_day(now_ms: u64) -> u64 {
    now_ms / 86_400_000
}

/// The fleet-wide daily counters a call is reserved against.
#[derive(Debug, Clone)]
pub struct DailyCaps<'a> {
    /// The agent.
    pub agent: &'a str,
    /// The tenant, if any.
    pub tenant: Option<&'a TenantId>,
    /// The UTC day, as days since the Unix epoch.
    pub day: u64,
    /// The agent's cap, micro-USD.
    pub agent_cap: Option<u64>,
    /// The tenant's cap, micro-USD.
    pub tenant_cap: Option<u64>,
}

impl DailyCaps<'_> {
    /// The tenant as it appears in the daily counters' keys (empty for none).
    pub fn tenant_key(&self) -> &str {
        self.tenant.map_or("", TenantId::as_str)
    }
}

/// Whether a daily reservation was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DailyVerdict {
    /// Reserved.
    Reserved,
    /// Refused by a cap.
    Refused {
        /// The cap in the way.
        cap: DailyCap,
        /// What is spent would leave room: the cap is only held by reservations (calls in flight,
        /// workers' allowances), which give it back within seconds unless their worker died.
        held: bool,
    },
}

/// One of the two daily caps of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DailyCap {
    /// The agent's.
    Agent,
    /// The tenant's.
    Tenant,
}

/// A session as the API shows it.
#[derive(Debug, Clone)]
pub struct SessionView {
    /// The meta hash.
    pub meta: Meta,
    /// Usage counters.
    pub usage: UsageTotals,
    /// The conversation.
    pub messages: Vec<String>,
}

/// A session's usage counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct UsageTotals {
    /// Uncached input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Cache-write input tokens.
    pub cache_creation_input_tokens: u64,
    /// Cache-read input tokens.
    pub cache_read_input_tokens: u64,
    /// Cost in micro-USD.
    pub cost_micro_usd: u64,
    /// Of the cost, that of reconciled calls by kind of token. What the parts do not cover is the
    /// worst case of calls whose usage is unknown ([`UsageTotals::unreconciled_calls`]).
    pub cost_parts: Bill,
    /// Model calls made (including ones whose checkpoint was lost).
    pub model_calls: u64,
    /// Calls whose worker died before their usage was known: counted at their reserved worst case.
    pub unreconciled_calls: u64,
    /// Model calls the API answered with an error (not billed; retried or fatal).
    pub model_errors: u64,
}

impl UsageTotals {
    /// Every token: input, cache reads and writes, and output.
    pub fn total_tokens(&self) -> u64 {
        self.input_tokens + self.output_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens
    }

    /// What the session has spent before step `step`, for planning its call.
    pub fn spent_before(&self, step: u32) -> crate::budget::Spent {
        crate::budget::Spent {
            steps: step.saturating_sub(1),
            tokens: self.total_tokens(),
            cost: crate::domain::MicroUsd::new(self.cost_micro_usd),
        }
    }

    /// Counts one reconciled call, as the model checkpoint does.
    pub fn add_call(&mut self, call: &CallUsage<'_>) {
        let usage = &call.usage;
        self.input_tokens += usage.input_tokens;
        self.output_tokens += usage.output_tokens;
        self.cache_creation_input_tokens += usage.cache_creation_input_tokens;
        self.cache_read_input_tokens += usage.cache_read_input_tokens;
        self.cost_micro_usd += call.cost_micro_usd;
        if let Some(b) = call.bill {
            let p = &mut self.cost_parts;
            (p.input, p.output) = (p.input + b.input, p.output + b.output);
            (p.cache_write, p.cache_read) = (p.cache_write + b.cache_write, p.cache_read + b.cache_read);
        }
        self.model_calls += 1;
    }
}

/// What a worker needs to run a step: claim and lease, the budget's reservations, the fenced
/// checkpoints, and the indexes a step's ending touches. Redis in production ([`RedisStore`]); in
/// memory ([`MemoryStore`]) for fast tests of the engine.
#[async_trait]
pub trait StepStore: Send + Sync {
    /// Decides what `msg` means and, when it is current, takes the lease with `token` and loads.
    async fn claim(&self, msg: &StepMessage, token: &str, lease_ms: u64, now_ms: u64) -> Result<Claim, StoreError>;
    /// Extends our lease; false when it is no longer ours.
    async fn renew(&self, id: &SessionId, token: &str, lease_ms: u64) -> Result<bool, StoreError>;
    /// Releases our lease and marks `published` (0 for none) as in the broker. A step that will be
    /// tried again records its next `attempt` with it, only while the lease is still ours. With
    /// `unused_reservation`, the step made no model call: the reservation held under `token` (by the
    /// claim or by [`StepStore::reserve`]) is dropped.
    async fn release(
        &self,
        id: &SessionId,
        token: &str,
        published: u32,
        retry: Option<Attempt>,
        unused_reservation: bool,
    ) -> Result<(), StoreError>;
    /// Marks `step` as in the broker (after its publish was confirmed), without a lease.
    async fn mark_published(&self, id: &SessionId, step: u32) -> Result<(), StoreError> {
        self.release(id, "", step, None, false).await
    }
    /// Holds a call's worst case before it is made, replacing any held under the same id;
    /// [`StoreError::LeaseLost`] when the lease is not ours (and the call must not be made).
    async fn reserve(&self, at: &Fence<'_>, reservation_id: &str, r: &Reservation) -> Result<(), StoreError>;
    /// Replaces the reservation with the call's actual usage, once, also when another worker's claim
    /// counted it at its worst case meanwhile (this worker had lost its lease); the new totals, or
    /// `None` when the call was already counted. Not fenced: the call was billed.
    async fn reconcile(
        &self,
        id: &SessionId,
        reservation_id: &str,
        call: &CallUsage<'_>,
    ) -> Result<Option<UsageTotals>, StoreError>;
    /// Drops the reservation of a call that was certainly not billed.
    async fn cancel_reservation(&self, id: &SessionId, reservation_id: &str, trace: &str) -> Result<(), StoreError>;
    /// Marks the budget alert as sent; true only for the first caller.
    async fn mark_alert(&self, at: &Fence<'_>, limit: &str) -> Result<bool, StoreError>;
    /// Reserves `amount` micro-USD against the daily caps, atomically across the fleet.
    async fn daily_reserve(&self, caps: &DailyCaps<'_>, amount: u64) -> Result<DailyVerdict, StoreError>;
    /// Settles a daily reservation of `reserved` micro-USD by what was `spent` (0 for a call that
    /// was not billed). The store may write it later, with other corrections ([`StepStore::flush`]
    /// writes everything held).
    async fn daily_settle(&self, caps: &DailyCaps<'_>, reserved: u64, spent: u64) -> Result<(), StoreError>;
    /// Writes what the store holds in-process (the daily counters' unspent allowances and pending
    /// corrections); at shutdown, and wherever a test reads a counter.
    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// The model phase's checkpoint, in one write: reconciles the call's reservation (held under
    /// the lease token) with `call`'s actual usage (not fenced, like [`StepStore::reconcile`]), then
    /// appends the reply (fenced).
    async fn commit_model(
        &self,
        at: &Fence<'_>,
        call: &CallUsage<'_>,
        commit: &ModelCommit,
        now_ms: u64,
    ) -> Result<ModelCheckpoint, StoreError>;
    /// Records a tool's outcome in the ledger (first write wins) with its trace record.
    async fn record_tool(
        &self,
        at: &Fence<'_>,
        tool_use_id: &str,
        outcome: &ToolOutcome,
        trace: &str,
    ) -> Result<(), StoreError>;
    /// The tool phase's checkpoint, with the results not yet in the ledger; false when the step or
    /// phase moved on.
    async fn commit_tools(&self, at: &Fence<'_>, commit: &ToolCommit<'_>, now_ms: u64) -> Result<bool, StoreError>;
    /// Ends or pauses the session at this step and `phase`; false when the step or phase moved on.
    async fn end_step(&self, at: &Fence<'_>, phase: Phase, end: &StepEnd, now_ms: u64) -> Result<bool, StoreError>;
    /// Moves the session into the listing indexes of its status; a no-op when they are current. An
    /// ended session also leaves the live and waiting indexes, and every key of it expires after the
    /// retention. Called after each status change; the janitor calls it again for a session whose
    /// call was lost (it stays in the live index until this succeeded).
    async fn reindex(&self, id: &SessionId, now_ms: u64) -> Result<(), StoreError>;
    /// Takes an ended session out of the index of live sessions.
    async fn deactivate(&self, id: &SessionId) -> Result<(), StoreError>;
    /// Indexes a waiting session by its deadline (for `/v1/escalations` and the janitor).
    async fn wait_until(&self, id: &SessionId, deadline_ms: u64) -> Result<(), StoreError>;
    /// Takes a session out of the waiting index.
    async fn unwait(&self, id: &SessionId) -> Result<(), StoreError>;
}

/// What the dispatcher needs to administer sessions: create, show, list, resume, cancel, and the
/// janitor's indexes.
#[async_trait]
pub trait AdminStore: Send + Sync {
    /// Creates the session unless it exists; true when this call created it.
    async fn create(&self, new: &NewSession, now_ms: u64) -> Result<bool, StoreError>;
    /// Maps `key` (already scoped to its tenant) to `id` and the request's `fingerprint`, unless it
    /// maps to a session already; returns the session it maps to and whether the fingerprints match.
    async fn remember_idempotency_key(
        &self,
        key: &str,
        id: &SessionId,
        fingerprint: &str,
        ttl_s: u64,
    ) -> Result<(SessionId, bool), StoreError>;
    /// The daily spend of an agent and a tenant on `day`, micro-USD.
    async fn daily_spend(&self, agent: &str, tenant: &str, day: u64) -> Result<(u64, u64), StoreError>;
    /// The session for the API, or `None`.
    async fn view(&self, id: &SessionId) -> Result<Option<SessionView>, StoreError>;
    /// Checks the connection.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Puts the session in the index of live sessions (or refreshes its time there).
    async fn activate(&self, id: &SessionId, now_ms: u64) -> Result<(), StoreError>;
    /// Up to `limit` live sessions not touched in the index since `before_ms`, oldest first.
    async fn stalled(&self, before_ms: u64, limit: usize) -> Result<Vec<SessionId>, StoreError>;
    /// The session's meta hash, or `None`.
    async fn meta(&self, id: &SessionId) -> Result<Option<Meta>, StoreError>;
    /// The session's trace records (JSON), oldest first, at most `limit`.
    async fn trace(&self, id: &SessionId, limit: usize) -> Result<Vec<String>, StoreError>;
    /// Appends a trace record written outside a step (a person's decision).
    async fn append_trace(&self, id: &SessionId, record: &str) -> Result<(), StoreError>;
    /// Waiting sessions with their deadlines, soonest first; only those due by `due_by_ms` if given.
    async fn waiting(&self, due_by_ms: Option<u64>, limit: usize) -> Result<Vec<(SessionId, u64)>, StoreError>;
    /// Resumes a session waiting in `expected`: records `result` for `tool_use_id` (if any) and
    /// marks the call approved when `approve`.
    async fn resume(
        &self,
        id: &SessionId,
        expected: SessionStatus,
        tool_use_id: &str,
        result: Option<&ToolOutcome>,
        approve: bool,
        now_ms: u64,
    ) -> Result<ResumeOutcome, StoreError>;
    /// Cancels a session now, or at its next step boundary when a step is running.
    async fn cancel(&self, id: &SessionId, now_ms: u64) -> Result<CancelOutcome, StoreError>;
    /// Applies a wait's deadline if the session still waits in `expected`; true when applied.
    async fn expire_wait(
        &self,
        id: &SessionId,
        expected: SessionStatus,
        to: SessionStatus,
        error: &str,
        escalation: &str,
        now_ms: u64,
    ) -> Result<bool, StoreError>;
    /// Forgets up to `limit` sessions whose retention ended by `now_ms`: takes them out of every
    /// listing index and deletes any key of theirs still there. Then indexes up to `limit` sessions
    /// stored before the listing indexes existed. Returns how many sessions it handled.
    async fn purge_expired(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError>;
    /// Sessions newest first, filtered, after `cursor` (a `<created_ms>:<id>` from a previous page).
    /// Reads a bounded number of sessions per call: a page may be short, or even empty, with a
    /// cursor to go on.
    async fn list(
        &self,
        filter: &ListFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<(SessionId, Meta)>, Option<String>), StoreError>;

    /// The cost so far of each session (micro-USD, 0 for one that is gone), in order.
    async fn costs(&self, ids: &[SessionId]) -> Result<Vec<u64>, StoreError>;
}

/// Both halves: what the dispatcher holds (it also ends sessions, as a step does).
pub trait SessionStore: StepStore + AdminStore {}

impl<T: StepStore + AdminStore + ?Sized> SessionStore for T {}

/// How a step ends or pauses a session outside the model checkpoint.
#[derive(Debug, Clone)]
pub struct StepEnd {
    /// The new status.
    pub status: SessionStatus,
    /// The result text (terminal statuses).
    pub result: String,
    /// The reason.
    pub error: String,
    /// The escalation record (pauses).
    pub escalation: String,
    /// The trace record.
    pub trace: String,
}
