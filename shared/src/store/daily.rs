//! The fleet-wide daily spend counters (DESIGN §5), with a worker's share held in-process.
//!
//! Every model call of the fleet reserves its worst case against its agent's counter and its
//! tenant's, and corrects it once the call's usage is known. A round trip for each would make
//! these counters the fleet's hottest keys and cost every step two more calls. So a worker takes
//! more than a call needs while the counter is far from its cap: the surplus is its **allowance**,
//! counted in Redis as reserved, from which its next calls reserve without a round trip. What a
//! call did not use (its worst case minus its cost) goes back into the allowance, not to Redis.
//!
//! - The cap is never crossed: every micro-dollar of an allowance was reserved against the counter
//!   by `daily_batch.lua`, which refuses what would cross the cap.
//! - An allowance is only granted below 7/8 of the cap, at most half the room left there; above,
//!   each call reserves exactly what it needs, and what it did not use goes straight back, so the
//!   last eighth is shared call by call and one worker's allowance cannot starve another near the
//!   cap.
//! - A counter reads as spent plus held: in-flight worst cases and unspent allowances. An
//!   allowance is bounded (`MAX_ALLOWANCE_CALLS` worst cases) and given back after `IDLE` without
//!   use, and all of it at shutdown ([`DailyCounters::flush`]). A worker that dies keeps its
//!   allowance counted until the day ends: the cap is only ever stricter.
//! - The held part is counted apart too, so a refusal says whether the cap is spent
//!   ([`Taken::Spent`]) or only held by calls in flight ([`Taken::Held`]), which give it back
//!   within seconds: near the cap, a step of the second kind waits for room instead of ending.
//! - What goes to Redis is batched: the requests for one counter that arrive while its last call
//!   is in flight go out together in the next.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use redis::Script;
use tokio::sync::oneshot;

use super::StoreError;
use crate::redis_conn::RedisConn;

/// An allowance is asked for as this many worst cases of the call that asks.
const CHUNK_CALLS: u64 = 16;
/// An allowance above this many worst cases (of the last call) goes back to Redis.
const MAX_ALLOWANCE_CALLS: u64 = 32;
/// An allowance unused this long goes back to Redis.
const IDLE: Duration = Duration::from_secs(1);
/// How often idle allowances and pending corrections are written.
const TICK: Duration = Duration::from_millis(250);
/// How long [`DailyCounters::flush`] waits for batches other tasks have in flight.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// What a reservation got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Taken {
    /// Reserved.
    Yes,
    /// Refused: what is spent leaves no room for it.
    Spent,
    /// Refused, but only because of what is held (calls in flight, allowances): the room may come
    /// back within seconds.
    Held,
}

/// What one waiting caller is told, or why the batch failed (its outcome is unknown, like any
/// failed write).
type Verdict = Result<Taken, String>;

/// One reservation waiting for Redis.
struct Take {
    amount: u64,
    /// Below 0: no cap.
    cap: i64,
    /// The allowance asked for with it.
    chunk: u64,
    tx: oneshot::Sender<Verdict>,
}

/// One counter's state in this process.
#[derive(Default)]
struct Counter {
    /// Reserved in Redis and not yet given to any call.
    allowance: u64,
    /// The correction to write next (negative: given back).
    pending: i64,
    /// What calls spent since the last write: it moves from the held part to the spent part.
    spent: u64,
    /// Reservations waiting for Redis, in order.
    takes: Vec<Take>,
    /// The counter's expiry, Unix s.
    expiry_s: u64,
    /// A flush task is running for this counter.
    flushing: bool,
    /// Batches sent and not yet answered.
    sending: u32,
    /// The largest allowance to keep.
    max_allowance: u64,
    /// The last time a call reserved from the allowance.
    used: Option<Instant>,
    /// Redis granted an allowance with the last reservation: the counter is far from its cap.
    roomy: bool,
}

type Counters = Mutex<HashMap<String, Counter>>;

/// The daily counters of one process.
#[derive(Clone)]
pub(super) struct DailyCounters {
    conn: RedisConn,
    script: Script,
    counters: Arc<Counters>,
    ticking: Arc<std::sync::atomic::AtomicBool>,
}

fn lock(counters: &Counters) -> std::sync::MutexGuard<'_, HashMap<String, Counter>> {
    counters.lock().unwrap_or_else(PoisonError::into_inner)
}

