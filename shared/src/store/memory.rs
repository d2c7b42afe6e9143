//! An in-memory [`StepStore`]: the same verdicts and fencing as the Redis scripts, in one process.
//!
//! It exists so the step engine's edge cases (a duplicate, a stale or future step, a lost lease,
//! every ending, a tool already in the ledger, a write whose outcome is unknown) can be tested in
//! milliseconds with no services. The Redis store stays the one the integration tests and the
//! fleet use. Each method mirrors its Lua script in `store/lua/`; keep them in step.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{
    Attempt, CallUsage, Checkpoint, Claim, DailyCap, DailyCaps, DailyVerdict, Fence, Meta, ModelCheckpoint,
    ModelCommit, ModelOutcome, NewSession, SessionState, StepEnd, StepStore, StoreError, ToolCommit, UsageTotals,
};
use crate::budget::Reservation;
use crate::domain::{Phase, SessionId, SessionStatus, StepMessage};
use crate::llm::ToolOutcome;

/// One session, as the Redis keys of its hash tag hold it.
#[derive(Debug, Clone)]
struct Session {
    meta: Meta,
    msgs: Vec<String>,
    ledger: HashMap<String, ToolOutcome>,
    usage: UsageTotals,
    resv: BTreeMap<String, Reservation>,
    /// Reservations a claim counted at their worst case (`o:<id>` in Redis).
    orphans: BTreeMap<String, Reservation>,
    lease: Option<(String, Instant)>,
    trace: Vec<String>,
    /// The worst case a checkpoint planned for the call of a later step (`resv_next`).
    planned: Option<(u32, Reservation)>,
}

#[derive(Debug, Default)]
struct State {
    sessions: HashMap<SessionId, Session>,
    active: HashMap<SessionId, u64>,
    waiting: HashMap<SessionId, u64>,
    /// Daily counters: spent and held (reserved by calls not settled).
    daily: HashMap<String, (u64, u64)>,
    /// Writes that will fail with an unknown outcome: by method name, whether the write applies.
    faults: Vec<(&'static str, bool)>,
}

/// Session state in one process's memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

/// A session's stored state, for tests to inspect.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The meta hash.
    pub meta: Meta,
    /// The conversation.
    pub messages: Vec<String>,
    /// The tool ledger.
    pub ledger: HashMap<String, ToolOutcome>,
    /// The usage counters.
    pub usage: UsageTotals,
    /// Open reservations.
    pub open_reservations: usize,
    /// The lease holder's token, if the lease is live.
    pub lease: Option<String>,
    /// Trace records, oldest first.
    pub trace: Vec<String>,
    /// Whether the session is in the live index.
    pub active: bool,
    /// Its wait deadline, if it waits for people.
    pub waiting_until: Option<u64>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates the session unless it exists; true when this call created it.
    pub fn create(&self, new: &NewSession, now_ms: u64) -> bool {
        let mut st = self.lock();
        if st.sessions.contains_key(&new.id) {
            return false;
        }
        let meta = Meta {
            agent: new.agent.clone(),
            tenant: new.tenant.clone(),
            status: SessionStatus::Queued,
            step: 1,
            phase: Phase::Llm,
            published: 0,
            limits: new.limits,
            alerted: None,
            created_ms: now_ms,
            updated_ms: now_ms,
            result: None,
            error: None,
            escalation: None,
            metadata: new.metadata.to_string(),
            approved: Vec::new(),
            callback_url: new.callback_url.clone(),
            cancel_requested: false,
            attempt: 0,
            origin: new.origin.clone(),
        };
        let session = Session {
            meta,
            msgs: new.messages.clone(),
            ledger: HashMap::new(),
            usage: UsageTotals::default(),
            resv: BTreeMap::new(),
            orphans: BTreeMap::new(),
            lease: None,
            trace: Vec::new(),
            planned: new.first_call.map(|r| (1, r)),
        };
        st.sessions.insert(new.id.clone(), session);
        st.active.insert(new.id.clone(), now_ms);
        true
    }

