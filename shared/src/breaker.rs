//! Circuit breakers shared by the whole fleet, one per tool and one per model provider (DESIGN §6).
//!
//! ```text
//!        failure_rate of ≥ min_calls                cool-down over: the next `check`
//!        in the sliding window failed                (and it is let through)
//!   Closed ─────────────────────────────▶ Open ────────────────────────────────────▶ HalfOpen
//!     ▲        (counted fleet-wide)        ▲                                  share 10% → 25% → 50% → 100%
//!     │                                    │   the stage's trials fail at failure_rate     │ │
//!     │                                    └───────────────────────────────────────────────┘ │
//!     └──────────────────────────────────────────────────────────────────────────────────────┘
//!                                 a success after the last stage's interval
//! ```
//!
//! * **Closed**: every call goes through ([`Permit::Allow`]). Reported outcomes are counted in ten
//!   time buckets spanning `window_ms`. A failure that leaves at least `min_calls` outcomes in the
//!   window, `failure_rate` of them failures, opens the breaker. A burst of failures among many
//!   successes does not: at fleet scale, "N in a row" comes within seconds from any modest error
//!   rate, and each trip would stop every worker.
//! * **Open**: calls are refused ([`Permit::Deny`]) until the cool-down ends. Outcomes reported now come
//!   from calls that started before it opened: they are ignored and never extend the cool-down.
//! * **Half-open**: admits a share of the calls that ask ([`Permit::Trial`]), stage by stage
//!   ([`RAMP`]: 10 %, 25 %, 50 %, 100 %), counted fleet-wide; the first call of each stage always
//!   goes through, so a quiet fleet still recovers. A stage passes once it has lasted
//!   `ramp_interval_ms` and a trial succeeds; after the last stage the breaker closes. Trials that
//!   fail at `failure_rate` of the stage's outcomes reopen it for another cool-down. A trial whose
//!   worker died never reports, and holds nothing: the next stage's calls go through regardless.
//!
//! Only evidence about the dependency is recorded: callers report `healthy: None` for outcomes
//! that say nothing (a 529 or 429 answer, which slows the fleet through the rate limit instead),
//! and a step whose lease is lost reports nothing at all.
//!
//! Why Redis: a worker sees a small share of the calls to a tool. Counted per worker, a rate would
//! be noisy and every worker would ramp up on its own. Counted in one Redis hash, the fleet decides
//! once. Each operation is one Lua script, so concurrent workers cannot both flip the breaker.
//! Times come from the caller (`now_ms`), which keeps the scripts deterministic and the tests in
//! control of the clock. The key is `{prefix}:breaker:{<name>}` and every write refreshes its TTL;
//! a `check` on a closed breaker only reads, and a breaker with no outcomes in a while has no key.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use redis::Script;
use thiserror::Error;

use crate::redis_conn::RedisConn;

pub use crate::config::{BreakerConfig, RAMP};

/// How long a breaker key outlives the last time it matters.
const KEY_GRACE: Duration = Duration::from_secs(60);

/// The time buckets of a breaker's window.
const BUCKETS: u32 = 10;

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
    /// The old form, "`n` failures (and no success) within the window".
    pub fn consecutive(n: NonZeroU32, cool_down: Duration) -> Self {
        Self { min_calls: n, failure_rate: 1.0, cool_down, ..Self::default() }
    }

    /// How long a breaker key lives after its last write: long enough for a window, a cool-down and
    /// a ramp.
    fn key_ttl(&self) -> Duration {
        let ramp = self.ramp_interval * RAMP.len() as u32;
        self.window + self.cool_down + ramp + KEY_GRACE
    }
}

/// What `check` decided about one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// The breaker is closed: make the call, then `record` its outcome.
    Allow,
    /// The breaker is half-open and this call is one of the share it lets through: make it, then
    /// `record` it with this `generation` (which names the half-open spell it belongs to).
    Trial {
        /// Hand it back to `record`.
        generation: u64,
    },
    /// The breaker is open, or this call is outside the half-open share: do not call. Try again
    /// after `retry_after`, or use the fallback.
    Deny {
        /// When asking again may be let through.
        retry_after: Duration,
    },
}

impl Permit {
    /// Whether the call may be made (as a normal call or as a trial).
    pub fn is_allowed(&self) -> bool {
        !matches!(self, Self::Deny { .. })
    }

