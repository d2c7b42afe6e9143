//! What the OpenAI server saw, for tests to assert on (`GET /admin/stats`).
//!
//! Counters sit behind a plain mutex: every update is a few integer bumps, never held across an await.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

/// How many invalid-request reasons are kept.
const KEPT_REASONS: usize = 100;

/// Counters of `POST /v1/chat/completions` traffic since start or the last reset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenAiStats {
    /// Every request to `/v1/chat/completions`.
    pub requests_total: u64,
    /// Requests that passed validation.
    pub valid_total: u64,
    /// Requests rejected by validation (including authentication).
    pub invalid_total: u64,
    /// Responses by HTTP status.
    pub status_counts: BTreeMap<u16, u64>,
    /// The last 100 validation messages, oldest first.
    pub invalid_reasons: Vec<String>,
    /// Valid requests by `tool_choice` (`"absent"` when none was sent, `"function"` for a named one).
    pub tool_choice_seen: BTreeMap<String, u64>,
}

/// The shared, updatable [`OpenAiStats`].
#[derive(Debug, Default)]
pub(crate) struct StatsRecorder(Mutex<OpenAiStats>);

impl StatsRecorder {
    fn lock(&self) -> MutexGuard<'_, OpenAiStats> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of the current counters.
    pub(crate) fn snapshot(&self) -> OpenAiStats {
        self.lock().clone()
    }

    /// Zeroes everything.
    pub(crate) fn reset(&self) {
        *self.lock() = OpenAiStats::default();
    }

    /// Counts a request.
    pub(crate) fn request(&self) {
        self.lock().requests_total += 1;
    }

    /// Counts a rejected request and keeps its reason.
    pub(crate) fn invalid(&self, reason: &str) {
        let mut stats = self.lock();
        stats.invalid_total += 1;
        stats.invalid_reasons.push(reason.to_owned());
        let excess = stats.invalid_reasons.len().saturating_sub(KEPT_REASONS);
        stats.invalid_reasons.drain(..excess);
    }

    /// Counts a request that passed validation.
    pub(crate) fn valid(&self, tool_choice: &str) {
        let mut stats = self.lock();
        stats.valid_total += 1;
        *stats.tool_choice_seen.entry(tool_choice.to_owned()).or_default() += 1;
    }

    /// Counts a response status.
    pub(crate) fn status(&self, status: u16) {
        *self.lock().status_counts.entry(status).or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_keep_the_latest_reasons_and_reset() {
        let recorder = StatsRecorder::default();
        for i in 0..=KEPT_REASONS {
            recorder.request();
            recorder.invalid(&format!("reason {i}"));
        }
        recorder.valid("auto");
        recorder.status(200);
        let stats = recorder.snapshot();
        assert_eq!((stats.requests_total, stats.invalid_total, stats.valid_total), (101, 101, 1));
        assert_eq!(stats.invalid_reasons.len(), KEPT_REASONS);
        assert_eq!(stats.invalid_reasons[0], "reason 1");
        assert_eq!(stats.tool_choice_seen["auto"], 1);
        recorder.reset();
        assert_eq!(recorder.snapshot(), OpenAiStats::default());
    }
}
