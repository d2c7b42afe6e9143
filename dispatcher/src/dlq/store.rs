//! The dead-letter store in Redis: one hash per dead letter and sorted-set indexes, all under the
//! one hash tag `{dlq}`, so every script touches one Redis Cluster slot.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `<p>:{dlq}:e:<id>` | hash | `entry` (the [`Entry`] as JSON), `body` (bytes), `size` (bytes counted), `claimed` (a redrive in progress, until ms) |
//! | `<p>:{dlq}:ix` | sorted set | every id, score 0, read by lex order (ids are ULIDs: by time) |
//! | `<p>:{dlq}:ix:t:<tenant>` | sorted set | the ids of one tenant's dead letters |
//! | `<p>:{dlq}:bytes` | string | the bytes of every stored body |
//!
//! One slot for all of them, as `{budget}` is for the daily caps: dead letters are few (bounded by
//! `dead_letters.max_stored`), and one slot lets one script check the bound and write the entry
//! and its indexes at once.

use redis::Script;
use redis::aio::ConnectionLike;

use super::entry::Entry;

/// Stores an entry unless the store is full. KEYS: entry, all, bytes, [tenant index]. ARGV: id,
/// entry JSON, body, size, max count, max bytes. 1 stored, 0 full.
const PUT: &str = r"
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return 0 end
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
if used > 0 and used + tonumber(ARGV[4]) > tonumber(ARGV[6]) then return 0 end
redis.call('HSET', KEYS[1], 'entry', ARGV[2], 'body', ARGV[3], 'size', ARGV[4])
redis.call('ZADD', KEYS[2], 0, ARGV[1])
if KEYS[4] then redis.call('ZADD', KEYS[4], 0, ARGV[1]) end
redis.call('INCRBY', KEYS[3], ARGV[4])
return 1
";

/// Removes an entry. KEYS: entry, all, bytes, [tenant index]. ARGV: id. 1 removed, 0 not there.
const DELETE: &str = r"
local size = redis.call('HGET', KEYS[1], 'size')
if not size then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DECRBY', KEYS[3], size)
if KEYS[4] then redis.call('ZREM', KEYS[4], ARGV[1]) end
return 1
";

/// Claims an entry for a redrive until ARGV[2] (ms), unless another redrive holds it past ARGV[1]
/// (now). KEYS: entry. 1 claimed, 0 not there, -1 held.
const CLAIM: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local until_ms = tonumber(redis.call('HGET', KEYS[1], 'claimed') or '0')
if until_ms > tonumber(ARGV[1]) then return -1 end
redis.call('HSET', KEYS[1], 'claimed', ARGV[2])
return 1
";

/// What a claim for a redrive found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// The entry is ours to re-drive.
    Claimed,
    /// No such entry (re-driven or discarded already).
    Missing,
    /// Another redrive of it is under way.
    Held,
}

