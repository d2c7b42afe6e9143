//! The wait between retries of something that failed for now: a broker connection, a publish.
//!
//! Every retry loop in the fleet used to carry its own `wait = (wait * 2).min(..)`; this is that
//! arithmetic once, so the first wait and the cap are the same everywhere.

use std::time::Duration;

/// A wait that doubles after each use, up to a cap; [`reset`](Self::reset) starts it afresh.
///
/// ```
/// use std::time::Duration;
/// use agentfleet::amqp::Backoff;
///
/// let mut b = Backoff::new(Duration::from_millis(200), Duration::from_millis(500));
/// assert_eq!(b.next_wait(), Duration::from_millis(200));
/// assert_eq!(b.next_wait(), Duration::from_millis(400));
/// assert_eq!(b.next_wait(), Duration::from_millis(500));
/// b.reset();
/// assert_eq!(b.next_wait(), Duration::from_millis(200));
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    wait: Duration,
}

impl Backoff {
    /// Starts at `first` and doubles up to `max`.
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self { first, max, wait: first }
    }

    /// The wait [`next_wait`](Self::next_wait) will return, without using it.
    pub fn peek(&self) -> Duration {
        self.wait
    }

    /// The wait before the next retry; the one after is twice as long (up to the cap).
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.wait;
        self.wait = (wait * 2).min(self.max);
        wait
    }

    /// Starts again from the first wait (after something worked for a while).
    pub fn reset(&mut self) {
        self.wait = self.first;
    }
}

impl Default for Backoff {
    /// 200 ms, doubling up to 5 s: what every retry loop of the fleet used.
    fn default() -> Self {
        Self::new(Duration::from_millis(200), Duration::from_secs(5))
    }
}
