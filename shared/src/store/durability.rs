//! Is Redis durable? The worker and the dispatcher ask once, at start.
//!
//! A session's Redis keys are the only copy of its lease, its tool ledger and its conversation
//! (DESIGN §2). Without AOF a Redis restart loses everything written since the last snapshot;
//! with an evicting `maxmemory-policy`, a full Redis drops session keys and leases in the middle
//! of a step. Both are settings of the server, so both binaries read them (`CONFIG GET appendonly`,
//! `CONFIG GET maxmemory-policy`) and warn loudly, or refuse to start when
//! `redis.require_durable` is set. Sidekiq warns the same way.
//!
//! A managed Redis may rename `CONFIG` or refuse it to the fleet's user; then durability cannot be
//! verified. That is warned about too, and with `require_durable` it refuses: the setting promises
//! a checked Redis, and an unchecked one is not. Where `CONFIG` is unavailable, check persistence
//! in the provider's settings and leave `require_durable` off.

use std::collections::HashMap;
use std::fmt;

use redis::aio::ConnectionLike;
use thiserror::Error;
use tracing::{info, warn};

use crate::config::RedisConfig;

/// What the server's settings mean for the sessions stored in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Durability {
    /// AOF on and no eviction.
    Durable {
        /// `appendfsync`: how much a crash of the host may lose (`everysec`: up to a second).
        appendfsync: String,
    },
    /// Settings that can lose sessions, each with why and how to fix it.
    NotDurable(Vec<Finding>),
    /// `CONFIG GET` was refused or answered nothing, so nothing could be checked.
    Unverified(String),
}

/// One setting that can lose sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// `appendonly` is not `yes`.
    NoAof {
        /// Its value.
        appendonly: String,
    },
    /// `maxmemory-policy` is not `noeviction`.
    Evicts {
        /// Its value.
        policy: String,
    },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoAof { appendonly } => write!(
                f,
                "AOF is off (appendonly = {appendonly}): a Redis restart loses every session, lease and tool \
                 ledger written since the last snapshot, so sessions vanish or their tool calls run twice; \
                 fix: set `appendonly yes` and `appendfsync everysec` in redis.conf (README, Production Redis)"
            ),
            Self::Evicts { policy } => write!(
                f,
                "maxmemory-policy is {policy}, which evicts keys when memory is full: Redis then drops session \
                 keys and leases in the middle of a step; fix: set `maxmemory-policy noeviction` (writes then \
                 fail loudly instead) and give Redis the memory it needs (README, Production Redis)"
            ),
        }
    }
}

/// Why a process with `redis.require_durable = true` does not start.
#[derive(Debug, Error)]
pub enum DurabilityError {
    /// Redis answered, and is not durable.
    #[error("redis.require_durable is set and Redis is not durable: {}", join(.0))]
    NotDurable(Vec<Finding>),
    /// Redis refused `CONFIG GET`, so durability cannot be checked.
    #[error(
        "redis.require_durable is set and Redis durability cannot be verified ({0}); where CONFIG is \
         unavailable (managed Redis), check AOF and noeviction in the provider's settings and set \
         redis.require_durable = false"
    )]
    Unverified(String),
    /// Redis did not answer at all.
    #[error("asking Redis for its persistence settings: {0}")]
    Redis(#[from] redis::RedisError),
}

