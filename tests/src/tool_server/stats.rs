//! What the tool server saw (`GET /admin/stats`), counted per tool and per `Idempotency-Key`.
//!
//! A key counted more than once means the client repeated a call; [`ToolStats::repeats`] sums those.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::stats::Recorder;

/// Counters since start or the last reset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolStats {
    /// Every call to `/tools/{name}`, failed or not.
    pub calls_total: u64,
    /// Calls by tool name.
    pub by_tool: BTreeMap<String, u64>,
    /// Calls by `Idempotency-Key` value.
    pub by_key: BTreeMap<String, u64>,
    /// Calls without an `Idempotency-Key`.
    pub missing_key: u64,
    /// Calls answered with an injected failure.
    pub failures_injected: u64,
    /// Calls that ran their tool successfully, by `Idempotency-Key`: a key counted more than once
    /// is an effect the client caused twice (a failed call retried under its key is not).
    pub executed_by_key: BTreeMap<String, u64>,
}

impl ToolStats {
    /// How many calls repeated a key already seen: the sum over keys of (count - 1).
    pub fn repeats(&self) -> u64 {
        self.by_key.values().map(|count| count.saturating_sub(1)).sum()
    }

    /// How many successful executions repeated a key already executed.
    pub fn repeated_executions(&self) -> u64 {
        self.executed_by_key.values().map(|count| count.saturating_sub(1)).sum()
    }
}

/// The shared, updatable [`ToolStats`].
pub(crate) type ToolStatsRecorder = Recorder<ToolStats>;

/// What the tool server counts.
impl Recorder<ToolStats> {
    /// Counts one call of `tool`, under its key when it has one.
    pub(crate) fn call(&self, tool: &str, key: Option<&str>) {
        self.update(|stats| {
            stats.calls_total += 1;
            *stats.by_tool.entry(tool.to_owned()).or_default() += 1;
            match key {
                Some(key) => *stats.by_key.entry(key.to_owned()).or_default() += 1,
                None => stats.missing_key += 1,
            }
        });
    }

    /// Counts an injected failure.
    pub(crate) fn failure(&self) {
        self.update(|stats| stats.failures_injected += 1);
    }

    /// Counts a successful execution under its key.
    pub(crate) fn executed(&self, key: Option<&str>) {
        if let Some(key) = key {
            self.update(|stats| *stats.executed_by_key.entry(key.to_owned()).or_default() += 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_calls_keys_and_repeats() {
        let recorder = ToolStatsRecorder::default();
        recorder.call("search", Some("k1"));
        recorder.call("search", Some("k1"));
        recorder.call("search", Some("k1"));
        recorder.call("lookup", Some("k2"));
        recorder.call("lookup", None);
        recorder.failure();
        recorder.executed(Some("k1"));
        recorder.executed(Some("k1"));
        recorder.executed(None);
        let stats = recorder.snapshot();
        assert_eq!(stats.repeated_executions(), 1);
        assert_eq!(stats.calls_total, 5);
        assert_eq!(stats.by_tool["search"], 3);
        assert_eq!(stats.missing_key, 1);
        assert_eq!(stats.failures_injected, 1);
        assert_eq!(stats.repeats(), 2);
        recorder.reset();
        assert_eq!(recorder.snapshot(), ToolStats::default());
    }
}
