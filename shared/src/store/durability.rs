//! Is Redis durable? The worker and the dispatcher ask once, at start.
//!
//! A session's Redis keys are the only copy of its lease, its tool ledger and its conversation
//! (DESIGN §2). Without AOF a Redis restart loses everything written since the last snapshot;
//! with an evicting `maxmemory-policy`, a full Redis drops session keys and leases in the middle
//! of a step. Both are settings of the server, so both binaries read them (`CONFIG GET appendonly`,
//! `CONFIG GET maxmemory-policy`) and warn loudly, or refuse to start when
//! `redis.require_durable` is set. Sidekiq warns the same way.
//!
//! On a Redis Cluster every master holds some sessions, so every master is asked, and a finding
//! names its node.
//!
//! A managed Redis may rename `CONFIG` or refuse it to the fleet's user; then durability cannot be
//! verified. That is warned about too, and with `require_durable` it refuses: the setting promises
//! a checked Redis, and an unchecked one is not. Where `CONFIG` is unavailable, check persistence
//! in the provider's settings and leave `require_durable` off.

use std::collections::HashMap;
use std::fmt;

use thiserror::Error;
use tracing::{info, warn};

use crate::config::RedisConfig;
use crate::redis_conn::RedisConn;

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
    /// A finding on one master of a cluster (`host:port`).
    OnNode {
        /// The node.
        node: String,
        /// What is wrong there.
        finding: Box<Finding>,
    },
}

impl Finding {
    /// This finding, on `node` (empty: the one server).
    fn on(self, node: &str) -> Self {
        if node.is_empty() { self } else { Self::OnNode { node: node.to_owned(), finding: Box::new(self) } }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OnNode { node, finding } => write!(f, "on the cluster node {node}: {finding}"),
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
pub async fn check(conn: &RedisConn, cfg: &RedisConfig) -> Result<Durability, DurabilityError> {
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

/// Reads `appendonly`, `maxmemory-policy` and `appendfsync` with `CONFIG GET`, on the one server or
/// on every master of a cluster. A refusal (an error reply: the command renamed, or not allowed) is
/// [`Durability::Unverified`]; a connection error is an error. On a cluster the findings of every
/// master add up, each naming its node; one master that cannot be checked makes the whole unverified.
pub async fn inspect(conn: &RedisConn) -> Result<Durability, redis::RedisError> {
    // node -> setting -> value
    let mut nodes: Vec<(String, HashMap<&str, String>)> = Vec::new();
    for name in ["appendonly", "maxmemory-policy", "appendfsync"] {
        for (node, reply) in conn.on_each_master(redis::cmd("CONFIG").arg("GET").arg(name)).await? {
            let value = match reply.and_then(|v| Ok(redis::from_redis_value::<HashMap<String, String>>(v)?)) {
                Ok(pairs) => pairs.into_iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v),
                Err(e) if e.code().is_some() => {
                    return Ok(Durability::Unverified(format!("{}CONFIG GET {name}: {e}", at(&node))));
                }
                Err(e) => return Err(e),
            };
            let i = nodes.iter().position(|(n, _)| *n == node).unwrap_or_else(|| {
                nodes.push((node.clone(), HashMap::new()));
                nodes.len() - 1
            });
            match value {
                Some(value) => {
                    nodes[i].1.insert(name, value);
                }
                // `appendfsync` only says how much AOF may lose; not knowing it is no reason to doubt.
                None if name == "appendfsync" => {}
                None => return Ok(Durability::Unverified(format!("{}CONFIG GET {name} answered nothing", at(&node)))),
            }
        }
    }
    Ok(combine(nodes.iter().map(|(node, values)| {
        let get = |name: &str| values.get(name).map_or("", String::as_str);
        (node.as_str(), judge(get("appendonly"), get("maxmemory-policy"), get("appendfsync").to_owned()))
    })))
}

/// `on the cluster node <node>: ` for a node of a cluster; nothing for the one server.
fn at(node: &str) -> String {
    if node.is_empty() { String::new() } else { format!("on the cluster node {node}: ") }
}

/// The verdicts of every node as one: durable only when every node is, with every node's findings.
fn combine<'a>(verdicts: impl Iterator<Item = (&'a str, Durability)>) -> Durability {
    let mut findings = Vec::new();
    let mut appendfsync = None;
    for (node, verdict) in verdicts {
        match verdict {
            Durability::Durable { appendfsync: fsync } => {
                appendfsync.get_or_insert(fsync);
            }
            Durability::NotDurable(found) => findings.extend(found.into_iter().map(|f| f.on(node))),
            Durability::Unverified(why) => return Durability::Unverified(why),
        }
    }
    match appendfsync {
        _ if !findings.is_empty() => Durability::NotDurable(findings),
        Some(appendfsync) => Durability::Durable { appendfsync },
        None => Durability::Unverified("no Redis node answered".into()),
    }
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
    fn a_cluster_is_durable_only_when_every_master_is() {
        let durable = || judge("yes", "noeviction", "everysec".into());
        let verdict = combine([("10.0.0.1:7000", durable()), ("10.0.0.2:7000", durable())].into_iter());
        assert_eq!(verdict, Durability::Durable { appendfsync: "everysec".into() });
        let one_off = [("10.0.0.1:7000", durable()), ("10.0.0.2:7000", judge("no", "noeviction", String::new()))];
        let Durability::NotDurable(findings) = combine(one_off.into_iter()) else { panic!("durable") };
        assert_eq!(findings.len(), 1);
        assert!(
            findings[0].to_string().starts_with("on the cluster node 10.0.0.2:7000: AOF is off"),
            "{}",
            findings[0]
        );
        let unknown = [("a:1", durable()), ("b:1", Durability::Unverified("NOPERM".into()))];
        assert_eq!(combine(unknown.into_iter()), Durability::Unverified("NOPERM".into()));
        // The one server names no node.
        let single = combine([("", judge("no", "noeviction", String::new()))].into_iter());
        assert_eq!(single, Durability::NotDurable(vec![Finding::NoAof { appendonly: "no".into() }]));
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
