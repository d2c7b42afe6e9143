//! Prompt caching, modelled on the real API's: the server's one piece of state.
//!
//! A request's prompt is a sequence of blocks in the API's cache order: each tool definition, then
//! the system prompt (a string is one text block, a list counts block by block), then each message's
//! content blocks (a string `content` is one text block). Each block is canonicalised without its
//! `cache_control` key, so moving a marker never changes a key, and hashed into a running hash: the
//! prefix hash at block `i` is the hash of the prefix hash at `i - 1`, the block's section (tool,
//! system, or the message's role, marked at the start of each message) and its canonical JSON. The
//! prefix up to block `i` has `ceil(canonical bytes of blocks 0..=i / 4)` tokens.
//!
//! Blocks carrying `cache_control` are breakpoints. For a successful answer, [`CacheStore::apply`]
//! looks for a live entry at each breakpoint's prefix and at up to [`LOOKBACK_BLOCKS`] positions
//! before it; the longest one found is read (and its expiry refreshed). Every breakpoint past it
//! whose prefix reaches the model's minimum cacheable length is then written with its TTL. A request
//! without breakpoints neither reads nor writes, as in the Messages API.

use std::collections::{BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hasher};
use std::io;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::{Serialize, Serializer};
use serde_json::Value;

use super::error::ApiError;
use super::fields::{Object, invalid_at};
use super::tools;

/// How many block positions before a breakpoint are also looked up, as the API's lookback window.
pub(crate) const LOOKBACK_BLOCKS: usize = 20;

/// The most entries kept; when full, the entry expiring first is dropped.
const MAX_ENTRIES: usize = 200_000;

/// How long a cache entry lives after its last write or read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ttl {
    /// `{"type": "ephemeral"}` or `"ttl": "5m"`.
    FiveMinutes,
    /// `"ttl": "1h"`.
    OneHour,
}

impl Ttl {
    fn duration(self) -> Duration {
        match self {
            Self::FiveMinutes => Duration::from_secs(5 * 60),
            Self::OneHour => Duration::from_secs(60 * 60),
        }
    }
}

/// The smallest prefix, in tokens, the API caches for `model`; shorter breakpoints are ignored.
pub(crate) fn min_cacheable_tokens(model: &str) -> u64 {
    const TABLE: [(&str, u64); 8] = [
        ("claude-opus-4-5", 4096),
        ("claude-opus-4-6", 4096),
        ("claude-haiku-4-5", 4096),
        ("claude-sonnet-4-6", 2048),
        ("claude-haiku-4-20250514", 2048),
        ("claude-haiku-3", 2048),
        ("claude-3-5-haiku", 2048),
        ("claude-3-haiku", 2048),
    ];
    TABLE.iter().find(|(prefix, _)| model.starts_with(prefix)).map_or(1024, |&(_, tokens)| tokens)
}

/// A block carrying `cache_control`: its position in cache order and its TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Breakpoint {
    block: usize,
    ttl: Ttl,
}

/// The running hash and token count of the prompt up to and including one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Prefix {
    hash: u64,
    tokens: u64,
}

/// What the cache needs of a validated request: its breakpoints and, when there are any, the
/// prefixes up to the last one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CachePlan {
    model: String,
    min_tokens: u64,
    breakpoints: Vec<Breakpoint>,
    prefixes: Vec<Prefix>,
}

/// Where a block sits, for messages and for what is hashed with it.
#[derive(Debug, Clone, Copy)]
enum Place {
    Tool(usize),
    System(usize),
    /// Message `i`, block `j`, and the message's role.
    Message(usize, usize, &'static str),
}

impl Place {
    fn path(self) -> String {
        match self {
            Self::Tool(i) => format!("tools.{i}"),
            Self::System(i) => format!("system.{i}"),
            Self::Message(i, j, _) => format!("messages.{i}.content.{j}"),
        }
    }

    /// What is hashed before the block: its section, and the role at the start of a message.
    fn tag(self) -> &'static [u8] {
        match self {
            Self::Tool(_) => b"tool",
            Self::System(_) => b"system",
            Self::Message(_, 0, "assistant") => b"message:assistant",
            Self::Message(_, 0, _) => b"message:user",
            Self::Message(..) => b"block",
        }
    }
}