/// The dead-letter store's keys under a fleet's key prefix.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    /// The keys under `key_prefix` (`redis.key_prefix`).
    pub(crate) fn new(key_prefix: &str) -> Self {
        Self { prefix: format!("{key_prefix}:{{dlq}}") }
    }

    fn entry(&self, id: &str) -> String {
        format!("{}:e:{id}", self.prefix)
    }

    fn all(&self) -> String {
        format!("{}:ix", self.prefix)
    }

    fn tenant(&self, tenant: &str) -> String {
        format!("{}:ix:t:{tenant}", self.prefix)
    }

    fn bytes(&self) -> String {
        format!("{}:bytes", self.prefix)
    }

    /// The index of `tenant`'s dead letters, or of all of them.
    fn index(&self, tenant: Option<&str>) -> String {
        tenant.map_or_else(|| self.all(), |t| self.tenant(t))
    }

    /// Stores `entry` with `body` unless that would pass `max_count` entries or `max_bytes`
    /// bytes (one entry always fits an empty store); false when full.
    pub(crate) async fn put<C: ConnectionLike + Send>(
        &self,
        conn: &mut C,
        entry: &Entry,
        body: &[u8],
        max_count: u64,
        max_bytes: u64,
    ) -> redis::RedisResult<bool> {
        let json = serde_json::to_string(entry).unwrap_or_default();
        let script = Script::new(PUT);
        let mut call = script.key(self.entry(&entry.id));
        call.key(self.all()).key(self.bytes());
        if let Some(t) = &entry.tenant {
            call.key(self.tenant(t));
        }
        call.arg(&entry.id).arg(json).arg(body).arg(body.len()).arg(max_count).arg(max_bytes);
        let stored: i64 = call.invoke_async(conn).await?;
        Ok(stored == 1)
    }

    /// The entry and its body, when there is one.
    pub(crate) async fn get<C: ConnectionLike + Send>(
        &self,
        conn: &mut C,
        id: &str,
    ) -> redis::RedisResult<Option<(Entry, Vec<u8>)>> {
        let (entry, body): (Option<String>, Option<Vec<u8>>) =
            redis::cmd("HMGET").arg(self.entry(id)).arg("entry").arg("body").query_async(conn).await?;
        Ok(entry.and_then(|e| serde_json::from_str(&e).ok()).map(|e| (e, body.unwrap_or_default())))
    }

    /// The entries of `ids` that still exist, in order (without their bodies).
    pub(crate) async fn entries<C: ConnectionLike + Send>(
        &self,
        conn: &mut C,
        ids: &[String],
    ) -> redis::RedisResult<Vec<Entry>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.hget(self.entry(id), "entry");
        }
        let found: Vec<Option<String>> = pipe.query_async(conn).await?;
        Ok(found.into_iter().flatten().filter_map(|e| serde_json::from_str(&e).ok()).collect())
    }

    /// Up to `n` ids of `tenant`'s index (or all), after `cursor`, newest or oldest first.
    pub(crate) async fn ids<C: ConnectionLike + Send>(
        &self,
        conn: &mut C,
        tenant: Option<&str>,
        cursor: Option<&str>,
        newest_first: bool,
        n: usize,
    ) -> redis::RedisResult<Vec<String>> {
        let key = self.index(tenant);
        let mut cmd = if newest_first {
            let mut c = redis::cmd("ZREVRANGEBYLEX");
            c.arg(&key).arg(cursor.map_or("+".to_owned(), |c| format!("({c}"))).arg("-");
            c
        } else {
            let mut c = redis::cmd("ZRANGEBYLEX");
            c.arg(&key).arg(cursor.map_or("-".to_owned(), |c| format!("({c}"))).arg("+");
            c
        };
        cmd.arg("LIMIT").arg(0).arg(n).query_async(conn).await
    }

    /// Dead letters stored in `tenant`'s index (or all).
    pub(crate) async fn count<C: ConnectionLike + Send>(
        &self,
        conn: &mut C,
        tenant: Option<&str>,
    ) -> redis::RedisResult<u64> {
        redis::cmd("ZCARD").arg(self.index(tenant)).query_async(conn).await
    }

    /// Takes an entry for a redrive for `hold_ms`.
    pub(crate) async fn claim<C: ConnectionLike + Send>(
        &self,
        conn: &mut C,
        id: &str,
        now_ms: u64,
        hold_ms: u64,
    ) -> redis::RedisResult<Claim> {
        let got: i64 =
            Script::new(CLAIM).key(self.entry(id)).arg(now_ms).arg(now_ms + hold_ms).invoke_async(conn).await?;
        Ok(match got {
            1 => Claim::Claimed,
            0 => Claim::Missing,
            _ => Claim::Held,
        })
    }

    /// Gives a claimed entry back (its redrive failed).
    pub(crate) async fn unclaim<C: ConnectionLike + Send>(&self, conn: &mut C, id: &str) -> redis::RedisResult<()> {
        redis::cmd("HDEL").arg(self.entry(id)).arg("claimed").query_async(conn).await
    }

    /// Removes `entry`; false when it was gone already.
    pub(crate) async fn delete<C: ConnectionLike + Send>(
        &self,
        conn: &mut C,
        entry: &Entry,
    ) -> redis::RedisResult<bool> {
        let script = Script::new(DELETE);
        let mut call = script.key(self.entry(&entry.id));
        call.key(self.all()).key(self.bytes());
        if let Some(t) = &entry.tenant {
            call.key(self.tenant(t));
        }
        let removed: i64 = call.arg(&entry.id).invoke_async(conn).await?;
        Ok(removed == 1)
    }
}
