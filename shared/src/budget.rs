//! Budgets that cannot run away (DESIGN §5).
//!
//! Before each model call the worker estimates the input tokens, then plans the call against the
//! session's limits: it caps `max_tokens` so the call cannot cross `max_cost_per_step_usd`, and so
//! that after it the final summary call can still be afforded within `max_cost_usd` and
//! `max_tokens`. The worst case of the planned call is reserved (in the session, and in the
//! fleet-wide daily caps) before the call and reconciled with the actual usage after it. When no
//! useful call fits, the session gets one last tool-less, bounded summary call and ends
//! `budget_exhausted`.
//!
//! Money is integer micro-USD; a price in USD per million tokens is micro-USD per token.

use std::fmt;

use serde::Serialize;
use thiserror::Error;

use crate::config::{BudgetConfig, Price};
use crate::domain::MicroUsd;
use crate::llm::Usage;

/// The user message of the last, tool-less call.
pub const SUMMARY_PROMPT: &str = "Budget limit reached. Summarize what you have accomplished so far.";
/// Tokens the summary prompt adds to the input, counted generously.
const SUMMARY_PROMPT_TOKENS: u64 = 48;
/// A normal call with less output room than this is not worth making: the budget is spent.
const MIN_USEFUL_OUTPUT: u64 = 256;
/// A summary with less room than this is not worth making.
const MIN_SUMMARY_OUTPUT: u64 = 32;

/// A session's limits, after any lowering by the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// Agent steps (model calls, not counting the final summary).
    pub max_steps: u32,
    /// Total cost, micro-USD.
    pub max_cost: MicroUsd,
    /// Cost of one model call, micro-USD.
    pub max_cost_per_step: MicroUsd,
    /// Total tokens: input (with cache reads and writes) plus output.
    pub max_tokens: u64,
    /// The alert threshold, in thousandths of a limit.
    pub alert_permille: u32,
    /// `max_tokens` of the summary call.
    pub summary_max_tokens: u32,
}

/// Lower limits asked for by a request; each must not exceed the agent's.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// Lower `max_steps`.
    #[serde(default, deserialize_with = "whole")]
    pub max_steps: Option<u32>,
    /// Lower `max_cost_usd`.
    pub max_cost_usd: Option<f64>,
    /// Lower `max_cost_per_step_usd`.
    pub max_cost_per_step_usd: Option<f64>,
    /// Lower `max_tokens`.
    #[serde(default, deserialize_with = "whole")]
    pub max_tokens: Option<u64>,
    /// Lower `alert_threshold`.
    pub alert_threshold: Option<f64>,
}

/// A whole number, also when written with a fraction of zero (`25.0`): JSON Schema counts that an
/// integer, so a client that writes it so is not refused.
fn whole<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    use serde::de::{Deserialize as _, Error as _};
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else { return Ok(None) };
    let whole = n
        .as_u64()
        .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 2f64.powi(64)).map(|f| f as u64));
    let value = whole.ok_or_else(|| D::Error::custom(format!("invalid value: {n}, expected a whole number")))?;
    T::try_from(value).map(Some).map_err(|_| D::Error::custom(format!("invalid value: {n}, out of range")))
}

impl Limits {
    /// The agent's configured limits.
    pub fn of(b: &BudgetConfig) -> Self {
        Self {
            max_steps: b.max_steps,
            max_cost: usd(b.max_cost_usd),
            max_cost_per_step: usd(b.max_cost_per_step_usd),
            max_tokens: b.max_tokens,
            alert_permille: (b.alert_threshold * 1000.0).round() as u32,
            summary_max_tokens: b.summary_max_tokens,
        }
    }

