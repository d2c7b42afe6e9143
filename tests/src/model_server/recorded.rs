//! The request log for tests: per goal, the bodies of the answered requests and the usage each got.
//!
//! Kept only when [`super::ModelServerConfig::record_requests`] is set, and bounded: the last
//! [`KEPT_PER_GOAL`] requests of at most [`KEPT_GOALS`] goals (the goals seen first are dropped).

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

use super::response::Usage;

/// How many requests are kept per goal.
pub(crate) const KEPT_PER_GOAL: usize = 64;

/// How many goals are kept.
pub(crate) const KEPT_GOALS: usize = 1000;

/// The input side of a response's usage: how its input was billed.
///
/// `input_tokens + cache_creation_input_tokens + cache_read_input_tokens` is the request's whole
/// input, `ceil(body bytes / 4)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheUsage {
    /// Input neither read from nor written to the prompt cache.
    pub input_tokens: u64,
    /// Input written to the prompt cache: the tokens from the prefix read (or the start) to the
    /// last breakpoint written.
    pub cache_creation_input_tokens: u64,
    /// Input read from the prompt cache: the longest cached prefix found.
    pub cache_read_input_tokens: u64,
}

impl From<&Usage> for CacheUsage {
    fn from(usage: &Usage) -> Self {
        Self {
            input_tokens: usage.input_tokens,
            cache_creation_input_tokens: usage.cache_creation_input_tokens,
            cache_read_input_tokens: usage.cache_read_input_tokens,
        }
    }
}

/// One answered request, as received, and the usage it was answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// The raw request body.
    pub body: Vec<u8>,
    /// The input side of the usage in the answer.
    pub usage: CacheUsage,
}

#[derive(Debug, Default)]
struct Log {
    by_goal: HashMap<String, VecDeque<RecordedRequest>>,
    /// The goals in the order first seen, to drop the oldest when too many.
    goals: VecDeque<String>,
}

/// The bounded log, shared by the handlers and the server handle.
#[derive(Debug, Default)]
pub(crate) struct RequestLog(Mutex<Log>);

impl RequestLog {
    fn lock(&self) -> MutexGuard<'_, Log> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends an answered request to its goal's log.
    pub(crate) fn record(&self, goal: &str, body: &[u8], usage: CacheUsage) {
        let mut log = self.lock();
        if !log.by_goal.contains_key(goal) {
            if log.goals.len() >= KEPT_GOALS
                && let Some(oldest) = log.goals.pop_front()
            {
                log.by_goal.remove(&oldest);
            }
            log.goals.push_back(goal.to_owned());
        }
        let requests = log.by_goal.entry(goal.to_owned()).or_default();
        if requests.len() >= KEPT_PER_GOAL {
            requests.pop_front();
        }
        requests.push_back(RecordedRequest { body: body.to_vec(), usage });
    }

    /// The kept requests of `goal`, oldest first.
    pub(crate) fn of(&self, goal: &str) -> Vec<RecordedRequest> {
        self.lock().by_goal.get(goal).map(|requests| requests.iter().cloned().collect()).unwrap_or_default()
    }

    /// Forgets everything.
    pub(crate) fn clear(&self) {
        *self.lock() = Log::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_latest_per_goal_and_the_latest_goals() {
        let log = RequestLog::default();
        for i in 0..=KEPT_PER_GOAL {
            log.record("a", i.to_string().as_bytes(), CacheUsage { input_tokens: i as u64, ..CacheUsage::default() });
        }
        let a = log.of("a");
        assert_eq!(a.len(), KEPT_PER_GOAL);
        assert_eq!((a[0].body.as_slice(), a[0].usage.input_tokens), (b"1".as_slice(), 1));
        for i in 0..KEPT_GOALS {
            log.record(&format!("g{i}"), b"{}", CacheUsage::default());
        }
        assert!(log.of("a").is_empty(), "the first goal is dropped");
        assert_eq!(log.of("g0").len(), 1);
        log.clear();
        assert!(log.of("g0").is_empty());
    }
}
