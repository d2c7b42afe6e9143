//! Circuit breakers shared by the whole fleet, one per tool and one per model provider (DESIGN §6).
//!
//! ```text
//!             N consecutive failures                cool-down over: the first `check`
//!   Closed ─────────────────────────────▶ Open ────────────────────────────────────▶ HalfOpen
//!     ▲        (counted fleet-wide)        ▲                                        (one probe)
//!     │                                    │            probe failed                   │ │
//!     │                                    └───────────────────────────────────────────┘ │
//!     └──────────────────────────────────────────────────────────────────────────────────┘
//!                                            probe succeeded
//! ```
//!
//! * **Closed**: every call goes through ([`Permit::Allow`]). Each failure adds one to a count of
//!   consecutive failures; any success resets it. The failure that makes the count reach
//!   `failure_threshold` opens the breaker.
//! * **Open**: calls are refused ([`Permit::Deny`]) until the cool-down ends. Outcomes reported now come
//!   from calls that started before it opened: they are ignored and never extend the cool-down.
//! * **Half-open**: the first `check` after the cool-down gets [`Permit::Probe`]; everyone else is
//!   refused until the probe reports. Its success closes the breaker (count reset), its failure reopens
//!   it for another cool-down. A probe that never reports (its worker died) loses its slot after
//!   `probe_timeout`, and the next `check` probes again, so a dead worker cannot wedge the breaker.
//!
//! Why Redis: a worker sees a small share of the calls to a tool. Counted per worker, N failures would
//! take N failures *per worker* to notice an outage, and every worker would probe on its own. Counted
//! in one Redis hash, the fleet notices after N failures in total and sends exactly one probe. Each
//! operation is one Lua script, so concurrent workers cannot both flip the breaker or both probe.
//! Times come from the caller (`now_ms`), which keeps the scripts deterministic and the tests in
//! control of the clock. The key is `{prefix}:breaker:{<name>}`; a closed breaker without failures
//! has no key at all, so healthy breakers cost no memory and a `check` on them writes nothing.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;
use thiserror::Error;

pub use crate::config::BreakerConfig;

/// How long a breaker key outlives the last time it matters, so a renamed tool leaves nothing behind.
/// (Failures a day apart with nothing in between therefore do not add up.)
const KEY_GRACE: Duration = Duration::from_secs(24 * 3600);

/// A breaker operation that failed.
#[derive(Debug, Error)]
pub enum BreakerError {
    /// Redis did not answer or answered with an error. For `record`, the outcome is unknown.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A stored or returned value that does not parse (a bug or a foreign writer).
    #[error("corrupt breaker data: {0}")]
    Corrupt(String),
}

impl BreakerConfig {
    /// The probe timeout in effect: the configured one or the cool-down, at least 1 ms.
    pub fn effective_probe_timeout(&self) -> Duration {
        self.probe_timeout.unwrap_or(self.cool_down).max(Duration::from_millis(1))
    }

    /// How long a breaker key lives after its last write.
    fn key_ttl(&self) -> Duration {
        self.cool_down.max(self.effective_probe_timeout()) + KEY_GRACE
    }
}

/// What `check` decided about one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// The breaker is closed: make the call, then `record` its outcome.
    Allow,
    /// The breaker is half-open and this call is its one probe: make it, then `record` it with
    /// `was_probe = true` — the fleet waits for that report (or for the probe timeout).
    Probe,
    /// The breaker is open, or a probe is out: do not call. Try again after `retry_after` (the rest of
    /// the cool-down, or of the probe's slot), or use the fallback.
    Deny {
        /// When asking again may be let through.
        retry_after: Duration,
    },
}

impl Permit {
    /// Whether the call may be made (as a normal call or as the probe).
    pub fn is_allowed(&self) -> bool {
        !matches!(self, Self::Deny { .. })
    }

    /// Whether this call is the probe.
    pub fn is_probe(&self) -> bool {
        matches!(self, Self::Probe)
    }
}

/// A change of state caused by a reported outcome, for metrics and traces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Closed → open: the threshold of consecutive failures was reached.
    Opened,
    /// Half-open → closed: the probe succeeded.
    Closed,
    /// Half-open → open: the probe failed; another cool-down starts.
    Reopened,
}

