//! What the model server saw, for tests to assert on (`GET /admin/stats`).
//!
//! Kept in a [`Recorder`]: its request counters are shared with the OpenAI server's.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::cache::CacheOutcome;
use super::faults::Injection;
use super::response::Usage;
use crate::serve::ConnectionStats;
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
    /// The body bytes of those requests (what a client sent per model call, on average, is this
    /// over `requests_total`).
    pub request_bytes_total: u64,
    /// Requests that passed validation (including those then answered with an injected fault).
    pub valid_total: u64,
    /// Requests rejected by validation.
    pub invalid_total: u64,
    /// Requests whose body never arrived whole: the client went away while sending it (a killed
    /// worker). Neither valid nor invalid: there was no request to judge.
    #[serde(default)]
    pub cut_off_total: u64,
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
    /// `input_tokens` of every successful response: the input billed at the plain price, neither read
    /// from nor written to the prompt cache.
    pub billed_input_tokens: u64,
    /// `cache_read_input_tokens` of every successful response.
    #[serde(default)]
    pub billed_cache_read_tokens: u64,
    /// `cache_creation_input_tokens` of every successful response.
    #[serde(default)]
    pub billed_cache_creation_tokens: u64,
    /// Output tokens of every successful response.
    pub billed_output_tokens: u64,
    /// Successful responses.
    pub answered_total: u64,
    /// Arrival times (Unix ms) of the last 20000 requests, valid or not, oldest first.
    pub request_times_ms: Vec<u64>,
    /// The server's connections: open now, and accepted since it started (a reset leaves them).
    /// Over HTTP/2 many calls in flight share a connection; over HTTP/1.1 each has its own.
    #[serde(default)]
    pub connections: ConnectionStats,
    /// What the prompt cache did for the successful responses.
    #[serde(default)]
    pub cache: CacheStats,
}

/// Prompt-cache counters of the successful responses since start or the last reset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CacheStats {
    /// Responses to requests with at least one `cache_control` breakpoint.
    pub requests_with_breakpoints: u64,
    /// Responses that read a cached prefix.
    pub reads: u64,
    /// Responses that wrote at least one cache entry.
    pub writes: u64,
    /// Their `cache_read_input_tokens`.
    pub read_tokens: u64,
    /// Their `cache_creation_input_tokens`.
    pub creation_tokens: u64,
    /// Live cache entries now (a reset drops them all).
    pub entries: u64,
}

/// What the answered requests of one goal were billed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoalBill {
    /// Successful responses.
    pub answered: u64,
    /// Their `input_tokens` (the input neither read from nor written to the cache).
    pub input_tokens: u64,
    /// Their output tokens.
    pub output_tokens: u64,
    /// Their `cache_read_input_tokens`.
    #[serde(default)]
    pub cache_read_tokens: u64,
    /// Their `cache_creation_input_tokens`.
    #[serde(default)]
    pub cache_creation_tokens: u64,
}

/// Bills by goal (the first user message's text), kept apart from [`ModelStats`] so that its
/// snapshots stay small.
pub(crate) type GoalRecorder = Recorder<BTreeMap<String, GoalBill>>;

impl Recorder<BTreeMap<String, GoalBill>> {
    /// Adds a successful response to its goal's bill.
    pub(crate) fn billed(&self, goal: &str, usage: &Usage) {
        self.update(|bills| {
            let bill = bills.entry(goal.to_owned()).or_default();
            bill.answered += 1;
            bill.input_tokens += usage.input_tokens;
            bill.output_tokens += usage.output_tokens;
            bill.cache_read_tokens += usage.cache_read_input_tokens;
            bill.cache_creation_tokens += usage.cache_creation_input_tokens;
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
    /// Counts a request whose body was cut off on the wire.
    pub(crate) fn cut_off(&self) {
        self.update(|stats| stats.cut_off_total += 1);
    }

    /// Keeps the `max_tokens` of a valid request.
    pub(crate) fn max_tokens(&self, max_tokens: u64) {
        self.update(|stats| push_bounded(&mut stats.max_tokens_seen, max_tokens, KEPT_MAX_TOKENS));
    }

    /// Adds a request body's size.
    pub(crate) fn received(&self, bytes: usize) {
        self.update(|stats| stats.request_bytes_total += bytes as u64);
    }

    /// Notes a request's arrival time.
    pub(crate) fn arrived(&self, at_ms: u64) {
        self.update(|stats| push_bounded(&mut stats.request_times_ms, at_ms, KEPT_ARRIVALS));
    }

    /// Counts a successful response, what it billed and what the cache did for it.
    pub(crate) fn billed(&self, usage: &Usage, cache: &CacheOutcome) {
        self.update(|stats| {
            stats.answered_total += 1;
            stats.billed_input_tokens += usage.input_tokens;
            stats.billed_output_tokens += usage.output_tokens;
            stats.billed_cache_read_tokens += usage.cache_read_input_tokens;
            stats.billed_cache_creation_tokens += usage.cache_creation_input_tokens;
            let counts = &mut stats.cache;
            counts.requests_with_breakpoints += u64::from(cache.breakpoints);
            counts.reads += u64::from(cache.read > 0);
            counts.writes += u64::from(cache.wrote);
            counts.read_tokens += usage.cache_read_input_tokens;
            counts.creation_tokens += usage.cache_creation_input_tokens;
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
        recorder.received(3000);
        recorder.valid("auto");
        recorder.max_tokens(512);
        recorder.injected(Injection::RateLimited);
        recorder.status(429);
        recorder.request();
        recorder.invalid("max_tokens: Field required");
        recorder.status(400);
        let stats = recorder.snapshot();
        assert_eq!((stats.requests_total, stats.valid_total, stats.invalid_total), (2, 1, 1));
        assert_eq!(stats.request_bytes_total, 3000);
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
        bills.billed("a", &usage(10, 2, 7));
        bills.billed("a", &usage(5, 1, 0));
        bills.billed("b", &usage(1, 1, 0));
        let snapshot = bills.snapshot();
        let a = GoalBill {
            answered: 2,
            input_tokens: 15,
            output_tokens: 3,
            cache_read_tokens: 7,
            cache_creation_tokens: 0,
        };
        assert_eq!(snapshot["a"], a);
        assert_eq!(snapshot["b"].answered, 1);
    }

    fn usage(input_tokens: u64, output_tokens: u64, cache_read_input_tokens: u64) -> Usage {
        Usage {
            input_tokens,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens,
            cache_creation: super::super::response::CacheCreation::default(),
            output_tokens,
            service_tier: "standard",
        }
    }

    #[test]
    fn cache_counters_add_up() {
        let recorder = StatsRecorder::default();
        let hit = CacheOutcome { breakpoints: true, read: 7, ..CacheOutcome::default() };
        recorder.billed(&usage(10, 2, 7), &hit);
        let mut written = usage(10, 2, 0);
        written.cache_creation_input_tokens = 30;
        recorder.billed(
            &written,
            &CacheOutcome { breakpoints: true, creation_5m: 30, wrote: true, ..CacheOutcome::default() },
        );
        recorder.billed(&usage(10, 2, 0), &CacheOutcome::default());
        let stats = recorder.snapshot();
        assert_eq!(
            (stats.billed_input_tokens, stats.billed_cache_read_tokens, stats.billed_cache_creation_tokens),
            (30, 7, 30)
        );
        let expected = CacheStats {
            requests_with_breakpoints: 2,
            reads: 1,
            writes: 1,
            read_tokens: 7,
            creation_tokens: 30,
            entries: 0,
        };
        assert_eq!(stats.cache, expected);
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
