//! Fleet-wide token buckets per provider and model (DESIGN §6), so that the whole fleet together
//! stays under the account's requests, input tokens and output tokens per minute.
//!
//! Each limit is a token bucket that refills continuously at its per-minute rate and holds at most
//! `burst_seconds` worth of it: with 600 requests per minute and `burst_seconds = 10`, the bucket
//! holds 100 requests, so the fleet may send 100 at once and then 10 a second — never more than
//! 600 + 100 in any 60 s. A small burst paces the fleet, because providers enforce their per-minute
//! limits over shorter intervals too; `burst_seconds = 60` allows what the provider's own
//! full-minute bucket would.
//!
//! The three buckets of one provider+model live in one Redis hash, `{prefix}:rate:{<provider>:<model>}`,
//! and each operation is one Lua script, so a call is granted by all three buckets at once or by
//! none, atomically across the fleet:
//!
//! 1. [`RateLimiter::acquire`] before the call, with the input tokens estimated and the output
//!    tokens at `max_tokens`: [`Acquire::Granted`], or [`Acquire::Wait`] with the time until the
//!    emptiest bucket holds enough (nothing is taken then). A call larger than a bucket's capacity
//!    is granted once that bucket is full and leaves it in debt, so it is slowed, never starved.
//! 2. [`RateLimiter::settle`] after it, with the usage the API reported: the difference is taken or
//!    given back. Buckets may go negative; the refill repays the debt.
//! 3. [`RateLimiter::observe_headers`] with the `anthropic-ratelimit-*-remaining` headers: the buckets
//!    drop to what the API says remains (other clients may share the account), never rise.
//!
//! 4. [`RateLimiter::adapt`] with how the call went, for AIMD (DESIGN §6): an overload (529) or a
//!    429 adds an adaptive request bucket, or shrinks it (multiplicative decrease); each success
//!    grows it back (additive increase) until it reaches the rate it started from, and is dropped.
//!    It starts from `requests_per_minute` when one is configured, else from the grants the fleet
//!    was given over the last 1-20 s (`acquire` counts them when asked to), and never goes under
//!    the configured floor, so an overloaded provider slows the fleet down without stopping it. A
//!    success while the provider is not overloaded writes nothing.
//!
//! Times come from the caller (`now_ms`). A caller whose clock lags the fleet's refills nothing, so
//! skew makes the limiter stricter, never looser. Keys expire once their buckets would be full again.

use std::num::NonZeroU64;
use std::time::Duration;

use redis::{Script, ScriptInvocation};
use reqwest::header::HeaderMap;
use thiserror::Error;

pub use crate::config::{AdaptiveRate, RateLimit};
use crate::redis_conn::RedisConn;

/// How long the adaptive rate outlives the last overload when no call asks in between.
const ADAPTIVE_TTL: Duration = Duration::from_secs(300);

/// The response header with the requests left in the current window.
pub const REQUESTS_REMAINING: &str = "anthropic-ratelimit-requests-remaining";
/// The response header with the input tokens left in the current window.
pub const INPUT_TOKENS_REMAINING: &str = "anthropic-ratelimit-input-tokens-remaining";
/// The response header with the output tokens left in the current window.
pub const OUTPUT_TOKENS_REMAINING: &str = "anthropic-ratelimit-output-tokens-remaining";

/// A rate-limit operation that failed.
#[derive(Debug, Error)]
pub enum RateLimitError {
    /// Redis did not answer or answered with an error. For `acquire`, the tokens may have been taken.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

impl RateLimit {
    /// Whether no limit is set (every operation is then a no-op without a round trip).
    pub fn is_unlimited(&self) -> bool {
        self.rates().iter().all(|&r| r == 0)
    }

    /// The per-minute rates of the request, input and output buckets (0 = unlimited).
    fn rates(&self) -> [u64; 3] {
        [
            self.requests_per_minute.map_or(0, |r| u64::from(r.get())),
            self.input_tokens_per_minute.map_or(0, NonZeroU64::get),
            self.output_tokens_per_minute.map_or(0, NonZeroU64::get),
        ]
    }

    /// A bucket's capacity: `burst_seconds` worth of its rate.
    fn capacity(&self, per_minute: u64) -> f64 {
        per_minute as f64 * f64::from(self.burst_seconds.get()) / 60.0
    }
}

/// Token counts of one model call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    /// Input tokens.
    pub input: u64,
    /// Output tokens.
    pub output: u64,
}