/// One block as sent: an object, or a string that stands for one text block.
#[derive(Debug, Clone, Copy)]
enum Piece<'a> {
    Value(&'a Value),
    Text(&'a str),
}

/// The prompt's blocks in cache order: tools, system, messages.
///
/// Runs after the shapes were validated, so anything that is not the expected list is skipped.
fn blocks(body: &Object) -> Vec<(Place, Piece<'_>)> {
    fn list(value: Option<&Value>) -> &[Value] {
        value.and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default()
    }
    let mut out: Vec<(Place, Piece<'_>)> =
        list(body.get("tools")).iter().enumerate().map(|(i, tool)| (Place::Tool(i), Piece::Value(tool))).collect();
    match body.get("system") {
        Some(Value::String(text)) => out.push((Place::System(0), Piece::Text(text))),
        system => out.extend(list(system).iter().enumerate().map(|(i, b)| (Place::System(i), Piece::Value(b)))),
    }
    for (i, message) in list(body.get("messages")).iter().enumerate() {
        let role = if message.get("role").and_then(Value::as_str) == Some("assistant") { "assistant" } else { "user" };
        match message.get("content") {
            Some(Value::String(text)) => out.push((Place::Message(i, 0, role), Piece::Text(text))),
            content => {
                let items = list(content).iter().enumerate();
                out.extend(items.map(|(j, b)| (Place::Message(i, j, role), Piece::Value(b))));
            }
        }
    }
    out
}

impl CachePlan {
    /// Validates every `cache_control` of a request (its value, the block it is on, at most four, no
    /// 1h after a 5m) and, when there is a breakpoint, hashes the prompt up to the last one.
    pub(crate) fn read(body: &Object, model: &str) -> Result<CachePlan, ApiError> {
        let blocks = blocks(body);
        let mut breakpoints = Vec::new();
        for (block, &(place, piece)) in blocks.iter().enumerate() {
            let Piece::Value(Value::Object(object)) = piece else { continue };
            let Some(control) = object.get("cache_control") else { continue };
            let path = place.path();
            let ttl = tools::cache_control_ttl(control, &format!("{path}.cache_control"))?;
            check_cacheable(object, &path)?;
            breakpoints.push((path, Breakpoint { block, ttl }));
        }
        tools::check_breakpoint_count(breakpoints.len())?;
        check_ttl_order(&breakpoints)?;
        let breakpoints: Vec<Breakpoint> = breakpoints.into_iter().map(|(_, b)| b).collect();
        let last = breakpoints.last().map_or(0, |b| b.block + 1);
        let prefixes = prefixes(&blocks[..last]);
        Ok(CachePlan { model: model.to_owned(), min_tokens: min_cacheable_tokens(model), breakpoints, prefixes })
    }

    fn key(&self, block: usize) -> Key {
        Key { model: self.model.clone(), prefix: self.prefixes[block].hash }
    }

    fn tokens(&self, block: usize) -> u64 {
        self.prefixes[block].tokens
    }
}

/// `cache_control` may not sit on thinking blocks or on empty text blocks.
fn check_cacheable(block: &Object, path: &str) -> Result<(), ApiError> {
    match block.get("type").and_then(Value::as_str) {
        Some(kind @ ("thinking" | "redacted_thinking")) => Err(invalid_at(
            &format!("{path}.cache_control"),
            format!("cache_control cannot be set on `{kind}` blocks; thinking blocks are cached with their turn"),
        )),
        Some("text") if block.get("text").and_then(Value::as_str).is_some_and(|t| t.trim().is_empty()) => {
            Err(invalid_at(&format!("{path}.text"), "cache_control cannot be set for empty text blocks"))
        }
        _ => Ok(()),
    }
}

/// A 1h breakpoint may not come after a 5m one, in cache order.
fn check_ttl_order(breakpoints: &[(String, Breakpoint)]) -> Result<(), ApiError> {
    let first_short = breakpoints.iter().position(|(_, b)| b.ttl == Ttl::FiveMinutes);
    let late_long = first_short.and_then(|i| breakpoints[i..].iter().find(|(_, b)| b.ttl == Ttl::OneHour));
    match late_long {
        Some((path, _)) => Err(invalid_at(
            &format!("{path}.cache_control"),
            "a cache_control block with ttl '1h' must not come after one with ttl '5m'; \
             blocks are taken in the order tools, system, messages",
        )),
        None => Ok(()),
    }
}

/// The running hash and token count after each block.
fn prefixes(blocks: &[(Place, Piece<'_>)]) -> Vec<Prefix> {
    let mut out = Vec::with_capacity(blocks.len());
    let (mut hash, mut bytes) = (0_u64, 0_usize);
    for &(place, piece) in blocks {
        let mut writer = HashWriter { hasher: DefaultHasher::new(), bytes: 0 };
        writer.hasher.write_u64(hash);
        writer.hasher.write(place.tag());
        write_canonical(&mut writer, piece);
        hash = writer.hasher.finish();
        bytes += writer.bytes;
        out.push(Prefix { hash, tokens: u64::try_from(bytes.div_ceil(4)).unwrap_or(u64::MAX) });
    }
    out
}

/// Writes a block's canonical JSON: compact, without `cache_control`, a string as a text block.
fn write_canonical(writer: &mut HashWriter, piece: Piece<'_>) {
    // Writing into a hasher cannot fail, and a `Value` always serialises.
    let _ = match piece {
        Piece::Text(text) => {
            let mut block = Object::new();
            block.insert("type".to_owned(), Value::from("text"));
            block.insert("text".to_owned(), Value::from(text));
            serde_json::to_writer(writer, &block)
        }
        Piece::Value(Value::Object(object)) => serde_json::to_writer(writer, &WithoutCacheControl(object)),
        Piece::Value(other) => serde_json::to_writer(writer, other),
    };
}

/// Feeds serialised bytes to a hasher and counts them.
struct HashWriter {
    hasher: DefaultHasher,
    bytes: usize,
}

impl io::Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.write(buf);
        self.bytes += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An object serialised without its top-level `cache_control` key.
struct WithoutCacheControl<'a>(&'a Object);

impl Serialize for WithoutCacheControl<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().filter(|(key, _)| key.as_str() != "cache_control"))
    }
}

