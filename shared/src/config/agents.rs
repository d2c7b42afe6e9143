//! The agents, their budgets and waits, and tenants.

use secrecy::SecretString;
use serde::Deserialize;

use super::{Invalid, Problem};
use crate::domain::{Name, Provider};

fn default_max_system_prompt_tokens() -> u32 {
    2_000
}

pub(super) fn default_pool() -> Name {
    Name::parse("default").unwrap_or_else(|_| unreachable!("`default` is a valid name"))
}

/// An agent: a model, a system prompt and a set of tools, run in one pool under one budget.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The model id, e.g. `claude-sonnet-4-5`. Must have a price.
    pub model: String,
    /// Which API the model speaks: `anthropic` (default) or `openai` (OpenAI-compatible).
    #[serde(default)]
    pub provider: Provider,
    /// The system prompt.
    pub system_prompt: String,
    /// The largest system prompt accepted, in tokens (default 2,000): a larger one is refused at
    /// start-up with its count. A prompt that long is resent, and paid for, at every step.
    #[serde(default = "default_max_system_prompt_tokens")]
    pub max_system_prompt_tokens: u32,
    /// Names of the tools (from `[tools]`) this agent may call.
    #[serde(default)]
    pub tools: Vec<Name>,
    /// The worker pool (AMQP routing key). Default `default`.
    #[serde(default = "default_pool")]
    pub pool: Name,
    /// `max_tokens` of each model call. Default 1024.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// Prompt caching (Anthropic): `auto` (default) marks cache breakpoints on the stable prefix
    /// (tool definitions, system prompt) and on the conversation, so each step pays about a tenth
    /// of the input price for what the step before it sent; `off` sends none. OpenAI-compatible
    /// servers cache on their own either way.
    #[serde(default)]
    pub prompt_cache: PromptCache,
    /// How long a cached prefix lives after its last use: `5m` (default; writing costs 1.25 × the
    /// input price) or `1h` (2 ×).
    #[serde(default)]
    pub prompt_cache_ttl: CacheTtl,
    /// Budget limits.
    #[serde(default)]
    pub budget: BudgetConfig,
    /// What happens when the model API keeps failing past `worker.max_model_attempts`, or refuses
    /// the request outright: `fail` the session (default) or `escalate` it to a human.
    #[serde(default)]
    pub on_model_failure: OnModelFailure,
    /// How long a session waits for a human's reply to an escalation, and what happens then.
    /// Default 24 h, then `fail`.
    #[serde(default = "WaitConfig::human")]
    pub human_wait: WaitConfig,
    /// How long a tool call waits for approval, and what happens then. Default 24 h, then `reject`.
    #[serde(default = "WaitConfig::approval")]
    pub approval_wait: WaitConfig,
    /// Where this agent's lifecycle events are POSTed (signed), unless the session names its own
    /// `callback_url`. Default none.
    #[serde(default)]
    pub webhook_url: Option<String>,
}

/// Whether an agent's calls mark prompt-cache breakpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PromptCache {
    /// Breakpoints on the last tool definition, the system prompt and the conversation's newest
    /// messages, where the prefix is long enough for the model to cache.
    #[default]
    Auto,
    /// No breakpoints: every input token at the plain input price.
    Off,
}

/// The lifetime of a prompt-cache entry after its last use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum CacheTtl {
    /// Five minutes: writes cost 1.25 × the input price.
    #[default]
    #[serde(rename = "5m")]
    FiveMinutes,
    /// One hour: writes cost 2 × the input price.
    #[serde(rename = "1h")]
    OneHour,
}

impl CacheTtl {
    /// The API's `ttl` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FiveMinutes => "5m",
            Self::OneHour => "1h",
        }
    }
}

impl AgentConfig {
    /// The TTL its calls write to the prompt cache with, `None` when they never do: caching `off`,
    /// or an OpenAI-compatible provider (which caches on its own, without a write price).
    pub fn cache_ttl(&self) -> Option<CacheTtl> {
        (self.provider == Provider::Anthropic && self.prompt_cache == PromptCache::Auto)
            .then_some(self.prompt_cache_ttl)
    }
}

/// A wait for people, with its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitConfig {
    /// Seconds before the deadline.
    pub deadline_s: u64,
    /// What the deadline does.
    pub on_deadline: OnDeadline,
}

impl WaitConfig {
    fn human() -> Self {
        Self { deadline_s: 86_400, on_deadline: OnDeadline::Fail }
    }

    fn approval() -> Self {
        Self { deadline_s: 86_400, on_deadline: OnDeadline::Reject }
    }
}