impl DailyCounters {
    pub(super) fn new(conn: RedisConn) -> Self {
        Self {
            conn,
            script: Script::new(include_str!("lua/daily_batch.lua")),
            counters: Arc::default(),
            ticking: Arc::default(),
        }
    }

    /// Reserves `amount` on the counter `key` unless that crosses `cap`.
    pub(super) async fn take(
        &self,
        key: &str,
        amount: u64,
        cap: Option<u64>,
        expiry_s: u64,
    ) -> Result<Taken, StoreError> {
        let cap = cap.map_or(-1, |c| i64::try_from(c).unwrap_or(i64::MAX));
        let rx = {
            let mut counters = lock(&self.counters);
            let c = counters.entry(key.to_owned()).or_default();
            c.expiry_s = c.expiry_s.max(expiry_s);
            c.max_allowance = amount.saturating_mul(MAX_ALLOWANCE_CALLS);
            if c.allowance >= amount {
                c.allowance -= amount;
                c.used = Some(Instant::now());
                return Ok(Taken::Yes);
            }
            // Too little left: give it back with this reservation, which asks for a new one.
            let rest = std::mem::take(&mut c.allowance);
            c.pending = c.pending.saturating_sub(i64::try_from(rest).unwrap_or(i64::MAX));
            let (tx, rx) = oneshot::channel();
            c.takes.push(Take { amount, cap, chunk: amount.saturating_mul(CHUNK_CALLS), tx });
            self.start_flush(key, c);
            rx
        };
        self.start_ticking();
        match rx.await {
            Ok(verdict) => verdict.map_err(StoreError::Unavailable),
            Err(_) => Err(StoreError::Unavailable("the daily counter's batch was dropped".into())),
        }
    }

    /// Settles a reservation of `reserved` on the counter `key` by what was `spent`: what a call
    /// did not use joins the allowance while the counter is far from its cap, and is written back
    /// at once near it; the rest is written with the next batch (a correction of a counter that is
    /// gone is dropped).
    pub(super) fn correct(&self, key: &str, reserved: u64, spent: u64, expiry_s: u64) {
        let delta =
            i64::try_from(spent).unwrap_or(i64::MAX).saturating_sub(i64::try_from(reserved).unwrap_or(i64::MAX));
        if delta == 0 && spent == 0 {
            return;
        }
        {
            let mut counters = lock(&self.counters);
            let c = counters.entry(key.to_owned()).or_default();
            c.expiry_s = c.expiry_s.max(expiry_s);
            c.spent = c.spent.saturating_add(spent);
            match delta.cmp(&0) {
                std::cmp::Ordering::Less if !c.roomy => {
                    c.pending = c.pending.saturating_add(delta);
                    self.start_flush(key, c);
                }
                std::cmp::Ordering::Less => {
                    c.allowance = c.allowance.saturating_add(delta.unsigned_abs());
                    let surplus = c.allowance.saturating_sub(c.max_allowance);
                    c.allowance -= surplus;
                    c.pending = c.pending.saturating_sub(i64::try_from(surplus).unwrap_or(i64::MAX));
                }
                std::cmp::Ordering::Greater => {
                    let from_allowance = c.allowance.min(delta.unsigned_abs());
                    c.allowance -= from_allowance;
                    c.pending = c.pending.saturating_add(delta - i64::try_from(from_allowance).unwrap_or(0));
                }
                std::cmp::Ordering::Equal => {}
            }
        }
        self.start_ticking();
    }