    /// These limits lowered by `o`; raising any is an error naming the field.
    pub fn lowered(mut self, o: &Overrides) -> Result<Self, OverrideError> {
        if let Some(v) = o.max_steps {
            self.max_steps = lower("budget.max_steps", self.max_steps, v)?;
        }
        if let Some(v) = o.max_cost_usd {
            self.max_cost = MicroUsd::new(lower(
                "budget.max_cost_usd",
                self.max_cost.get(),
                checked_usd("budget.max_cost_usd", v)?,
            )?);
        }
        if let Some(v) = o.max_cost_per_step_usd {
            let v = checked_usd("budget.max_cost_per_step_usd", v)?;
            self.max_cost_per_step =
                MicroUsd::new(lower("budget.max_cost_per_step_usd", self.max_cost_per_step.get(), v)?);
        }
        if let Some(v) = o.max_tokens {
            self.max_tokens = lower("budget.max_tokens", self.max_tokens, v)?;
        }
        if let Some(v) = o.alert_threshold {
            if !(0.0..=1.0).contains(&v) {
                return Err(OverrideError::AlertThreshold);
            }
            self.alert_permille = lower("budget.alert_threshold", self.alert_permille, (v * 1000.0).round() as u32)?;
        }
        if self.max_steps == 0 {
            return Err(OverrideError::NoSteps);
        }
        Ok(self)
    }
}

fn usd(v: f64) -> MicroUsd {
    MicroUsd::from_usd(v).unwrap_or_default()
}

fn checked_usd(field: &'static str, v: f64) -> Result<u64, OverrideError> {
    MicroUsd::from_usd(v).map(MicroUsd::get).map_err(|_| OverrideError::NotUsd(field))
}

fn lower<T: PartialOrd + fmt::Display + Copy>(field: &'static str, limit: T, asked: T) -> Result<T, OverrideError> {
    if asked > limit { Err(OverrideError::Raises { field, limit: limit.to_string() }) } else { Ok(asked) }
}

/// A request's budget that the agent's limits do not allow; the text starts with the field.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OverrideError {
    /// The request asked for more than the agent allows.
    #[error("{field}: may lower the agent's limit ({limit}), not raise it")]
    Raises {
        /// The field, e.g. `budget.max_cost_usd`.
        field: &'static str,
        /// The agent's limit, as configured.
        limit: String,
    },
    /// An amount of money that is negative or not a number.
    #[error("{0}: must be a non-negative number of USD")]
    NotUsd(&'static str),
    /// An alert threshold outside 0..=1.
    #[error("budget.alert_threshold: must be between 0 and 1")]
    AlertThreshold,
    /// No steps at all.
    #[error("budget.max_steps: must be at least 1")]
    NoSteps,
}

impl From<OverrideError> for String {
    fn from(e: OverrideError) -> Self {
        e.to_string()
    }
}

/// What the session has used so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spent {
    /// Steps completed (model calls of agent steps).
    pub steps: u32,
    /// All tokens, input with cache reads and writes, plus output.
    pub tokens: u64,
    /// Cost, micro-USD (including open reservations of calls whose outcome is unknown).
    pub cost: MicroUsd,
}

/// Which limit stopped the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    /// `max_steps`.
    Steps(u32),
    /// `max_cost_usd`.
    Cost(MicroUsd),
    /// `max_cost_per_step_usd`: even the input of one call costs more.
    CostPerStep(MicroUsd),
    /// `max_tokens`.
    Tokens(u64),
}

impl fmt::Display for LimitHit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Steps(n) => write!(f, "max_steps ({n}) reached"),
            Self::Cost(c) => write!(f, "max_cost_usd ({}) reached", c.as_usd()),
            Self::CostPerStep(c) => write!(f, "max_cost_per_step_usd ({}) is too small for the next call", c.as_usd()),
            Self::Tokens(t) => write!(f, "max_tokens ({t}) reached"),
        }
    }
}

impl LimitHit {
    /// A short label for metrics and events.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Steps(_) => "max_steps",
            Self::Cost(_) => "max_cost_usd",
            Self::CostPerStep(_) => "max_cost_per_step_usd",
            Self::Tokens(_) => "max_tokens",
        }
    }
}

