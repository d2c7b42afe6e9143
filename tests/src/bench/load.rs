//! The load of a run: sessions of a given shape, submitted through the HTTP API in a closed loop
//! (a fixed number live, a new one as one ends, as the reference keeps its sessions), open loop at
//! a paced rate, or all at once; then drained and checked.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agentfleet::domain::SessionId;
use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::fleet::TestFleet;

/// How often the live sessions are counted (`ZCARD <prefix>:active`).
const POLL_EVERY: Duration = Duration::from_millis(20);

/// The sessions of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Steps per session (their mean with `vary`).
    pub steps: u32,
    /// Spread session lengths over `1..=2·steps−1`, as the reference's `--vary` does, so that
    /// sessions do not end in waves and conversations of every length are in flight.
    pub vary: bool,
    /// Bytes of filler in each session's first message: a longer conversation from the first step.
    pub pad_bytes: usize,
}

impl Shape {
    /// The steps of the `i`th session: with `vary`, a multiplicative hash of `i` spread over
    /// `1..=2·steps−1` (the reference's own spread, so both runs see the same mix).
    pub fn steps_of(&self, i: u64) -> u32 {
        if !self.vary || self.steps <= 1 {
            return self.steps.max(1);
        }
        let spread = 2 * u64::from(self.steps) - 1;
        1 + (i.wrapping_mul(2_654_435_761) % spread) as u32
    }

    /// The longest session.
    pub fn max_steps(&self) -> u32 {
        if self.vary { 2 * self.steps.max(1) - 1 } else { self.steps.max(1) }
    }

    /// The mean steps per session.
    pub fn mean_steps(&self) -> f64 {
        f64::from(self.steps.max(1))
    }

    /// The `POST /v1/sessions` body of the `i`th session: the scripted model's `[steps=N]` directive
    /// and the filler.
    pub fn body(&self, i: u64) -> Value {
        let mut input = format!("[steps={}] Customer jane@example.com cannot reset her password.", self.steps_of(i));
        if self.pad_bytes > 0 {
            input.push(' ');
            input.extend(std::iter::repeat_n('x', self.pad_bytes));
        }
        json!({ "agent": "support", "input": input })
    }
}

/// Submits sessions of one shape and keeps their ids.
#[derive(Clone)]
pub struct Load {
    http: reqwest::Client,
    sessions_url: String,
    shape: Shape,
    next: Arc<AtomicU64>,
    ids: Arc<std::sync::Mutex<Vec<SessionId>>>,
    live: LiveCount,
}

impl Load {
    /// Sessions of `shape` for `fleet`.
    pub async fn new(fleet: &TestFleet, shape: Shape) -> anyhow::Result<Self> {
        Ok(Self {
            http: fleet.http.clone(),
            sessions_url: format!("{}/v1/sessions", fleet.api),
            shape,
            next: Arc::default(),
            ids: Arc::default(),
            live: LiveCount::new(fleet).await?,
        })
    }

    /// The live-session counter (its `ZCARD`s are the bench's own Redis calls).
    pub fn live(&self) -> &LiveCount {
        &self.live
    }

    /// Creates the next session.
    async fn submit(&self) -> anyhow::Result<()> {
        let body = self.shape.body(self.next.fetch_add(1, Ordering::Relaxed));
        let r = self.http.post(&self.sessions_url).json(&body).send().await?;
        let status = r.status();
        let v: Value = r.json().await?;
        if status != reqwest::StatusCode::ACCEPTED {
            bail!("POST /v1/sessions answered {status}: {v}");
        }
        let id = SessionId::parse(v["id"].as_str().context("no id")?)?;
        self.ids.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(id);
        Ok(())
    }

    /// Submits `n` sessions, `parallel` at a time.
    pub async fn all_at_once(&self, n: u64, parallel: usize) -> anyhow::Result<()> {
        use futures::StreamExt as _;
        let results: Vec<anyhow::Result<()>> =
            futures::stream::iter(0..n).map(|_| self.submit()).buffer_unordered(parallel.max(1)).collect().await;
        results.into_iter().collect()
    }

