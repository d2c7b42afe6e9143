//! The Redis implementation of [`StepStore`](super::StepStore) and [`AdminStore`](super::AdminStore).
//!
//! One multiplexed connection ([`RedisConn`]: one server or a cluster, auto-reconnecting) carries
//! every command of the process, so concurrent steps pipeline on the wire instead of queueing for
//! pooled connections. Every key of a session carries the hash tag `{<session_id>}`, so each script
//! touches one cluster slot; every other script touches one key. Commands on keys of several slots
//! (the indexes, a page of sessions) go through [`RedisConn::exec_each`] and
//! [`RedisConn::query_each`], never one pipeline.
//!
//! Listing reads sorted sets, each a key (and a cluster slot) of its own: every session, a tenant's,
//! a status class's and a tenant's in a status class. Their members are `<created_ms, 20 digits>:<id>`
//! at score 0, so a lexicographic range is newest-first order with the id breaking ties: a cursor
//! always moves on, however many sessions share a millisecond. The indexes are never written in the
//! same script as a session's keys; [`StepStore::reindex`] moves them after a status change, and an
//! ended session's retention starts there.

use std::collections::HashMap;

use async_trait::async_trait;
use redis::{Cmd, Script, Value};

use super::daily::{DailyCounters, Taken};
use super::{
    AdminStore, Attempt, CallUsage, CancelOutcome, Checkpoint, Claim, DailyCap, DailyCaps, DailyVerdict, Fence,
    ListFilter, Meta, ModelCheckpoint, ModelCommit, ModelOutcome, NewSession, Origin, ResumeOutcome, SessionState,
    SessionView, StepEnd, StepStore, StoreError, ToolCommit, UsageTotals,
};
use crate::budget::{Limits, Reservation};
use crate::config::RedisConfig;
use crate::domain::MicroUsd;
use crate::domain::{Name, Phase, SessionId, SessionStatus, StepMessage, TenantId};
use crate::llm::ToolOutcome;
use crate::redis_conn::RedisConn;

/// The keys of one session.
struct Keys {
    meta: String,
    msgs: String,
    usage: String,
    ledger: String,
    trace: String,
    lease: String,
    resv: String,
}

impl Keys {
    fn all(&self) -> [&String; 7] {
        [&self.meta, &self.msgs, &self.usage, &self.ledger, &self.trace, &self.lease, &self.resv]
    }

    fn new(prefix: &str, id: &SessionId) -> Self {
        let k = |what: &str| format!("{prefix}:{{{id}}}:{what}");
        Self {
            meta: k("meta"),
            msgs: k("msgs"),
            usage: k("usage"),
            ledger: k("ledger"),
            trace: k("trace"),
            lease: k("lease"),
            resv: k("resv"),
        }
    }
}

/// The key of session `id`'s trace stream under the key prefix `prefix`, for readers that follow
/// it on a connection of their own (`XREAD BLOCK`).
pub fn trace_key(prefix: &str, id: &SessionId) -> String {
    Keys::new(prefix, id).trace
}

/// The fleet's pulse under the key prefix `prefix`: a hash of each worker's steps per second over
/// its last few seconds and when it said so (`<steps/s> <unix ms>`), for the dispatcher's fleet view.
pub fn pulse_key(prefix: &str) -> String {
    format!("{prefix}:fleet:{{pulse}}")
}

struct Scripts {
    claim: Script,
    commit_model: Script,
    commit_tools: Script,
    end_step: Script,
    record_tool: Script,
    release: Script,
    renew: Script,
    create: Script,
    idempotency: Script,
    reserve: Script,
    reconcile: Script,
    cancel_reservation: Script,
    mark_alert: Script,
    resume: Script,
    cancel: Script,
    expire: Script,
    indexed: Script,
}

impl Scripts {
    fn load() -> Self {
        Self {
            claim: Script::new(include_str!("lua/claim.lua")),
            commit_model: Script::new(concat!(include_str!("lua/orphan.lua"), include_str!("lua/commit_model.lua"))),
            commit_tools: Script::new(include_str!("lua/commit_tools.lua")),
            end_step: Script::new(include_str!("lua/end_step.lua")),
            record_tool: Script::new(include_str!("lua/record_tool.lua")),
            release: Script::new(include_str!("lua/release.lua")),
            renew: Script::new(include_str!("lua/renew.lua")),
            create: Script::new(include_str!("lua/create.lua")),
            idempotency: Script::new(include_str!("lua/idempotency.lua")),
            reserve: Script::new(include_str!("lua/reserve.lua")),
            reconcile: Script::new(concat!(include_str!("lua/orphan.lua"), include_str!("lua/reconcile.lua"))),
            cancel_reservation: Script::new(concat!(
                include_str!("lua/orphan.lua"),
                include_str!("lua/cancel_reservation.lua")
            )),
            mark_alert: Script::new(include_str!("lua/mark_alert.lua")),
            resume: Script::new(include_str!("lua/resume.lua")),
            cancel: Script::new(include_str!("lua/cancel.lua")),
            expire: Script::new(include_str!("lua/expire.lua")),
            indexed: Script::new(include_str!("lua/indexed.lua")),
        }
    }
}

/// Sessions in Redis.
pub struct RedisStore {
    conn: RedisConn,
    prefix: String,
    scripts: Scripts,
    retention_ms: u64,
    daily: DailyCounters,
}

/// How long a finished session is kept unless [`RedisStore::with_retention_ms`] says otherwise.
const DEFAULT_RETENTION_MS: u64 = 30 * 86_400_000;

/// The index classes a session can leave: queued, running and paused share `live`, because a claim
/// moves sessions among them at every step and the step's hot path touches no global key; a listed
/// row's status is always read from its meta.
const LIVE_CLASSES: [&str; 3] = ["live", "awaiting_human", "awaiting_approval"];

/// The listing index class of a status.
fn index_class(status: SessionStatus) -> &'static str {
    match status {
        SessionStatus::Queued | SessionStatus::Running | SessionStatus::Paused => "live",
        other => other.as_str(),
    }
}