/// The worst case of one call, held until its actual usage is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Reservation {
    /// Worst-case cost, micro-USD.
    pub cost: u64,
    /// Estimated input tokens.
    pub input_tokens: u64,
    /// The output cap (`max_tokens` of the call).
    pub output_tokens: u64,
}

/// What the next model call may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// A normal step, with this output cap.
    Call {
        /// `max_tokens` of the call.
        max_tokens: u32,
        /// What to reserve.
        reserve: Reservation,
    },
    /// The last, tool-less summary call.
    Summarize {
        /// `max_tokens` of the call.
        max_tokens: u32,
        /// What to reserve.
        reserve: Reservation,
        /// The limit that was reached.
        hit: LimitHit,
    },
    /// Not even the summary fits: end now.
    Stop {
        /// The limit that was reached.
        hit: LimitHit,
    },
}

/// Prices per token, micro-USD, for the worst case of a call.
///
/// Input is priced at the plain input price: the fleet sends no `cache_control`, so no call can
/// write to the prompt cache (cache reads are cheaper still). Whoever adds prompt caching must price
/// input at the cache-write rate here.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    input: f64,
    output: f64,
}

impl Rates {
    /// The worst-case per-token rates of `price`.
    pub fn of(price: &Price) -> Self {
        Self { input: price.input, output: price.output }
    }

    fn cost(&self, input: u64, output: u64) -> u64 {
        (input as f64 * self.input + output as f64 * self.output).ceil() as u64
    }
}

/// The cost of a call's usage at `price`, rounded up to the micro-dollar. Cache writes default to
/// 1.25 × and cache reads to 0.1 × the input price.
pub fn cost(price: &Price, usage: &Usage) -> MicroUsd {
    let per_token = |usd_per_mtok: f64, tokens: u64| usd_per_mtok * tokens as f64; // micro-USD
    let total = per_token(price.input, usage.input_tokens)
        + per_token(price.output, usage.output_tokens)
        + per_token(price.cache_write.unwrap_or(price.input * 1.25), usage.cache_creation_input_tokens)
        + per_token(price.cache_read.unwrap_or(price.input * 0.1), usage.cache_read_input_tokens);
    MicroUsd::new(total.ceil() as u64)
}

/// An upper estimate of a request's input tokens from its size in bytes: about one token per three
/// bytes (English runs nearer four; code, JSON and non-Latin text nearer three), plus framing.
pub fn estimate_input_tokens(request_bytes: usize) -> u64 {
    request_bytes as u64 / 3 + 16
}

/// Plans the call of step `step`, whose request is about `input` tokens.
pub fn plan(limits: &Limits, spent: &Spent, step: u32, input: u64, agent_max_tokens: u32, rates: Rates) -> Plan {
    if step > limits.max_steps {
        return summarize(limits, spent, input, rates, LimitHit::Steps(limits.max_steps));
    }
    let (room, hit) = output_room(limits, spent, input, rates);
    let wanted = u64::from(agent_max_tokens);
    let out = room.min(wanted);
    if out >= MIN_USEFUL_OUTPUT.min(wanted) && out > 0 {
        let max_tokens = u32::try_from(out).unwrap_or(u32::MAX);
        let reserve = Reservation { cost: rates.cost(input, out), input_tokens: input, output_tokens: out };
        return Plan::Call { max_tokens, reserve };
    }
    summarize(limits, spent, input, rates, hit)
}

