//! The model providers: how to reach them, their fleet-wide protections, and model prices.

use std::collections::BTreeMap;
use std::fmt;
use std::num::{NonZeroU32, NonZeroU64};
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Deserializer};

use super::Problem;

/// How the API key is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AuthStyle {
    /// `x-api-key: <key>`, as documented.
    #[default]
    XApiKey,
    /// `Authorization: Bearer <key>`, as the late-2026 SDKs send it.
    Bearer,
}

/// The HTTP version a model client speaks.
///
/// Over HTTP/2 the calls in flight share a few connections as concurrent streams, instead of one
/// connection each: fewer handshakes, sockets and idle connections for the same load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HttpVersion {
    /// HTTP/2 when the server offers it in the TLS handshake (ALPN), else HTTP/1.1; a cleartext
    /// `http://` endpoint gets HTTP/1.1.
    #[default]
    Auto,
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 only: offered alone in the TLS handshake, and spoken from the first byte on a cleartext
    /// `http://` endpoint (prior knowledge, `h2c`). A server without HTTP/2 fails every call.
    Http2,
}

/// Anthropic Messages API settings.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnthropicConfig {
    /// API base URL. Env `ANTHROPIC_BASE_URL`. Default `https://api.anthropic.com`.
    pub base_url: String,
    /// The API key. Env `ANTHROPIC_API_KEY` (never put it in the file).
    #[serde(skip)]
    pub api_key: Option<SecretString>,
    /// Header style for the key. Default `x-api-key`.
    pub auth: AuthStyle,
    /// The `anthropic-version` header. Default `2023-06-01`.
    pub version: String,
    /// Request timeout. Default 120000 ms.
    pub timeout_ms: u64,
    /// The HTTP version: `auto`, `http1` or `http2` ([`HttpVersion`]). Default `auto`.
    pub http: HttpVersion,
}

impl fmt::Debug for AnthropicConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnthropicConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("auth", &self.auth)
            .field("version", &self.version)
            .field("http", &self.http)
            .finish()
    }
}

impl Default for AnthropicConfig {
    fn default() -> Self {
        Self {
            base_url: "https://api.anthropic.com".into(),
            api_key: None,
            auth: AuthStyle::XApiKey,
            version: "2023-06-01".into(),
            timeout_ms: 120_000,
            http: HttpVersion::Auto,
        }
    }
}

/// Where and how to reach an OpenAI-compatible server.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiConfig {
    /// The API base, up to and including the version segment; `/chat/completions` is appended.
    /// Default `http://127.0.0.1:11434/v1` (Ollama; vLLM listens on `:8000/v1`, `llama-server` on
    /// `:8080/v1`).
    pub base_url: String,
    /// Sent as `Authorization: Bearer <key>` when set; local servers usually need none. Never read
    /// from the file: the config loader sets it from the environment. Default none.
    #[serde(skip)]
    pub api_key: Option<SecretString>,
    /// Request timeout. Default 300000 ms: local models on modest hardware answer slowly.
    pub timeout_ms: u64,
    /// The HTTP version: `auto`, `http1` or `http2` ([`HttpVersion`]). Default `auto` (HTTP/1.1 on
    /// the usual cleartext endpoint of a local server).
    pub http: HttpVersion,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:11434/v1".into(),
            api_key: None,
            timeout_ms: 300_000,
            http: HttpVersion::Auto,
        }
    }
}

impl fmt::Debug for OpenAiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("timeout_ms", &self.timeout_ms)
            .field("http", &self.http)
            .finish()
    }
}

/// The fleet-wide protections of one model provider.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    /// The provider's circuit breaker: opens when 5xx answers (529 aside), timeouts and connection
    /// failures make up `failure_rate` of the calls in its window (a step that lost its lease
    /// reports nothing).
    /// Default: [`BreakerConfig::default`].
    pub breaker: Option<BreakerConfig>,
    /// Requests and tokens per minute, by model id. Default: unlimited.
    pub rate_limits: BTreeMap<String, RateLimit>,
    /// How overload (529) and 429 answers slow the fleet down. Default: on, see [`AdaptiveRate`].
    pub adaptive: AdaptiveRate,
}

impl ProviderConfig {
    /// The breaker settings in force: the configured ones, or the defaults.
    pub fn breaker(&self) -> BreakerConfig {
        self.breaker.clone().unwrap_or_default()
    }
}

/// The share of traffic a half-open breaker lets through, stage by stage; each stage lasts at least
/// `ramp_interval_ms` and needs a success to pass. After the last stage the breaker closes.
pub const RAMP: [f64; 4] = [0.1, 0.25, 0.5, 1.0];

