//! The process's one Redis connection: a single server or a Redis Cluster, as the config says.
//!
//! Every Redis command of a process goes through one [`RedisConn`], cloned cheaply. Against one
//! server it is a multiplexed, reconnecting `ConnectionManager`; against a cluster
//! (`redis+cluster://` or `[redis] cluster = true`) it is redis-rs's `cluster_async` connection, which
//! keeps one multiplexed connection per node, sends each command to the master of its key's slot and
//! follows `MOVED`/`ASK`. Both are bounded alike: a reply within `redis.response_timeout_ms` (on a
//! cluster, redirections and retries included) or the outcome is unknown, each connection attempt
//! within `redis.connect_timeout_ms`, and at most six attempts with backoff up to 2 s.
//!
//! A cluster runs a Lua script or a pipeline only when every key in it lies in one hash slot, so
//! every script's keys share a hash tag (`{s_…}` for a session) and commands on keys of several slots
//! go through [`RedisConn::exec_each`] and [`RedisConn::query_each`]: one pipeline on a single server,
//! concurrent commands (pipelined per node) on a cluster. Debug builds check every other script call
//! and pipeline for keys of one slot on a single server too, so the tests against one Redis catch a
//! change that would break on a cluster. Commands for every master (`CONFIG GET` for the durability
//! check) go through [`RedisConn::on_each_master`].

use std::time::Duration;

