//! Admission to a dependency: its fleet-wide circuit breaker and rate limit, as one guard.
//!
//! A step asks the guard before it calls the model or a tool ([`Guard::admit`]) and tells it how
//! the call went ([`Guard::report`]): whether it is evidence for the breaker (`healthy`), and, for
//! a model provider, whether it was an overload that shrinks the fleet's request rate (AIMD on the
//! provider's token bucket) instead. The fleet's guard ([`FleetGuard`]) keeps both in Redis so every
//! worker sees the same breaker and the same budget of requests; each breaker transition is one typed
//! [`BreakerEvent`], logged and counted in one place. [`OpenGuard`] admits everything: a single
//! process with nothing to protect, as in the engine's unit tests.
//!
//! Only changes go to Redis at once. A healthy dependency costs no round trip per call: a breaker
//! seen closed is believed closed for [`FleetGuard::with_cache_ms`] (25 ms by default), and so is an
//! unlimited provider seen without an adaptive rate; the successes of such calls are counted
//! in-process and written together at most every [`SUCCESS_FLUSH_MS`], or with the next failure
//! (which goes to Redis at once, and can open the breaker). A breaker another worker opened is
//! noticed within the cache time; one this worker opened, at once.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::breaker::{BreakerConfig, Breakers, Permit, Transition};
use crate::ratelimit::{Acquire, AdaptiveRate, RateHeaders, RateLimit, RateLimiter, Signal, Tokens};
use crate::telemetry::metric;

/// What a call must pass: a breaker, and for model calls a rate limit.
#[derive(Debug, Clone)]
pub struct Gate<'a> {
    /// The breaker's name (`model:anthropic`, `tool:lookup_order`).
    pub breaker: String,
    /// Its settings.
    pub breaker_cfg: &'a BreakerConfig,
    /// The rate limit, when the dependency has one.
    pub rate: Option<RateGate<'a>>,
}

/// A rate limit on a gate, and what the call is expected to use of it.
#[derive(Debug, Clone)]
pub struct RateGate<'a> {
    /// The limiter's key (`anthropic:<model>`).
    pub key: String,
    /// The limit.
    pub limit: &'a RateLimit,
    /// The call's worst case.
    pub estimate: Tokens,
    /// How overloads shrink the rate (AIMD); `None`: they do not.
    pub adaptive: Option<&'a AdaptiveRate>,
}

/// Why a call must wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitFor {
    /// The breaker is open, or half-open and this call is outside the share it lets through.
    Breaker,
    /// The rate limit has no room now.
    RateLimit,
}

/// The guard's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Make the call, then report it with this pass.
    Pass(Pass),
    /// Do not call now; ask again after `after`.
    Wait {
        /// How long to wait.
        after: Duration,
        /// What is in the way.
        why: WaitFor,
    },
}

/// An admitted call; hand it back to [`Guard::report`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pass {
    /// The call is a trial of the half-open breaker: the generation its permit named.
    pub trial: Option<u64>,
}

/// How an admitted call went.
#[derive(Debug, Clone, Default)]
pub struct Outcome<'a> {
    /// For the breaker: `Some(true)` healthy, `Some(false)` evidence of a failing dependency, `None`
    /// says nothing (not recorded).
    pub healthy: Option<bool>,
    /// The provider answered 529 (overloaded) or 429 (rate limited): shrink the fleet's rate.
    pub overloaded: bool,
    /// What the call used of the rate limit.
    pub actual: Tokens,
    /// The provider's rate-limit headers, if it sent any.
    pub headers: Option<&'a RateHeaders>,
}

/// Admission to dependencies shared by the fleet.
#[async_trait]
pub trait Guard: Send + Sync {
    /// May a call through `gate` be made now?
    async fn admit(&self, gate: &Gate<'_>, now_ms: u64) -> Admission;
    /// Feeds an admitted call's outcome back (best effort: failures are logged).
    async fn report(&self, gate: &Gate<'_>, pass: Pass, outcome: &Outcome<'_>, now_ms: u64);
}

/// A breaker changed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerEvent<'a> {
    /// The breaker.
    pub breaker: &'a str,
    /// What happened.
    pub transition: Transition,
}

impl BreakerEvent<'_> {
    /// Logs and counts it.
    pub fn emit(&self) {
        let (name, t) = (self.breaker, self.transition);
        tracing::warn!(breaker = name, transition = t.as_str(), "circuit breaker changed state");
        metric::breaker_transition(name, t.as_str());
        metric::breaker_state(name, t.status().gauge());
    }
}

/// How long a worker may hold the successes of calls through a closed breaker before writing them.
pub const SUCCESS_FLUSH_MS: u64 = 1_000;

/// The default time a healthy breaker or an unslowed provider is believed so without asking Redis.
const DEFAULT_CACHE_MS: u64 = 25;

/// A belief about a shared state, held for a few milliseconds after Redis said so.
#[derive(Debug, Clone, Copy)]
struct Belief {
    /// Believed without asking until then (Unix ms).
    until: u64,
    /// Since when one call has been asking Redis again: the others keep the belief meanwhile (for
    /// at most [`RENEWAL_MS`], in case that call was dropped), so that a slow answer under load
    /// does not send every call to Redis at once.
    renewing: Option<u64>,
}