/// A session's member in the listing indexes: sorts by creation time, then id.
fn index_member(created_ms: u64, id: &str) -> String {
    format!("{created_ms:020}:{id}")
}

/// Sessions read per `list` call at most, beyond the page itself.
const LIST_MIN_READS: usize = 100;

impl RedisStore {
    /// Connects to the server or cluster `cfg` names (retrying with backoff).
    pub async fn connect(cfg: &RedisConfig) -> Result<Self, StoreError> {
        let conn = RedisConn::connect(cfg).await?;
        let daily = DailyCounters::new(conn.clone());
        Ok(Self {
            conn,
            prefix: cfg.key_prefix.clone(),
            scripts: Scripts::load(),
            retention_ms: DEFAULT_RETENTION_MS,
            daily,
        })
    }

    /// Keeps finished sessions for `ms` (`[sessions] retention_ms`) instead of 30 days.
    pub fn with_retention_ms(self, ms: u64) -> Self {
        Self { retention_ms: ms.max(1), ..self }
    }

    /// The process's Redis connection (multiplexed; cheap to clone), for the breakers and limits.
    pub fn connection(&self) -> RedisConn {
        self.conn.clone()
    }

    fn keys(&self, id: &SessionId) -> Keys {
        Keys::new(&self.prefix, id)
    }

    /// The daily spend counters of an agent and a tenant, each its own hash tag, so the counters
    /// of different agents and tenants spread over a cluster's slots.
    fn daily_keys(&self, agent: &str, tenant: &str, day: u64) -> (String, String) {
        daily_keys(&self.prefix, agent, tenant, day)
    }

    /// Takes `amount` from the daily counter `key` unless that crosses `cap`.
    async fn daily_take(&self, key: &str, amount: u64, cap: Option<u64>, expiry_s: u64) -> Result<Taken, StoreError> {
        self.daily.take(key, amount, cap, expiry_s).await
    }

    /// The index of every session from before the listing indexes, scored by creation time: the
    /// janitor moves its sessions into them and empties it.
    fn legacy_sessions_key(&self) -> String {
        format!("{}:sessions", self.prefix)
    }

    /// A listing index: every session, or a tenant's, and either in one status class.
    fn index_key(&self, tenant: Option<&str>, class: Option<&str>) -> String {
        let p = &self.prefix;
        match (tenant, class) {
            (None, None) => format!("{p}:ix:all"),
            (Some(t), None) => format!("{p}:ix:tenant:{t}"),
            (None, Some(c)) => format!("{p}:ix:status:{c}"),
            (Some(t), Some(c)) => format!("{p}:ix:tenant:{t}:status:{c}"),
        }
    }

    /// Ended sessions, scored by when their retention ends; members `<index member>|<class>|<tenant>`.
    fn retired_key(&self) -> String {
        format!("{}:ix:retired", self.prefix)
    }

    /// Sessions waiting for people, scored by their deadline.
    fn waiting_key(&self) -> String {
        format!("{}:waiting", self.prefix)
    }

    /// The index of live sessions (a sorted set scored by last touch), read by the janitor.
    fn active_key(&self) -> String {
        format!("{}:active", self.prefix)
    }

    fn conn(&self) -> RedisConn {
        self.conn.clone()
    }

    /// The sessions of listing index members, read in one round trip.
    async fn metas(&self, members: &[String]) -> Result<Vec<Row>, StoreError> {
        let ids: Vec<Option<SessionId>> =
            members.iter().map(|m| m.split_once(':').and_then(|(_, id)| SessionId::parse(id).ok())).collect();
        if ids.iter().all(Option::is_none) {
            return Ok(ids.into_iter().map(|_| Row::Gone).collect());
        }
        // Each meta is in its session's slot: one pipeline on one server, one command each on a cluster.
        let reads = ids.iter().flatten().map(|id| Cmd::hgetall(self.keys(id).meta)).collect();
        let mut hashes = self.conn.query_each::<HashMap<String, String>>(reads).await?.into_iter();
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(id) = id else {
                out.push(Row::Gone);
                continue;
            };
            let hash = hashes.next().unwrap_or_default();
            out.push(match parse_meta(&hash) {
                _ if hash.is_empty() => Row::Gone,
                Ok(meta) => Row::Found(id, Box::new(meta)),
                Err(e) => {
                    tracing::warn!(session = %id, error = %e, "a listed session's meta does not parse; skipped");
                    Row::Unreadable
                }
            });
        }
        Ok(out)
    }
}

#[async_trait]
impl StepStore for RedisStore {
    async fn claim(&self, msg: &StepMessage, token: &str, lease_ms: u64, now_ms: u64) -> Result<Claim, StoreError> {
        let k = self.keys(&msg.session_id);
        let reply: Vec<Value> = self
            .scripts
            .claim
            .key(&k.meta)
            .key(&k.msgs)
            .key(&k.ledger)
            .key(&k.lease)
            .key(&k.usage)
            .key(&k.resv)
            .key(&k.trace)
            .arg(msg.step)
            .arg(token)
            .arg(lease_ms)
            .arg(now_ms)
            .arg(msg.session_id.as_str())
            .invoke_async(&mut self.conn())
            .await?;
        parse_claim(reply)
    }

    async fn renew(&self, id: &SessionId, token: &str, lease_ms: u64) -> Result<bool, StoreError> {
        let k = self.keys(id);
        let ok: i64 = self.scripts.renew.key(&k.lease).arg(token).arg(lease_ms).invoke_async(&mut self.conn()).await?;
        Ok(ok == 1)
    }

    async fn release(
        &self,
        id: &SessionId,
        token: &str,
        published: u32,
        retry: Option<Attempt>,
        unused_reservation: bool,
    ) -> Result<(), StoreError> {
        let k = self.keys(id);
        let attempt = retry.map(|a| a.to_string()).unwrap_or_default();
        let unused = if unused_reservation { token } else { "" };
        let mut inv = self.scripts.release.key(&k.lease);
        inv.key(&k.meta).key(&k.resv).arg(token).arg(published).arg(attempt).arg(unused);
        let _: i64 = inv.invoke_async(&mut self.conn()).await?;
        Ok(())
    }