    /// The session's state, or `None`.
    pub fn snapshot(&self, id: &SessionId) -> Option<Snapshot> {
        let st = self.lock();
        let s = st.sessions.get(id)?;
        Some(Snapshot {
            meta: s.meta.clone(),
            messages: s.msgs.clone(),
            ledger: s.ledger.clone(),
            usage: s.usage,
            open_reservations: s.resv.len(),
            lease: s.lease.as_ref().filter(|(_, until)| *until > Instant::now()).map(|(t, _)| t.clone()),
            trace: s.trace.clone(),
            active: st.active.contains_key(id),
            waiting_until: st.waiting.get(id).copied(),
        })
    }

    /// Changes a session in place (a test's way to stage a state, e.g. a cancel request).
    pub fn update(&self, id: &SessionId, f: impl FnOnce(&mut Meta)) {
        if let Some(s) = self.lock().sessions.get_mut(id) {
            f(&mut s.meta);
        }
    }

    /// Gives the lease to `token` for `ttl`, as another worker's claim would.
    pub fn take_lease(&self, id: &SessionId, token: &str, ttl: Duration) {
        if let Some(s) = self.lock().sessions.get_mut(id) {
            s.lease = Some((token.to_owned(), Instant::now() + ttl));
        }
    }

    /// Records a tool result, as an earlier delivery of the step would have.
    pub fn put_ledger(&self, id: &SessionId, tool_use_id: &str, outcome: ToolOutcome) {
        if let Some(s) = self.lock().sessions.get_mut(id) {
            s.ledger.entry(tool_use_id.to_owned()).or_insert(outcome);
        }
    }

    /// The next call of the write `method` fails with an unknown outcome, as a Redis time-out does;
    /// the write is applied first when `applied`.
    pub fn fail_next(&self, method: &'static str, applied: bool) {
        self.lock().faults.push((method, applied));
    }

    /// The daily spend counted for `agent` on `day`, micro-USD.
    pub fn daily_agent_spend(&self, agent: &str, day: u64) -> u64 {
        self.lock().daily.get(&format!("{day}:agent:{agent}")).map_or(0, |(spent, held)| spent + held)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs a write; an injected fault for `method` applies it (or not) and then fails.
    fn write<T>(&self, method: &'static str, f: impl FnOnce(&mut State) -> T) -> Result<T, StoreError> {
        let mut st = self.lock();
        let fault = st.faults.iter().position(|(m, _)| *m == method).map(|i| st.faults.remove(i));
        match fault {
            None => Ok(f(&mut st)),
            Some((_, applied)) => {
                if applied {
                    f(&mut st);
                }
                Err(StoreError::Unavailable(format!("injected: the outcome of `{method}` is unknown")))
            }
        }
    }
}

fn lease_live(s: &Session) -> Option<&str> {
    s.lease.as_ref().filter(|(_, until)| *until > Instant::now()).map(|(t, _)| t.as_str())
}

fn fenced(s: &Session, step: u32, phase: Phase) -> bool {
    s.meta.step == step && s.meta.phase == phase
}

/// The session, when `at`'s token still holds its lease (as the scripts check).
fn leased<'s>(st: &'s mut State, at: &Fence<'_>) -> Result<Option<&'s mut Session>, StoreError> {
    match st.sessions.get_mut(at.id) {
        Some(s) if lease_live(s) != Some(at.token) => Err(StoreError::LeaseLost),
        s => Ok(s),
    }
}

/// How a call's reservation was taken (mirrors `lua/orphan.lua`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    /// It was open.
    Open,
    /// A claim had counted it at its worst case; that was taken back out of the usage.
    Orphan,
}

/// Takes the call's reservation, or the worst case a claim counted for it back out of the usage;
/// `None` when the call was already counted.
fn take_reservation(s: &mut Session, rid: &str) -> Option<Taken> {
    if s.resv.remove(rid).is_some() {
        return Some(Taken::Open);
    }
    let r = s.orphans.remove(rid)?;
    let u = &mut s.usage;
    u.cost_micro_usd = u.cost_micro_usd.saturating_sub(r.cost);
    u.input_tokens = u.input_tokens.saturating_sub(r.input_tokens);
    u.output_tokens = u.output_tokens.saturating_sub(r.output_tokens);
    u.model_calls = u.model_calls.saturating_sub(1);
    u.unreconciled_calls = u.unreconciled_calls.saturating_sub(1);
    Some(Taken::Orphan)
}