/// The most output a normal call may have so that it, and a summary after it, fit every limit; with
/// the limit that binds.
fn output_room(l: &Limits, s: &Spent, input: u64, r: Rates) -> (u64, LimitHit) {
    let summary_out = u64::from(l.summary_max_tokens);
    let sp = SUMMARY_PROMPT_TOKENS;
    // One step: input·in + out·out ≤ per-step cap.
    let per_step = floor_div(l.max_cost_per_step.get() as f64 - input as f64 * r.input, r.output);
    // This call and the summary after it (whose input is this call's input and output, plus the
    // prompt): input·in + out·out + (input + out + sp)·in + summary·out ≤ what is left.
    let cost_left = l.max_cost.get().saturating_sub(s.cost.get()) as f64;
    let fixed = (2 * input + sp) as f64 * r.input + summary_out as f64 * r.output;
    let by_cost = floor_div(cost_left - fixed, r.output + r.input);
    // Tokens likewise: (input + out) + (input + out + sp + summary) ≤ what is left.
    let tokens_left = l.max_tokens.saturating_sub(s.tokens);
    let by_tokens = tokens_left.saturating_sub(2 * input + sp + summary_out) / 2;
    [
        (per_step, LimitHit::CostPerStep(l.max_cost_per_step)),
        (by_cost, LimitHit::Cost(l.max_cost)),
        (by_tokens, LimitHit::Tokens(l.max_tokens)),
    ]
    .into_iter()
    .min_by_key(|(room, _)| *room)
    .unwrap_or((0, LimitHit::Cost(l.max_cost)))
}

fn summarize(l: &Limits, s: &Spent, input: u64, r: Rates, hit: LimitHit) -> Plan {
    let input = input + SUMMARY_PROMPT_TOKENS;
    let per_step = floor_div(l.max_cost_per_step.get() as f64 - input as f64 * r.input, r.output);
    let by_cost = floor_div(l.max_cost.get().saturating_sub(s.cost.get()) as f64 - input as f64 * r.input, r.output);
    let by_tokens = l.max_tokens.saturating_sub(s.tokens).saturating_sub(input);
    let out = u64::from(l.summary_max_tokens).min(per_step).min(by_cost).min(by_tokens);
    if out < MIN_SUMMARY_OUTPUT {
        return Plan::Stop { hit };
    }
    let reserve = Reservation { cost: r.cost(input, out), input_tokens: input, output_tokens: out };
    Plan::Summarize { max_tokens: u32::try_from(out).unwrap_or(u32::MAX), reserve, hit }
}

fn floor_div(amount: f64, rate: f64) -> u64 {
    if amount <= 0.0 || rate <= 0.0 {
        return if rate <= 0.0 && amount >= 0.0 { u64::MAX } else { 0 };
    }
    (amount / rate).floor() as u64
}