    async fn commit_model(
        &self,
        at: &Fence<'_>,
        call: &CallUsage<'_>,
        c: &ModelCommit,
        now_ms: u64,
    ) -> Result<ModelCheckpoint, StoreError> {
        let k = self.keys(at.id);
        let (mode, status, result, error) = match &c.outcome {
            ModelOutcome::Tools => ("tools", "", "", ""),
            ModelOutcome::Next => ("next", "", "", ""),
            ModelOutcome::Done { status, result, error } => ("done", status.as_str(), result.as_str(), error.as_str()),
        };
        let u = &call.usage;
        let mut inv = self.scripts.commit_model.key(&k.usage);
        inv.key(&k.resv).key(&k.trace).key(&k.meta).key(&k.msgs).key(&k.lease);
        inv.arg(at.token).arg(u.input_tokens).arg(u.output_tokens).arg(u.cache_creation_input_tokens);
        inv.arg(u.cache_read_input_tokens).arg(call.cost_arg()).arg(call.trace);
        inv.arg(at.step).arg(mode).arg(status).arg(result).arg(error).arg(now_ms).arg(at.token);
        inv.arg(c.next.as_ref().map(reservation_text).unwrap_or_default()).arg(c.messages.len());
        for m in &c.messages {
            inv.arg(m);
        }
        let (applied, totals): (i64, Vec<(String, u64)>) = inv.invoke_async(&mut self.conn()).await?;
        let totals = (!totals.is_empty()).then(|| parse_usage(&totals.into_iter().collect()));
        Ok(ModelCheckpoint { totals, checkpoint: checkpoint(applied) })
    }

    async fn reserve(&self, at: &Fence<'_>, reservation_id: &str, r: &Reservation) -> Result<(), StoreError> {
        let k = self.keys(at.id);
        let mut inv = self.scripts.reserve.key(&k.resv);
        inv.key(&k.lease).arg(reservation_id).arg(reservation_text(r)).arg(at.token);
        fenced(inv.invoke_async(&mut self.conn()).await?).map(drop)
    }

    async fn reconcile(
        &self,
        id: &SessionId,
        reservation_id: &str,
        call: &CallUsage<'_>,
    ) -> Result<Option<UsageTotals>, StoreError> {
        let k = self.keys(id);
        let u = &call.usage;
        let totals: Vec<(String, u64)> = self
            .scripts
            .reconcile
            .key(&k.usage)
            .key(&k.resv)
            .key(&k.trace)
            .arg(reservation_id)
            .arg(u.input_tokens)
            .arg(u.output_tokens)
            .arg(u.cache_creation_input_tokens)
            .arg(u.cache_read_input_tokens)
            .arg(call.cost_arg())
            .arg(call.trace)
            .invoke_async(&mut self.conn())
            .await?;
        Ok((!totals.is_empty()).then(|| parse_usage(&totals.into_iter().collect())))
    }