    /// Keeps `target` sessions live until `stop`: counts them every [`POLL_EVERY`] and submits
    /// what is missing, at most `parallel` submissions at a time.
    pub async fn closed_loop(&self, target: u64, parallel: usize, stop: CancellationToken) -> anyhow::Result<()> {
        let mut pending = JoinSet::new();
        while !stop.is_cancelled() {
            reap(&mut pending)?;
            let live = self.live.count().await?;
            let missing = target.saturating_sub(live + pending.len() as u64);
            let room = parallel.saturating_sub(pending.len()) as u64;
            for _ in 0..missing.min(room) {
                let load = self.clone();
                pending.spawn(async move { load.submit().await });
            }
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(POLL_EVERY) => {}
            }
        }
        finish(pending).await
    }

    /// Submits `per_s` sessions a second on a fixed schedule, whatever the fleet does (open
    /// loop), until `stop`.
    pub async fn paced(&self, per_s: f64, stop: CancellationToken) -> anyhow::Result<()> {
        anyhow::ensure!(per_s > 0.0, "a paced load needs a positive rate, got {per_s}");
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_s));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut pending = JoinSet::new();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {
                    reap(&mut pending)?;
                    let load = self.clone();
                    pending.spawn(async move { load.submit().await });
                }
            }
        }
        finish(pending).await
    }

    /// Waits until no session is live, up to `timeout`.
    pub async fn drain(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let live = self.live.count().await?;
            if live == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{live} sessions still live after {timeout:?}");
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Checks that every session submitted so far `completed`, and counts them and their steps;
    /// forgets them, so that the next check covers only the sessions submitted after this one.
    pub async fn check_completed(&self, fleet: &TestFleet) -> anyhow::Result<Completed> {
        let ids = std::mem::take(&mut *self.ids.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        let mut redis = fleet.redis().await?;
        let mut steps = 0;
        for id in &ids {
            let (status, step): (Option<String>, Option<u64>) = redis::cmd("HMGET")
                .arg(format!("{}:{{{id}}}:meta", fleet.config.redis.key_prefix))
                .arg("status")
                .arg("step")
                .query_async(&mut redis)
                .await?;
            if status.as_deref() != Some("completed") {
                bail!("session {id} ended {status:?}, not completed; logs in {}", fleet.log_dir().display());
            }
            steps += step.unwrap_or(0);
        }
        Ok(Completed { sessions: ids.len() as u64, steps })
    }
}

/// Sessions that completed, and their steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completed {
    /// Sessions.
    pub sessions: u64,
    /// Their steps, all told.
    pub steps: u64,
}

/// Collects the finished submissions; the first error ends the load.
fn reap(pending: &mut JoinSet<anyhow::Result<()>>) -> anyhow::Result<()> {
    while let Some(done) = pending.try_join_next() {
        done.context("a submission panicked")??;
    }
    Ok(())
}

/// Waits for the submissions still under way.
async fn finish(mut pending: JoinSet<anyhow::Result<()>>) -> anyhow::Result<()> {
    while let Some(done) = pending.join_next().await {
        done.context("a submission panicked")??;
    }
    Ok(())
}

/// Counts a fleet's live sessions (`ZCARD <prefix>:active`), and its own calls.
#[derive(Clone)]
pub struct LiveCount {
    redis: agentfleet::redis_conn::RedisConn,
    key: String,
    calls: Arc<AtomicU64>,
}

impl LiveCount {
    async fn new(fleet: &TestFleet) -> anyhow::Result<Self> {
        let key = format!("{}:active", fleet.config.redis.key_prefix);
        Ok(Self { redis: fleet.redis().await?, key, calls: Arc::default() })
    }

    /// The live sessions now.
    pub async fn count(&self) -> anyhow::Result<u64> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut redis = self.redis.clone();
        Ok(redis::cmd("ZCARD").arg(&self.key).query_async(&mut redis).await?)
    }

    /// How many `ZCARD`s it sent: Redis calls of the bench, not of the fleet.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varied_sessions_spread_over_twice_the_mean() {
        let shape = Shape { steps: 5, vary: true, pad_bytes: 0 };
        let lengths: Vec<u32> = (0..9_000).map(|i| shape.steps_of(i)).collect();
        assert!(lengths.iter().all(|k| (1..=9).contains(k)));
        assert!((1..=9).all(|k| lengths.contains(&k)));
        let mean = f64::from(lengths.iter().sum::<u32>()) / lengths.len() as f64;
        assert!((mean - 5.0).abs() < 0.1, "{mean}");
        assert_eq!(shape.max_steps(), 9);
    }

    #[test]
    fn fixed_sessions_and_filler() {
        let shape = Shape { steps: 3, vary: false, pad_bytes: 100 };
        assert_eq!(shape.steps_of(7), 3);
        let input = shape.body(0)["input"].as_str().unwrap_or_default().to_owned();
        assert!(input.starts_with("[steps=3] ") && input.ends_with(&"x".repeat(100)), "{input}");
    }
}