use futures::future::try_join_all;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, Slot};
use redis::{Arg, Cmd, ErrorKind, FromRedisValue, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use crate::config::{RedisConfig, RedisTarget};

/// Connection attempts after the first one fails, for the first connection and for reconnects.
const RECONNECT_ATTEMPTS: u32 = 6;

/// The longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A connection to the fleet's Redis: one server or a cluster. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct RedisConn(Inner);

#[derive(Clone)]
enum Inner {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// Connects to the server or cluster `cfg` names, retrying with backoff within the bounds above.
    pub async fn connect(cfg: &RedisConfig) -> RedisResult<Self> {
        let target = cfg.target().map_err(|p| {
            RedisError::from((ErrorKind::InvalidClientConfig, "invalid [redis] settings", p.to_string()))
        })?;
        let response_timeout = Duration::from_millis(cfg.response_timeout_ms);
        let connect_timeout = Duration::from_millis(cfg.connect_timeout_ms);
        match target {
            RedisTarget::Single(url) => Self::single(&url, response_timeout, connect_timeout).await,
            RedisTarget::Cluster(seeds) => Self::cluster(seeds, response_timeout, connect_timeout).await,
        }
    }

    async fn single(url: &str, response_timeout: Duration, connect_timeout: Duration) -> RedisResult<Self> {
        let client = redis::Client::open(url)?;
        let manager_cfg = ConnectionManagerConfig::new()
            .set_response_timeout(Some(response_timeout))
            .set_connection_timeout(Some(connect_timeout))
            .set_number_of_retries(RECONNECT_ATTEMPTS as usize)
            .set_max_delay(MAX_BACKOFF);
        Ok(Self(Inner::Single(client.get_connection_manager_with_config(manager_cfg).await?)))
    }

    async fn cluster(seeds: Vec<String>, response_timeout: Duration, connect_timeout: Duration) -> RedisResult<Self> {
        let client = ClusterClientBuilder::new(seeds)
            .connection_timeout(connect_timeout)
            .response_timeout(response_timeout)
            .retries(RECONNECT_ATTEMPTS)
            .max_retry_wait(u64::try_from(MAX_BACKOFF.as_millis()).unwrap_or(u64::MAX))
            .build()?;
        // The cluster client retries commands and reconnects nodes by itself, but not its first
        // connection: retry that here, as the connection manager does for one server.
        let mut attempt = 0;
        loop {
            // Connecting to the seeds, then asking one of them for the slots.
            let bound = connect_timeout + response_timeout;
            let result = match tokio::time::timeout(bound, client.get_async_connection()).await {
                Ok(result) => result,
                Err(_) => Err(RedisError::from((ErrorKind::Io, "connecting to the Redis Cluster timed out"))),
            };
            match result {
                Ok(conn) => return Ok(Self(Inner::Cluster(conn))),
                Err(e) if attempt >= RECONNECT_ATTEMPTS => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "connecting to the Redis Cluster failed; retrying");
                    tokio::time::sleep(MAX_BACKOFF.min(Duration::from_millis(100 << attempt))).await;
                    attempt += 1;
                }
            }
        }
    }

    /// True when this is a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.0, Inner::Cluster(_))
    }

    /// Runs `cmds`, whose keys may lie in different slots, and drops their replies: one pipeline
    /// on a single server (in order), concurrent commands on a cluster (in no particular order).
    /// Any error fails the whole; some commands may have run.
    pub async fn exec_each(&self, cmds: Vec<Cmd>) -> RedisResult<()> {
        match (&self.0, cmds.len()) {
            (_, 0) => Ok(()),
            (Inner::Single(conn), _) => {
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd).ignore();
                }
                // Straight to the server, past the one-slot check: these keys may be of many slots.
                pipe.exec_async(&mut conn.clone()).await
            }
            (Inner::Cluster(_), _) => try_join_all(cmds.iter().map(|cmd| {
                let mut conn = self.clone();
                async move { cmd.exec_async(&mut conn).await }
            }))
            .await
            .map(drop),
        }
    }

    /// Runs `cmds`, whose keys may lie in different slots, and returns their replies in order: one
    /// pipeline on a single server, concurrent commands on a cluster.
    pub async fn query_each<T: FromRedisValue + Send>(&self, cmds: Vec<Cmd>) -> RedisResult<Vec<T>> {
        match (&self.0, cmds.len()) {
            (_, 0) => Ok(Vec::new()),
            (Inner::Single(conn), _) => {
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                // Straight to the server, past the one-slot check: these keys may be of many slots.
                pipe.query_async(&mut conn.clone()).await
            }
            (Inner::Cluster(_), _) => {
                try_join_all(cmds.iter().map(|cmd| {
                    let mut conn = self.clone();
                    async move { cmd.query_async::<T>(&mut conn).await }
                }))
                .await
            }
        }
    }

    /// Runs `cmd` on the one server, or on every master of a cluster, and returns each node's
    /// reply: a server's error reply (`NOPERM`, an unknown command) as that node's `Err`. The node
    /// is `host:port`, or empty for a single server. A connection error fails the whole.
    pub async fn on_each_master(&self, cmd: &Cmd) -> RedisResult<Vec<(String, RedisResult<Value>)>> {
        match &self.0 {
            Inner::Single(conn) => {
                let reply = cmd.query_async::<Value>(&mut conn.clone()).await;
                match reply {
                    Err(e) if e.code().is_none() => Err(e),
                    reply => Ok(vec![(String::new(), reply.and_then(Value::extract_error))]),
                }
            }
            Inner::Cluster(conn) => {
                let every_master = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                let replies = conn.clone().route_command(cmd.clone(), every_master).await?;
                let Value::Map(replies) = replies else {
                    return Err(RedisError::from((ErrorKind::UnexpectedReturnType, "no reply per node")));
                };
                replies
                    .into_iter()
                    .map(|(node, reply)| Ok((String::from_redis_value(node)?, reply.extract_error())))
                    .collect()
            }
        }
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        if cfg!(debug_assertions)
            && let Err(e) = one_slot(script_keys(cmd).unwrap_or_default())
        {
            return Box::pin(async move { Err(e) });
        }
        match &mut self.0 {
            Inner::Single(conn) => conn.req_packed_command(cmd),
            Inner::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        if cfg!(debug_assertions)
            && let Err(e) = one_slot(pipeline.cmd_iter().flat_map(keys_of).collect())
        {
            return Box::pin(async move { Err(e) });
        }
        match &mut self.0 {
            Inner::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Inner::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.0 {
            Inner::Single(conn) => conn.get_db(),
            Inner::Cluster(conn) => conn.get_db(),
        }
    }
}

/// The cluster slot of `key`: the CRC16 of its hash tag (the text between the first `{` and the
/// next `}`, when not empty) or of the whole key, modulo 16384.
pub fn slot(key: &[u8]) -> Slot {
    Slot::for_key(key)
}

/// Fails unless every key of `keys` lies in one slot, naming them.
fn one_slot(keys: Vec<&[u8]>) -> RedisResult<()> {
    let Some(first) = keys.first() else { return Ok(()) };
    if keys.iter().all(|k| slot(k) == slot(first)) {
        return Ok(());
    }
    let shown: Vec<String> = keys.iter().map(|k| String::from_utf8_lossy(k).into_owned()).collect();
    Err(RedisError::from((
        ErrorKind::Client,
        "keys of more than one cluster slot in one script or pipeline (Redis Cluster refuses it)",
        shown.join(" "),
    )))
}

/// The arguments of `cmd`, the command's name first.
fn args(cmd: &Cmd) -> Vec<&[u8]> {
    cmd.args_iter()
        .filter_map(|a| match a {
            Arg::Simple(bytes) => Some(bytes),
            _ => None,
        })
        .collect()
}

/// The `KEYS` of an `EVAL`/`EVALSHA`; `None` for any other command.
fn script_keys(cmd: &Cmd) -> Option<Vec<&[u8]>> {
    let args = args(cmd);
    let name = args.first()?;
    if !(name.eq_ignore_ascii_case(b"EVALSHA") || name.eq_ignore_ascii_case(b"EVAL")) {
        return None;
    }
    let count: usize = std::str::from_utf8(args.get(2)?).ok()?.parse().ok()?;
    Some(args.iter().skip(3).take(count).copied().collect())
}

/// Commands that take no key, or whose second argument is not one.
const KEYLESS: [&[u8]; 14] = [
    b"PING", b"CONFIG", b"SCRIPT", b"CLUSTER", b"INFO", b"KEYS", b"SCAN", b"TIME", b"ECHO", b"CLIENT", b"MULTI",
    b"EXEC", b"DISCARD", b"WAIT",
];

/// Commands whose arguments are all keys.
const ALL_KEYS: [&[u8]; 5] = [b"DEL", b"UNLINK", b"EXISTS", b"MGET", b"TOUCH"];

/// The keys of a command in a pipeline, as far as the commands this crate sends go: a script's
/// `KEYS`, every argument of a multi-key command, else the first argument.
fn keys_of(cmd: &Cmd) -> Vec<&[u8]> {
    if let Some(keys) = script_keys(cmd) {
        return keys;
    }
    let args = args(cmd);
    let Some(name) = args.first() else { return Vec::new() };
    let is = |list: &[&[u8]]| list.iter().any(|n| name.eq_ignore_ascii_case(n));
    if is(&KEYLESS) {
        Vec::new()
    } else if is(&ALL_KEYS) {
        args[1..].to_vec()
    } else {
        args.get(1).copied().into_iter().collect()
    }
}

/// The keys a Lua script touches without having been given them: the key argument of each
/// `redis.call`/`redis.pcall` that is neither `KEYS[…]` nor a local set from one (`local meta = KEYS[1]`).
/// A cluster routes a script by its `KEYS`, so a key built inside the script (`KEYS[1] .. ':x'`, or
/// one from `ARGV`) may live on another node: every script must return an empty list here.
pub fn undeclared_keys(script: &str) -> Vec<String> {
    let aliases = key_aliases(script);
    let mut found = Vec::new();
    for call in ["redis.call(", "redis.pcall("] {
        for (at, _) in script.match_indices(call) {
            let rest = &script[at + call.len()..];
            let mut args = rest.split([',', ')']).map(str::trim);
            let command = args.next().unwrap_or("").trim_matches(['\'', '"']).to_ascii_uppercase();
            let key = args.next().unwrap_or("");
            let keyless = ["TIME", "PING"].contains(&command.as_str());
            let given = (key.starts_with("KEYS[") && key.ends_with(']')) || aliases.iter().any(|a| a == key);
            if !keyless && !given {
                found.push(format!("{command} {key}"));
            }
        }
    }
    found
}

/// The locals of a script that hold one of its `KEYS`: `local a, b = KEYS[1], KEYS[2]`.
fn key_aliases(script: &str) -> Vec<String> {
    let mut aliases = Vec::new();
    for line in script.lines().map(str::trim) {
        let Some((names, values)) = line.strip_prefix("local ").and_then(|l| l.split_once('=')) else { continue };
        for (name, value) in names.split(',').zip(values.split(',')) {
            let value = value.trim();
            if value.starts_with("KEYS[") && value.ends_with(']') {
                aliases.push(name.trim().to_owned());
            }
        }
    }
    aliases
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline_keys(pipe: &Pipeline) -> Vec<&[u8]> {
        pipe.cmd_iter().flat_map(keys_of).collect()
    }

    #[test]
    fn a_script_may_touch_only_keys_of_one_slot() {
        let mut one = redis::cmd("EVALSHA");
        one.arg("abc").arg(2).arg("af:{s_1}:meta").arg("af:{s_1}:msgs").arg("not-a-key");
        assert!(one_slot(script_keys(&one).unwrap_or_default()).is_ok());
        let mut two = redis::cmd("EVALSHA");
        two.arg("abc").arg(2).arg("af:{s_1}:meta").arg("af:{s_2}:msgs");
        let e = one_slot(script_keys(&two).unwrap_or_default()).expect_err("two slots");
        assert!(e.to_string().contains("af:{s_2}:msgs"), "{e}");
        // Arguments past the keys are not keys.
        let mut args_only = redis::cmd("EVAL");
        args_only.arg("return 1").arg(1).arg("af:{s_1}:meta").arg("af:{s_2}:meta");
        assert!(one_slot(script_keys(&args_only).unwrap_or_default()).is_ok());
    }

    #[test]
    fn a_pipeline_may_touch_only_keys_of_one_slot() {
        let mut same = redis::pipe();
        same.hgetall("af:{s_1}:meta").lrange("af:{s_1}:msgs", 0, -1).del(&["af:{s_1}:a", "af:{s_1}:b"]);
        assert!(one_slot(pipeline_keys(&same)).is_ok());
        let mut spread = redis::pipe();
        spread.zadd("af:ix:all", "m", 0).zadd("af:ix:status:live", "m", 0);
        assert!(one_slot(pipeline_keys(&spread)).is_err());
        let mut del = redis::pipe();
        del.del(&["af:{s_1}:meta", "af:{s_2}:meta"]);
        assert!(one_slot(pipeline_keys(&del)).is_err());
        let mut keyless = redis::pipe();
        keyless.cmd("PING").cmd("CONFIG").arg("GET").arg("appendonly").get("any");
        assert!(one_slot(pipeline_keys(&keyless)).is_ok());
    }

    #[test]
    fn keys_built_inside_a_script_are_found() {
        let good = "local meta, msgs = KEYS[1], KEYS[2]\nredis.call('HGET', meta, 'x')\nredis.call('RPUSH', msgs, 1)\n\
                    for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], 5) end\nredis.call('TIME')";
        assert_eq!(undeclared_keys(good), Vec::<String>::new());
        let bad = "local k = KEYS[1] .. ':x'\nredis.call('GET', k)\nredis.pcall(\"del\", ARGV[1])";
        assert_eq!(undeclared_keys(bad), vec!["GET k".to_owned(), "DEL ARGV[1]".to_owned()]);
    }

    #[test]
    fn slots_follow_the_hash_tag() {
        // The values Redis's CLUSTER KEYSLOT gives.
        assert_eq!(slot(b"foo"), Slot::new(12182).expect("slot"));
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        // An empty first tag: the whole key counts.
        assert_ne!(slot(b"foo{}{bar}"), slot(b"{bar}"));
    }
}