/// What `acquire` decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquire {
    /// Every bucket was debited: make the call, then `settle` it.
    Granted,
    /// Nothing was debited: ask again after `retry_after`, when the emptiest bucket holds enough.
    Wait {
        /// How long until the call could be granted, if nobody else takes the tokens first.
        retry_after: Duration,
    },
}

/// The rate-limit headers of one response; `None` where a header was absent or unreadable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateHeaders {
    /// `anthropic-ratelimit-requests-remaining`.
    pub requests_remaining: Option<u64>,
    /// `anthropic-ratelimit-input-tokens-remaining`.
    pub input_tokens_remaining: Option<u64>,
    /// `anthropic-ratelimit-output-tokens-remaining`.
    pub output_tokens_remaining: Option<u64>,
}

impl RateHeaders {
    /// Whether no header was present.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Reads the `anthropic-ratelimit-*-remaining` headers of a response.
pub fn parse_ratelimit_headers(headers: &HeaderMap) -> RateHeaders {
    let number = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<u64>().ok();
    RateHeaders {
        requests_remaining: number(REQUESTS_REMAINING),
        input_tokens_remaining: number(INPUT_TOKENS_REMAINING),
        output_tokens_remaining: number(OUTPUT_TOKENS_REMAINING),
    }
}

/// What a call's outcome says about the provider's capacity, for AIMD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// It answered: grow the adaptive rate back, if there is one.
    Success,
    /// It answered 529 (overloaded) or 429 (rate limited): shrink the rate.
    Overload,
}

/// The key of the buckets of `key` (`<provider>:<model>`), with it as the hash tag.
fn key_of(prefix: &str, key: &str) -> String {
    format!("{prefix}:rate:{{{key}}}")
}

/// The scripts, each the shared bucket prelude followed by its operation.
#[derive(Clone)]
struct Scripts {
    acquire: Script,
    settle: Script,
    observe: Script,
    adapt: Script,
}

impl Scripts {
    fn load() -> Self {
        Self {
            acquire: Script::new(concat!(include_str!("ratelimit/buckets.lua"), include_str!("ratelimit/acquire.lua"))),
            settle: Script::new(concat!(include_str!("ratelimit/buckets.lua"), include_str!("ratelimit/settle.lua"))),
            observe: Script::new(concat!(include_str!("ratelimit/buckets.lua"), include_str!("ratelimit/observe.lua"))),
            adapt: Script::new(include_str!("ratelimit/adapt.lua")),
        }
    }
}

/// The fleet's rate limiters, in Redis. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct RateLimiter {
    conn: RedisConn,
    prefix: String,
    scripts: Scripts,
}

impl RateLimiter {
    /// Limiters under the key prefix `prefix` (the store's, e.g. `af`), over a shared connection.
    pub fn new(conn: RedisConn, prefix: impl Into<String>) -> Self {
        Self { conn, prefix: prefix.into(), scripts: Scripts::load() }
    }

    /// The Redis key of the buckets of `key` (`<provider>:<model>`, e.g. `anthropic:claude-sonnet-4-5`).
    pub fn key(&self, key: &str) -> String {
        key_of(&self.prefix, key)
    }

    /// Takes `requests` and the `estimated` tokens from every limited bucket of `key` (and from its
    /// adaptive bucket, while there is one), or nothing. `adaptive`: the key may have an adaptive
    /// bucket, and grants are counted for it; without it, an unlimited key costs no round trip.
    pub async fn acquire(
        &self,
        key: &str,
        limit: &RateLimit,
        adaptive: bool,
        requests: u32,
        estimated: Tokens,
        now_ms: u64,
    ) -> Result<Acquire, RateLimitError> {
        Ok(self.acquire_observed(key, limit, adaptive, requests, estimated, now_ms).await?.0)
    }

    /// [`RateLimiter::acquire`], and whether `key` has an adaptive bucket now (the provider is being
    /// slowed down); without one, an unlimited key's grants only count for a future adaptive rate.
    pub async fn acquire_observed(
        &self,
        key: &str,
        limit: &RateLimit,
        adaptive: bool,
        requests: u32,
        estimated: Tokens,
        now_ms: u64,
    ) -> Result<(Acquire, bool), RateLimitError> {
        self.acquire_with(key, limit, adaptive, requests, 0, estimated, now_ms).await
    }

