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

use crate::config::{BudgetConfig, CacheTtl, Price};
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
pub fn whole<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
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
/// With prompt caching on, any input token may be written to the cache, at the cache-write price
/// of the call's TTL (1.25 × or 2 × the input price): the worst case prices all input so, also
/// when the cache then misses. Cache reads are cheaper still.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    input: f64,
    output: f64,
}

impl Rates {
    /// The worst-case per-token rates of `price`, for calls that write to the prompt cache with
    /// `cache` (`None`: calls that never write to it).
    pub fn of(price: &Price, cache: Option<CacheTtl>) -> Self {
        let input = cache.map_or(price.input, |ttl| price.input.max(price.cache_write(ttl)));
        Self { input, output: price.output }
    }

    fn cost(&self, input: u64, output: u64) -> u64 {
        (input as f64 * self.input + output as f64 * self.output).ceil() as u64
    }
}

/// What one call cost, micro-USD, by kind of token. Each part is rounded up to the micro-dollar on
/// its own, and the call's cost is their sum, so that a session's cost, its parts and its trace
/// records add up exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Bill {
    /// Plain (uncached) input tokens.
    pub input: u64,
    /// Output tokens.
    pub output: u64,
    /// Input tokens written to the prompt cache.
    pub cache_write: u64,
    /// Input tokens read from the prompt cache.
    pub cache_read: u64,
}

impl Bill {
    /// The call's cost: the sum of the parts.
    pub fn total(&self) -> MicroUsd {
        MicroUsd::new(self.input + self.output + self.cache_write + self.cache_read)
    }
}

/// The bill of a call's usage at `price`. Cache writes are priced by their TTL (the 1-hour part at
/// `cache_write_1h`, the rest at `cache_write`), reads at `cache_read`.
pub fn bill(price: &Price, usage: &Usage) -> Bill {
    // micro-USD, rounded to the pico-dollar first so that float noise (0.1 × 3.0 is 0.30000000000000004)
    // does not round a whole number up.
    let part = |usd_per_mtok: f64, tokens: u64| ((usd_per_mtok * tokens as f64 * 1e6).round() / 1e6).ceil() as u64;
    let written_1h = usage.cache_creation_1h_input_tokens.min(usage.cache_creation_input_tokens);
    let written_5m = usage.cache_creation_input_tokens - written_1h;
    Bill {
        input: part(price.input, usage.input_tokens),
        output: part(price.output, usage.output_tokens),
        cache_write: part(price.cache_write(CacheTtl::FiveMinutes), written_5m)
            + part(price.cache_write(CacheTtl::OneHour), written_1h),
        cache_read: part(price.cache_read(), usage.cache_read_input_tokens),
    }
}

/// The cost of a call's usage at `price`: the total of its [`bill`].
pub fn cost(price: &Price, usage: &Usage) -> MicroUsd {
    bill(price, usage).total()
}

/// An upper estimate of a request's input tokens from its size in bytes: about one token per three
/// bytes (English runs nearer four; code, JSON and non-Latin text nearer three), plus framing.
pub fn estimate_input_tokens(request_bytes: usize) -> u64 {
    request_bytes as u64 / 3 + 16
}

/// What an agent's calls are planned from besides the session: the request bytes that do not
/// depend on the conversation (system prompt, tool definitions, framing), the output cap and the
/// prices. The worker plans each call with it; the checkpoint before a step (and the dispatcher,
/// for a session's first step) plans the same call ahead, so that the step's claim can hold its
/// worst case without a round trip of its own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CallShape {
    /// Request bytes besides the conversation.
    pub fixed_bytes: usize,
    /// The agent's `max_tokens` per call.
    pub max_tokens: u32,
    /// Its model's worst-case rates.
    pub rates: Rates,
}

/// Request framing counted besides the system prompt, the tools and the conversation: the body's
/// other fields, and up to four prompt-cache markers with the system prompt as a block.
const FRAMING_BYTES: usize = 512;

impl CallShape {
    /// The shape of an agent with this system prompt, these tool definitions (as sent), output cap
    /// and price, whose calls write to the prompt cache with `cache` (`None`: never).
    pub fn new(system: &str, tool_definitions: &str, max_tokens: u32, price: &Price, cache: Option<CacheTtl>) -> Self {
        let fixed_bytes = system.len() + tool_definitions.len() + FRAMING_BYTES;
        Self { fixed_bytes, max_tokens, rates: Rates::of(price, cache) }
    }

    /// The call of `step`, with `spent` so far and a conversation of `conversation_bytes`.
    pub fn plan(&self, limits: &Limits, spent: &Spent, step: u32, conversation_bytes: usize) -> Plan {
        let input = estimate_input_tokens(self.fixed_bytes + conversation_bytes);
        plan(limits, spent, step, input, self.max_tokens, self.rates)
    }

    /// The worst case of that call; `None` when none fits (the step ends the session).
    pub fn worst_case(
        &self,
        limits: &Limits,
        spent: &Spent,
        step: u32,
        conversation_bytes: usize,
    ) -> Option<Reservation> {
        match self.plan(limits, spent, step, conversation_bytes) {
            Plan::Call { reserve, .. } | Plan::Summarize { reserve, .. } => Some(reserve),
            Plan::Stop { .. } => None,
        }
    }
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
        Rates::of(&Price::new(3.0, 15.0), None)
    }

    #[test]
    fn cost_is_rounded_up_micro_usd() {
        let sonnet = crate::config::default_prices()["claude-sonnet-4-20250514"];
        let usage = Usage { input_tokens: 1_000, output_tokens: 100, ..Default::default() };
        // 1000 × 3 + 100 × 15 = 4500 micro-USD
        assert_eq!(cost(&sonnet, &usage), MicroUsd::new(4_500));
    }

    #[test]
    fn a_bill_adds_up_and_prices_cache_tokens_by_kind() {
        let price = Price::new(3.0, 15.0);
        let usage = Usage {
            input_tokens: 100,
            output_tokens: 10,
            cache_creation_input_tokens: 1_000,
            cache_creation_1h_input_tokens: 400,
            cache_read_input_tokens: 5_000,
        };
        let b = bill(&price, &usage);
        // 100 × 3; 10 × 15; 600 × 3.75 + 400 × 6; 5000 × 0.3.
        assert_eq!(b, Bill { input: 300, output: 150, cache_write: 2_250 + 2_400, cache_read: 1_500 });
        assert_eq!(cost(&price, &usage), MicroUsd::new(300 + 150 + 4_650 + 1_500));
    }

    #[test]
    fn the_worst_case_with_caching_prices_all_input_as_a_cache_write() {
        let price = Price::new(3.0, 15.0);
        let input = 2_000;
        for (ttl, rate) in [(CacheTtl::FiveMinutes, 3.75), (CacheTtl::OneHour, 6.0)] {
            let Plan::Call { reserve, max_tokens } =
                plan(&limits(), &Spent::default(), 1, input, 256, Rates::of(&price, Some(ttl)))
            else {
                panic!("expected a call")
            };
            // A total miss: the whole input written to the cache, and the whole output.
            let miss = Usage {
                cache_creation_input_tokens: input,
                cache_creation_1h_input_tokens: if ttl == CacheTtl::OneHour { input } else { 0 },
                output_tokens: u64::from(max_tokens),
                ..Usage::default()
            };
            assert!(cost(&price, &miss).get() <= reserve.cost, "{ttl:?}: {reserve:?}");
            assert_eq!(reserve.cost, (input as f64 * rate + 256.0 * 15.0).ceil() as u64);
        }
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