/// Replaces the reservation `rid` with the call's actual usage, once (reconcile.lua); the totals.
fn reconcile(st: &mut State, id: &SessionId, rid: &str, call: &CallUsage<'_>) -> Option<UsageTotals> {
    let s = st.sessions.get_mut(id)?;
    let taken = take_reservation(s, rid)?;
    s.usage.add_call(call);
    s.trace.push(superseding(call.trace, rid, taken));
    Some(s.usage)
}

/// Appends the model's reply and moves the session on (the checkpoint half of commit_model.lua).
fn commit_reply(s: &mut Session, step: u32, c: &ModelCommit, now_ms: u64) {
    s.msgs.extend(c.messages.iter().cloned());
    s.meta.updated_ms = now_ms;
    s.meta.attempt = 0;
    match &c.outcome {
        ModelOutcome::Tools => s.meta.phase = Phase::Tools,
        ModelOutcome::Next => {
            s.meta.step = step + 1;
            s.planned = c.next.map(|r| (step + 1, r));
        }
        ModelOutcome::Done { status, result, error } => {
            s.meta.phase = Phase::Done;
            s.meta.status = *status;
            s.meta.result = Some(result.clone());
            s.meta.error = Some(error.clone());
        }
    }
}

/// The trace record, marked as superseding the claim's worst-case record of `rid` when it was taken
/// back as an orphan.
fn superseding(record: &str, rid: &str, taken: Taken) -> String {
    match serde_json::from_str::<serde_json::Value>(record) {
        Ok(mut r) if taken == Taken::Orphan && r.is_object() => {
            r["supersedes"] = rid.into();
            r.to_string()
        }
        _ => record.to_owned(),
    }
}

fn orphan_record(s: &Session, id: &SessionId, step: u32, token: &str, rid: &str, r: &Reservation, now: u64) -> String {
    serde_json::json!({
        "ts_ms": now, "agent_id": s.meta.agent, "session_id": id, "step": step, "action": "model_call",
        "input_summary": format!("reservation {rid}"), "output_summary": "",
        "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
        "cost_usd": r.cost as f64 / 1e6, "cost_micro_usd": r.cost, "duration_ms": 0, "success": false,
        "error": "the worker died before this call was reconciled: counted at its reserved worst case",
        "worker": token.split('|').nth(1).unwrap_or_default(), "reservation": rid,
    })
    .to_string()
}

#[async_trait]
impl StepStore for MemoryStore {
    async fn claim(&self, msg: &StepMessage, token: &str, lease_ms: u64, now_ms: u64) -> Result<Claim, StoreError> {
        self.write("claim", |st| {
            let Some(s) = st.sessions.get_mut(&msg.session_id) else { return Claim::Missing };
            let (n, cur) = (msg.step, s.meta.step);
            let status = s.meta.status;
            if status.is_terminal() {
                return Claim::Terminal(status);
            }
            if matches!(status, SessionStatus::AwaitingHuman | SessionStatus::AwaitingApproval) {
                return Claim::Paused(status);
            }
            if n > cur {
                return Claim::Future { current: cur };
            }
            if n < cur && s.meta.published >= cur {
                return Claim::Stale;
            }
            if let Some(holder) = lease_live(s) {
                let hstep: Option<u32> = holder.split('|').next().and_then(|h| h.parse().ok());
                if !(hstep.is_some_and(|h| h < cur) && n == cur) {
                    return Claim::Busy;
                }
            }
            if n < cur {
                return Claim::Republish { current: cur, agent: s.meta.agent.clone() };
            }
            if s.meta.cancel_requested {
                s.meta.status = SessionStatus::Cancelled;
                s.meta.phase = Phase::Done;
                s.meta.error = Some("cancelled by request".into());
                s.meta.updated_ms = now_ms;
                return Claim::Cancelled(Box::new(s.meta.clone()));
            }
            s.lease = Some((token.to_owned(), Instant::now() + Duration::from_millis(lease_ms)));
            if s.meta.published < n {
                s.meta.published = n;
            }
            s.meta.status = SessionStatus::Running;
            s.meta.updated_ms = now_ms;
            for (rid, r) in std::mem::take(&mut s.resv) {
                s.usage.cost_micro_usd += r.cost;
                s.usage.input_tokens += r.input_tokens;
                s.usage.output_tokens += r.output_tokens;
                s.usage.model_calls += 1;
                s.usage.unreconciled_calls += 1;
                let record = orphan_record(s, &msg.session_id, n, token, &rid, &r, now_ms);
                s.trace.push(record);
                s.orphans.insert(rid, r);
            }
            let planned = s.planned.filter(|(step, _)| *step == n && s.meta.phase == Phase::Llm).map(|(_, r)| r);
            if let Some(r) = planned {
                s.resv.insert(token.to_owned(), r);
            }
            Claim::Run(Box::new(SessionState::loaded(
                s.meta.clone(),
                s.msgs.clone(),
                s.ledger.clone(),
                s.usage,
                planned,
            )))
        })
    }