    async fn cancel_reservation(&self, id: &SessionId, reservation_id: &str, trace: &str) -> Result<(), StoreError> {
        let k = self.keys(id);
        let _: i64 = self
            .scripts
            .cancel_reservation
            .key(&k.usage)
            .key(&k.resv)
            .key(&k.trace)
            .arg(reservation_id)
            .arg(trace)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn mark_alert(&self, at: &Fence<'_>, limit: &str) -> Result<bool, StoreError> {
        let k = self.keys(at.id);
        let mut inv = self.scripts.mark_alert.key(&k.meta);
        inv.key(&k.lease).arg(limit).arg(at.token);
        fenced(inv.invoke_async(&mut self.conn()).await?)
    }

    async fn daily_reserve(&self, caps: &DailyCaps<'_>, amount: u64) -> Result<DailyVerdict, StoreError> {
        let (agent_key, tenant_key) = self.daily_keys(caps.agent, caps.tenant_key(), caps.day);
        let expiry = daily_expiry_s(caps.day);
        // Two counters in two slots: two reservations, at once. One taken while the other was
        // refused (or failed) is given back; until then it only makes its cap stricter.
        let (agent, tenant) = futures::join!(
            self.daily_take(&agent_key, amount, caps.agent_cap, expiry),
            self.daily_take(&tenant_key, amount, caps.tenant_cap, expiry),
        );
        if matches!((&agent, &tenant), (Ok(Taken::Yes), Ok(Taken::Yes))) {
            return Ok(DailyVerdict::Reserved);
        }
        for (key, taken) in [(&agent_key, &agent), (&tenant_key, &tenant)] {
            if matches!(taken, Ok(Taken::Yes)) {
                self.daily.correct(key, amount, 0, expiry);
            }
        }
        let refused = |cap, taken| match taken {
            Taken::Yes => None,
            Taken::Spent => Some(DailyVerdict::Refused { cap, held: false }),
            Taken::Held => Some(DailyVerdict::Refused { cap, held: true }),
        };
        let (agent, tenant) = (agent?, tenant?);
        // A spent cap is the answer over a held one: the session cannot go on today either way.
        let verdicts = [refused(DailyCap::Agent, agent), refused(DailyCap::Tenant, tenant)];
        Ok(verdicts
            .iter()
            .flatten()
            .copied()
            .min_by_key(|v| matches!(v, DailyVerdict::Refused { held: true, .. }))
            .unwrap_or(DailyVerdict::Reserved))
    }

    async fn daily_settle(&self, caps: &DailyCaps<'_>, reserved: u64, spent: u64) -> Result<(), StoreError> {
        let (agent_key, tenant_key) = self.daily_keys(caps.agent, caps.tenant_key(), caps.day);
        let expiry = daily_expiry_s(caps.day);
        self.daily.correct(&agent_key, reserved, spent, expiry);
        self.daily.correct(&tenant_key, reserved, spent, expiry);
        Ok(())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.daily.flush().await
    }

    async fn record_tool(
        &self,
        at: &Fence<'_>,
        tool_use_id: &str,
        outcome: &ToolOutcome,
        trace: &str,
    ) -> Result<(), StoreError> {
        let k = self.keys(at.id);
        let value = serde_json::to_string(outcome).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut inv = self.scripts.record_tool.key(&k.ledger);
        inv.key(&k.trace).key(&k.lease).arg(tool_use_id).arg(value).arg(trace).arg(at.token);
        fenced(inv.invoke_async(&mut self.conn()).await?).map(drop)
    }

    async fn commit_tools(&self, at: &Fence<'_>, c: &ToolCommit<'_>, now_ms: u64) -> Result<bool, StoreError> {
        let k = self.keys(at.id);
        let mut inv = self.scripts.commit_tools.key(&k.meta);
        inv.key(&k.msgs).key(&k.lease).key(&k.ledger).key(&k.trace);
        inv.arg(at.step).arg(c.user_message).arg(now_ms).arg(at.token);
        inv.arg(c.next.as_ref().map(reservation_text).unwrap_or_default()).arg(c.results.len());
        for r in c.results {
            let outcome = serde_json::to_string(&r.outcome).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            inv.arg(&r.tool_use_id).arg(outcome).arg(&r.trace);
        }
        fenced(inv.invoke_async(&mut self.conn()).await?)
    }

    async fn end_step(&self, at: &Fence<'_>, phase: Phase, end: &StepEnd, now_ms: u64) -> Result<bool, StoreError> {
        let k = self.keys(at.id);
        let mut inv = self.scripts.end_step.key(&k.meta);
        inv.key(&k.trace).key(&k.lease).arg(at.step).arg(phase.as_str()).arg(end.status.as_str());
        inv.arg(&end.result).arg(&end.error).arg(&end.escalation).arg(now_ms).arg(&end.trace).arg(at.token);
        fenced(inv.invoke_async(&mut self.conn()).await?)
    }

    async fn reindex(&self, id: &SessionId, now_ms: u64) -> Result<(), StoreError> {
        let k = self.keys(id);
        let (status, indexed, tenant, created): (Option<String>, Option<String>, Option<String>, Option<String>) =
            redis::cmd("HMGET")
                .arg(&k.meta)
                .arg("status")
                .arg("indexed")
                .arg("tenant")
                .arg("created_ms")
                .query_async(&mut self.conn())
                .await?;
        let Some(status) = status else { return Ok(()) };
        let status: SessionStatus = status.parse().map_err(|_| StoreError::Corrupt(format!("status `{status}`")))?;
        let class = index_class(status);
        if indexed.as_deref() == Some(class) {
            return Ok(());
        }
        let created = created.unwrap_or_default();
        let created: u64 = created.parse().map_err(|_| StoreError::Corrupt(format!("created_ms `{created}`")))?;
        let member = index_member(created, id.as_str());
        let tenant = tenant.filter(|t| !t.is_empty());
        let tenant = tenant.as_deref();
        // Each index is a key (and cluster slot) of its own.
        let mut moves: Vec<Cmd> = Vec::new();
        let (zadd, zrem) = (|key, score: u64, member: &str| Cmd::zadd(key, member, score), Cmd::zrem::<String, &str>);
        if indexed.is_none() {
            moves.push(zadd(self.index_key(None, None), 0, &member));
            if tenant.is_some() {
                moves.push(zadd(self.index_key(tenant, None), 0, &member));
            }
        }
        moves.push(zadd(self.index_key(None, Some(class)), 0, &member));
        if tenant.is_some() {
            moves.push(zadd(self.index_key(tenant, Some(class)), 0, &member));
        }
        // Out of the class it was in; an ended session out of every live class (a race of two
        // reindexes may have left it in one), for good.
        let leaving: Vec<&str> = match indexed.as_deref() {
            _ if status.is_terminal() => LIVE_CLASSES.to_vec(),
            Some(old) => vec![old],
            None => vec![],
        };
        for old in leaving.into_iter().filter(|c| *c != class) {
            moves.push(zrem(self.index_key(None, Some(old)), &member));
            if tenant.is_some() {
                moves.push(zrem(self.index_key(tenant, Some(old)), &member));
            }
        }
        let retention = if status.is_terminal() { self.retention_ms } else { 0 };
        if status.is_terminal() {
            let entry = format!("{member}|{class}|{}", tenant.unwrap_or(""));
            moves.push(zadd(self.retired_key(), now_ms.saturating_add(retention), &entry));
        }
        self.conn.exec_each(moves).await?;
        let mut inv = self.scripts.indexed.prepare_invoke();
        for key in k.all() {
            inv.key(key);
        }
        let _: i64 = inv.arg(class).arg(retention).invoke_async(&mut self.conn()).await?;
        if status.is_terminal() {
            // Last: until here the session stays in the live index, where the janitor finds it again.
            let leave = vec![zrem(self.waiting_key(), id.as_str()), zrem(self.active_key(), id.as_str())];
            self.conn.exec_each(leave).await?;
        }
        Ok(())
    }

    async fn deactivate(&self, id: &SessionId) -> Result<(), StoreError> {
        let _: i64 = redis::cmd("ZREM").arg(self.active_key()).arg(id.as_str()).query_async(&mut self.conn()).await?;
        Ok(())
    }

    async fn wait_until(&self, id: &SessionId, deadline_ms: u64) -> Result<(), StoreError> {
        let _: i64 = redis::cmd("ZADD")
            .arg(self.waiting_key())
            .arg(deadline_ms)
            .arg(id.as_str())
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn unwait(&self, id: &SessionId) -> Result<(), StoreError> {
        let _: i64 = redis::cmd("ZREM").arg(self.waiting_key()).arg(id.as_str()).query_async(&mut self.conn()).await?;
        Ok(())
    }
}

#[async_trait]
impl AdminStore for RedisStore {
    async fn create(&self, new: &NewSession, now_ms: u64) -> Result<bool, StoreError> {
        let k = self.keys(&new.id);
        let fields = [
            ("agent", new.agent.to_string()),
            ("tenant", new.tenant.as_ref().map_or_else(String::new, ToString::to_string)),
            ("status", "queued".to_owned()),
            ("step", "1".to_owned()),
            ("phase", "llm".to_owned()),
            ("published", "0".to_owned()),
            ("max_steps", new.limits.max_steps.to_string()),
            ("max_cost", new.limits.max_cost.get().to_string()),
            ("max_cost_per_step", new.limits.max_cost_per_step.get().to_string()),
            ("max_tokens", new.limits.max_tokens.to_string()),
            ("alert_permille", new.limits.alert_permille.to_string()),
            ("summary_max_tokens", new.limits.summary_max_tokens.to_string()),
            ("created_ms", now_ms.to_string()),
            ("updated_ms", now_ms.to_string()),
            ("metadata", new.metadata.to_string()),
            ("callback_url", new.callback_url.clone().unwrap_or_default()),
            ("origin", new.origin.as_ref().map(Origin::text).unwrap_or_default()),
        ];
        let mut inv = self.scripts.create.key(&k.meta);
        inv.key(&k.msgs).key(&k.usage).arg(new.messages.len()).arg(&new.messages);
        for (f, v) in fields {
            inv.arg(f).arg(v);
        }
        if let Some(r) = &new.first_call {
            inv.arg("resv_next").arg(format!("1|{}", reservation_text(r)));
        }
        let created: i64 = inv.invoke_async(&mut self.conn()).await?;
        // Also when it existed: a retry of a create whose indexing failed indexes it now.
        self.reindex(&new.id, now_ms).await?;
        Ok(created == 1)
    }

    async fn remember_idempotency_key(
        &self,
        key: &str,
        id: &SessionId,
        fingerprint: &str,
        ttl_s: u64,
    ) -> Result<(SessionId, bool), StoreError> {
        let idem_key = format!("{}:idem:{{{key}}}", self.prefix);
        let mut inv = self.scripts.idempotency.key(idem_key);
        let stored: String = inv.arg(id.as_str()).arg(fingerprint).arg(ttl_s).invoke_async(&mut self.conn()).await?;
        let (existing, stored_fp) = stored.split_once(' ').unwrap_or((stored.as_str(), fingerprint));
        let existing = SessionId::parse(existing).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok((existing, stored_fp == fingerprint))
    }

    async fn daily_spend(&self, agent: &str, tenant: &str, day: u64) -> Result<(u64, u64), StoreError> {
        let (agent_key, tenant_key) = self.daily_keys(agent, tenant, day);
        let reads = vec![Cmd::get(agent_key), Cmd::get(tenant_key)];
        let spend: Vec<Option<i64>> = self.conn.query_each(reads).await?;
        let non_negative = |v: Option<&Option<i64>>| u64::try_from(v.copied().flatten().unwrap_or(0)).unwrap_or(0);
        Ok((non_negative(spend.first()), non_negative(spend.get(1))))
    }

    async fn view(&self, id: &SessionId) -> Result<Option<SessionView>, StoreError> {
        let k = self.keys(id);
        let (meta, usage, messages): (HashMap<String, String>, HashMap<String, u64>, Vec<String>) = redis::pipe()
            .hgetall(&k.meta)
            .hgetall(&k.usage)
            .lrange(&k.msgs, 0, -1)
            .query_async(&mut self.conn())
            .await?;
        if meta.is_empty() {
            return Ok(None);
        }
        let meta = parse_meta(&meta)?;
        Ok(Some(SessionView { meta, usage: parse_usage(&usage), messages }))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let _: String = redis::cmd("PING").query_async(&mut self.conn()).await?;
        Ok(())
    }

    async fn activate(&self, id: &SessionId, now_ms: u64) -> Result<(), StoreError> {
        let _: i64 = redis::cmd("ZADD")
            .arg(self.active_key())
            .arg(now_ms)
            .arg(id.as_str())
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn stalled(&self, before_ms: u64, limit: usize) -> Result<Vec<SessionId>, StoreError> {
        let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.active_key())
            .arg("-inf")
            .arg(before_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.conn())
            .await?;
        Ok(ids.iter().filter_map(|id| SessionId::parse(id).ok()).collect())
    }

    async fn trace(&self, id: &SessionId, limit: usize) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
            .arg(self.keys(id).trace)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut self.conn())
            .await?;
        Ok(rows.into_iter().filter_map(|(_, mut fields)| fields.remove("r")).collect())
    }

