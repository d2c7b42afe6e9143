//! What the model server saw, for tests to assert on (`GET /admin/stats`).
//!
//! Kept in a [`Recorder`]: its request counters are shared with the OpenAI server's.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::faults::Injection;
use crate::stats::{CountsRequests, Recorder, RequestCounters, push_bounded};

/// How many `max_tokens` values are kept.
const KEPT_MAX_TOKENS: usize = 1000;

/// How many arrival times are kept.
const KEPT_ARRIVALS: usize = 20_000;

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

/// What the answered requests of one goal were billed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoalBill {
    /// Successful responses.
    pub answered: u64,
    /// Their input tokens.
    pub input_tokens: u64,
    /// Their output tokens.
    pub output_tokens: u64,
}

/// Bills by goal (the first user message's text), kept apart from [`ModelStats`] so that its
/// snapshots stay small.
pub(crate) type GoalRecorder = Recorder<BTreeMap<String, GoalBill>>;

impl Recorder<BTreeMap<String, GoalBill>> {
    /// Adds a successful response to its goal's bill.
    pub(crate) fn billed(&self, goal: &str, input_tokens: u64, output_tokens: u64) {
        self.update(|bills| {
            let bill = bills.entry(goal.to_owned()).or_default();
            bill.answered += 1;
            bill.input_tokens += input_tokens;
            bill.output_tokens += output_tokens;
        });
    }
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

impl CountsRequests for ModelStats {
    fn counters(&mut self) -> RequestCounters<'_> {
        RequestCounters {
            requests_total: &mut self.requests_total,
            valid_total: &mut self.valid_total,
            invalid_total: &mut self.invalid_total,
            status_counts: &mut self.status_counts,
            invalid_reasons: &mut self.invalid_reasons,
            tool_choice_seen: &mut self.tool_choice_seen,
        }
    }
}

/// The shared, updatable [`ModelStats`].
pub(crate) type StatsRecorder = Recorder<ModelStats>;

/// What only the Messages API server counts; the request counters are [`Recorder`]'s.
impl Recorder<ModelStats> {
    /// Keeps the `max_tokens` of a valid request.
    pub(crate) fn max_tokens(&self, max_tokens: u64) {
        self.update(|stats| push_bounded(&mut stats.max_tokens_seen, max_tokens, KEPT_MAX_TOKENS));
    }

    /// Notes a request's arrival time.
    pub(crate) fn arrived(&self, at_ms: u64) {
        self.update(|stats| push_bounded(&mut stats.request_times_ms, at_ms, KEPT_ARRIVALS));
    }

    /// Counts a successful response and what it billed.
    pub(crate) fn billed(&self, input_tokens: u64, output_tokens: u64) {
        self.update(|stats| {
            stats.answered_total += 1;
            stats.billed_input_tokens += input_tokens;
            stats.billed_output_tokens += output_tokens;
        });
    }

    /// Counts an injected fault.
    pub(crate) fn injected(&self, injection: Injection) {
        self.update(|stats| {
            let counter = match injection {
                Injection::RateLimited => &mut stats.injected.r429,
                Injection::Overloaded => &mut stats.injected.r529,
                Injection::ServerError => &mut stats.injected.r500,
            };
            *counter += 1;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_resets() {
        let recorder = StatsRecorder::default();
        recorder.request();
        recorder.valid("auto");
        recorder.max_tokens(512);
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
    fn bills_add_up_per_goal() {
        let bills = GoalRecorder::default();
        bills.billed("a", 10, 2);
        bills.billed("a", 5, 1);
        bills.billed("b", 1, 1);
        let snapshot = bills.snapshot();
        assert_eq!(snapshot["a"], GoalBill { answered: 2, input_tokens: 15, output_tokens: 3 });
        assert_eq!(snapshot["b"].answered, 1);
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
