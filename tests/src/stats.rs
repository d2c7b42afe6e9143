//! What every scripted test server shares to count its traffic: a recorder around a stats struct
//! (snapshot, reset, update under a plain mutex, never held across an await), the counters the two
//! model APIs have in common, and a bounded log.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// How many invalid-request reasons are kept.
pub const KEPT_REASONS: usize = 100;

/// The shared, updatable stats `T` of one server.
#[derive(Debug, Default)]
pub struct Recorder<T>(Mutex<T>);

impl<T: Clone + Default> Recorder<T> {
    fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of the current counters.
    pub fn snapshot(&self) -> T {
        self.lock().clone()
    }

    /// Zeroes everything.
    pub fn reset(&self) {
        *self.lock() = T::default();
    }

    /// Applies `f` to the counters.
    pub fn update<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        f(&mut self.lock())
    }
}

/// The request counters of a validating API server, borrowed from its stats struct.
pub struct RequestCounters<'a> {
    /// Every request.
    pub requests_total: &'a mut u64,
    /// Requests that passed validation.
    pub valid_total: &'a mut u64,
    /// Requests rejected by validation.
    pub invalid_total: &'a mut u64,
    /// Responses by HTTP status.
    pub status_counts: &'a mut BTreeMap<u16, u64>,
    /// The last [`KEPT_REASONS`] validation messages, oldest first.
    pub invalid_reasons: &'a mut Vec<String>,
    /// Valid requests by `tool_choice`.
    pub tool_choice_seen: &'a mut BTreeMap<String, u64>,
}

/// Stats that count requests the way both scripted model servers do.
pub trait CountsRequests {
    /// The request counters inside.
    fn counters(&mut self) -> RequestCounters<'_>;
}

impl<T: CountsRequests + Clone + Default> Recorder<T> {
    /// Counts a request.
    pub fn request(&self) {
        *self.lock().counters().requests_total += 1;
    }

    /// Counts a rejected request and keeps its reason.
    pub fn invalid(&self, reason: &str) {
        let mut stats = self.lock();
        let c = stats.counters();
        *c.invalid_total += 1;
        push_bounded(c.invalid_reasons, reason.to_owned(), KEPT_REASONS);
    }

    /// Counts a request that passed validation, by its `tool_choice`.
    pub fn valid(&self, tool_choice: &str) {
        let mut stats = self.lock();
        let c = stats.counters();
        *c.valid_total += 1;
        *c.tool_choice_seen.entry(tool_choice.to_owned()).or_default() += 1;
    }

    /// Counts a response status.
    pub fn status(&self, status: u16) {
        *self.lock().counters().status_counts.entry(status).or_default() += 1;
    }
}

/// Appends `item`, dropping the oldest entries beyond `cap`.
pub fn push_bounded<T>(items: &mut Vec<T>, item: T, cap: usize) {
    items.push(item);
    let excess = items.len().saturating_sub(cap);
    items.drain(..excess);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Default, PartialEq)]
    struct Counts {
        requests_total: u64,
        valid_total: u64,
        invalid_total: u64,
        status_counts: BTreeMap<u16, u64>,
        invalid_reasons: Vec<String>,
        tool_choice_seen: BTreeMap<String, u64>,
    }

    impl CountsRequests for Counts {
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

    #[test]
    fn counts_keep_the_latest_reasons_and_reset() {
        let recorder = Recorder::<Counts>::default();
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
        assert_eq!(stats.status_counts[&200], 1);
        recorder.reset();
        assert_eq!(recorder.snapshot(), Counts::default());
    }

    #[test]
    fn keeps_only_the_latest() {
        let mut items: Vec<u32> = (0..5).collect();
        push_bounded(&mut items, 5, 3);
        assert_eq!(items, [3, 4, 5]);
    }
}