impl Transition {
    /// A label for metrics and traces.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Opened => "opened",
            Self::Closed => "closed",
            Self::Reopened => "reopened",
        }
    }
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state of a breaker as stored in Redis (field `state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerStatus {
    /// Calls go through.
    Closed,
    /// Calls are refused until the cool-down ends.
    Open,
    /// The cool-down is over: one probe is out, or the next `check` sends it.
    HalfOpen,
}

impl BreakerStatus {
    /// The stored form.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    /// A gauge value: 0 closed, 1 half-open, 2 open.
    pub fn gauge(&self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::HalfOpen => 1.0,
            Self::Open => 2.0,
        }
    }
}

impl fmt::Display for BreakerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BreakerStatus {
    type Err = BreakerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "closed" => Ok(Self::Closed),
            "open" => Ok(Self::Open),
            "half_open" => Ok(Self::HalfOpen),
            other => Err(BreakerError::Corrupt(format!("unknown breaker state `{other}`"))),
        }
    }
}

/// A breaker as seen at one instant, for metrics and the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerState {
    /// The state in effect: an open breaker whose cool-down is over reads as half-open.
    pub status: BreakerStatus,
    /// Consecutive failures counted fleet-wide (while open: those that opened it, plus failed probes).
    pub consecutive_failures: u32,
    /// How long a `check` now would be refused; `None` when it would be let through.
    pub retry_after: Option<Duration>,
}

impl BreakerState {
    /// Reads the stored fields (`None` when absent) as of `now_ms`.
    fn from_fields(
        state: Option<&str>,
        failures: Option<&str>,
        until: Option<&str>,
        now_ms: u64,
    ) -> Result<Self, BreakerError> {
        let status = state.map(str::parse).transpose()?.unwrap_or(BreakerStatus::Closed);
        let number = |v: Option<&str>, what: &str| {
            v.map(|v| v.parse::<u64>().map_err(|_| BreakerError::Corrupt(format!("breaker {what} `{v}`"))))
                .transpose()
                .map(Option::unwrap_or_default)
        };
        let consecutive_failures = u32::try_from(number(failures, "failures")?).unwrap_or(u32::MAX);
        let until = number(until, "until")?;
        let waiting =
            (status != BreakerStatus::Closed && now_ms < until).then(|| Duration::from_millis(until - now_ms));
        let status = match status {
            BreakerStatus::Open if waiting.is_none() => BreakerStatus::HalfOpen,
            s => s,
        };
        Ok(Self { status, consecutive_failures, retry_after: waiting })
    }
}

/// The key of breaker `name`; the hash tag keeps each breaker's script on one cluster slot.
fn key_of(prefix: &str, name: &str) -> String {
    format!("{prefix}:breaker:{{{name}}}")
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The fleet's circuit breakers, in Redis. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct Breakers {
    conn: ConnectionManager,
    prefix: String,
    check: Script,
    record: Script,
}

impl Breakers {
    /// Breakers under the key prefix `prefix` (the store's, e.g. `af`), over a shared connection.
    pub fn new(conn: ConnectionManager, prefix: impl Into<String>) -> Self {
        Self {
            conn,
            prefix: prefix.into(),
            check: Script::new(include_str!("breaker/check.lua")),
            record: Script::new(include_str!("breaker/record.lua")),
        }
    }

    /// The key of breaker `name` (`tool:lookup_order`, `model:anthropic`, …).
    pub fn key(&self, name: &str) -> String {
        key_of(&self.prefix, name)
    }

    /// May a call go through breaker `name` now? Ask before every call; `record` every call let
    /// through. Atomic across the fleet: after a cool-down exactly one caller gets [`Permit::Probe`].
    pub async fn check(&self, name: &str, cfg: &BreakerConfig, now_ms: u64) -> Result<Permit, BreakerError> {
        let (verdict, wait_ms): (String, u64) = self
            .check
            .key(self.key(name))
            .arg(now_ms)
            .arg(ms(cfg.effective_probe_timeout()))
            .arg(ms(cfg.key_ttl()))
            .invoke_async(&mut self.conn.clone())
            .await?;
        match verdict.as_str() {
            "allow" => Ok(Permit::Allow),
            "probe" => Ok(Permit::Probe),
            "deny" => Ok(Permit::Deny { retry_after: Duration::from_millis(wait_ms) }),
            other => Err(BreakerError::Corrupt(format!("unknown check verdict `{other}`"))),
        }
    }

    /// Reports the outcome of a call `check` let through (`was_probe`: it got [`Permit::Probe`]).
    /// Returns the transition it caused, if any. Never call it for a denied call.
    pub async fn record(
        &self,
        name: &str,
        cfg: &BreakerConfig,
        was_probe: bool,
        success: bool,
        now_ms: u64,
    ) -> Result<Option<Transition>, BreakerError> {
        let transition: String = self
            .record
            .key(self.key(name))
            .arg(now_ms)
            .arg(u8::from(was_probe))
            .arg(u8::from(success))
            .arg(cfg.failure_threshold.get())
            .arg(ms(cfg.cool_down))
            .arg(ms(cfg.key_ttl()))
            .invoke_async(&mut self.conn.clone())
            .await?;
        match transition.as_str() {
            "" => Ok(None),
            "opened" => Ok(Some(Transition::Opened)),
            "closed" => Ok(Some(Transition::Closed)),
            "reopened" => Ok(Some(Transition::Reopened)),
            other => Err(BreakerError::Corrupt(format!("unknown transition `{other}`"))),
        }
    }

    /// Breaker `name` as of `now_ms` (read-only).
    pub async fn state(&self, name: &str, now_ms: u64) -> Result<BreakerState, BreakerError> {
        let (state, failures, until): (Option<String>, Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(self.key(name))
            .arg("state")
            .arg("failures")
            .arg("until")
            .query_async(&mut self.conn.clone())
            .await?;
        BreakerState::from_fields(state.as_deref(), failures.as_deref(), until.as_deref(), now_ms)
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Deserialize)]
    struct Wrapper {
        breaker: BreakerConfig,
    }

    fn parse(toml_text: &str) -> Result<BreakerConfig, toml::de::Error> {
        toml::from_str::<Wrapper>(toml_text).map(|w| w.breaker)
    }

    #[test]
    fn config_defaults_are_five_failures_and_a_minute() -> Result<(), toml::de::Error> {
        let cfg = parse("[breaker]")?;
        assert_eq!(cfg, BreakerConfig::default());
        assert_eq!(cfg.failure_threshold.get(), 5);
        assert_eq!(cfg.cool_down, Duration::from_secs(60));
        assert_eq!(cfg.effective_probe_timeout(), Duration::from_secs(60));
        Ok(())
    }

    #[test]
    fn config_reads_milliseconds() -> Result<(), toml::de::Error> {
        let cfg = parse("[breaker]\nfailure_threshold = 3\ncool_down_ms = 1500\nprobe_timeout_ms = 20000")?;
        assert_eq!(cfg.failure_threshold.get(), 3);
        assert_eq!(cfg.cool_down, Duration::from_millis(1500));
        assert_eq!(cfg.effective_probe_timeout(), Duration::from_secs(20));
        Ok(())
    }

    #[test]
    fn config_rejects_unknown_fields_and_a_zero_threshold() {
        assert!(parse("[breaker]\ncool_down = 5").is_err());
        assert!(parse("[breaker]\nfailure_threshold = 0").is_err());
    }

    #[test]
    fn a_zero_probe_timeout_still_reserves_the_probe_for_a_millisecond() {
        let cfg = BreakerConfig { cool_down: Duration::ZERO, ..Default::default() };
        assert_eq!(cfg.effective_probe_timeout(), Duration::from_millis(1));
    }

    #[test]
    fn a_missing_key_is_a_closed_breaker() -> Result<(), BreakerError> {
        let s = BreakerState::from_fields(None, None, None, 1_000)?;
        assert_eq!(s, BreakerState { status: BreakerStatus::Closed, consecutive_failures: 0, retry_after: None });
        Ok(())
    }

    #[test]
    fn an_open_breaker_reads_half_open_once_cooled_down() -> Result<(), BreakerError> {
        let cooling = BreakerState::from_fields(Some("open"), Some("5"), Some("10000"), 4_000)?;
        assert_eq!(cooling.status, BreakerStatus::Open);
        assert_eq!(cooling.retry_after, Some(Duration::from_secs(6)));
        let cooled = BreakerState::from_fields(Some("open"), Some("5"), Some("10000"), 10_000)?;
        assert_eq!(cooled.status, BreakerStatus::HalfOpen);
        assert_eq!(cooled.retry_after, None);
        let probing = BreakerState::from_fields(Some("half_open"), Some("5"), Some("12000"), 11_000)?;
        assert_eq!(probing.status, BreakerStatus::HalfOpen);
        assert_eq!(probing.retry_after, Some(Duration::from_secs(1)));
        Ok(())
    }

    #[test]
    fn statuses_round_trip_and_garbage_is_corrupt() {
        for s in [BreakerStatus::Closed, BreakerStatus::Open, BreakerStatus::HalfOpen] {
            assert_eq!(s.as_str().parse::<BreakerStatus>().ok(), Some(s));
        }
        assert!(matches!("ajar".parse::<BreakerStatus>(), Err(BreakerError::Corrupt(_))));
        assert!(BreakerState::from_fields(Some("open"), Some("x"), None, 0).is_err());
    }

    #[test]
    fn the_key_carries_the_name_as_its_hash_tag() {
        assert_eq!(key_of("af", "tool:lookup_order"), "af:breaker:{tool:lookup_order}");
    }

    #[test]
    fn permits_say_whether_to_call() {
        assert!(Permit::Allow.is_allowed() && !Permit::Allow.is_probe());
        assert!(Permit::Probe.is_allowed() && Permit::Probe.is_probe());
        assert!(!Permit::Deny { retry_after: Duration::ZERO }.is_allowed());
    }
}