/// The longest a belief is kept for a renewal that has not answered.
const RENEWAL_MS: u64 = 1_000;

impl Belief {
    /// Whether a call may go on the belief now; if not, the caller is the one that asks again.
    fn holds(&mut self, now_ms: u64) -> bool {
        if now_ms < self.until || self.renewing.is_some_and(|since| now_ms < since.saturating_add(RENEWAL_MS)) {
            return true;
        }
        self.renewing = Some(now_ms);
        false
    }
}

/// What this process believes about the fleet's shared state, for a few milliseconds.
#[derive(Debug, Default)]
struct Local {
    /// Breakers seen closed.
    closed: HashMap<String, Belief>,
    /// Successes through closed breakers not written yet: how many, and when the first was.
    successes: HashMap<String, (u64, u64)>,
    /// Unlimited rate keys last seen without an adaptive bucket, and the grants made here since
    /// (counted with the next acquire, so an adaptive rate starts from the true rate).
    unslowed: HashMap<String, (Belief, u32)>,
    /// Overloads seen, by rate key: an answer asked for before the latest one is not believed.
    overloads: HashMap<String, u64>,
}

/// The fleet's guard: breakers and rate limits in Redis.
pub struct FleetGuard {
    breakers: Breakers,
    limiter: RateLimiter,
    cache_ms: u64,
    local: Mutex<Local>,
}

impl FleetGuard {
    /// A guard over these breakers and limits.
    pub fn new(breakers: Breakers, limiter: RateLimiter) -> Self {
        Self { breakers, limiter, cache_ms: DEFAULT_CACHE_MS, local: Mutex::default() }
    }

    /// Believes a breaker seen closed (and a provider seen unslowed) for `ms` without asking again;
    /// 0 asks Redis on every call.
    pub fn with_cache_ms(self, ms: u64) -> Self {
        Self { cache_ms: ms, ..self }
    }

    fn local(&self) -> std::sync::MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn permit(&self, gate: &Gate<'_>, now_ms: u64) -> Permit {
        if self.local().closed.get_mut(&gate.breaker).is_some_and(|b| b.holds(now_ms)) {
            return Permit::Allow;
        }
        let asked = Instant::now();
        let permit = self.breakers.check(&gate.breaker, gate.breaker_cfg, now_ms).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, breaker = gate.breaker, "breaker check failed; letting the call through");
            Permit::Allow
        });
        let mut local = self.local();
        if permit == Permit::Allow && self.cache_ms > 0 {
            local.closed.insert(gate.breaker.clone(), self.belief(now_ms, asked));
        } else {
            local.closed.remove(&gate.breaker);
        }
        permit
    }

    /// A belief from an answer asked for at `asked` (`now_ms` then): it holds for the cache time
    /// after the answer came.
    fn belief(&self, now_ms: u64, asked: Instant) -> Belief {
        let waited = u64::try_from(asked.elapsed().as_millis()).unwrap_or(u64::MAX);
        Belief { until: now_ms.saturating_add(waited).saturating_add(self.cache_ms), renewing: None }
    }

    /// Asks the rate limit; an unlimited key seen unslowed is granted here, counted for later.
    async fn acquire(&self, rate: &RateGate<'_>, now_ms: u64) -> Option<Admission> {
        let adaptive = rate.adaptive.is_some();
        let cacheable = adaptive && rate.limit.is_unlimited() && self.cache_ms > 0;
        let mut granted_here = 0;
        let overloads = {
            let mut local = self.local();
            if cacheable && let Some((belief, grants)) = local.unslowed.get_mut(&rate.key) {
                if belief.holds(now_ms) {
                    *grants += 1;
                    return None;
                }
                granted_here = std::mem::take(grants);
            }
            local.overloads.get(&rate.key).copied().unwrap_or(0)
        };
        let asked = Instant::now();
        let limiter = &self.limiter;
        match limiter.acquire_counting(&rate.key, rate.limit, adaptive, granted_here, rate.estimate, now_ms).await {
            Ok((Acquire::Wait { retry_after }, _)) => {
                self.local().unslowed.remove(&rate.key);
                metric::retry("rate_limit");
                Some(Admission::Wait { after: retry_after, why: WaitFor::RateLimit })
            }
            Ok((Acquire::Granted, slowed)) => {
                let belief = self.belief(now_ms, asked);
                let mut local = self.local();
                let fresh = local.overloads.get(&rate.key).copied().unwrap_or(0) == overloads;
                if cacheable && !slowed && fresh {
                    let grants = local.unslowed.get(&rate.key).map_or(0, |(_, g)| *g);
                    local.unslowed.insert(rate.key.clone(), (belief, grants));
                } else {
                    local.unslowed.remove(&rate.key);
                }
                None
            }
            Err(e) => {
                // The next call asks again.
                if let Some((belief, _)) = self.local().unslowed.get_mut(&rate.key) {
                    belief.renewing = None;
                }
                tracing::warn!(error = %e, "rate limiter unavailable; letting the call through");
                None
            }
        }
    }

    /// Records a breaker outcome: a success through a closed breaker is counted here and written
    /// with others; anything else goes to Redis now, with the successes held so far.
    async fn record(&self, gate: &Gate<'_>, pass: Pass, healthy: bool, now_ms: u64) {
        let batched = {
            let mut local = self.local();
            // A plain call was let through a closed breaker: its success changes nothing now (and
            // if the breaker opened since, an open breaker ignores it anyway).
            if healthy && pass.trial.is_none() {
                let (count, first) = local.successes.entry(gate.breaker.clone()).or_insert((0, now_ms));
                *count += 1;
                if now_ms.saturating_sub(*first) < SUCCESS_FLUSH_MS {
                    return;
                }
            }
            local.successes.remove(&gate.breaker).map_or(0, |(count, _)| count)
        };
        // A success that flushes the batch is one of its calls.
        let (success, batched) = if healthy && batched > 0 { (true, batched - 1) } else { (healthy, batched) };
        let cfg = gate.breaker_cfg;
        match self.breakers.record_with(&gate.breaker, cfg, pass.trial, success, batched, now_ms).await {
            Ok(Some(transition)) => {
                if transition.status() != crate::breaker::BreakerStatus::Closed {
                    self.local().closed.remove(&gate.breaker);
                }
                BreakerEvent { breaker: &gate.breaker, transition }.emit();
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, breaker = gate.breaker, "recording a breaker outcome failed"),
        }
    }

    async fn settle_rate(&self, rate: &RateGate<'_>, outcome: &Outcome<'_>, now_ms: u64) {
        let limiter = &self.limiter;
        if let Err(e) = limiter.settle(&rate.key, rate.limit, rate.estimate, outcome.actual, now_ms).await {
            tracing::warn!(error = %e, "settling the rate limit failed");
        }
        if let Some(adaptive) = rate.adaptive {
            self.adapt(rate, adaptive, outcome, now_ms).await;
        }
        if let Some(headers) = outcome.headers
            && let Err(e) = limiter.observe_headers(&rate.key, rate.limit, headers, now_ms).await
        {
            tracing::warn!(error = %e, "applying the rate-limit headers failed");
        }
    }
}