    /// The half-open spell of a trial; `None` for any other permit.
    pub fn trial(&self) -> Option<u64> {
        match self {
            Self::Trial { generation } => Some(*generation),
            _ => None,
        }
    }
}

/// A change of state caused by a reported outcome, for metrics and traces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Closed → open: the failure rate over the window reached the threshold.
    Opened,
    /// Half-open → half-open with a larger share: a stage passed.
    Ramped,
    /// Half-open → closed: the last stage passed.
    Closed,
    /// Half-open → open: the trials failed; another cool-down starts.
    Reopened,
}

impl Transition {
    /// A label for metrics and traces.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Opened => "opened",
            Self::Ramped => "ramped",
            Self::Closed => "closed",
            Self::Reopened => "reopened",
        }
    }

    /// The state it leaves the breaker in.
    pub fn status(&self) -> BreakerStatus {
        match self {
            Self::Opened | Self::Reopened => BreakerStatus::Open,
            Self::Ramped => BreakerStatus::HalfOpen,
            Self::Closed => BreakerStatus::Closed,
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
    /// The cool-down is over: a share of the calls goes through.
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

/// A breaker as seen at one instant, for metrics, the API and tests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerState {
    /// The state in effect: an open breaker whose cool-down is over reads as half-open.
    pub status: BreakerStatus,
    /// Closed: the outcomes in the stored window. Open: those that opened it. Half-open: the
    /// trials of the current stage.
    pub calls: u64,
    /// The failures among `calls`.
    pub failures: u64,
    /// Half-open: the share of calls let through now (a cooled-down open breaker: the first
    /// stage's). `None` otherwise.
    pub share: Option<f64>,
    /// How long a `check` now would surely be refused; `None` when it may be let through.
    pub retry_after: Option<Duration>,
}

impl BreakerState {
    /// Reads the stored hash (field, value pairs; empty when absent) as of `now_ms`.
    fn from_fields(fields: &[(String, String)], now_ms: u64) -> Result<Self, BreakerError> {
        let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let number = |name: &str| {
            get(name)
                .map(|v| v.parse::<u64>().map_err(|_| BreakerError::Corrupt(format!("breaker {name} `{v}`"))))
                .transpose()
                .map(Option::unwrap_or_default)
        };
        let status = get("state").map(str::parse).transpose()?.unwrap_or(BreakerStatus::Closed);
        let (calls, failures) = match status {
            BreakerStatus::Closed => window_totals(fields)?,
            BreakerStatus::Open => (number("calls")?, number("failures")?),
            BreakerStatus::HalfOpen => (number("sc")?, number("sf")?),
        };
        let until = number("until")?;
        Ok(match status {
            BreakerStatus::Open if now_ms < until => {
                Self { status, calls, failures, share: None, retry_after: Some(Duration::from_millis(until - now_ms)) }
            }
            BreakerStatus::Open => {
                Self { status: BreakerStatus::HalfOpen, calls, failures, share: Some(RAMP[0]), retry_after: None }
            }
            BreakerStatus::HalfOpen => {
                let stage = usize::try_from(number("stage")?).unwrap_or(usize::MAX);
                let share = RAMP.get(stage).copied().unwrap_or(1.0);
                Self { status, calls, failures, share: Some(share), retry_after: None }
            }
            BreakerStatus::Closed => Self { status, calls, failures, share: None, retry_after: None },
        })
    }
}

/// The calls and failures of a closed breaker's stored buckets (`n<bucket>`, `f<bucket>`).
fn window_totals(fields: &[(String, String)]) -> Result<(u64, u64), BreakerError> {
    let (mut calls, mut failures) = (0_u64, 0_u64);
    for (k, v) in fields {
        let total = match k.as_bytes().first() {
            Some(b'n') => &mut calls,
            Some(b'f') => &mut failures,
            _ => continue,
        };
        let n = v.parse::<u64>().map_err(|_| BreakerError::Corrupt(format!("breaker bucket {k} `{v}`")))?;
        *total = total.saturating_add(n);
    }
    Ok((calls, failures))
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
    conn: RedisConn,
    prefix: String,
    check: Script,
    record: Script,
}

impl Breakers {
    /// Breakers under the key prefix `prefix` (the store's, e.g. `af`), over a shared connection.
    pub fn new(conn: RedisConn, prefix: impl Into<String>) -> Self {
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
    /// through. Atomic across the fleet: while half-open, the share let through is exact.
    pub async fn check(&self, name: &str, cfg: &BreakerConfig, now_ms: u64) -> Result<Permit, BreakerError> {
        let mut inv = self.check.key(self.key(name));
        inv.arg(now_ms).arg(ms(cfg.ramp_interval)).arg(ms(cfg.key_ttl()));
        for share in RAMP {
            inv.arg(share);
        }
        let (verdict, wait_ms, generation): (String, u64, u64) = inv.invoke_async(&mut self.conn.clone()).await?;
        match verdict.as_str() {
            "allow" => Ok(Permit::Allow),
            "trial" => Ok(Permit::Trial { generation }),
            "deny" => Ok(Permit::Deny { retry_after: Duration::from_millis(wait_ms) }),
            other => Err(BreakerError::Corrupt(format!("unknown check verdict `{other}`"))),
        }
    }

    /// Reports the outcome of a call `check` let through (`trial`: the generation of its
    /// [`Permit::Trial`]). Returns the transition it caused, if any. Never call it for a denied call,
    /// nor for an outcome that says nothing about the dependency.
    pub async fn record(
        &self,
        name: &str,
        cfg: &BreakerConfig,
        trial: Option<u64>,
        success: bool,
        now_ms: u64,
    ) -> Result<Option<Transition>, BreakerError> {
        self.record_with(name, cfg, trial, success, 0, now_ms).await
    }

    /// [`Breakers::record`], with `batched` successes of plain calls made while the breaker was closed
    /// and not reported one by one: they are counted in the closed window with this outcome.
    pub async fn record_with(
        &self,
        name: &str,
        cfg: &BreakerConfig,
        trial: Option<u64>,
        success: bool,
        batched: u64,
        now_ms: u64,
    ) -> Result<Option<Transition>, BreakerError> {
        let transition: String = self
            .record
            .key(self.key(name))
            .arg(now_ms)
            .arg(trial.unwrap_or(0))
            .arg(u8::from(success))
            .arg(cfg.failure_rate)
            .arg(cfg.min_calls.get())
            .arg(ms(cfg.window))
            .arg(BUCKETS)
            .arg(ms(cfg.cool_down))
            .arg(ms(cfg.ramp_interval))
            .arg(RAMP.len())
            .arg(ms(cfg.key_ttl()))
            .arg(batched)
            .invoke_async(&mut self.conn.clone())
            .await?;
        match transition.as_str() {
            "" => Ok(None),
            "opened" => Ok(Some(Transition::Opened)),
            "ramped" => Ok(Some(Transition::Ramped)),
            "closed" => Ok(Some(Transition::Closed)),
            "reopened" => Ok(Some(Transition::Reopened)),
            other => Err(BreakerError::Corrupt(format!("unknown transition `{other}`"))),
        }
    }

    /// Breaker `name` as of `now_ms` (read-only).
    pub async fn state(&self, name: &str, now_ms: u64) -> Result<BreakerState, BreakerError> {
        let fields: Vec<(String, String)> =
            redis::cmd("HGETALL").arg(self.key(name)).query_async(&mut self.conn.clone()).await?;
        BreakerState::from_fields(&fields, now_ms)
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

    fn fields(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn config_defaults_are_half_of_twenty_calls_in_thirty_seconds() -> Result<(), toml::de::Error> {
        let cfg = parse("[breaker]")?;
        assert_eq!(cfg, BreakerConfig::default());
        assert_eq!((cfg.failure_rate, cfg.min_calls.get()), (0.5, 20));
        assert_eq!((cfg.window, cfg.cool_down), (Duration::from_secs(30), Duration::from_secs(30)));
        assert_eq!(cfg.ramp_interval, Duration::from_secs(5));
        Ok(())
    }

    #[test]
    fn config_reads_milliseconds_and_rates() -> Result<(), toml::de::Error> {
        let cfg = parse(
            "[breaker]\nfailure_rate = 0.25\nmin_calls = 8\nwindow_ms = 10000\ncool_down_ms = 1500\nramp_interval_ms = 0",
        )?;
        assert_eq!((cfg.failure_rate, cfg.min_calls.get()), (0.25, 8));
        assert_eq!(
            (cfg.window, cfg.cool_down, cfg.ramp_interval),
            (Duration::from_secs(10), Duration::from_millis(1500), Duration::ZERO)
        );
        Ok(())
    }

    #[test]
    fn the_old_threshold_means_that_many_failures_and_no_success_in_the_window() -> Result<(), toml::de::Error> {
        let cfg = parse("[breaker]\nfailure_threshold = 3\ncool_down_ms = 1500")?;
        assert_eq!(cfg, BreakerConfig::consecutive(NonZeroU32::MIN.saturating_add(2), Duration::from_millis(1500)));
        assert_eq!((cfg.failure_rate, cfg.min_calls.get()), (1.0, 3));
        Ok(())
    }

    #[test]
    fn config_rejects_bad_and_conflicting_keys_with_a_reason() {
        for (text, why) in [
            ("cool_down = 5", "unknown field"),
            ("failure_threshold = 0", "nonzero"),
            ("min_calls = 0", "nonzero"),
            ("failure_rate = 0.0", "(0, 1]"),
            ("failure_rate = 1.5", "(0, 1]"),
            ("failure_rate = nan", "(0, 1]"),
            ("window_ms = 5", "at least 10"),
            ("failure_threshold = 5\nmin_calls = 5", "one or the other"),
            ("probe_timeout_ms = 20000", "probe_timeout_ms` is gone"),
        ] {
            let err = parse(&format!("[breaker]\n{text}")).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(why), "`{text}`: {err}");
        }
    }

    #[test]
    fn a_missing_key_is_a_closed_breaker_and_buckets_add_up() -> Result<(), BreakerError> {
        let s = BreakerState::from_fields(&[], 1_000)?;
        let closed =
            BreakerState { status: BreakerStatus::Closed, calls: 0, failures: 0, share: None, retry_after: None };
        assert_eq!(s, closed);
        let s = BreakerState::from_fields(&fields(&[("n1", "4"), ("f1", "1"), ("n2", "6"), ("f2", "3")]), 1_000)?;
        assert_eq!((s.status, s.calls, s.failures), (BreakerStatus::Closed, 10, 4));
        Ok(())
    }

    #[test]
    fn an_open_breaker_reads_half_open_once_cooled_down() -> Result<(), BreakerError> {
        let open = fields(&[("state", "open"), ("until", "10000"), ("calls", "20"), ("failures", "12")]);
        let cooling = BreakerState::from_fields(&open, 4_000)?;
        assert_eq!((cooling.status, cooling.calls, cooling.failures), (BreakerStatus::Open, 20, 12));
        assert_eq!(cooling.retry_after, Some(Duration::from_secs(6)));
        let cooled = BreakerState::from_fields(&open, 10_000)?;
        assert_eq!((cooled.status, cooled.share, cooled.retry_after), (BreakerStatus::HalfOpen, Some(0.1), None));
        let ramping = fields(&[("state", "half_open"), ("stage", "2"), ("sc", "3"), ("sf", "1")]);
        let s = BreakerState::from_fields(&ramping, 11_000)?;
        assert_eq!((s.status, s.share, s.calls, s.failures), (BreakerStatus::HalfOpen, Some(0.5), 3, 1));
        Ok(())
    }

    #[test]
    fn statuses_round_trip_and_garbage_is_corrupt() {
        for s in [BreakerStatus::Closed, BreakerStatus::Open, BreakerStatus::HalfOpen] {
            assert_eq!(s.as_str().parse::<BreakerStatus>().ok(), Some(s));
        }
        assert!(matches!("ajar".parse::<BreakerStatus>(), Err(BreakerError::Corrupt(_))));
        assert!(BreakerState::from_fields(&fields(&[("state", "open"), ("until", "x")]), 0).is_err());
        assert!(BreakerState::from_fields(&fields(&[("n7", "many")]), 0).is_err());
    }

    #[test]
    fn the_key_carries_the_name_as_its_hash_tag() {
        assert_eq!(key_of("af", "tool:lookup_order"), "af:breaker:{tool:lookup_order}");
    }

    #[test]
    fn permits_say_whether_to_call() {
        assert!(Permit::Allow.is_allowed() && Permit::Allow.trial().is_none());
        let trial = Permit::Trial { generation: 7 };
        assert!(trial.is_allowed() && trial.trial() == Some(7));
        assert!(!Permit::Deny { retry_after: Duration::ZERO }.is_allowed());
    }

    #[test]
    fn the_key_outlives_a_window_a_cool_down_and_a_ramp() {
        let cfg = BreakerConfig::default();
        assert_eq!(cfg.key_ttl(), Duration::from_secs(30 + 30 + 4 * 5 + 60));
    }
}
