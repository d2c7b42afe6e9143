//! The Redis implementation of [`SessionStore`](super::SessionStore).
//!
//! One multiplexed connection (auto-reconnecting) carries every command of the process, so
//! concurrent steps pipeline on the wire instead of queueing for pooled connections. Every key of a
//! session carries the hash tag `{<session_id>}`, so each script touches one cluster slot.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};

use super::{
    Claim, Meta, ModelCommit, ModelOutcome, NewSession, SessionState, SessionStore, SessionView, StepEnd, StoreError,
    UsageTotals,
};
use crate::config::RedisConfig;
use crate::domain::{Name, Phase, SessionId, StepMessage};
use crate::llm::ToolOutcome;

/// The keys of one session.
struct Keys {
    meta: String,
    msgs: String,
    usage: String,
    ledger: String,
    trace: String,
    lease: String,
}

impl Keys {
    fn new(prefix: &str, id: &SessionId) -> Self {
        let k = |what: &str| format!("{prefix}:{{{id}}}:{what}");
        Self {
            meta: k("meta"),
            msgs: k("msgs"),
            usage: k("usage"),
            ledger: k("ledger"),
            trace: k("trace"),
            lease: k("lease"),
        }
    }
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
}

impl Scripts {
    fn load() -> Self {
        Self {
            claim: Script::new(include_str!("lua/claim.lua")),
            commit_model: Script::new(include_str!("lua/commit_model.lua")),
            commit_tools: Script::new(include_str!("lua/commit_tools.lua")),
            end_step: Script::new(include_str!("lua/end_step.lua")),
            record_tool: Script::new(include_str!("lua/record_tool.lua")),
            release: Script::new(include_str!("lua/release.lua")),
            renew: Script::new(include_str!("lua/renew.lua")),
            create: Script::new(include_str!("lua/create.lua")),
            idempotency: Script::new(include_str!("lua/idempotency.lua")),
        }
    }
}

/// Sessions in Redis.
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    scripts: Scripts,
}

impl RedisStore {
    /// Connects (retrying with backoff inside the connection manager).
    pub async fn connect(cfg: &RedisConfig) -> Result<Self, StoreError> {
        let client = redis::Client::open(cfg.url.as_str())?;
        let manager_cfg = ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_millis(cfg.response_timeout_ms)))
            .set_connection_timeout(Some(Duration::from_millis(cfg.connect_timeout_ms)))
            .set_number_of_retries(6)
            .set_max_delay(Duration::from_secs(2));
        let conn = client.get_connection_manager_with_config(manager_cfg).await?;
        Ok(Self { conn, prefix: cfg.key_prefix.clone(), scripts: Scripts::load() })
    }

    fn keys(&self, id: &SessionId) -> Keys {
        Keys::new(&self.prefix, id)
    }

    /// The index of live sessions (a sorted set scored by last touch), read by the janitor.
    fn active_key(&self) -> String {
        format!("{}:active", self.prefix)
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }
}

#[async_trait]
impl SessionStore for RedisStore {
    async fn create(&self, new: &NewSession, now_ms: u64) -> Result<bool, StoreError> {
        let k = self.keys(&new.id);
        let goal = crate::llm::user_message(&new.input);
        let fields = [
            ("agent", new.agent.to_string()),
            ("tenant", new.tenant.clone()),
            ("status", "queued".to_owned()),
            ("step", "1".to_owned()),
            ("phase", "llm".to_owned()),
            ("published", "0".to_owned()),
            ("max_steps", new.max_steps.to_string()),
            ("created_ms", now_ms.to_string()),
            ("updated_ms", now_ms.to_string()),
            ("metadata", new.metadata.to_string()),
        ];
        let mut inv = self.scripts.create.key(&k.meta);
        inv.key(&k.msgs).key(&k.usage).arg(goal);
        for (f, v) in fields {
            inv.arg(f).arg(v);
        }
        let created: i64 = inv.invoke_async(&mut self.conn()).await?;
        Ok(created == 1)
    }