/// The first limit whose used fraction reached the alert threshold, if any.
pub fn alert_crossed(l: &Limits, s: &Spent) -> Option<&'static str> {
    let reached = |used: f64, limit: f64| limit > 0.0 && used * 1000.0 >= limit * f64::from(l.alert_permille);
    if reached(f64::from(s.steps), f64::from(l.max_steps)) {
        Some("max_steps")
    } else if reached(s.cost.get() as f64, l.max_cost.get() as f64) {
        Some("max_cost_usd")
    } else if reached(s.tokens as f64, l.max_tokens as f64) {
        Some("max_tokens")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_take_whole_numbers_written_as_floats() {
        let parse = |t: &str| serde_json::from_str::<Overrides>(t);
        let o = parse(r#"{"max_steps": 3.0, "max_tokens": 10}"#).expect("whole numbers");
        assert_eq!((o.max_steps, o.max_tokens), (Some(3), Some(10)));
        assert_eq!(parse(r#"{"max_steps": null}"#).expect("null").max_steps, None);
        for bad in
            [r#"{"max_steps": 3.5}"#, r#"{"max_steps": -1}"#, r#"{"max_steps": 5000000000}"#, r#"{"max_tokens": "1"}"#]
        {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    fn limits() -> Limits {
        Limits {
            max_steps: 10,
            max_cost: MicroUsd::new(100_000),
            max_cost_per_step: MicroUsd::new(20_000),
            max_tokens: 100_000,
            alert_permille: 750,
            summary_max_tokens: 300,
        }
    }

    fn sonnet() -> Rates {
        Rates::of(&Price { input: 3.0, output: 15.0, cache_write: None, cache_read: None })
    }

    #[test]
    fn cost_is_rounded_up_micro_usd() {
        let sonnet = crate::config::default_prices()["claude-sonnet-4-20250514"];
        let usage = Usage { input_tokens: 1_000, output_tokens: 100, ..Default::default() };
        // 1000 × 3 + 100 × 15 = 4500 micro-USD
        assert_eq!(cost(&sonnet, &usage), MicroUsd::new(4_500));
    }

    #[test]
    fn a_call_is_capped_by_the_per_step_cost() {
        let Plan::Call { max_tokens, reserve } = plan(&limits(), &Spent::default(), 1, 1_000, 4_096, sonnet()) else {
            panic!("expected a call")
        };
        assert!(reserve.cost <= 20_000, "{reserve:?}");
        // 20_000 µ$ − 1000 × 3 = 17_000 µ$ → 1133 output tokens at 15 µ$.
        assert_eq!(max_tokens, 1_133);
    }

    #[test]
    fn the_step_limit_leads_to_a_summary() {
        let spent = Spent { steps: 10, ..Default::default() };
        let p = plan(&limits(), &spent, 11, 1_000, 4_096, sonnet());
        assert!(matches!(p, Plan::Summarize { hit: LimitHit::Steps(10), max_tokens: 300, .. }), "{p:?}");
    }

    #[test]
    fn the_summary_is_always_left_room_within_the_cost_limit() {
        let l = limits();
        let mut spent = Spent::default();
        let mut step = 1;
        let rates = sonnet();
        loop {
            match plan(&l, &spent, step, 2_000 + u64::from(step) * 500, 4_096, rates) {
                Plan::Call { reserve, .. } => {
                    spent.cost = spent.cost.saturating_add(MicroUsd::new(reserve.cost));
                    spent.tokens += reserve.input_tokens + reserve.output_tokens;
                    spent.steps += 1;
                    step += 1;
                }
                Plan::Summarize { reserve, hit, .. } => {
                    assert!(spent.cost.get() + reserve.cost <= l.max_cost.get(), "{hit}: {spent:?} + {reserve:?}");
                    assert!(spent.tokens + reserve.input_tokens + reserve.output_tokens <= l.max_tokens);
                    break;
                }
                Plan::Stop { hit } => panic!("the summary should fit, stopped on {hit}"),
            }
        }
    }

    #[test]
    fn nothing_fits_means_stop() {
        let spent = Spent { cost: MicroUsd::new(99_990), ..Default::default() };
        assert!(matches!(plan(&limits(), &spent, 2, 1_000, 1_024, sonnet()), Plan::Stop { hit: LimitHit::Cost(_) }));
    }

    #[test]
    fn requests_may_lower_limits_but_not_raise_them() {
        let l = limits();
        let lower = l.lowered(&Overrides { max_steps: Some(3), max_cost_usd: Some(0.05), ..Default::default() });
        assert_eq!(lower.map(|l| (l.max_steps, l.max_cost)), Ok((3, MicroUsd::new(50_000))));
        let e = l.lowered(&Overrides { max_cost_usd: Some(5.0), ..Default::default() }).expect_err("raise");
        assert!(e.to_string().starts_with("budget.max_cost_usd"), "{e}");
        assert!(l.lowered(&Overrides { max_steps: Some(0), ..Default::default() }).is_err());
        assert!(l.lowered(&Overrides { max_cost_usd: Some(-1.0), ..Default::default() }).is_err());
    }

    #[test]
    fn alerts_trigger_on_any_limit() {
        let l = limits();
        assert_eq!(alert_crossed(&l, &Spent { steps: 7, ..Default::default() }), None);
        assert_eq!(alert_crossed(&l, &Spent { steps: 8, ..Default::default() }), Some("max_steps"));
        assert_eq!(
            alert_crossed(&l, &Spent { cost: MicroUsd::new(75_000), ..Default::default() }),
            Some("max_cost_usd")
        );
    }
}