/// A request's JSON with every `cache_control` key removed, at any depth: two requests whose results
/// are equal would share their cache entries as far as they agree.
pub fn strip_cache_control(body: &[u8]) -> anyhow::Result<Value> {
    fn strip(value: Value) -> Value {
        match value {
            Value::Object(object) => Value::Object(
                object.into_iter().filter(|(k, _)| k != "cache_control").map(|(k, v)| (k, strip(v))).collect(),
            ),
            Value::Array(items) => Value::Array(items.into_iter().map(strip).collect()),
            other => other,
        }
    }
    Ok(strip(serde_json::from_slice(body)?))
}

/// What the cache did for one answered request. Invariant: `read + creation() <= ` the total given to
/// [`CacheStore::apply`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CacheOutcome {
    /// The request had at least one breakpoint.
    pub(crate) breakpoints: bool,
    /// Tokens of the longest live prefix found (`cache_read_input_tokens`).
    pub(crate) read: u64,
    /// Tokens written into entries with a 5-minute TTL.
    pub(crate) creation_5m: u64,
    /// Tokens written into entries with a 1-hour TTL.
    pub(crate) creation_1h: u64,
    /// Whether any entry was written.
    pub(crate) wrote: bool,
}

impl CacheOutcome {
    /// `cache_creation_input_tokens`.
    pub(crate) fn creation(&self) -> u64 {
        self.creation_5m + self.creation_1h
    }
}

/// An entry's key: the model and the prefix hash.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    model: String,
    prefix: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    tokens: u64,
    ttl: Ttl,
    expires: Instant,
}

#[derive(Debug)]
struct Entries {
    map: HashMap<Key, Entry>,
    /// The same entries by expiry, to drop the expired and, when full, the one expiring first.
    by_expiry: BTreeSet<(Instant, Key)>,
    capacity: usize,
}

impl Entries {
    /// Drops every entry expired at `now`.
    fn purge(&mut self, now: Instant) {
        while let Some(first) = self.by_expiry.first() {
            if first.0 > now {
                break;
            }
            if let Some((_, key)) = self.by_expiry.pop_first() {
                self.map.remove(&key);
            }
        }
    }