    async fn append_trace(&self, id: &SessionId, record: &str) -> Result<(), StoreError> {
        let _: String = redis::cmd("XADD")
            .arg(self.keys(id).trace)
            .arg("MAXLEN")
            .arg("~")
            .arg(10_000)
            .arg("*")
            .arg("r")
            .arg(record)
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn waiting(&self, due_by_ms: Option<u64>, limit: usize) -> Result<Vec<(SessionId, u64)>, StoreError> {
        let max = due_by_ms.map_or_else(|| "+inf".to_owned(), |d| d.to_string());
        let rows: Vec<(String, f64)> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.waiting_key())
            .arg("-inf")
            .arg(max)
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.conn())
            .await?;
        Ok(rows.into_iter().filter_map(|(id, at)| Some((SessionId::parse(&id).ok()?, at as u64))).collect())
    }

    async fn resume(
        &self,
        id: &SessionId,
        expected: SessionStatus,
        tool_use_id: &str,
        result: Option<&ToolOutcome>,
        approve: bool,
        now_ms: u64,
    ) -> Result<ResumeOutcome, StoreError> {
        let k = self.keys(id);
        let value = match result {
            Some(r) => serde_json::to_string(r).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            None => String::new(),
        };
        let reply: Vec<String> = self
            .scripts
            .resume
            .key(&k.meta)
            .key(&k.ledger)
            .arg(expected.as_str())
            .arg(tool_use_id)
            .arg(value)
            .arg(if approve { "1" } else { "0" })
            .arg(now_ms)
            .invoke_async(&mut self.conn())
            .await?;
        match reply.as_slice() {
            [ok, step, _] if ok == "1" => {
                let step = step.parse().map_err(|_| StoreError::Corrupt(format!("step `{step}`")))?;
                Ok(ResumeOutcome::Resumed { step })
            }
            [_, status, ..] => Ok(ResumeOutcome::NotWaiting(status.clone())),
            _ => Err(StoreError::Corrupt("short resume reply".into())),
        }
    }

    async fn cancel(&self, id: &SessionId, now_ms: u64) -> Result<CancelOutcome, StoreError> {
        let reply: Vec<String> =
            self.scripts.cancel.key(self.keys(id).meta).arg(now_ms).invoke_async(&mut self.conn()).await?;
        let (verdict, status) = match reply.as_slice() {
            [v, s] => (v.as_str(), s.as_str()),
            _ => return Err(StoreError::Corrupt("short cancel reply".into())),
        };
        Ok(match verdict {
            "cancelled" => CancelOutcome::Cancelled,
            "requested" => CancelOutcome::Requested,
            "ended" => CancelOutcome::Ended(
                status.parse().map_err(|e: crate::domain::ParseError| StoreError::Corrupt(e.to_string()))?,
            ),
            _ => CancelOutcome::Missing,
        })
    }

    async fn expire_wait(
        &self,
        id: &SessionId,
        expected: SessionStatus,
        to: SessionStatus,
        error: &str,
        escalation: &str,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let applied: i64 = self
            .scripts
            .expire
            .key(self.keys(id).meta)
            .arg(expected.as_str())
            .arg(to.as_str())
            .arg(error)
            .arg(escalation)
            .arg(now_ms)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(applied == 1)
    }

    async fn purge_expired(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.retired_key())
            .arg("-inf")
            .arg(now_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.conn())
            .await?;
        if !due.is_empty() {
            // Indexes and sessions of many slots: never one pipeline on a cluster.
            let mut purge: Vec<Cmd> = Vec::new();
            let zrem = Cmd::zrem::<String, &str>;
            for entry in &due {
                let mut parts = entry.splitn(3, '|');
                let (Some(member), Some(class), tenant) = (parts.next(), parts.next(), parts.next()) else {
                    purge.push(zrem(self.retired_key(), entry));
                    continue;
                };
                let tenant = tenant.filter(|t| !t.is_empty());
                let mut keys = vec![self.index_key(None, None), self.index_key(None, Some(class))];
                if tenant.is_some() {
                    keys.extend([self.index_key(tenant, None), self.index_key(tenant, Some(class))]);
                }
                for key in keys {
                    purge.push(zrem(key, member));
                }
                // The keys expired already; a late write (a dead worker's reconcile) may have made one
                // again, without a TTL. One session's keys share a slot: one DEL.
                if let Some(id) = member.split_once(':').and_then(|(_, id)| SessionId::parse(id).ok()) {
                    purge.push(Cmd::del(self.keys(&id).all().to_vec()));
                }
                purge.push(zrem(self.retired_key(), entry));
            }
            self.conn.exec_each(purge).await?;
        }
        let legacy: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.legacy_sessions_key())
            .arg(0)
            .arg(limit.saturating_sub(due.len()).max(1) - 1)
            .query_async(&mut self.conn())
            .await?;
        for raw in &legacy {
            if let Ok(id) = SessionId::parse(raw) {
                self.reindex(&id, now_ms).await?;
            }
            let _: i64 =
                redis::cmd("ZREM").arg(self.legacy_sessions_key()).arg(raw).query_async(&mut self.conn()).await?;
        }
        Ok(due.len() + legacy.len())
    }

    async fn costs(&self, ids: &[SessionId]) -> Result<Vec<u64>, StoreError> {
        let reads = ids.iter().map(|id| Cmd::hget(self.keys(id).usage, "cost_micro_usd")).collect();
        let costs: Vec<Option<u64>> = self.conn.query_each(reads).await?;
        Ok(costs.into_iter().map(Option::unwrap_or_default).collect())
    }

    async fn list(
        &self,
        filter: &ListFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<(SessionId, Meta)>, Option<String>), StoreError> {
        let bad = || StoreError::Corrupt("cursor".into());
        // The cursor is `<created_ms>:<id>` of the last row read; the next page starts below it.
        let mut max = match cursor {
            Some(c) => {
                // Any text after the time is a bound as good as an id (the document promises no more).
                let (ms, id) = c.split_once(':').ok_or_else(bad)?;
                format!("({}", index_member(ms.parse::<u64>().map_err(|_| bad())?, id))
            }
            // Every member of a time before `before` sorts below the bare padded time.
            None => filter.created_before_ms.map_or_else(|| "+".to_owned(), |b| format!("({b:020}")),
        };
        let min = filter.created_after_ms.map_or_else(|| "-".to_owned(), |a| format!("[{a:020}"));
        let tenant = filter.tenant.as_ref().map(TenantId::as_str);
        let key = self.index_key(tenant, filter.status.map(index_class));
        let mut reads_left = limit.saturating_mul(2).max(LIST_MIN_READS);
        let mut out = Vec::new();
        while reads_left > 0 {
            let want = (2 * (limit - out.len())).clamp(1, reads_left);
            let members: Vec<String> = redis::cmd("ZREVRANGEBYLEX")
                .arg(&key)
                .arg(&max)
                .arg(&min)
                .arg("LIMIT")
                .arg(0)
                .arg(want)
                .query_async(&mut self.conn())
                .await?;
            reads_left -= members.len().min(reads_left);
            let rows = self.metas(&members).await?;
            let mut gone = Vec::new();
            for (member, row) in members.iter().zip(rows) {
                max = format!("({member}");
                let (id, meta) = match row {
                    Row::Found(id, meta) => (id, *meta),
                    Row::Gone => {
                        gone.push(member);
                        continue;
                    }
                    Row::Unreadable => continue,
                };
                if matches_filter(&meta, filter) {
                    out.push((id, meta));
                    if out.len() == limit {
                        return Ok((out, Some(cursor_of(member))));
                    }
                }
            }
            if !gone.is_empty() {
                // Expired sessions the janitor has not purged yet: ids are never reused.
                let _: i64 = redis::cmd("ZREM").arg(&key).arg(&gone).query_async(&mut self.conn()).await?;
            }
            if members.len() < want {
                return Ok((out, None));
            }
        }
        // The work of one call is spent: a short page, and where to go on.
        Ok((out, max.strip_prefix('(').map(cursor_of)))
    }

    async fn meta(&self, id: &SessionId) -> Result<Option<Meta>, StoreError> {
        let meta: HashMap<String, String> =
            redis::cmd("HGETALL").arg(self.keys(id).meta).query_async(&mut self.conn()).await?;
        if meta.is_empty() { Ok(None) } else { parse_meta(&meta).map(Some) }
    }
}