/// A breaker's settings, per tool or provider. In TOML durations are in milliseconds.
/// (The breaker itself is in the `breaker` module.)
///
/// The breaker opens when, within the sliding `window_ms`, at least `min_calls` calls reported and
/// at least `failure_rate` of them failed. The old key `failure_threshold = N` still parses: it
/// means `min_calls = N, failure_rate = 1.0` (N failures, and no success, within the window).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "BreakerToml")]
pub struct BreakerConfig {
    /// The share of failed calls in the window that opens the breaker, in (0, 1]. Default 0.5.
    pub failure_rate: f64,
    /// Calls the window must hold before its failure rate counts. Default 20.
    pub min_calls: NonZeroU32,
    /// The sliding window, kept as 10 time buckets. Key `window_ms`. Default 30000 ms.
    pub window: Duration,
    /// How long an open breaker refuses every call before it turns half-open. Key `cool_down_ms`.
    /// Default 30000 ms.
    pub cool_down: Duration,
    /// The shortest time a half-open stage lasts (see [`RAMP`]). Key `ramp_interval_ms`. Default
    /// 5000 ms.
    pub ramp_interval: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_rate: 0.5,
            min_calls: DEFAULT_MIN_CALLS,
            window: Duration::from_secs(30),
            cool_down: Duration::from_secs(30),
            ramp_interval: Duration::from_secs(5),
        }
    }
}

/// The default `min_calls` of a breaker (checked at compile time).
const DEFAULT_MIN_CALLS: NonZeroU32 = NonZeroU32::new(20).expect("20 is not zero");

/// A breaker as written in TOML, before its keys are checked against each other.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BreakerToml {
    failure_rate: Option<f64>,
    min_calls: Option<NonZeroU32>,
    window_ms: Option<u64>,
    cool_down_ms: Option<u64>,
    ramp_interval_ms: Option<u64>,
    /// The old "N consecutive failures".
    failure_threshold: Option<NonZeroU32>,
    /// The old single probe's slot; half-open no longer waits on one call.
    probe_timeout_ms: Option<u64>,
}

impl TryFrom<BreakerToml> for BreakerConfig {
    type Error = String;

    fn try_from(t: BreakerToml) -> Result<Self, String> {
        if t.probe_timeout_ms.is_some() {
            return Err("`probe_timeout_ms` is gone: a half-open breaker lets a share of calls through \
                        (see `ramp_interval_ms`), so a lost probe cannot hold it; remove the key"
                .into());
        }
        let d = Self::default();
        let (min_calls, failure_rate) = match t.failure_threshold {
            Some(_) if t.min_calls.is_some() || t.failure_rate.is_some() => {
                return Err("`failure_threshold` is the old form of `min_calls` with `failure_rate = 1.0`; \
                            set one or the other"
                    .into());
            }
            Some(n) => (n, 1.0),
            None => (t.min_calls.unwrap_or(d.min_calls), t.failure_rate.unwrap_or(d.failure_rate)),
        };
        if !(failure_rate > 0.0 && failure_rate <= 1.0) {
            return Err(format!("`failure_rate` must be a fraction in (0, 1], got {failure_rate}"));
        }
        let window = t.window_ms.map_or(d.window, Duration::from_millis);
        if window < Duration::from_millis(10) {
            return Err("`window_ms` must be at least 10".into());
        }
        Ok(Self {
            failure_rate,
            min_calls,
            window,
            cool_down: t.cool_down_ms.map_or(d.cool_down, Duration::from_millis),
            ramp_interval: t.ramp_interval_ms.map_or(d.ramp_interval, Duration::from_millis),
        })
    }
}

/// How a provider's overload (529) and rate-limit (429) answers slow the fleet (AIMD on the
/// provider+model's token bucket). The first such answer caps the fleet's requests at the rate it
/// was sending (`requests_per_minute` when configured, else the grants of the last 1-20 s); each
/// overload multiplies the cap by `decrease`, each success adds `increase` of the starting rate,
/// and once it is back at the start the cap is gone. It never goes below `min_requests_per_minute`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveRate {
    /// Whether 529 and 429 slow the fleet down. Default true.
    pub enabled: bool,
    /// The floor: the fleet always gets at least this many requests a minute. Default 60.
    pub min_requests_per_minute: NonZeroU32,
    /// What each overload multiplies the rate by, in (0, 1). Default 0.9.
    #[serde(deserialize_with = "open_fraction")]
    pub decrease: f64,
    /// What each success adds, as a share of the starting rate, in (0, 1]. Default 0.05: the rate
    /// settles where `(1 - p) × increase = p × (1 - decrease) × rate / start` for an overload share
    /// `p`, so a 30 % storm barely slows the fleet, 50 % halves it, and a steady 529 takes it to the
    /// floor.
    #[serde(deserialize_with = "fraction")]
    pub increase: f64,
}

impl Default for AdaptiveRate {
    fn default() -> Self {
        Self { enabled: true, min_requests_per_minute: DEFAULT_FLOOR, decrease: 0.9, increase: 0.05 }
    }
}

/// The default floor of an adaptive rate (checked at compile time).
const DEFAULT_FLOOR: NonZeroU32 = NonZeroU32::new(60).expect("60 is not zero");

fn open_fraction<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v = f64::deserialize(d)?;
    if v > 0.0 && v < 1.0 { Ok(v) } else { Err(serde::de::Error::custom(format!("must be in (0, 1), got {v}"))) }
}