    /// Gives every allowance back and writes every pending correction, now, and waits (a while)
    /// for the batches other tasks have in flight to be answered.
    pub(super) async fn flush(&self) -> Result<(), StoreError> {
        let keys: Vec<String> = {
            let mut counters = lock(&self.counters);
            for c in counters.values_mut() {
                c.pending = c.pending.saturating_sub(i64::try_from(std::mem::take(&mut c.allowance)).unwrap_or(0));
            }
            counters.keys().cloned().collect()
        };
        for key in keys {
            self.send(&key).await?;
        }
        let deadline = Instant::now() + FLUSH_WAIT;
        while lock(&self.counters).values().any(|c| c.sending > 0) {
            if Instant::now() >= deadline {
                return Err(StoreError::Unavailable("a daily counter's batch is still unanswered".into()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    fn start_flush(&self, key: &str, c: &mut Counter) {
        if !c.flushing {
            c.flushing = true;
            tokio::spawn(self.clone().flush_key(key.to_owned()));
        }
    }

    /// Sends the counter's requests in batches until none is left.
    async fn flush_key(self, key: String) {
        loop {
            match self.send(&key).await {
                Ok(true) => {}
                Ok(false) | Err(_) => {
                    if let Some(c) = lock(&self.counters).get_mut(&key) {
                        c.flushing = false;
                    }
                    return;
                }
            }
        }
    }

    /// One batch of `key`: its pending correction and its waiting reservations. False when there
    /// was nothing to send.
    async fn send(&self, key: &str) -> Result<bool, StoreError> {
        let (delta, spent, takes, expiry_s) = {
            let mut counters = lock(&self.counters);
            let Some(c) = counters.get_mut(key) else { return Ok(false) };
            if c.pending == 0 && c.spent == 0 && c.takes.is_empty() {
                return Ok(false);
            }
            c.sending += 1;
            (std::mem::take(&mut c.pending), std::mem::take(&mut c.spent), std::mem::take(&mut c.takes), c.expiry_s)
        };
        let mut inv = self.script.key(key);
        inv.key(held_key(key)).arg(expiry_s).arg(delta).arg(spent);
        for t in &takes {
            inv.arg(t.amount).arg(t.cap).arg(t.chunk);
        }
        let reply: Result<Vec<i64>, redis::RedisError> = inv.invoke_async(&mut self.conn.clone()).await;
        if let Some(c) = lock(&self.counters).get_mut(key) {
            c.sending = c.sending.saturating_sub(1);
        }
        let verdicts = match reply {
            Ok(v) => v,
            Err(e) => {
                // The correction is tried again with the next batch (a counter only ever reads
                // high meanwhile); the reservations' outcome is unknown.
                if let Some(c) = lock(&self.counters).get_mut(key) {
                    c.pending = c.pending.saturating_add(delta);
                    c.spent = c.spent.saturating_add(spent);
                }
                let why = format!("redis: {e}");
                for t in takes {
                    let _ = t.tx.send(Err(why.clone()));
                }
                return Err(StoreError::Unavailable(why));
            }
        };
        let (mut granted, mut last) = (0_u64, None);
        for (t, verdict) in takes.into_iter().zip(verdicts.into_iter().chain(std::iter::repeat(-1))) {
            granted = granted.saturating_add(u64::try_from(verdict).unwrap_or(0));
            last = Some(verdict);
            let _ = t.tx.send(Ok(match verdict {
                0.. => Taken::Yes,
                -2 => Taken::Held,
                _ => Taken::Spent,
            }));
        }
        if let Some(last) = last {
            let mut counters = lock(&self.counters);
            let c = counters.entry(key.to_owned()).or_default();
            c.allowance = c.allowance.saturating_add(granted);
            c.used = Some(Instant::now());
            c.roomy = last > 0;
            if !c.roomy {
                // Near the cap: what is held goes back now.
                c.pending = c.pending.saturating_sub(i64::try_from(std::mem::take(&mut c.allowance)).unwrap_or(0));
            }
        }
        Ok(true)
    }

    /// Starts the task that gives idle allowances back and writes corrections, once.
    fn start_ticking(&self) {
        if self.ticking.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(&self.counters);
        let (conn, script, ticking) = (self.conn.clone(), self.script.clone(), self.ticking.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(TICK).await;
                let Some(counters) = Weak::upgrade(&weak) else { return };
                let me = Self { conn: conn.clone(), script: script.clone(), counters, ticking: ticking.clone() };
                for key in me.due() {
                    let _ = me.send(&key).await;
                }
            }
        });
    }

    /// Counters with something to write: a correction, or an allowance idle for `IDLE` (given
    /// back now); counters with nothing left are forgotten.
    fn due(&self) -> Vec<String> {
        let mut counters = lock(&self.counters);
        counters.retain(|_, c| {
            c.allowance > 0 || c.pending != 0 || c.spent != 0 || !c.takes.is_empty() || c.flushing || c.sending > 0
        });
        let mut due = Vec::new();
        for (key, c) in counters.iter_mut() {
            if c.allowance > 0 && c.used.is_none_or(|t| t.elapsed() >= IDLE) {
                c.pending = c.pending.saturating_sub(i64::try_from(std::mem::take(&mut c.allowance)).unwrap_or(0));
            }
            if (c.pending != 0 || c.spent != 0) && !c.flushing {
                due.push(key.clone());
            }
        }
        due
    }
}

/// The key of the held part of the counter `key` (in the counter's hash slot: the tag is kept).
fn held_key(key: &str) -> String {
    format!("{key}:held")
}