    async fn remember_idempotency_key(&self, key: &str, id: &SessionId, ttl_s: u64) -> Result<SessionId, StoreError> {
        let idem_key = format!("{}:idem:{{{key}}}", self.prefix);
        let existing: String =
            self.scripts.idempotency.key(idem_key).arg(id.as_str()).arg(ttl_s).invoke_async(&mut self.conn()).await?;
        SessionId::parse(&existing).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    async fn claim(&self, msg: &StepMessage, token: &str, lease_ms: u64, now_ms: u64) -> Result<Claim, StoreError> {
        let k = self.keys(&msg.session_id);
        let reply: Vec<Value> = self
            .scripts
            .claim
            .key(&k.meta)
            .key(&k.msgs)
            .key(&k.ledger)
            .key(&k.lease)
            .arg(msg.step)
            .arg(token)
            .arg(lease_ms)
            .arg(now_ms)
            .invoke_async(&mut self.conn())
            .await?;
        parse_claim(reply)
    }

    async fn renew(&self, id: &SessionId, token: &str, lease_ms: u64) -> Result<bool, StoreError> {
        let k = self.keys(id);
        let ok: i64 = self.scripts.renew.key(&k.lease).arg(token).arg(lease_ms).invoke_async(&mut self.conn()).await?;
        Ok(ok == 1)
    }

    async fn release(&self, id: &SessionId, token: &str, published: u32) -> Result<(), StoreError> {
        let k = self.keys(id);
        let _: i64 = self
            .scripts
            .release
            .key(&k.lease)
            .key(&k.meta)
            .arg(token)
            .arg(published)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn commit_model(&self, id: &SessionId, step: u32, c: &ModelCommit, now_ms: u64) -> Result<bool, StoreError> {
        let k = self.keys(id);
        let (mode, status, result, error) = match &c.outcome {
            ModelOutcome::Tools => ("tools", "", "", ""),
            ModelOutcome::Next => ("next", "", "", ""),
            ModelOutcome::Done { status, result, error } => ("done", status.as_str(), result.as_str(), error.as_str()),
        };
        let mut inv = self.scripts.commit_model.key(&k.meta);
        inv.key(&k.msgs).key(&k.usage).key(&k.trace);
        inv.arg(step).arg(mode).arg(status).arg(result).arg(error).arg(now_ms).arg(&c.trace);
        let u = &c.usage;
        inv.arg(u.input_tokens).arg(u.output_tokens).arg(u.cache_creation_input_tokens).arg(u.cache_read_input_tokens);
        inv.arg(c.cost_micro_usd).arg(c.messages.len());
        for m in &c.messages {
            inv.arg(m);
        }
        let applied: i64 = inv.invoke_async(&mut self.conn()).await?;
        Ok(applied == 1)
    }

    async fn record_tool(
        &self,
        id: &SessionId,
        tool_use_id: &str,
        outcome: &ToolOutcome,
        trace: &str,
    ) -> Result<(), StoreError> {
        let k = self.keys(id);
        let value = serde_json::to_string(outcome).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let _: i64 = self
            .scripts
            .record_tool
            .key(&k.ledger)
            .key(&k.trace)
            .arg(tool_use_id)
            .arg(value)
            .arg(trace)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn commit_tools(
        &self,
        id: &SessionId,
        step: u32,
        user_message: &str,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let k = self.keys(id);
        let applied: i64 = self
            .scripts
            .commit_tools
            .key(&k.meta)
            .key(&k.msgs)
            .arg(step)
            .arg(user_message)
            .arg(now_ms)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(applied == 1)
    }

    async fn end_step(
        &self,
        id: &SessionId,
        step: u32,
        phase: Phase,
        end: &StepEnd,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let k = self.keys(id);
        let mut inv = self.scripts.end_step.key(&k.meta);
        inv.key(&k.trace).arg(step).arg(phase.as_str()).arg(end.status.as_str());
        inv.arg(&end.result).arg(&end.error).arg(&end.escalation).arg(now_ms).arg(&end.trace);
        let applied: i64 = inv.invoke_async(&mut self.conn()).await?;
        Ok(applied == 1)
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

    async fn deactivate(&self, id: &SessionId) -> Result<(), StoreError> {
        let _: i64 = redis::cmd("ZREM").arg(self.active_key()).arg(id.as_str()).query_async(&mut self.conn()).await?;
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

    async fn meta(&self, id: &SessionId) -> Result<Option<Meta>, StoreError> {
        let meta: HashMap<String, String> =
            redis::cmd("HGETALL").arg(self.keys(id).meta).query_async(&mut self.conn()).await?;
        if meta.is_empty() { Ok(None) } else { parse_meta(&meta).map(Some) }
    }
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
        "run" => {
            let meta: HashMap<String, String> = next_as(&mut it)?;
            let messages: Vec<String> = next_as(&mut it)?;
            let ledger: HashMap<String, String> = next_as(&mut it)?;
            Claim::Run(Box::new(SessionState { meta: parse_meta(&meta)?, messages, ledger: parse_ledger(ledger)? }))
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
        tenant: get("tenant").to_owned(),
        status: get("status").parse().map_err(|_| corrupt("status"))?,
        step: num32("step")?,
        phase: get("phase").parse().map_err(|_| corrupt("phase"))?,
        published: num32("published")?,
        max_steps: num32("max_steps")?,
        created_ms: num("created_ms")?,
        updated_ms: num("updated_ms")?,
        result: opt("result"),
        error: opt("error"),
        escalation: opt("escalation"),
        metadata: m.get("metadata").cloned().unwrap_or_else(|| "{}".into()),
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
        model_calls: get("model_calls"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_a_session_carries_its_hash_tag() {
        let id = SessionId::generate();
        let k = Keys::new("af", &id);
        let tag = format!("{{{id}}}");
        for key in [&k.meta, &k.msgs, &k.usage, &k.ledger, &k.trace, &k.lease] {
            assert!(key.contains(&tag), "{key}");
        }
    }
}