    /// Sets an entry, replacing one with the same key.
    fn put(&mut self, key: Key, tokens: u64, ttl: Ttl, now: Instant) {
        let expires = now + ttl.duration();
        if let Some(old) = self.map.get(&key) {
            self.by_expiry.remove(&(old.expires, key.clone()));
        } else if self.map.len() >= self.capacity
            && let Some((_, first)) = self.by_expiry.pop_first()
        {
            self.map.remove(&first);
        }
        self.by_expiry.insert((expires, key.clone()));
        self.map.insert(key, Entry { tokens, ttl, expires });
    }
}

/// The prompt cache: entries keyed by model and prefix hash, each with its tokens and expiry.
#[derive(Debug)]
pub(crate) struct CacheStore(Mutex<Entries>);

impl Default for CacheStore {
    fn default() -> Self {
        Self::with_capacity(MAX_ENTRIES)
    }
}

impl CacheStore {
    /// A store that keeps at most `capacity` entries.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self(Mutex::new(Entries { map: HashMap::new(), by_expiry: BTreeSet::new(), capacity: capacity.max(1) }))
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads and writes the cache for a request answered at `now` whose input is `total` tokens.
    ///
    /// The hit is the longest live prefix at a breakpoint or up to [`LOOKBACK_BLOCKS`] blocks before
    /// one; its expiry is refreshed by its own TTL. Every breakpoint past the hit that reaches the
    /// model's minimum is written; the tokens between consecutive written breakpoints (from the hit)
    /// are created with the later one's TTL. Read and creation are capped so they never exceed `total`
    /// (the tail cut off is the 5-minute part first, which comes last in a valid request). With
    /// `misses`, nothing is found: every breakpoint is written, as after an eviction.
    pub(crate) fn apply(&self, plan: &CachePlan, total: u64, now: Instant, misses: bool) -> CacheOutcome {
        if plan.breakpoints.is_empty() {
            return CacheOutcome::default();
        }
        let mut entries = self.lock();
        entries.purge(now);
        let mut positions: Vec<usize> =
            plan.breakpoints.iter().flat_map(|b| b.block.saturating_sub(LOOKBACK_BLOCKS)..=b.block).collect();
        positions.sort_unstable_by(|a, b| b.cmp(a));
        positions.dedup();
        let hit = positions.into_iter().filter(|_| !misses).find_map(|block| {
            let key = plan.key(block);
            let entry = *entries.map.get(&key)?;
            entries.put(key, entry.tokens, entry.ttl, now);
            Some(block)
        });
        let read = hit.map_or(0, |block| plan.tokens(block));
        let mut outcome = CacheOutcome { breakpoints: true, read, ..CacheOutcome::default() };
        let mut covered = read;
        let fresh = plan.breakpoints.iter().filter(|b| hit.is_none_or(|h| b.block > h));
        for breakpoint in fresh.filter(|b| plan.tokens(b.block) >= plan.min_tokens) {
            let tokens = plan.tokens(breakpoint.block);
            entries.put(plan.key(breakpoint.block), tokens, breakpoint.ttl, now);
            let segment = tokens.saturating_sub(covered);
            covered = covered.max(tokens);
            match breakpoint.ttl {
                Ttl::FiveMinutes => outcome.creation_5m += segment,
                Ttl::OneHour => outcome.creation_1h += segment,
            }
            outcome.wrote = true;
        }
        outcome.read = outcome.read.min(total);
        let room = total - outcome.read;
        if outcome.creation() > room {
            outcome.creation_1h = outcome.creation_1h.min(room);
            outcome.creation_5m = room - outcome.creation_1h;
        }
        outcome
    }

    /// How many entries are live at `now`.
    pub(crate) fn live_entries(&self, now: Instant) -> usize {
        let mut entries = self.lock();
        entries.purge(now);
        entries.map.len()
    }

