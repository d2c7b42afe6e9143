//! Fault injection: latency and 429 / 529 / 500 answers at configured rates.
//!
//! Faults apply only to requests that passed validation, so a client's retries are exercised without
//! hiding its validation bugs. One random draw picks at most one fault: 429 with probability
//! `rate_429`, else 529 with `rate_529`, else 500 with `rate_500` (the rates are cumulative, so their
//! sum should stay at or below 1).

use std::fmt;
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ErrorKind};

/// What to inject into valid requests. Missing JSON fields take their defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Fixed delay before every answer, in milliseconds. Default 0.
    pub latency_ms: u64,
    /// Extra random delay in `0..=latency_jitter_ms` milliseconds. Default 0.
    pub latency_jitter_ms: u64,
    /// Probability of a 429 `rate_limit_error`. Default 0.
    pub rate_429: f64,
    /// Probability of a 529 `overloaded_error`. Default 0.
    pub rate_529: f64,
    /// Probability of a 500 `api_error`. Default 0.
    pub rate_500: f64,
    /// The `retry-after` seconds sent with a 429. Default 1.
    pub retry_after_s: u64,
    /// Every lookup in the prompt cache misses (as after an eviction): each call writes its whole
    /// prefix again, the most a call with breakpoints can cost. Default false.
    pub cache_misses: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            latency_jitter_ms: 0,
            rate_429: 0.0,
            rate_529: 0.0,
            rate_500: 0.0,
            retry_after_s: 1,
            cache_misses: false,
        }
    }
}

/// A rate outside `0.0..=1.0`.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidFaults {
    field: &'static str,
    value: f64,
}

impl fmt::Display for InvalidFaults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} must be between 0 and 1, got {}", self.field, self.value)
    }
}

impl std::error::Error for InvalidFaults {}

/// An injected failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Injection {
    RateLimited,
    Overloaded,
    ServerError,
}

impl Faults {
    /// Checks every rate is a probability.
    pub fn validate(&self) -> Result<(), InvalidFaults> {
        let rates = [("rate_429", self.rate_429), ("rate_529", self.rate_529), ("rate_500", self.rate_500)];
        match rates.into_iter().find(|(_, rate)| !(0.0..=1.0).contains(rate)) {
            Some((field, value)) => Err(InvalidFaults { field, value }),
            None => Ok(()),
        }
    }

    /// The same faults with every rate forced into `0.0..=1.0` (NaN becomes 0).
    pub fn clamped(self) -> Self {
        let clamp = |rate: f64| {
            if rate.is_nan() { 0.0 } else { rate.clamp(0.0, 1.0) }
        };
        Self { rate_429: clamp(self.rate_429), rate_529: clamp(self.rate_529), rate_500: clamp(self.rate_500), ..self }
    }

    /// How long to wait before answering this time.
    pub(crate) fn delay(&self) -> Duration {
        let jitter = if self.latency_jitter_ms == 0 { 0 } else { rand::rng().random_range(0..=self.latency_jitter_ms) };
        Duration::from_millis(self.latency_ms.saturating_add(jitter))
    }

    /// Draws whether to fail this request, and how.
    pub(crate) fn draw(&self) -> Option<Injection> {
        self.pick(rand::random::<f64>())
    }

    fn pick(&self, roll: f64) -> Option<Injection> {
        let thresholds = [
            (self.rate_429, Injection::RateLimited),
            (self.rate_429 + self.rate_529, Injection::Overloaded),
            (self.rate_429 + self.rate_529 + self.rate_500, Injection::ServerError),
        ];
        thresholds.into_iter().find(|(threshold, _)| roll < *threshold).map(|(_, injection)| injection)
    }
}

impl Injection {
    /// The API error this fault answers with.
    pub(crate) fn error(self, retry_after_s: u64) -> ApiError {
        match self {
            Self::RateLimited => ApiError::rate_limited(retry_after_s),
            Self::Overloaded => ApiError::new(ErrorKind::Overloaded, "Overloaded"),
            Self::ServerError => ApiError::new(ErrorKind::Api, "Internal server error"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faults(rate_429: f64, rate_529: f64, rate_500: f64) -> Faults {
        Faults { rate_429, rate_529, rate_500, ..Faults::default() }
    }

    #[test]
    fn defaults_inject_nothing() {
        let none = Faults::default();
        assert_eq!(none.retry_after_s, 1);
        assert_eq!(none.draw(), None);
        assert_eq!(none.delay(), Duration::ZERO);
    }

    #[test]
    fn rates_partition_one_roll() {
        let f = faults(0.25, 0.25, 0.25);
        assert_eq!(f.pick(0.1), Some(Injection::RateLimited));
        assert_eq!(f.pick(0.3), Some(Injection::Overloaded));
        assert_eq!(f.pick(0.6), Some(Injection::ServerError));
        assert_eq!(f.pick(0.9), None);
        assert_eq!(faults(1.0, 0.0, 0.0).draw(), Some(Injection::RateLimited));
    }

    #[test]
    fn rates_must_be_probabilities() {
        assert!(faults(1.5, 0.0, 0.0).validate().is_err());
        assert!(faults(0.0, f64::NAN, 0.0).validate().is_err());
        assert!(faults(0.0, 0.0, 1.0).validate().is_ok());
        assert_eq!(faults(2.0, f64::NAN, -1.0).clamped(), faults(1.0, 0.0, 0.0));
    }

    #[test]
    fn jitter_stays_in_range() {
        let f = Faults { latency_ms: 5, latency_jitter_ms: 3, ..Faults::default() };
        let delay = f.delay();
        assert!((Duration::from_millis(5)..=Duration::from_millis(8)).contains(&delay));
    }

    #[test]
    fn partial_json_takes_defaults() {
        let f: Faults = serde_json::from_str(r#"{"rate_429": 1.0}"#).expect("json");
        assert_eq!((f.rate_429, f.retry_after_s), (1.0, 1));
    }

    #[test]
    fn injections_map_to_statuses() {
        assert_eq!(Injection::RateLimited.error(4).retry_after_s, Some(4));
        assert_eq!(Injection::Overloaded.error(1).kind, ErrorKind::Overloaded);
        assert_eq!(Injection::ServerError.error(1).kind, ErrorKind::Api);
    }
}
