//! What the model server saw, for tests to assert on (`GET /admin/stats`).
//!
//! Counters are kept behind a plain mutex: every update is a few integer bumps, never held across an
//! await.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

use super::faults::Injection;

/// How many invalid-request reasons are kept.
const KEPT_REASONS: usize = 100;

/// How many `max_tokens` values are kept.
const KEPT_MAX_TOKENS: usize = 1000;

/// Counters of `POST /v1/messages` traffic since start or the last reset.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelStats {
    /// Every request to `/v1/messages`.
    pub requests_total: u64,
    /// Requests that passed validation (including those then answered with an injected fault).
    pub valid_total: u64,
    /// Requests rejected by validation.
    pub invalid_total: u64,
    /// Responses by HTTP status.
    pub status_counts: BTreeMap<u16, u64>,
    /// Injected faults by kind.
    pub injected: Injected,
    /// The last 100 validation messages, oldest first.
    pub invalid_reasons: Vec<String>,
    /// `max_tokens` of the last 1000 valid requests, oldest first.
    pub max_tokens_seen: Vec<u64>,
    /// Valid requests by `tool_choice` type (`"absent"` when none was sent).
    pub tool_choice_seen: BTreeMap<String, u64>,
    /// Input tokens of every successful response (what the account was billed).
    pub billed_input_tokens: u64,
    /// Output tokens of every successful response.
    pub billed_output_tokens: u64,
    /// Successful responses.
    pub answered_total: u64,
    /// Arrival times (Unix ms) of the last 20000 requests, valid or not, oldest first.
    pub request_times_ms: Vec<u64>,
}

/// Injected fault counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Injected {
    /// 429 `rate_limit_error` responses.
    pub r429: u64,
    /// 529 `overloaded_error` responses.
    pub r529: u64,
    /// 500 `api_error` responses.
    pub r500: u64,
}

/// The shared, updatable [`ModelStats`].
#[derive(Debug, Default)]
pub(crate) struct StatsRecorder(Mutex<ModelStats>);

impl StatsRecorder {
    fn lock(&self) -> MutexGuard<'_, ModelStats> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of the current counters.
    pub(crate) fn snapshot(&self) -> ModelStats {
        self.lock().clone()
    }

    /// Zeroes everything.
    pub(crate) fn reset(&self) {
        *self.lock() = ModelStats::default();
    }

    /// Counts a request to `/v1/messages`.
    pub(crate) fn request(&self) {
        self.lock().requests_total += 1;
    }

    /// Counts a rejected request and keeps its reason.
    pub(crate) fn invalid(&self, reason: &str) {
        let mut stats = self.lock();
        stats.invalid_total += 1;
        push_bounded(&mut stats.invalid_reasons, reason.to_owned(), KEPT_REASONS);
    }

    /// Counts a request that passed validation.
    pub(crate) fn valid(&self, max_tokens: u64, tool_choice: &str) {
        let mut stats = self.lock();
        stats.valid_total += 1;
        push_bounded(&mut stats.max_tokens_seen, max_tokens, KEPT_MAX_TOKENS);
        *stats.tool_choice_seen.entry(tool_choice.to_owned()).or_default() += 1;
    }

    /// Notes a request's arrival time.
    pub(crate) fn arrived(&self, at_ms: u64) {
        push_bounded(&mut self.lock().request_times_ms, at_ms, 20_000);
    }

    /// Counts a successful response and what it billed.
    pub(crate) fn billed(&self, input_tokens: u64, output_tokens: u64) {
        let mut stats = self.lock();
        stats.answered_total += 1;
        stats.billed_input_tokens += input_tokens;
        stats.billed_output_tokens += output_tokens;
    }

    /// Counts an injected fault.
    pub(crate) fn injected(&self, injection: Injection) {
        let mut stats = self.lock();
        let counter = match injection {
            Injection::RateLimited => &mut stats.injected.r429,
            Injection::Overloaded => &mut stats.injected.r529,
            Injection::ServerError => &mut stats.injected.r500,
        };
        *counter += 1;
    }

    /// Counts a response status.
    pub(crate) fn status(&self, status: u16) {
        *self.lock().status_counts.entry(status).or_default() += 1;
    }
}

/// Appends `item`, dropping the oldest entries beyond `cap`.
fn push_bounded<T>(items: &mut Vec<T>, item: T, cap: usize) {
    items.push(item);
    let excess = items.len().saturating_sub(cap);
    items.drain(..excess);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_resets() {
        let recorder = StatsRecorder::default();
        recorder.request();
        recorder.valid(512, "auto");
        recorder.injected(Injection::RateLimited);
        recorder.status(429);
        recorder.request();
        recorder.invalid("max_tokens: Field required");
        recorder.status(400);
        let stats = recorder.snapshot();
        assert_eq!((stats.requests_total, stats.valid_total, stats.invalid_total), (2, 1, 1));
        assert_eq!(stats.injected, Injected { r429: 1, r529: 0, r500: 0 });
        assert_eq!(stats.status_counts, BTreeMap::from([(400, 1), (429, 1)]));
        assert_eq!(stats.max_tokens_seen, [512]);
        assert_eq!(stats.tool_choice_seen["auto"], 1);
        recorder.reset();
        assert_eq!(recorder.snapshot(), ModelStats::default());
    }

    #[test]
    fn keeps_only_the_latest() {
        let mut items: Vec<u32> = (0..5).collect();
        push_bounded(&mut items, 5, 3);
        assert_eq!(items, [3, 4, 5]);
    }

    #[test]
    fn stats_round_trip_through_json() {
        let recorder = StatsRecorder::default();
        recorder.status(200);
        let json = serde_json::to_string(&recorder.snapshot()).expect("serialise");
        let back: ModelStats = serde_json::from_str(&json).expect("deserialise");
        assert_eq!(back.status_counts[&200], 1);
    }
}