/// What happens when a wait for people passes its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDeadline {
    /// End the session `failed`.
    Fail,
    /// Refuse the tool call (approvals): the model is told it was not approved in time.
    Reject,
    /// Hand the decision to a human (approvals): the session becomes `awaiting_human`.
    Escalate,
}

/// What a session does when the model cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnModelFailure {
    /// End the session `failed` with the API's reason.
    #[default]
    Fail,
    /// Pause the session `awaiting_human` with the reason.
    Escalate,
}

fn default_max_tokens() -> u32 {
    1024
}

/// Per-session budget limits, and the agent's fleet-wide daily cap. A request may lower the
/// per-session limits, never raise them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// Agent steps (model calls) per session, not counting the final summary. Default 25.
    pub max_steps: u32,
    /// Cost per session, USD, the final summary included. Default 1.00.
    pub max_cost_usd: f64,
    /// Cost of one model call, USD. Default 0.25.
    pub max_cost_per_step_usd: f64,
    /// Tokens per session (input, cache reads and writes, and output). Default 500000.
    pub max_tokens: u64,
    /// Fraction of any limit at which `session.budget_alert` fires, once. Default 0.8.
    pub alert_threshold: f64,
    /// `max_tokens` of the final summary call. Default 512.
    pub summary_max_tokens: u32,
    /// Spend cap of this agent per UTC day across the fleet, USD. Default none.
    pub daily_cap_usd: Option<f64>,
    /// What a session does when a daily cap (the agent's or its tenant's) is reached: `pause`
    /// (retried every 10 minutes, so it resumes the next day or once the cap is raised) or `fail`.
    /// Only a cap that is spent counts: while its room is held by the reservations of calls in
    /// flight, the step waits for it (up to 2 minutes). Default `pause`.
    pub on_daily_cap: OnDailyCap,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            max_steps: 25,
            max_cost_usd: 1.0,
            max_cost_per_step_usd: 0.25,
            max_tokens: 500_000,
            alert_threshold: 0.8,
            summary_max_tokens: 512,
            daily_cap_usd: None,
            on_daily_cap: OnDailyCap::Pause,
        }
    }
}

/// What a session does at a daily cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnDailyCap {
    /// Wait, and try again every 10 minutes.
    #[default]
    Pause,
    /// End the session `failed`.
    Fail,
}

/// A tenant's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Spend cap of this tenant per UTC day across the fleet, USD.
    pub daily_cap_usd: Option<f64>,
    /// Live (not ended) sessions of this tenant at once; default `tenant_defaults.max_live_sessions`.
    #[serde(default)]
    pub max_live_sessions: Option<u32>,
    /// The URL prefixes a session's `callback_url` must start with, e.g.
    /// `["https://hooks.acme.example/"]`; each an http(s) URL ending in `/`, without userinfo.
    /// Default none: the tenant's sessions may not set a `callback_url`.
    #[serde(default)]
    pub callback_prefixes: Vec<String>,
    /// The environment variable holding this tenant's webhook signing secret. Default none: its
    /// events are signed with the fleet's secret (`webhooks.secret_env`).
    pub webhook_secret_env: Option<String>,
    /// The secret read from `webhook_secret_env`. When the variable is named but empty or unset,
    /// the tenant's events are dead-lettered rather than signed with another secret.
    #[serde(skip)]
    pub webhook_secret: Option<SecretString>,
}

pub(super) fn validate_budget(b: &BudgetConfig) -> Result<(), Invalid> {
    let err = |field: &str, problem| Err(Invalid::new(field, problem));
    if b.max_steps == 0 {
        return err("max_steps", Problem::AtLeast(1));
    }
    let usd = [
        ("max_cost_usd", Some(b.max_cost_usd)),
        ("max_cost_per_step_usd", Some(b.max_cost_per_step_usd)),
        ("daily_cap_usd", b.daily_cap_usd),
    ];
    for (field, value) in usd {
        if let Some(v) = value
            && (!v.is_finite() || v <= 0.0)
        {
            return err(field, Problem::NotPositiveUsd);
        }
    }
    if b.max_cost_per_step_usd > b.max_cost_usd {
        return err("max_cost_per_step_usd", Problem::StepCostOverTotal);
    }
    if !(b.alert_threshold > 0.0 && b.alert_threshold <= 1.0) {
        return err("alert_threshold", Problem::NotAnAlertFraction);
    }
    if b.max_tokens == 0 || b.summary_max_tokens == 0 {
        return err("max_tokens", Problem::ZeroTokenLimit);
    }
    Ok(())
}
