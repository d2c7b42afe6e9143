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
}

impl fmt::Debug for AnthropicConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnthropicConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("auth", &self.auth)
            .field("version", &self.version)
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
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self { base_url: "http://127.0.0.1:11434/v1".into(), api_key: None, timeout_ms: 300_000 }
    }
}

impl fmt::Debug for OpenAiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// The fleet-wide protections of one model provider.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    /// The provider's circuit breaker (opens after consecutive 5xx, 529, timeouts and connection
    /// failures across the fleet). Default: 5 failures, 60 s cool-down, probe timeout 150 s.
    pub breaker: Option<BreakerConfig>,
    /// Requests and tokens per minute, by model id. Default: unlimited.
    pub rate_limits: BTreeMap<String, RateLimit>,
}

impl ProviderConfig {
    /// The breaker settings in force: the configured ones, or defaults whose probe timeout outlasts
    /// a slow model call.
    pub fn breaker(&self) -> BreakerConfig {
        self.breaker.clone().unwrap_or_else(|| BreakerConfig {
            probe_timeout: Some(std::time::Duration::from_secs(150)),
            ..Default::default()
        })
    }
}

/// The default `failure_threshold` of a breaker (checked at compile time).
const DEFAULT_THRESHOLD: NonZeroU32 = NonZeroU32::new(5).expect("5 is not zero");

/// A breaker's settings, per tool or provider. In TOML durations are in milliseconds.
/// (The breaker itself is in the `breaker` module.)
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Consecutive failures, counted across the fleet, that open the breaker. Default 5.
    pub failure_threshold: NonZeroU32,
    /// How long an open breaker refuses calls before it lets one probe through. Key `cool_down_ms`.
    /// Default 60000 ms.
    #[serde(rename = "cool_down_ms", deserialize_with = "millis")]
    pub cool_down: Duration,
    /// How long a probe may stay out before another caller may probe (its worker may have died). Key
    /// `probe_timeout_ms`. Default: the cool-down. Set it above the tool's timeout with its retries.
    #[serde(rename = "probe_timeout_ms", deserialize_with = "opt_millis")]
    pub probe_timeout: Option<Duration>,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self { failure_threshold: DEFAULT_THRESHOLD, cool_down: Duration::from_secs(60), probe_timeout: None }
    }
}

fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_millis)
}

fn opt_millis<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    Option::<u64>::deserialize(d).map(|ms| ms.map(Duration::from_millis))
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

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            requests_per_minute: None,
            input_tokens_per_minute: None,
            output_tokens_per_minute: None,
            burst_seconds: DEFAULT_BURST_SECONDS,
        }
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
    /// Cache-write input tokens. Default 1.25 × input.
    pub cache_write: Option<f64>,
    /// Cache-read input tokens. Default 0.1 × input.
    pub cache_read: Option<f64>,
}

/// Prices of the current Anthropic models and of the ids the seed design used.
pub fn default_prices() -> BTreeMap<String, Price> {
    let p = |input, output| Price { input, output, cache_write: None, cache_read: None };
    [
        ("claude-haiku-4-20250514", p(0.80, 4.0)),
        ("claude-sonnet-4-20250514", p(3.0, 15.0)),
        ("claude-opus-4-20250514", p(15.0, 75.0)),
        ("claude-haiku-4-5", p(1.0, 5.0)),
        ("claude-sonnet-4-5", p(3.0, 15.0)),
        ("claude-opus-4-1", p(15.0, 75.0)),
        ("claude-opus-4-5", p(5.0, 25.0)),
    ]
    .into_iter()
    .map(|(m, p)| (m.to_owned(), p))
    .collect()
}

pub(super) fn check_price(price: &Price) -> Result<(), Problem> {
    let all = [Some(price.input), Some(price.output), price.cache_write, price.cache_read];
    if all.into_iter().flatten().all(|p| p.is_finite() && p >= 0.0) { Ok(()) } else { Err(Problem::NegativePrice) }
}