/// A listing index member, read.
enum Row {
    /// Its session, as its meta says now.
    Found(SessionId, Box<Meta>),
    /// Expired (or a member that names no session): never coming back.
    Gone,
    /// A meta that does not parse: skipped, left in the index.
    Unreadable,
}

/// The cursor of a listing index member: `<created_ms>:<id>`, without the padding.
fn cursor_of(member: &str) -> String {
    match member.split_once(':') {
        Some((ms, id)) => format!("{}:{id}", ms.parse::<u64>().unwrap_or(0)),
        None => member.to_owned(),
    }
}

/// The daily spend counters of `agent` and `tenant` (empty: none, counted as `-`) on `day`: each its
/// own hash tag, so one agent's or tenant's counter is one cluster slot and different ones spread.
fn daily_keys(prefix: &str, agent: &str, tenant: &str, day: u64) -> (String, String) {
    let tenant = if tenant.is_empty() { "-" } else { tenant };
    (format!("{prefix}:daily:{{agent:{agent}}}:{day}"), format!("{prefix}:daily:{{tenant:{tenant}}}:{day}"))
}

/// When a daily counter expires: two days after its day ends (Unix s), whoever writes it last.
fn daily_expiry_s(day: u64) -> u64 {
    day.saturating_add(3).saturating_mul(86_400)
}