impl FleetGuard {
    /// AIMD: an overload shrinks the provider's rate, a healthy answer grows it back.
    async fn adapt(&self, rate: &RateGate<'_>, adaptive: &AdaptiveRate, outcome: &Outcome<'_>, now_ms: u64) {
        let signal = match (outcome.overloaded, outcome.healthy) {
            (true, _) => Signal::Overload,
            (false, Some(true)) => Signal::Success,
            _ => return,
        };
        let uncounted = {
            // A success while no adaptive rate exists changes nothing; an overload ends the belief,
            // and the grants made here under it are counted with it.
            let mut local = self.local();
            let unslowed = local.unslowed.contains_key(&rate.key);
            match signal {
                Signal::Success if unslowed => return,
                Signal::Overload => {
                    *local.overloads.entry(rate.key.clone()).or_default() += 1;
                    local.unslowed.remove(&rate.key).map_or(0, |(_, grants)| grants)
                }
                Signal::Success => 0,
            }
        };
        match self.limiter.adapt_counting(&rate.key, rate.limit, adaptive, signal, uncounted, now_ms).await {
            Ok(rpm) => {
                if signal == Signal::Overload {
                    tracing::debug!(
                        limiter = rate.key,
                        rpm = rpm.unwrap_or(0.0),
                        "the provider is overloaded; the fleet's rate shrinks"
                    );
                }
                metric::adaptive_rate(&rate.key, rpm.unwrap_or(0.0));
            }
            Err(e) => tracing::warn!(error = %e, "adapting the provider's rate failed"),
        }
    }
}

#[async_trait]
impl Guard for FleetGuard {
    async fn admit(&self, gate: &Gate<'_>, now_ms: u64) -> Admission {
        let permit = self.permit(gate, now_ms).await;
        if let Permit::Deny { retry_after } = permit {
            metric::breaker_rejected(&gate.breaker);
            return Admission::Wait { after: retry_after, why: WaitFor::Breaker };
        }
        if let Some(rate) = &gate.rate
            && let Some(wait) = self.acquire(rate, now_ms).await
        {
            return wait;
        }
        Admission::Pass(Pass { trial: permit.trial() })
    }

    async fn report(&self, gate: &Gate<'_>, pass: Pass, outcome: &Outcome<'_>, now_ms: u64) {
        if let Some(healthy) = outcome.healthy {
            self.record(gate, pass, healthy, now_ms).await;
        }
        if let Some(rate) = &gate.rate {
            self.settle_rate(rate, outcome, now_ms).await;
        }
    }
}

/// Admits every call and learns nothing: for one process with nothing shared to protect.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenGuard;

#[async_trait]
impl Guard for OpenGuard {
    async fn admit(&self, _: &Gate<'_>, _: u64) -> Admission {
        Admission::Pass(Pass::default())
    }

    async fn report(&self, _: &Gate<'_>, _: Pass, _: &Outcome<'_>, _: u64) {}
}