    async fn renew(&self, id: &SessionId, token: &str, lease_ms: u64) -> Result<bool, StoreError> {
        self.write("renew", |st| {
            let Some(s) = st.sessions.get_mut(id) else { return false };
            match &mut s.lease {
                Some((t, until)) if t == token && *until > Instant::now() => {
                    *until = Instant::now() + Duration::from_millis(lease_ms);
                    true
                }
                _ => false,
            }
        })
    }

    async fn release(
        &self,
        id: &SessionId,
        token: &str,
        published: u32,
        retry: Option<Attempt>,
        unused_reservation: bool,
    ) -> Result<(), StoreError> {
        self.write("release", |st| {
            let Some(s) = st.sessions.get_mut(id) else { return };
            if unused_reservation {
                s.resv.remove(token);
            }
            if lease_live(s) == Some(token)
                && let Some(a) = retry.filter(|a| a.step == s.meta.step)
            {
                s.meta.attempt = a.count;
            }
            if s.lease.as_ref().is_some_and(|(t, _)| t == token) {
                s.lease = None;
            }
            if published > s.meta.published {
                s.meta.published = published;
            }
        })
    }

    async fn reserve(&self, at: &Fence<'_>, reservation_id: &str, r: &Reservation) -> Result<(), StoreError> {
        self.write("reserve", |st| {
            if let Some(s) = leased(st, at)? {
                s.resv.insert(reservation_id.to_owned(), *r);
            }
            Ok(())
        })?
    }

    async fn reconcile(
        &self,
        id: &SessionId,
        reservation_id: &str,
        call: &CallUsage<'_>,
    ) -> Result<Option<UsageTotals>, StoreError> {
        self.write("reconcile", |st| reconcile(st, id, reservation_id, call))
    }

    async fn cancel_reservation(&self, id: &SessionId, reservation_id: &str, trace: &str) -> Result<(), StoreError> {
        self.write("cancel_reservation", |st| {
            if let Some(s) = st.sessions.get_mut(id)
                && let Some(taken) = take_reservation(s, reservation_id)
            {
                s.trace.push(superseding(trace, reservation_id, taken));
                s.usage.model_errors += 1;
            }
        })
    }

    async fn mark_alert(&self, at: &Fence<'_>, limit: &str) -> Result<bool, StoreError> {
        self.write("mark_alert", |st| {
            Ok(match leased(st, at)? {
                Some(s) if s.meta.alerted.is_none() => {
                    s.meta.alerted = Some(limit.to_owned());
                    true
                }
                _ => false,
            })
        })?
    }

    async fn daily_reserve(&self, caps: &DailyCaps<'_>, amount: u64) -> Result<DailyVerdict, StoreError> {
        self.write("daily_reserve", |st| {
            let keys =
                [format!("{}:agent:{}", caps.day, caps.agent), format!("{}:tenant:{}", caps.day, caps.tenant_key())];
            let limits = [(caps.agent_cap, DailyCap::Agent), (caps.tenant_cap, DailyCap::Tenant)];
            for (key, (cap, which)) in keys.iter().zip(limits) {
                let (spent, held) = st.daily.get(key).copied().unwrap_or_default();
                if let Some(cap) = cap.filter(|&cap| spent + held + amount > cap) {
                    return DailyVerdict::Refused { cap: which, held: spent + amount <= cap };
                }
            }
            for key in keys {
                st.daily.entry(key).or_default().1 += amount;
            }
            DailyVerdict::Reserved
        })
    }