fn join(findings: &[Finding]) -> String {
    findings.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// Reads the server's settings and logs what they mean: a warning for each problem, one info
/// line when all is well. Fails when Redis does not answer, and, with `cfg.require_durable`, when
/// it is not durable or cannot be checked.
pub async fn check(conn: &mut (impl ConnectionLike + Send), cfg: &RedisConfig) -> Result<Durability, DurabilityError> {
    let found = inspect(conn).await?;
    match &found {
        Durability::Durable { appendfsync } => {
            info!(appendfsync = %appendfsync, "Redis is durable: AOF on, maxmemory-policy noeviction");
        }
        Durability::NotDurable(findings) if cfg.require_durable => {
            return Err(DurabilityError::NotDurable(findings.clone()));
        }
        Durability::NotDurable(findings) => {
            for finding in findings {
                warn!(problem = %finding, "REDIS IS NOT DURABLE: sessions can be lost (set redis.require_durable = true to refuse to start)");
            }
        }
        Durability::Unverified(why) if cfg.require_durable => return Err(DurabilityError::Unverified(why.clone())),
        Durability::Unverified(why) => {
            warn!(
                reason = %why,
                "REDIS DURABILITY COULD NOT BE VERIFIED: make sure it has AOF on (appendonly yes) and \
                 maxmemory-policy noeviction, or sessions can be lost"
            );
        }
    }
    Ok(found)
}

/// Reads `appendonly`, `maxmemory-policy` and `appendfsync` with `CONFIG GET`. A refusal (an error
/// reply: the command renamed, or not allowed) is [`Durability::Unverified`]; a connection error is
/// an error.
pub async fn inspect(conn: &mut (impl ConnectionLike + Send)) -> Result<Durability, redis::RedisError> {
    let mut values = HashMap::new();
    for name in ["appendonly", "maxmemory-policy", "appendfsync"] {
        match config_get(conn, name).await {
            Ok(Some(value)) => {
                values.insert(name, value);
            }
            // `appendfsync` only says how much AOF may lose; not knowing it is no reason to doubt.
            Ok(None) if name == "appendfsync" => {}
            Ok(None) => return Ok(Durability::Unverified(format!("CONFIG GET {name} answered nothing"))),
            Err(e) if e.code().is_some() => return Ok(Durability::Unverified(format!("CONFIG GET {name}: {e}"))),
            Err(e) => return Err(e),
        }
    }
    let get = |name: &str| values.get(name).map_or("", String::as_str);
    Ok(judge(get("appendonly"), get("maxmemory-policy"), get("appendfsync").to_owned()))
}

/// What `appendonly` and `maxmemory-policy` mean: only `yes` and `noeviction` are durable.
pub fn judge(appendonly: &str, policy: &str, appendfsync: String) -> Durability {
    let mut findings = Vec::new();
    if !appendonly.eq_ignore_ascii_case("yes") {
        findings.push(Finding::NoAof { appendonly: appendonly.to_owned() });
    }
    if !policy.eq_ignore_ascii_case("noeviction") {
        findings.push(Finding::Evicts { policy: policy.to_owned() });
    }
    if findings.is_empty() { Durability::Durable { appendfsync } } else { Durability::NotDurable(findings) }
}

async fn config_get(conn: &mut (impl ConnectionLike + Send), name: &str) -> Result<Option<String>, redis::RedisError> {
    let reply: HashMap<String, String> = redis::cmd("CONFIG").arg("GET").arg(name).query_async(conn).await?;
    Ok(reply.into_iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_aof_and_noeviction_are_durable() {
        assert_eq!(
            judge("yes", "noeviction", "everysec".into()),
            Durability::Durable { appendfsync: "everysec".into() }
        );
        let Durability::NotDurable(both) = judge("no", "allkeys-lru", String::new()) else { panic!("durable") };
        assert_eq!(both.len(), 2);
        for policy in ["volatile-lru", "allkeys-lfu", "volatile-ttl", "allkeys-random"] {
            assert!(matches!(judge("yes", policy, String::new()), Durability::NotDurable(f) if f.len() == 1));
        }
    }

    #[test]
    fn findings_say_what_why_and_how() {
        let text =
            join(&[Finding::NoAof { appendonly: "no".into() }, Finding::Evicts { policy: "allkeys-lru".into() }]);
        for needle in ["appendonly = no", "restart loses", "appendonly yes", "allkeys-lru", "leases", "noeviction"] {
            assert!(text.contains(needle), "{needle} is missing from {text}");
        }
    }
}