fn fraction<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v = f64::deserialize(d)?;
    if v > 0.0 && v <= 1.0 { Ok(v) } else { Err(serde::de::Error::custom(format!("must be in (0, 1], got {v}"))) }
}

/// The default `burst_seconds` of a rate limit (checked at compile time).
const DEFAULT_BURST_SECONDS: NonZeroU32 = NonZeroU32::new(10).expect("10 is not zero");

/// The rate limits of one provider+model. Every limit is optional; a missing one is unlimited.
/// (The limiter itself is in the `ratelimit` module.)
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimit {
    /// Requests per minute. Default: unlimited.
    pub requests_per_minute: Option<NonZeroU32>,
    /// Input tokens per minute. Default: unlimited.
    pub input_tokens_per_minute: Option<NonZeroU64>,
    /// Output tokens per minute. Default: unlimited.
    pub output_tokens_per_minute: Option<NonZeroU64>,
    /// Each bucket holds this many seconds' worth of its per-minute rate: the largest burst after a
    /// quiet spell. Default 10 (a sixth of a minute); 60 matches a full-minute bucket.
    pub burst_seconds: NonZeroU32,
}

impl RateLimit {
    /// No limit at all (the default), for a model without a `rate_limits` entry.
    pub const UNLIMITED: Self = Self {
        requests_per_minute: None,
        input_tokens_per_minute: None,
        output_tokens_per_minute: None,
        burst_seconds: DEFAULT_BURST_SECONDS,
    };
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::UNLIMITED
    }
}

/// A model's prices in USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Input tokens.
    pub input: f64,
    /// Output tokens.
    pub output: f64,
    /// Input tokens written to the prompt cache with the 5-minute TTL. Default 1.25 × input.
    pub cache_write: Option<f64>,
    /// Input tokens written to the prompt cache with the 1-hour TTL. Default 2 × input.
    pub cache_write_1h: Option<f64>,
    /// Input tokens read from the prompt cache. Default 0.1 × input.
    pub cache_read: Option<f64>,
    /// The shortest prefix, in tokens, the model caches: a breakpoint on a shorter one is not
    /// sent. Default 1024 (the built-in entries carry each model's own).
    pub min_cache_tokens: Option<u32>,
}

/// The shortest cacheable prefix of a model without its own `min_cache_tokens`.
pub const DEFAULT_MIN_CACHE_TOKENS: u32 = 1024;

impl Price {
    /// A price of `input` and `output` USD per million tokens, with the default cache prices.
    pub const fn new(input: f64, output: f64) -> Self {
        Self { input, output, cache_write: None, cache_write_1h: None, cache_read: None, min_cache_tokens: None }
    }

    /// USD per million input tokens written to the cache with `ttl`.
    pub fn cache_write(&self, ttl: super::CacheTtl) -> f64 {
        match ttl {
            super::CacheTtl::FiveMinutes => self.cache_write.unwrap_or(self.input * 1.25),
            super::CacheTtl::OneHour => self.cache_write_1h.unwrap_or(self.input * 2.0),
        }
    }

    /// USD per million input tokens read from the cache.
    pub fn cache_read(&self) -> f64 {
        self.cache_read.unwrap_or(self.input * 0.1)
    }

    /// The shortest prefix the model caches, in tokens.
    pub fn min_cache_tokens(&self) -> u32 {
        self.min_cache_tokens.unwrap_or(DEFAULT_MIN_CACHE_TOKENS)
    }
}

/// Prices of the current Anthropic models and of the ids the seed design used, with the shortest
/// prefix each caches. Cache writes cost 1.25 × (5 minutes) or 2 × (1 hour) the input price, and
/// reads 0.1 ×, the defaults of [`Price`].
pub fn default_prices() -> BTreeMap<String, Price> {
    let p = |input, output, min_cache_tokens| Price {
        min_cache_tokens: Some(min_cache_tokens),
        ..Price::new(input, output)
    };
    [
        ("claude-haiku-4-20250514", p(0.80, 4.0, 2048)),
        ("claude-sonnet-4-20250514", p(3.0, 15.0, 1024)),
        ("claude-opus-4-20250514", p(15.0, 75.0, 1024)),
        ("claude-haiku-4-5", p(1.0, 5.0, 4096)),
        ("claude-sonnet-4-5", p(3.0, 15.0, 1024)),
        ("claude-sonnet-4-6", p(3.0, 15.0, 2048)),
        ("claude-opus-4-1", p(15.0, 75.0, 1024)),
        ("claude-opus-4-5", p(5.0, 25.0, 4096)),
        ("claude-opus-4-6", p(5.0, 25.0, 4096)),
    ]
    .into_iter()
    .map(|(m, p)| (m.to_owned(), p))
    .collect()
}

pub(super) fn check_price(price: &Price) -> Result<(), Problem> {
    let all = [Some(price.input), Some(price.output), price.cache_write, price.cache_write_1h, price.cache_read];
    if all.into_iter().flatten().all(|p| p.is_finite() && p >= 0.0) { Ok(()) } else { Err(Problem::NegativePrice) }
}