    async fn daily_settle(&self, caps: &DailyCaps<'_>, reserved: u64, spent: u64) -> Result<(), StoreError> {
        self.write("daily_settle", |st| {
            for key in
                [format!("{}:agent:{}", caps.day, caps.agent), format!("{}:tenant:{}", caps.day, caps.tenant_key())]
            {
                if let Some((s, held)) = st.daily.get_mut(&key) {
                    *s += spent;
                    *held = held.saturating_sub(reserved);
                }
            }
        })
    }

    async fn commit_model(
        &self,
        at: &Fence<'_>,
        call: &CallUsage<'_>,
        c: &ModelCommit,
        now_ms: u64,
    ) -> Result<ModelCheckpoint, StoreError> {
        let step = at.step;
        self.write("commit_model", |st| {
            let totals = reconcile(st, at.id, at.token, call);
            let checkpoint = match leased(st, at) {
                Err(_) => Checkpoint::LeaseLost,
                Ok(Some(s)) if fenced(s, step, Phase::Llm) => {
                    commit_reply(s, step, c, now_ms);
                    Checkpoint::Applied
                }
                Ok(_) => Checkpoint::Moved,
            };
            ModelCheckpoint { totals, checkpoint }
        })
    }

    async fn record_tool(
        &self,
        at: &Fence<'_>,
        tool_use_id: &str,
        outcome: &ToolOutcome,
        trace: &str,
    ) -> Result<(), StoreError> {
        self.write("record_tool", |st| {
            if let Some(s) = leased(st, at)? {
                s.ledger.entry(tool_use_id.to_owned()).or_insert_with(|| outcome.clone());
                s.trace.push(trace.to_owned());
            }
            Ok(())
        })?
    }

    async fn commit_tools(&self, at: &Fence<'_>, c: &ToolCommit<'_>, now_ms: u64) -> Result<bool, StoreError> {
        let step = at.step;
        self.write("commit_tools", |st| {
            let Some(s) = leased(st, at)?.filter(|s| fenced(s, step, Phase::Tools)) else { return Ok(false) };
            for r in c.results {
                s.ledger.entry(r.tool_use_id.clone()).or_insert_with(|| r.outcome.clone());
                s.trace.push(r.trace.clone());
            }
            s.msgs.push(c.user_message.to_owned());
            s.meta.step = step + 1;
            s.meta.phase = Phase::Llm;
            s.meta.updated_ms = now_ms;
            s.meta.attempt = 0;
            s.planned = c.next.map(|r| (step + 1, r));
            Ok(true)
        })?
    }

    async fn end_step(&self, at: &Fence<'_>, phase: Phase, end: &StepEnd, now_ms: u64) -> Result<bool, StoreError> {
        let step = at.step;
        self.write("end_step", |st| {
            let Some(s) = leased(st, at)?.filter(|s| fenced(s, step, phase)) else { return Ok(false) };
            s.meta.status = end.status;
            s.meta.updated_ms = now_ms;
            match end.status {
                SessionStatus::AwaitingHuman | SessionStatus::AwaitingApproval => {
                    s.meta.escalation = Some(end.escalation.clone());
                }
                SessionStatus::Paused => s.meta.error = Some(end.error.clone()),
                _ => {
                    s.meta.phase = Phase::Done;
                    s.meta.result = Some(end.result.clone());
                    s.meta.error = Some(end.error.clone());
                }
            }
            s.trace.push(end.trace.clone());
            Ok(true)
        })?
    }

    async fn reindex(&self, id: &SessionId, _now_ms: u64) -> Result<(), StoreError> {
        self.write("reindex", |st| {
            if st.sessions.get(id).is_some_and(|s| s.meta.status.is_terminal()) {
                st.active.remove(id);
                st.waiting.remove(id);
            }
        })
    }

    async fn deactivate(&self, id: &SessionId) -> Result<(), StoreError> {
        self.write("deactivate", |st| {
            st.active.remove(id);
        })
    }

    async fn wait_until(&self, id: &SessionId, deadline_ms: u64) -> Result<(), StoreError> {
        self.write("wait_until", |st| {
            st.waiting.insert(id.clone(), deadline_ms);
        })
    }

    async fn unwait(&self, id: &SessionId) -> Result<(), StoreError> {
        self.write("unwait", |st| {
            st.waiting.remove(id);
        })
    }
}
