//! What the OpenAI server saw, for tests to assert on (`GET /admin/stats`).
//!
//! Kept in a [`Recorder`], whose request counters are shared with the Messages API server's.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::stats::{CountsRequests, Recorder, RequestCounters};

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

impl CountsRequests for OpenAiStats {
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

/// The shared, updatable [`OpenAiStats`]: a [`Recorder`] counts everything it has.
pub(crate) type StatsRecorder = Recorder<OpenAiStats>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::KEPT_REASONS;

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