    /// Drops every entry.
    pub(crate) fn clear(&self) {
        let mut entries = self.lock();
        entries.map.clear();
        entries.by_expiry.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const MODEL: &str = "claude-test";

    fn marker() -> Value {
        json!({"type": "ephemeral"})
    }

    fn text(text: &str, cache_control: Option<Value>) -> Value {
        let mut block = json!({"type": "text", "text": text});
        if let Some(control) = cache_control {
            block["cache_control"] = control;
        }
        block
    }

    /// A body with `system` blocks and a single user message with `content` blocks.
    fn body(system: Vec<Value>, content: Vec<Value>) -> Value {
        json!({"model": MODEL, "max_tokens": 100, "system": system, "messages": [{"role": "user", "content": content}]})
    }

    fn plan(body: &Value) -> CachePlan {
        plan_for(body, MODEL)
    }

    fn plan_for(body: &Value, model: &str) -> CachePlan {
        CachePlan::read(body.as_object().expect("object"), model).expect("valid cache_control")
    }

    fn rejected(body: &Value) -> String {
        CachePlan::read(body.as_object().expect("object"), MODEL).expect_err("invalid").message
    }

    /// `T` for a body, as the response computes it.
    fn total(body: &Value) -> u64 {
        body.to_string().len().div_ceil(4) as u64
    }

    fn apply(store: &CacheStore, body: &Value, now: Instant) -> CacheOutcome {
        store.apply(&plan(body), total(body), now, false)
    }

    /// Tokens of a prefix made of these canonical blocks.
    fn tokens_of(blocks: &[Value]) -> u64 {
        blocks.iter().map(|b| serde_json::to_vec(b).expect("json").len()).sum::<usize>().div_ceil(4) as u64
    }

    /// A system prompt long enough to be cached on any model with a 1024-token minimum.
    fn long(tag: &str) -> String {
        format!("{tag} {}", "You are a careful support agent. ".repeat(160))
    }

    #[test]
    fn a_first_request_writes_its_breakpoint() {
        let store = CacheStore::default();
        let request = body(vec![text(&long("s"), Some(marker()))], vec![text("hi", None)]);
        let outcome = apply(&store, &request, Instant::now());
        let prefix = tokens_of(&[text(&long("s"), None)]);
        assert!(prefix >= 1024, "{prefix}");
        let expected = CacheOutcome { breakpoints: true, read: 0, creation_5m: prefix, creation_1h: 0, wrote: true };
        assert_eq!(outcome, expected);
        assert_eq!(store.live_entries(Instant::now()), 1);
    }

    #[test]
    fn an_extended_prefix_reads_the_old_one_and_writes_the_difference() {
        let (store, now) = (CacheStore::default(), Instant::now());
        let first = body(vec![text(&long("s"), Some(marker()))], vec![text("hi", None)]);
        apply(&store, &first, now);
        let mut second = first.clone();
        second["messages"] = json!([
            {"role": "user", "content": [text("hi", None)]},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": [text("more", Some(marker()))]},
        ]);
        let outcome = apply(&store, &second, now);
        let read = tokens_of(&[text(&long("s"), None)]);
        let all = tokens_of(&[text(&long("s"), None), text("hi", None), text("hello", None), text("more", None)]);
        assert_eq!((outcome.read, outcome.creation_5m, outcome.creation_1h), (read, all - read, 0));
        let again = apply(&store, &second, now);
        assert_eq!((again.read, again.creation(), again.wrote), (all, 0, false), "the whole prefix is now cached");
    }

    #[test]
    fn a_prefix_below_the_minimum_is_neither_written_nor_read() {
        let (store, now) = (CacheStore::default(), Instant::now());
        let short = body(vec![text("You are a support agent.", Some(marker()))], vec![text("hi", None)]);
        assert_eq!(apply(&store, &short, now), CacheOutcome { breakpoints: true, ..CacheOutcome::default() });
        assert_eq!(apply(&store, &short, now).read, 0);
        assert_eq!(store.live_entries(now), 0);
        // About 1300 tokens: enough for a 1024-token model, not for a 4096-token one.
        let medium = body(vec![text(&long("s"), Some(marker()))], vec![text("hi", None)]);
        assert!(!store.apply(&plan_for(&medium, "claude-opus-4-5-20251101"), total(&medium), now, false).wrote);
        assert!(store.apply(&plan_for(&medium, "claude-sonnet-4-5"), total(&medium), now, false).wrote);
    }

    #[test]
    fn minimums_follow_the_model() {
        for model in ["claude-opus-4-5-20251101", "claude-opus-4-6", "claude-haiku-4-5-20251001"] {
            assert_eq!(min_cacheable_tokens(model), 4096, "{model}");
        }
        for model in ["claude-sonnet-4-6", "claude-3-5-haiku-20241022", "claude-3-haiku-20240307"] {
            assert_eq!(min_cacheable_tokens(model), 2048, "{model}");
        }
        assert_eq!(min_cacheable_tokens("claude-haiku-4-20250514"), 2048);
        for model in ["claude-sonnet-4-5", "claude-sonnet-4-20250514", "claude-opus-4-1", "claude-test"] {
            assert_eq!(min_cacheable_tokens(model), 1024, "{model}");
        }
    }

    /// One user message: the long text (block 0, marked when `mark_first`), then `n` short blocks,
    /// the last one marked.
    fn many_blocks(n: usize, mark_first: bool) -> Value {
        let mut content = vec![text(&long("s"), mark_first.then(marker))];
        content.extend((1..=n).map(|i| text(&format!("note {i}"), (i == n).then(marker))));
        json!({"model": MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": content}]})
    }

    #[test]
    fn lookback_reaches_twenty_blocks_back() {
        let now = Instant::now();
        let first = json!({"model": MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": [text(&long("s"), Some(marker()))]}]});
        let read = tokens_of(&[text(&long("s"), None)]);
        for (n, mark_first, hit) in [(20, false, true), (21, false, false), (25, false, false), (25, true, true)] {
            let store = CacheStore::default();
            assert!(apply(&store, &first, now).wrote);
            let outcome = apply(&store, &many_blocks(n, mark_first), now);
            assert_eq!(outcome.read, if hit { read } else { 0 }, "{n} blocks, first marked: {mark_first}");
            assert!(outcome.wrote);
        }
    }

    #[test]
    fn one_hour_entries_outlive_five_minute_ones() {
        let (store, t0) = (CacheStore::default(), Instant::now());
        let hour = json!({"type": "ephemeral", "ttl": "1h"});
        let request = body(vec![text(&long("s"), Some(hour))], vec![text(&long("u"), Some(marker()))]);
        let system = tokens_of(&[text(&long("s"), None)]);
        let both = tokens_of(&[text(&long("s"), None), text(&long("u"), None)]);
        let first = apply(&store, &request, t0);
        assert_eq!((first.read, first.creation_1h, first.creation_5m), (0, system, both - system));
        let minutes = |m: u64| t0 + Duration::from_secs(m * 60);
        assert_eq!(apply(&store, &request, minutes(4)).read, both, "read within 5 minutes, refreshing it");
        assert_eq!(apply(&store, &request, minutes(8)).read, both, "refreshed at minute 4");
        assert_eq!(store.live_entries(minutes(14)), 1, "only the hour entry is left");
        let later = apply(&store, &request, minutes(14));
        assert_eq!((later.read, later.creation_5m, later.creation_1h), (system, both - system, 0));
        assert_eq!(store.live_entries(minutes(14 + 61)), 0);
        assert_eq!(apply(&store, &request, minutes(14 + 61)).read, 0);
    }

    #[test]
    fn markers_do_not_change_the_key() {
        let (store, now) = (CacheStore::default(), Instant::now());
        let first = body(vec![text(&long("s"), Some(marker()))], vec![text("hi", None)]);
        apply(&store, &first, now);
        // The same prompt with the marker moved to the message, and the system prompt as a string.
        let mut moved = body(vec![], vec![text("hi", Some(marker()))]);
        moved["system"] = json!(long("s"));
        let outcome = apply(&store, &moved, now);
        let read = tokens_of(&[text(&long("s"), None)]);
        assert_eq!(
            (outcome.read, outcome.creation()),
            (read, tokens_of(&[text(&long("s"), None), text("hi", None)]) - read)
        );
        assert_eq!(plan(&moved).prefixes[0], plan(&first).prefixes[0]);
    }

    #[test]
    fn roles_models_and_sections_are_part_of_the_key() {
        let now = Instant::now();
        let as_user = many_blocks(1, true);
        let store = CacheStore::default();
        apply(&store, &as_user, now);
        assert_eq!(
            store.apply(&plan_for(&as_user, "claude-other"), total(&as_user), now, false).read,
            0,
            "another model"
        );
        let mut as_system = as_user.clone();
        as_system["system"] = json!([text(&long("s"), Some(marker()))]);
        as_system["messages"] = json!([{"role": "user", "content": [text("note 1", Some(marker()))]}]);
        assert_eq!(apply(&store, &as_system, now).read, 0, "the same block in the system prompt");
    }

    #[test]
    fn without_breakpoints_nothing_is_read_or_written() {
        let (store, now) = (CacheStore::default(), Instant::now());
        let plain = body(vec![text(&long("s"), None)], vec![text("hi", None)]);
        assert_eq!(apply(&store, &plain, now), CacheOutcome::default());
        assert_eq!(store.live_entries(now), 0);
    }

    #[test]
    fn read_and_creation_never_exceed_the_total() {
        let (store, now) = (CacheStore::default(), Instant::now());
        let hour = json!({"type": "ephemeral", "ttl": "1h"});
        let request = body(vec![text(&long("s"), Some(hour))], vec![text(&long("u"), Some(marker()))]);
        let outcome = store.apply(&plan(&request), 1500, now, false);
        assert_eq!(outcome.creation(), 1500);
        assert_eq!(outcome.creation_1h, tokens_of(&[text(&long("s"), None)]));
        assert_eq!(store.apply(&plan(&request), 1000, now, false).read, 1000);
    }

    #[test]
    fn the_store_is_bounded() {
        let (store, now) = (CacheStore::with_capacity(2), Instant::now());
        let hour = json!({"type": "ephemeral", "ttl": "1h"});
        for (tag, control) in [("a", hour.clone()), ("b", marker()), ("c", hour)] {
            apply(&store, &body(vec![text(&long(tag), Some(control))], vec![text("hi", None)]), now);
        }
        assert_eq!(store.live_entries(now), 2);
        let b = body(vec![text(&long("b"), Some(marker()))], vec![text("hi", None)]);
        assert_eq!(apply(&store, &b, now).read, 0, "the entry expiring first was dropped");
        store.clear();
        assert_eq!(store.live_entries(now), 0);
    }

    #[test]
    fn cache_control_is_checked_in_cache_order() {
        let block = text("a", Some(marker()));
        let five = body(vec![block.clone(), block.clone(), block.clone(), block.clone()], vec![block.clone()]);
        assert_eq!(rejected(&five), "A maximum of 4 blocks with cache_control may be provided. Found 5.");
        let hour = json!({"type": "ephemeral", "ttl": "1h"});
        let mut late_hour = body(vec![block.clone()], vec![text("b", Some(hour.clone()))]);
        assert!(
            rejected(&late_hour).starts_with("messages.0.content.0.cache_control: a cache_control block with ttl '1h'")
        );
        late_hour["tools"] = json!([{"name": "t", "input_schema": {"type": "object"}, "cache_control": hour}]);
        assert!(rejected(&late_hour).starts_with("messages.0.content.0"), "the tool's 1h comes first: fine");
        let early_hour = body(vec![text("a", Some(json!({"type": "ephemeral", "ttl": "1h"})))], vec![block.clone()]);
        assert_eq!(plan(&early_hour).breakpoints.len(), 2);
        let bad_ttl = body(vec![text("a", Some(json!({"type": "ephemeral", "ttl": "2h"})))], vec![]);
        assert_eq!(rejected(&bad_ttl), "system.0.cache_control.ttl: Input should be '5m' or '1h'");
        let thinking = json!({"type": "thinking", "thinking": "t", "signature": "s", "cache_control": marker()});
        let with_thinking = json!({"model": MODEL, "max_tokens": 100, "messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": [thinking]}]});
        assert!(
            rejected(&with_thinking)
                .starts_with("messages.1.content.0.cache_control: cache_control cannot be set on `thinking`")
        );
        let empty = body(vec![text("", Some(marker()))], vec![]);
        assert_eq!(rejected(&empty), "system.0.text: cache_control cannot be set for empty text blocks");
    }

    #[test]
    fn strip_removes_every_marker() {
        let marked = body(vec![text("a", Some(marker()))], vec![text("b", Some(marker()))]);
        let plain = body(vec![text("a", None)], vec![text("b", None)]);
        let stripped = strip_cache_control(marked.to_string().as_bytes()).expect("json");
        assert_eq!(stripped, plain);
        assert!(strip_cache_control(b"{nope").is_err());
    }
}
