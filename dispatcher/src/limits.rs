//! Per-tenant and per-token limits on creating sessions, kept in Redis so every dispatcher
//! replica shares them.
//!
//! - Live sessions per tenant (`tenants.<name>.max_live_sessions`, default
//!   `tenant_defaults.max_live_sessions`): a set of the tenant's session ids, admitted by one Lua
//!   script. Ended sessions leave it lazily: when the set is full, the members whose session has
//!   ended (or is gone) are removed and admission is tried once more.
//! - Sessions created per minute per token (`auth.sessions_per_minute`): a counter per token and
//!   minute; past the limit, 429 with `Retry-After` until the next minute.
//!
//! Keys carry a hash tag (`{tenant}`, `{token}`) so each lives in one Redis Cluster slot.

use agentfleet::domain::{SessionId, TenantId};
use agentfleet::telemetry::now_ms;
use redis::Script;

use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;

/// Admits a session id to a tenant's live set unless the set is full. KEYS: live set. ARGV: id, max.
const ADMIT: &str = r"
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
";

/// 429 when `caller` has created `per_minute` sessions this minute already.
pub(crate) async fn check_rate(s: &AppState, caller: &Caller) -> Result<(), ApiError> {
    let now_s = now_ms() / 1000;
    let minute = now_s / 60;
    let key = format!("{}:rate:{{{}}}:{minute}", s.cfg.redis.key_prefix, caller.name);
    let mut conn = s.redis.clone();
    let (count,): (u64,) = redis::pipe()
        .incr(&key, 1)
        .expire(&key, 120)
        .ignore()
        .query_async(&mut conn)
        .await
        .map_err(|e| ApiError::unavailable(&e))?;
    if count > u64::from(caller.per_minute) {
        let retry = 60 - now_s % 60;
        return Err(ApiError::too_many(
            format!(
                "sessions_per_minute: token `{}` may create {} sessions per minute; retry in {retry} s",
                caller.name, caller.per_minute
            ),
            Some(retry),
        ));
    }
    Ok(())
}

/// Counts session `id` among its tenant's live sessions, or 429 when the tenant has its
/// `max_live_sessions` already.
pub(crate) async fn admit_live(s: &AppState, tenant: &TenantId, id: &SessionId) -> Result<(), ApiError> {
    let max = s.cfg.tenant_max_live(tenant.as_str());
    let key = live_key(s, tenant);
    if admit(s, &key, id, max).await? {
        return Ok(());
    }
    prune(s, &key).await?;
    if admit(s, &key, id, max).await? {
        return Ok(());
    }
    Err(ApiError::too_many(
        format!("max_live_sessions: tenant `{tenant}` has {max} live sessions, its limit; wait for one to end"),
        None,
    ))
}

fn live_key(s: &AppState, tenant: &TenantId) -> String {
    format!("{}:live:{{{tenant}}}", s.cfg.redis.key_prefix)
}

async fn admit(s: &AppState, key: &str, id: &SessionId, max: u32) -> Result<bool, ApiError> {
    let mut conn = s.redis.clone();
    let admitted: i64 = Script::new(ADMIT)
        .key(key)
        .arg(id.as_str())
        .arg(max)
        .invoke_async(&mut conn)
        .await
        .map_err(|e| ApiError::unavailable(&e))?;
    Ok(admitted == 1)
}

/// Removes the members of a live set whose session has ended or is gone.
async fn prune(s: &AppState, key: &str) -> Result<(), ApiError> {
    let mut conn = s.redis.clone();
    let members: Vec<String> =
        redis::cmd("SMEMBERS").arg(key).query_async(&mut conn).await.map_err(|e| ApiError::unavailable(&e))?;
    let mut ended = Vec::new();
    for member in members {
        let live = match SessionId::parse(&member) {
            Ok(id) => s.store.meta(&id).await.map_err(|e| ApiError::unavailable(&e))?,
            Err(_) => None,
        };
        if live.is_none_or(|m| m.status.is_terminal()) {
            ended.push(member);
        }
    }
    if !ended.is_empty() {
        let _: i64 = redis::cmd("SREM")
            .arg(key)
            .arg(ended)
            .query_async(&mut conn)
            .await
            .map_err(|e| ApiError::unavailable(&e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_admit_script_touches_only_the_key_it_is_given() {
        assert_eq!(agentfleet::redis_conn::undeclared_keys(super::ADMIT), Vec::<String>::new());
    }
}
