//! Admission to a dependency: its fleet-wide circuit breaker and rate limit, as one guard.
//!
//! A step asks the guard before it calls the model or a tool ([`Guard::admit`]) and tells it how
//! the call went ([`Guard::report`]): whether it is evidence for the breaker (`healthy`), and, for
//! a model provider, whether it was an overload that shrinks the fleet's request rate (AIMD on the
//! provider's token bucket) instead. The fleet's guard ([`FleetGuard`]) keeps both in Redis so every
//! worker sees the same breaker and the same budget of requests; each breaker transition is one typed
//! [`BreakerEvent`], logged and counted in one place. [`OpenGuard`] admits everything: a single
//! process with nothing to protect, as in the engine's unit tests.

use std::time::Duration;

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

/// The fleet's guard: breakers and rate limits in Redis.
pub struct FleetGuard {
    breakers: Breakers,
    limiter: RateLimiter,
}

impl FleetGuard {
    /// A guard over these breakers and limits.
    pub fn new(breakers: Breakers, limiter: RateLimiter) -> Self {
        Self { breakers, limiter }
    }

    async fn permit(&self, gate: &Gate<'_>, now_ms: u64) -> Permit {
        self.breakers.check(&gate.breaker, gate.breaker_cfg, now_ms).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, breaker = gate.breaker, "breaker check failed; letting the call through");
            Permit::Allow
        })
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
        match self.limiter.adapt(&rate.key, rate.limit, adaptive, signal, now_ms).await {
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
        if let Some(rate) = &gate.rate {
            let adaptive = rate.adaptive.is_some();
            match self.limiter.acquire(&rate.key, rate.limit, adaptive, 1, rate.estimate, now_ms).await {
                Ok(Acquire::Wait { retry_after }) => {
                    metric::retry("rate_limit");
                    return Admission::Wait { after: retry_after, why: WaitFor::RateLimit };
                }
                Ok(Acquire::Granted) => {}
                Err(e) => tracing::warn!(error = %e, "rate limiter unavailable; letting the call through"),
            }
        }
        Admission::Pass(Pass { trial: permit.trial() })
    }

    async fn report(&self, gate: &Gate<'_>, pass: Pass, outcome: &Outcome<'_>, now_ms: u64) {
        if let Some(healthy) = outcome.healthy {
            match self.breakers.record(&gate.breaker, gate.breaker_cfg, pass.trial, healthy, now_ms).await {
                Ok(Some(transition)) => BreakerEvent { breaker: &gate.breaker, transition }.emit(),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, breaker = gate.breaker, "recording a breaker outcome failed"),
            }
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