fn matches_filter(m: &Meta, f: &ListFilter) -> bool {
    f.status.is_none_or(|s| s == m.status)
        && f.agent.as_deref().is_none_or(|a| a == m.agent.as_str())
        && f.tenant.as_ref().is_none_or(|t| m.tenant.as_ref() == Some(t))
}

/// A fenced script's answer: 1 applied, 0 fenced out by step and phase, -1 the lease is not ours.
fn fenced(reply: i64) -> Result<bool, StoreError> {
    checkpoint(reply).applied()
}

fn checkpoint(reply: i64) -> Checkpoint {
    match reply {
        -1 => Checkpoint::LeaseLost,
        1 => Checkpoint::Applied,
        _ => Checkpoint::Moved,
    }
}

/// A reservation as the scripts store it: `cost|input|output`.
fn reservation_text(r: &Reservation) -> String {
    format!("{}|{}|{}", r.cost, r.input_tokens, r.output_tokens)
}

/// A stored `cost|input|output`; `None` for anything else.
fn parse_reservation(text: &str) -> Option<Reservation> {
    let mut parts = text.split('|').map(str::parse::<u64>);
    let r = Reservation {
        cost: parts.next()?.ok()?,
        input_tokens: parts.next()?.ok()?,
        output_tokens: parts.next()?.ok()?,
    };
    parts.next().is_none().then_some(r)
}

fn parse_claim(reply: Vec<Value>) -> Result<Claim, StoreError> {
    let mut it = reply.into_iter();
    let verdict: String = next_as(&mut it)?;
    let detail: String = next_as(&mut it)?;
    let number = || detail.parse::<u32>().map_err(|_| StoreError::Corrupt(format!("claim detail `{detail}`")));
    let status = || detail.parse().map_err(|e: crate::domain::ParseError| StoreError::Corrupt(e.to_string()));
    Ok(match verdict.as_str() {
        "missing" => Claim::Missing,
        "terminal" => Claim::Terminal(status()?),
        "paused" => Claim::Paused(status()?),
        "future" => Claim::Future { current: number()? },
        "busy" => Claim::Busy,
        "stale" => Claim::Stale,
        "republish" => {
            let agent: String = next_as(&mut it)?;
            let agent = Name::parse(&agent).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            Claim::Republish { current: number()?, agent }
        }
        "cancelled" => {
            let meta: HashMap<String, String> = next_as(&mut it)?;
            Claim::Cancelled(Box::new(parse_meta(&meta)?))
        }
        "run" => {
            let meta: HashMap<String, String> = next_as(&mut it)?;
            let messages: Vec<String> = next_as(&mut it)?;
            let ledger: HashMap<String, String> = next_as(&mut it)?;
            let usage: HashMap<String, u64> = next_as(&mut it)?;
            let (meta, ledger, usage) = (parse_meta(&meta)?, parse_ledger(ledger)?, parse_usage(&usage));
            let state = SessionState::loaded(meta, messages, ledger, usage, parse_reservation(&detail));
            Claim::Run(Box::new(state))
        }
        other => return Err(StoreError::Corrupt(format!("unknown claim verdict `{other}`"))),
    })
}