    /// [`RateLimiter::acquire_observed`] of one request, also counting `granted_elsewhere` calls a
    /// worker let through on its own (an unlimited key seen unslowed) for a future adaptive rate,
    /// without taking them from any bucket.
    pub async fn acquire_counting(
        &self,
        key: &str,
        limit: &RateLimit,
        adaptive: bool,
        granted_elsewhere: u32,
        estimated: Tokens,
        now_ms: u64,
    ) -> Result<(Acquire, bool), RateLimitError> {
        self.acquire_with(key, limit, adaptive, 1, granted_elsewhere, estimated, now_ms).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn acquire_with(
        &self,
        key: &str,
        limit: &RateLimit,
        adaptive: bool,
        requests: u32,
        granted_elsewhere: u32,
        estimated: Tokens,
        now_ms: u64,
    ) -> Result<(Acquire, bool), RateLimitError> {
        if limit.is_unlimited() && !adaptive {
            return Ok((Acquire::Granted, false));
        }
        let mut inv = self.invocation(&self.scripts.acquire, key, limit, now_ms);
        inv.arg(u8::from(adaptive));
        inv.arg(requests).arg(estimated.input).arg(estimated.output).arg(granted_elsewhere);
        let (granted, wait_ms, slowed): (u8, u64, u8) = inv.invoke_async(&mut self.conn.clone()).await?;
        let acquire =
            if granted == 1 { Acquire::Granted } else { Acquire::Wait { retry_after: Duration::from_millis(wait_ms) } };
        Ok((acquire, slowed == 1))
    }

    /// After a granted call: takes `actual - estimated` more tokens (or gives the surplus back, up to
    /// each bucket's capacity). Call it with `actual` zero when the call failed before the provider
    /// counted anything.
    pub async fn settle(
        &self,
        key: &str,
        limit: &RateLimit,
        estimated: Tokens,
        actual: Tokens,
        now_ms: u64,
    ) -> Result<(), RateLimitError> {
        if limit.is_unlimited() {
            return Ok(());
        }
        let mut inv = self.invocation(&self.scripts.settle, key, limit, now_ms);
        inv.arg(0).arg(estimated.input).arg(estimated.output).arg(actual.input).arg(actual.output);
        let _: i64 = inv.invoke_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// Lowers the buckets of `key` to what the provider's headers say remains; never raises them.
    /// Headers for an unlimited bucket are ignored (there is no rate to refill it at).
    pub async fn observe_headers(
        &self,
        key: &str,
        limit: &RateLimit,
        headers: &RateHeaders,
        now_ms: u64,
    ) -> Result<(), RateLimitError> {
        if limit.is_unlimited() || headers.is_empty() {
            return Ok(());
        }
        let text = |v: Option<u64>| v.map(|n| n.to_string()).unwrap_or_default();
        let mut inv = self.invocation(&self.scripts.observe, key, limit, now_ms);
        inv.arg(0).arg(text(headers.requests_remaining));
        inv.arg(text(headers.input_tokens_remaining)).arg(text(headers.output_tokens_remaining));
        let _: i64 = inv.invoke_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// Feeds one outcome into the AIMD of `key`'s adaptive request bucket. Returns the adaptive rate
    /// per minute in force after it; `None` when there is none (the provider is not overloaded).
    pub async fn adapt(
        &self,
        key: &str,
        limit: &RateLimit,
        adaptive: &AdaptiveRate,
        signal: Signal,
        now_ms: u64,
    ) -> Result<Option<f64>, RateLimitError> {
        self.adapt_counting(key, limit, adaptive, signal, 0, now_ms).await
    }

    /// [`RateLimiter::adapt`], counting `uncounted` grants this worker let through on its own since
    /// its last call first, so an overload measures the rate the fleet really had.
    pub async fn adapt_counting(
        &self,
        key: &str,
        limit: &RateLimit,
        adaptive: &AdaptiveRate,
        signal: Signal,
        uncounted: u32,
        now_ms: u64,
    ) -> Result<Option<f64>, RateLimitError> {
        let rate: String = self
            .scripts
            .adapt
            .key(self.key(key))
            .arg(now_ms)
            .arg(if signal == Signal::Overload { "overload" } else { "ok" })
            .arg(limit.requests_per_minute.map_or(0, |r| r.get()))
            .arg(adaptive.min_requests_per_minute.get())
            .arg(adaptive.decrease)
            .arg(adaptive.increase)
            .arg(u64::try_from(ADAPTIVE_TTL.as_millis()).unwrap_or(u64::MAX))
            .arg(uncounted)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(rate.parse::<f64>().ok())
    }

    /// A call of `script` with the arguments of the bucket prelude: key, now and each bucket's rate
    /// and capacity.
    fn invocation<'a>(&self, script: &'a Script, key: &str, limit: &RateLimit, now_ms: u64) -> ScriptInvocation<'a> {
        let mut inv = script.key(self.key(key));
        inv.arg(now_ms);
        for rate in limit.rates() {
            inv.arg(rate).arg(limit.capacity(rate).to_string());
        }
        inv
    }
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;
    use serde::Deserialize;

    use super::*;

    #[derive(Deserialize)]
    struct Wrapper {
        limit: RateLimit,
    }

    fn parse(toml_text: &str) -> Result<RateLimit, toml::de::Error> {
        toml::from_str::<Wrapper>(toml_text).map(|w| w.limit)
    }

    #[test]
    fn the_default_is_unlimited() -> Result<(), toml::de::Error> {
        let limit = parse("[limit]")?;
        assert_eq!(limit, RateLimit::default());
        assert!(limit.is_unlimited());
        assert_eq!(limit.burst_seconds.get(), 10);
        Ok(())
    }

    #[test]
    fn capacities_are_burst_seconds_worth_of_each_rate() -> Result<(), toml::de::Error> {
        let limit = parse("[limit]\nrequests_per_minute = 600\noutput_tokens_per_minute = 90000\nburst_seconds = 20")?;
        assert!(!limit.is_unlimited());
        assert_eq!(limit.rates(), [600, 0, 90_000]);
        assert_eq!(limit.capacity(600), 200.0);
        assert_eq!(limit.capacity(90_000), 30_000.0);
        Ok(())
    }

    #[test]
    fn zero_rates_and_unknown_fields_are_rejected() {
        assert!(parse("[limit]\nrequests_per_minute = 0").is_err());
        assert!(parse("[limit]\nburst_seconds = 0").is_err());
        assert!(parse("[limit]\nburst = 10").is_err());
    }

    #[test]
    fn adaptive_rates_default_on_and_refuse_out_of_range_factors() -> Result<(), toml::de::Error> {
        #[derive(Deserialize)]
        struct Adaptive {
            adaptive: AdaptiveRate,
        }
        let parse = |text: &str| toml::from_str::<Adaptive>(text).map(|w| w.adaptive);
        let d = parse("[adaptive]")?;
        assert_eq!(d, AdaptiveRate::default());
        assert_eq!((d.enabled, d.min_requests_per_minute.get(), d.decrease, d.increase), (true, 60, 0.9, 0.05));
        assert!(!parse("[adaptive]\nenabled = false")?.enabled);
        for (text, why) in [
            ("decrease = 1.0", "(0, 1)"),
            ("decrease = 0.0", "(0, 1)"),
            ("increase = 0.0", "(0, 1]"),
            ("increase = 1.5", "(0, 1]"),
            ("min_requests_per_minute = 0", "nonzero"),
            ("step = 1", "unknown field"),
        ] {
            let err = parse(&format!("[adaptive]\n{text}")).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(why), "`{text}`: {err}");
        }
        Ok(())
    }

    #[test]
    fn the_key_carries_provider_and_model_as_its_hash_tag() {
        assert_eq!(key_of("af", "anthropic:claude-sonnet-4-5"), "af:rate:{anthropic:claude-sonnet-4-5}");
    }

    #[test]
    fn remaining_headers_are_read_and_garbage_ignored() {
        let mut h = HeaderMap::new();
        assert!(parse_ratelimit_headers(&h).is_empty());
        h.insert(REQUESTS_REMAINING, HeaderValue::from_static("49"));
        h.insert(INPUT_TOKENS_REMAINING, HeaderValue::from_static(" 29000 "));
        h.insert(OUTPUT_TOKENS_REMAINING, HeaderValue::from_static("lots"));
        let parsed = parse_ratelimit_headers(&h);
        assert_eq!(
            parsed,
            RateHeaders {
                requests_remaining: Some(49),
                input_tokens_remaining: Some(29_000),
                output_tokens_remaining: None
            }
        );
    }
}