fn next_as<T: redis::FromRedisValue>(it: &mut impl Iterator<Item = Value>) -> Result<T, StoreError> {
    let v = it.next().ok_or_else(|| StoreError::Corrupt("short script reply".into()))?;
    redis::from_redis_value(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn parse_ledger(raw: HashMap<String, String>) -> Result<HashMap<String, ToolOutcome>, StoreError> {
    raw.into_iter()
        .map(|(id, v)| {
            let outcome =
                serde_json::from_str(&v).map_err(|e| StoreError::Corrupt(format!("ledger entry {id}: {e}")))?;
            Ok((id, outcome))
        })
        .collect()
}

fn parse_meta(m: &HashMap<String, String>) -> Result<Meta, StoreError> {
    let get = |f: &str| m.get(f).map(String::as_str).unwrap_or("");
    let opt = |f: &str| m.get(f).filter(|v| !v.is_empty()).cloned();
    let corrupt = |f: &str| StoreError::Corrupt(format!("meta field `{f}` = `{}`", get(f)));
    let num = |f: &str| get(f).parse::<u64>().map_err(|_| corrupt(f));
    let num32 = |f: &str| get(f).parse::<u32>().map_err(|_| corrupt(f));
    Ok(Meta {
        agent: Name::parse(get("agent")).map_err(|_| corrupt("agent"))?,
        tenant: match get("tenant") {
            "" => None,
            t => Some(TenantId::parse(t).map_err(|e| StoreError::Corrupt(e.to_string()))?),
        },
        status: get("status").parse().map_err(|_| corrupt("status"))?,
        step: num32("step")?,
        phase: get("phase").parse().map_err(|_| corrupt("phase"))?,
        published: num32("published")?,
        limits: Limits {
            max_steps: num32("max_steps")?,
            max_cost: MicroUsd::new(num("max_cost")?),
            max_cost_per_step: MicroUsd::new(num("max_cost_per_step")?),
            max_tokens: num("max_tokens")?,
            alert_permille: num32("alert_permille")?,
            summary_max_tokens: num32("summary_max_tokens")?,
        },
        alerted: opt("alerted"),
        created_ms: num("created_ms")?,
        updated_ms: num("updated_ms")?,
        result: opt("result"),
        error: opt("error"),
        escalation: opt("escalation"),
        metadata: m.get("metadata").cloned().unwrap_or_else(|| "{}".into()),
        approved: get("approved").split_whitespace().map(str::to_owned).collect(),
        callback_url: opt("callback_url"),
        cancel_requested: get("cancel") == "1",
        attempt: Attempt::parse(get("attempt"))
            .filter(|a| Some(a.step) == get("step").parse().ok())
            .map_or(0, |a| a.count),
        origin: Origin::parse(get("origin")),
    })
}

fn parse_usage(u: &HashMap<String, u64>) -> UsageTotals {
    let get = |f: &str| u.get(f).copied().unwrap_or(0);
    UsageTotals {
        input_tokens: get("input_tokens"),
        output_tokens: get("output_tokens"),
        cache_creation_input_tokens: get("cache_creation_input_tokens"),
        cache_read_input_tokens: get("cache_read_input_tokens"),
        cost_micro_usd: get("cost_micro_usd"),
        cost_parts: crate::budget::Bill {
            input: get("cost_input_micro_usd"),
            output: get("cost_output_micro_usd"),
            cache_write: get("cost_cache_write_micro_usd"),
            cache_read: get("cost_cache_read_micro_usd"),
        },
        model_calls: get("model_calls"),
        unreconciled_calls: get("unreconciled_calls"),
        model_errors: get("model_errors"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::redis_conn::{slot, undeclared_keys};

    #[test]
    fn every_key_of_a_session_carries_its_hash_tag() {
        let id = SessionId::generate();
        let k = Keys::new("af", &id);
        let tag = format!("{{{id}}}");
        for key in [&k.meta, &k.msgs, &k.usage, &k.ledger, &k.trace, &k.lease, &k.resv] {
            assert!(key.contains(&tag), "{key}");
        }
    }

    /// Every session script is given a subset of a session's keys, and every other script one key, so
    /// each runs on one cluster slot. (Debug builds also check every call at run time.)
    #[test]
    fn every_script_is_given_keys_of_one_slot() {
        for prefix in ["af", "t01jabc", "a-b_c"] {
            let k = Keys::new(prefix, &SessionId::generate());
            let first = slot(k.meta.as_bytes());
            assert!(k.all().iter().all(|key| slot(key.as_bytes()) == first), "{:?}", k.all());
        }
    }

    /// A script may touch only the keys it is passed in KEYS: a key it builds itself may be on
    /// another cluster node. Reads every Lua file of the crate, so a new one is checked too.
    #[test]
    fn no_script_touches_a_key_it_is_not_given() {
        fn lua_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    lua_files(&path, out);
                } else if path.extension().is_some_and(|e| e == "lua") {
                    out.push(path);
                }
            }
        }
        let mut files = Vec::new();
        lua_files(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
        assert!(files.len() >= 25, "only {} Lua files found", files.len());
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            assert_eq!(undeclared_keys(&text), Vec::<String>::new(), "{}", file.display());
        }
    }

    /// The fleet-wide keys spread over slots: the daily counters of different agents and tenants,
    /// and the global indexes, are not one slot that every session or step writes.
    #[test]
    fn fleet_wide_keys_spread_over_slots() {
        use std::collections::HashSet;
        let slots = |keys: &[String]| keys.iter().map(|k| slot(k.as_bytes())).collect::<HashSet<_>>().len();
        let daily: Vec<String> = ["support", "billing", "triage"]
            .iter()
            .flat_map(|a| {
                let (agent, tenant) = daily_keys("af", a, &format!("{a}-corp"), 20_000);
                [agent, tenant]
            })
            .collect();
        assert_eq!(slots(&daily), daily.len(), "{daily:?}");
        let (agent, _) = daily_keys("af", "support", "acme", 20_000);
        let (tomorrow, _) = daily_keys("af", "support", "acme", 20_001);
        assert_eq!(slot(agent.as_bytes()), slot(tomorrow.as_bytes()), "one agent's counters keep one tag");
        let globals: Vec<String> =
            ["ix:all", "ix:status:live", "ix:status:completed", "ix:retired", "active", "waiting"]
                .iter()
                .map(|k| format!("af:{k}"))
                .collect();
        assert!(slots(&globals) >= 5, "{globals:?}");
    }
}
