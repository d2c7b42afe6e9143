//! Configuration: one TOML file plus environment overrides.
//!
//! The file defines the agents, their tools, model prices and the connection settings. The official
//! SDKs' variable names override the file (`AMQP_URL`, `REDIS_URL`, `ANTHROPIC_API_KEY`,
//! `ANTHROPIC_BASE_URL`), so the same file works locally and in Kubernetes. Parsing takes the
//! environment as a lookup function, so tests never touch the process environment.
//!
//! Every error names the file, the field and the problem: `config error in agentfleet.toml: field
//! `agents.support.model`: no price for model ...`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;
use thiserror::Error;

use crate::domain::{MicroUsd, Name};

/// A config file that cannot be used, with where and why.
#[derive(Debug, Error)]
#[error("config error in {}: field `{field}`: {problem}", file.display())]
pub struct ConfigError {
    /// The file that was read.
    pub file: PathBuf,
    /// The dotted path of the offending field (`agents.support.tools[2]`), or `(file)`.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

/// The whole configuration of a worker or a dispatcher.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// RabbitMQ settings.
    #[serde(default)]
    pub amqp: AmqpConfig,
    /// Redis settings.
    #[serde(default)]
    pub redis: RedisConfig,
    /// Anthropic Messages API settings.
    #[serde(default)]
    pub anthropic: AnthropicConfig,
    /// OpenAI-compatible API settings, for agents with `provider = "openai"`.
    #[serde(default)]
    pub openai: crate::llm::openai::OpenAiConfig,
    /// Worker settings.
    #[serde(default)]
    pub worker: WorkerConfig,
    /// Dispatcher settings.
    #[serde(default)]
    pub dispatcher: DispatcherConfig,
    /// Prices per model in USD per million tokens; merged over the built-in defaults.
    #[serde(default)]
    pub prices: BTreeMap<String, Price>,
    /// Tools that agents may use, by name.
    #[serde(default)]
    pub tools: BTreeMap<Name, ToolConfig>,
    /// The agents, by name.
    pub agents: BTreeMap<Name, AgentConfig>,
    /// Tenants with daily caps, by name (the tenant comes from the request).
    #[serde(default)]
    pub tenants: BTreeMap<Name, TenantConfig>,
    /// Fleet-wide breaker and rate limits per model provider (`anthropic`, `openai`).
    #[serde(default)]
    pub providers: BTreeMap<crate::llm::Provider, ProviderConfig>,
    /// Signed webhooks of lifecycle events (`crate::webhooks`).
    #[serde(default)]
    pub webhooks: WebhooksConfig,
    /// Logging, tracing and redaction.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

/// Logging, tracing and redaction settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// JSON field names whose values never appear in traces or logs (e.g. `card_number`). API
    /// keys and tool header values are always redacted.
    pub redact_fields: Vec<String>,
    /// OpenTelemetry trace export (`[telemetry.otlp]`); off unless an endpoint is set.
    pub otlp: OtlpConfig,
}

/// OpenTelemetry export of spans over OTLP (HTTP, protobuf): one trace per session, with a span
/// per step and a child span per action (`crate::telemetry::otel`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpConfig {
    /// The collector's OTLP/HTTP base URL, e.g. `http://otel-collector:4318`; `/v1/traces` is
    /// appended unless the URL already ends with it. Empty (the default) turns export off. The
    /// environment variable `OTEL_EXPORTER_OTLP_ENDPOINT` overrides it; extra request headers
    /// (an API key of a hosted backend) come from `OTEL_EXPORTER_OTLP_HEADERS`.
    pub endpoint: String,
    /// The fraction of sessions traced, 0.0 to 1.0. Decided from the session id, so every
    /// worker and the dispatcher agree on a session. Default 1.0.
    pub sample_ratio: f64,
    /// The longest a finished span waits before it is sent, in ms. Default 5000.
    pub batch_delay_ms: u64,
    /// Finished spans held for export; beyond this new spans are dropped, so a slow or absent
    /// collector never slows a step. Default 8192.
    pub max_queue_size: usize,
    /// Timeout of one export request, in ms. Default 10000.
    pub timeout_ms: u64,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            sample_ratio: 1.0,
            batch_delay_ms: 5_000,
            max_queue_size: 8_192,
            timeout_ms: 10_000,
        }
    }
}

impl OtlpConfig {
    /// True when spans are exported.
    pub fn enabled(&self) -> bool {
        !self.endpoint.is_empty()
    }

    /// The URL spans are posted to.
    pub fn traces_url(&self) -> String {
        let base = self.endpoint.trim_end_matches('/');
        if base.ends_with("/v1/traces") { base.to_owned() } else { format!("{base}/v1/traces") }
    }

    fn validate(&self) -> Result<(), (String, String)> {
        if self.enabled() {
            check_url(&self.endpoint, &["http", "https"]).map_err(|p| ("endpoint".to_owned(), p))?;
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(("sample_ratio".into(), "must be a number from 0.0 to 1.0".into()));
        }
        let counts = [
            ("max_queue_size", self.max_queue_size as u64),
            ("batch_delay_ms", self.batch_delay_ms),
            ("timeout_ms", self.timeout_ms),
        ];
        match counts.iter().find(|(_, v)| *v == 0) {
            Some((field, _)) => Err(((*field).to_owned(), "must be at least 1".into())),
            None => Ok(()),
        }
    }
}

/// Signed webhooks: the signing secret and how deliveries are retried.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// The environment variable holding the signing secret. Default `AGENTFLEET_WEBHOOK_SECRET`.
    pub secret_env: String,
    /// The signing secret, read from `secret_env` (never put it in the file). Without one, events
    /// that have a URL are dead-lettered instead of sent unsigned.
    #[serde(skip)]
    pub secret: Option<SecretString>,
    /// Timeout of one POST. Default 5000 ms.
    pub timeout_ms: u64,
    /// Attempts per event (retries wait 1 s, 5 s, 30 s, 2 min, then 10 min each) before it is
    /// dead-lettered. Default 12.
    pub max_attempts: u32,
}

impl fmt::Debug for WebhooksConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhooksConfig")
            .field("secret_env", &self.secret_env)
            .field("secret", &self.secret.as_ref().map(|_| "[redacted]"))
            .field("timeout_ms", &self.timeout_ms)
            .field("max_attempts", &self.max_attempts)
            .finish()
    }
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self { secret_env: "AGENTFLEET_WEBHOOK_SECRET".into(), secret: None, timeout_ms: 5_000, max_attempts: 12 }
    }
}

/// The fleet-wide protections of one model provider.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    /// The provider's circuit breaker (opens after consecutive 5xx, 529, timeouts and connection
    /// failures across the fleet). Default: 5 failures, 60 s cool-down, probe timeout 150 s.
    pub breaker: Option<crate::breaker::BreakerConfig>,
    /// Requests and tokens per minute, by model id. Default: unlimited.
    pub rate_limits: BTreeMap<String, crate::ratelimit::RateLimit>,
}

impl ProviderConfig {
    /// The breaker settings in force: the configured ones, or defaults whose probe timeout outlasts
    /// a slow model call.
    pub fn breaker(&self) -> crate::breaker::BreakerConfig {
        self.breaker.clone().unwrap_or_else(|| crate::breaker::BreakerConfig {
            probe_timeout: Some(std::time::Duration::from_secs(150)),
            ..Default::default()
        })
    }
}

/// RabbitMQ settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// Broker URL. Env `AMQP_URL`. Default `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub url: String,
    /// Prefix of every exchange and queue name. Default `agentfleet`; tests use their own.
    pub prefix: String,
    /// Deliveries of one step message before it is dead-lettered. Default 20.
    pub delivery_limit: u32,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self { url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(), prefix: "agentfleet".into(), delivery_limit: 20 }
    }
}

/// Redis settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Redis URL. Env `REDIS_URL`. Default `redis://127.0.0.1:6379`.
    pub url: String,
    /// Prefix of every key. Default `af`; tests use their own.
    pub key_prefix: String,
    /// How long to wait for a reply before the outcome counts as unknown. Default 10000 ms, far
    /// above tail latency under load (see DESIGN §3).
    pub response_timeout_ms: u64,
    /// How long to wait for a connection. Default 5000 ms.
    pub connect_timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: "af".into(),
            response_timeout_ms: 10_000,
            connect_timeout_ms: 5_000,
        }
    }
}

/// How the API key is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AuthStyle {
    /// `x-api-key: <key>`, as documented.
    #[default]
    XApiKey,
    /// `Authorization: Bearer <key>`, as the late-2026 SDKs send it.
    Bearer,
}

/// Anthropic Messages API settings.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnthropicConfig {
    /// API base URL. Env `ANTHROPIC_BASE_URL`. Default `https://api.anthropic.com`.
    pub base_url: String,
    /// The API key. Env `ANTHROPIC_API_KEY` (never put it in the file).
    #[serde(skip)]
    pub api_key: Option<SecretString>,
    /// Header style for the key. Default `x-api-key`.
    pub auth: AuthStyle,
    /// The `anthropic-version` header. Default `2023-06-01`.
    pub version: String,
    /// Request timeout. Default 120000 ms.
    pub timeout_ms: u64,
}

impl fmt::Debug for AnthropicConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnthropicConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("auth", &self.auth)
            .field("version", &self.version)
            .finish()
    }
}

impl Default for AnthropicConfig {
    fn default() -> Self {
        Self {
            base_url: "https://api.anthropic.com".into(),
            api_key: None,
            auth: AuthStyle::XApiKey,
            version: "2023-06-01".into(),
            timeout_ms: 120_000,
        }
    }
}

/// Worker settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Steps run at once by one worker (also the AMQP prefetch). Default 64.
    pub concurrency: u16,
    /// The pools this worker consumes. Default `["default"]`.
    pub pools: Vec<Name>,
    /// Lease time-to-live; renewed at a third of it while a step runs. Default 15000 ms.
    pub lease_ms: u64,
    /// How long in-flight steps may take to finish after SIGTERM. Default 25000 ms (under the
    /// pod's default 30 s grace).
    pub shutdown_grace_ms: u64,
    /// Where `/metrics` is served; empty for none. Default `0.0.0.0:9090`.
    pub metrics_listen: String,
    /// Model call attempts per step (retries go through the delay queues) before the session
    /// fails. Default 8.
    pub max_model_attempts: u32,
    /// The longest a worker waits in-process for tool retries, per call. Longer waits go through
    /// the delay queues. Default 2000 ms.
    pub max_inline_retry_ms: u64,
    /// Times a step may be sent through the delay queues for a tool's long retry before the call
    /// counts as failed. Default 5.
    pub max_tool_deferrals: u32,
    /// Tool results longer than this are cut, with a marker, before the model sees them. Default
    /// 32768 bytes.
    pub max_tool_result_bytes: usize,
    /// Tool inputs longer than this (as JSON) are refused with an error result. Default 262144.
    pub max_tool_input_bytes: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 64,
            pools: vec![default_pool()],
            lease_ms: 15_000,
            shutdown_grace_ms: 25_000,
            metrics_listen: "0.0.0.0:9090".into(),
            max_model_attempts: 8,
            max_inline_retry_ms: 2_000,
            max_tool_deferrals: 5,
            max_tool_result_bytes: 32 * 1024,
            max_tool_input_bytes: 256 * 1024,
        }
    }
}

/// Dispatcher settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatcherConfig {
    /// Where the HTTP API (and `/metrics`) is served. Default `0.0.0.0:8080`.
    pub listen: String,
    /// Largest accepted `input`, in bytes. Default 65536.
    pub max_input_bytes: usize,
    /// Largest accepted request body, in bytes. Default 262144.
    pub max_body_bytes: usize,
    /// How long an `idempotency_key` is remembered. Default 86400 s.
    pub idempotency_ttl_s: u64,
    /// How often the janitor looks for stalled sessions. Default 60 s.
    pub janitor_interval_s: u64,
    /// A queued or running session that has not moved for this long gets its current step
    /// re-published by the janitor. Default 300 s.
    pub stall_after_s: u64,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            max_input_bytes: 64 * 1024,
            max_body_bytes: 256 * 1024,
            idempotency_ttl_s: 86_400,
            janitor_interval_s: 60,
            stall_after_s: 300,
        }
    }
}

/// A model's prices in USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Input tokens.
    pub input: f64,
    /// Output tokens.
    pub output: f64,
    /// Cache-write input tokens. Default 1.25 × input.
    pub cache_write: Option<f64>,
    /// Cache-read input tokens. Default 0.1 × input.
    pub cache_read: Option<f64>,
}

/// Prices of the current Anthropic models and of the ids the seed design used.
pub fn default_prices() -> BTreeMap<String, Price> {
    let p = |input, output| Price { input, output, cache_write: None, cache_read: None };
    [
        ("claude-haiku-4-20250514", p(0.80, 4.0)),
        ("claude-sonnet-4-20250514", p(3.0, 15.0)),
        ("claude-opus-4-20250514", p(15.0, 75.0)),
        ("claude-haiku-4-5", p(1.0, 5.0)),
        ("claude-sonnet-4-5", p(3.0, 15.0)),
        ("claude-opus-4-1", p(15.0, 75.0)),
        ("claude-opus-4-5", p(5.0, 25.0)),
    ]
    .into_iter()
    .map(|(m, p)| (m.to_owned(), p))
    .collect()
}

/// A tool: what the model sees (name, description, schema) and how it runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolConfig {
    /// What the tool does, written as a directive for the model.
    pub description: String,
    /// JSON Schema of the input; must be an object schema.
    pub input_schema: serde_json::Value,
    /// How the tool runs.
    pub handler: HandlerConfig,
    /// In-process retries of an HTTP tool on timeouts, connection errors, 408, 429 and 5xx. A wait
    /// longer than `worker.max_inline_retry_ms` goes through the delay queues instead. Default 2.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// The first backoff between retries; it doubles, with jitter. Default 200 ms.
    #[serde(default = "default_retry_backoff_ms")]
    pub retry_backoff_ms: u64,
    /// The tool's fleet-wide circuit breaker. Default: opens after 5 consecutive failures, for 60 s.
    #[serde(default)]
    pub breaker: crate::breaker::BreakerConfig,
    /// A tool (of the same agent) run with the same input while this one's breaker is open.
    #[serde(default)]
    pub fallback: Option<Name>,
    /// Every call waits for a person's approval before it runs (`awaiting_approval`).
    #[serde(default)]
    pub requires_approval: bool,
    /// Calls whose input matches this rule wait for approval, e.g. `amount > 100`: a top-level
    /// input field, one of `> >= < <= == !=`, and a number.
    #[serde(default)]
    pub approval_rule: Option<String>,
}

fn default_retries() -> u32 {
    2
}

fn default_retry_backoff_ms() -> u64 {
    200
}

/// How a tool runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum HandlerConfig {
    /// An HTTP endpoint. The URL comes from here, never from the model.
    Http {
        /// Endpoint URL.
        url: String,
        /// HTTP method. Default `POST`.
        #[serde(default = "default_method")]
        method: String,
        /// Per-call timeout. Default 10000 ms.
        #[serde(default = "default_tool_timeout_ms")]
        timeout_ms: u64,
        /// Header name → the environment variable holding its value (read at start).
        #[serde(default)]
        headers_from_env: BTreeMap<String, String>,
    },
    /// A tool built into the worker (`escalate_to_human`).
    Builtin,
}

fn default_method() -> String {
    "POST".into()
}

fn default_tool_timeout_ms() -> u64 {
    10_000
}

fn default_pool() -> Name {
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
    pub provider: crate::llm::Provider,
    /// The system prompt.
    pub system_prompt: String,
    /// Names of the tools (from `[tools]`) this agent may call.
    #[serde(default)]
    pub tools: Vec<Name>,
    /// The worker pool (AMQP routing key). Default `default`.
    #[serde(default = "default_pool")]
    pub pool: Name,
    /// `max_tokens` of each model call. Default 1024.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
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
    /// Default `pause`.
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
}

/// The name of the built-in escalation tool.
pub const ESCALATE_TO_HUMAN: &str = "escalate_to_human";

impl Config {
    /// Reads and validates `path`, then applies the environment through `env`.
    pub fn load(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            field: "(file)".into(),
            problem: format!("cannot read it: {e}"),
        })?;
        Self::parse(&text, path, env)
    }

    /// Parses and validates the text of a config file named `file`.
    pub fn parse(text: &str, file: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let err = |field: String, problem: String| ConfigError { file: file.to_owned(), field, problem };
        let de = toml::Deserializer::parse(text).map_err(|e| err("(file)".into(), e.to_string().trim().to_owned()))?;
        let mut cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            err(field, e.into_inner().message().trim().to_owned())
        })?;
        cfg.apply_env(env);
        cfg.prices = default_prices().into_iter().chain(std::mem::take(&mut cfg.prices)).collect();
        cfg.validate().map_err(|(field, problem)| err(field, problem))?;
        Ok(cfg)
    }

    fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) {
        let set = |slot: &mut String, var: &str| {
            if let Some(v) = env(var).filter(|v| !v.is_empty()) {
                *slot = v;
            }
        };
        set(&mut self.amqp.url, "AMQP_URL");
        set(&mut self.redis.url, "REDIS_URL");
        set(&mut self.anthropic.base_url, "ANTHROPIC_BASE_URL");
        self.anthropic.api_key = env("ANTHROPIC_API_KEY").filter(|k| !k.is_empty()).map(SecretString::from);
        set(&mut self.openai.base_url, "OPENAI_BASE_URL");
        set(&mut self.telemetry.otlp.endpoint, "OTEL_EXPORTER_OTLP_ENDPOINT");
        self.openai.api_key = env("OPENAI_API_KEY").filter(|k| !k.is_empty()).map(SecretString::from);
        self.webhooks.secret = env(&self.webhooks.secret_env).filter(|k| !k.is_empty()).map(SecretString::from);
    }

    fn validate(&self) -> Result<(), (String, String)> {
        check_url(&self.amqp.url, &["amqp", "amqps"]).map_err(|p| ("amqp.url".into(), p))?;
        check_url(&self.redis.url, &["redis", "rediss"]).map_err(|p| ("redis.url".into(), p))?;
        check_url(&self.anthropic.base_url, &["http", "https"]).map_err(|p| ("anthropic.base_url".into(), p))?;
        check_url(&self.openai.base_url, &["http", "https"]).map_err(|p| ("openai.base_url".into(), p))?;
        Name::parse(&self.amqp.prefix).map_err(|e| ("amqp.prefix".into(), e.to_string()))?;
        Name::parse(&self.redis.key_prefix).map_err(|e| ("redis.key_prefix".into(), e.to_string()))?;
        if self.worker.concurrency == 0 {
            return Err(("worker.concurrency".into(), "must be at least 1".into()));
        }
        if self.worker.lease_ms < 1_000 {
            return Err(("worker.lease_ms".into(), "must be at least 1000".into()));
        }
        for (name, price) in &self.prices {
            check_price(price).map_err(|p| (format!("prices.{name}"), p))?;
        }
        for (name, tool) in &self.tools {
            validate_tool(tool, name, &self.tools).map_err(|(f, p)| (format!("tools.{name}.{f}"), p))?;
        }
        if self.agents.is_empty() {
            return Err(("agents".into(), "at least one agent is required".into()));
        }
        for (name, agent) in &self.agents {
            self.validate_agent(agent).map_err(|(f, p)| (format!("agents.{name}.{f}"), p))?;
        }
        self.telemetry.otlp.validate().map_err(|(f, p)| (format!("telemetry.otlp.{f}"), p))?;
        for (name, tenant) in &self.tenants {
            if let Some(cap) = tenant.daily_cap_usd
                && (!cap.is_finite() || cap <= 0.0)
            {
                return Err((format!("tenants.{name}.daily_cap_usd"), "must be a positive number of USD".into()));
            }
        }
        Ok(())
    }

    fn validate_agent(&self, agent: &AgentConfig) -> Result<(), (String, String)> {
        if !self.prices.contains_key(&agent.model) {
            let problem = format!("no price for model `{}`: add `[prices.\"{}\"]`", agent.model, agent.model);
            return Err(("model".into(), problem));
        }
        for (i, tool) in agent.tools.iter().enumerate() {
            if !self.tools.contains_key(tool) && tool.as_str() != ESCALATE_TO_HUMAN {
                return Err((format!("tools[{i}]"), format!("no tool named `{tool}` in [tools]")));
            }
        }
        if agent.max_tokens == 0 {
            return Err(("max_tokens".into(), "must be at least 1".into()));
        }
        if let Some(url) = &agent.webhook_url {
            check_url(url, &["http", "https"]).map_err(|p| ("webhook_url".to_owned(), p))?;
        }
        if agent.human_wait.on_deadline != OnDeadline::Fail {
            return Err((
                "human_wait.on_deadline".into(),
                "a wait for a human reply can only `fail` at its deadline".into(),
            ));
        }
        validate_budget(&agent.budget).map_err(|(f, p)| (format!("budget.{f}"), p))
    }

    /// The daily cap of `tenant`, if it has one.
    pub fn tenant_daily_cap(&self, tenant: &str) -> Option<f64> {
        self.tenants.iter().find(|(n, _)| n.as_str() == tenant).and_then(|(_, t)| t.daily_cap_usd)
    }

    /// Every secret value this config uses (API keys, tool header values), for redaction.
    pub fn secrets(&self, env: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
        use secrecy::ExposeSecret;
        let keys = [&self.anthropic.api_key, &self.openai.api_key];
        let mut out: Vec<String> = keys.into_iter().flatten().map(|k| k.expose_secret().to_owned()).collect();
        for tool in self.tools.values() {
            if let HandlerConfig::Http { headers_from_env, .. } = &tool.handler {
                out.extend(headers_from_env.values().filter_map(|var| env(var)));
            }
        }
        out
    }

    /// The agent named `name`.
    pub fn agent(&self, name: &str) -> Option<&AgentConfig> {
        self.agents.iter().find(|(n, _)| n.as_str() == name).map(|(_, a)| a)
    }

    /// The price of `model`; config validation guarantees one for every agent's model.
    pub fn price(&self, model: &str) -> Option<&Price> {
        self.prices.get(model)
    }
}

impl Price {
    /// The cost of a call's usage, rounded up to the micro-dollar.
    pub fn cost(&self, usage: &crate::llm::Usage) -> MicroUsd {
        let per_token = |usd_per_mtok: f64, tokens: u64| usd_per_mtok * tokens as f64; // micro-USD
        let total = per_token(self.input, usage.input_tokens)
            + per_token(self.output, usage.output_tokens)
            + per_token(self.cache_write.unwrap_or(self.input * 1.25), usage.cache_creation_input_tokens)
            + per_token(self.cache_read.unwrap_or(self.input * 0.1), usage.cache_read_input_tokens);
        MicroUsd::new(total.ceil() as u64)
    }
}

fn validate_budget(b: &BudgetConfig) -> Result<(), (String, String)> {
    let err = |f: &str, p: &str| Err((f.to_owned(), p.to_owned()));
    if b.max_steps == 0 {
        return err("max_steps", "must be at least 1");
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
            return err(field, "must be a positive number of USD");
        }
    }
    if b.max_cost_per_step_usd > b.max_cost_usd {
        return err("max_cost_per_step_usd", "must not exceed max_cost_usd");
    }
    if !(b.alert_threshold > 0.0 && b.alert_threshold <= 1.0) {
        return err("alert_threshold", "must be a fraction in (0, 1]");
    }
    if b.max_tokens == 0 || b.summary_max_tokens == 0 {
        return err("max_tokens", "token limits must be at least 1");
    }
    Ok(())
}

fn check_url(url: &str, schemes: &[&str]) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    if schemes.contains(&parsed.scheme()) {
        Ok(())
    } else {
        Err(format!("`{url}` must use one of the schemes {schemes:?}"))
    }
}

fn check_price(price: &Price) -> Result<(), String> {
    let all = [Some(price.input), Some(price.output), price.cache_write, price.cache_read];
    if all.into_iter().flatten().all(|p| p.is_finite() && p >= 0.0) {
        Ok(())
    } else {
        Err("prices must be non-negative numbers of USD per million tokens".into())
    }
}

fn validate_tool(tool: &ToolConfig, name: &Name, tools: &BTreeMap<Name, ToolConfig>) -> Result<(), (String, String)> {
    if let Some(rule) = &tool.approval_rule {
        crate::tools::ApprovalRule::parse(rule).map_err(|e| ("approval_rule".to_owned(), e))?;
    }
    if let Some(fallback) = &tool.fallback
        && (fallback == name || !tools.contains_key(fallback))
    {
        return Err(("fallback".into(), format!("`{fallback}` must be another tool in [tools]")));
    }
    if tool.input_schema.get("type").and_then(|t| t.as_str()) != Some("object") {
        return Err(("input_schema".into(), "must be a JSON Schema with `type = \"object\"`".into()));
    }
    jsonschema::validator_for(&tool.input_schema)
        .map_err(|e| ("input_schema".into(), format!("not a valid JSON Schema: {e}")))?;
    match &tool.handler {
        HandlerConfig::Http { url, method, timeout_ms, .. } => {
            check_url(url, &["http", "https"]).map_err(|p| ("handler.url".into(), p))?;
            reqwest::Method::from_bytes(method.as_bytes())
                .map_err(|_| ("handler.method".into(), format!("`{method}` is not an HTTP method")))?;
            if *timeout_ms == 0 {
                return Err(("handler.timeout_ms".into(), "must be at least 1".into()));
            }
            Ok(())
        }
        HandlerConfig::Builtin => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [tools.lookup]
        description = "Use this to look a customer up."
        input_schema = { type = "object", properties = { email = { type = "string" } }, required = ["email"] }
        handler = { kind = "http", url = "http://127.0.0.1:1/tools/lookup" }

        [agents.support]
        model = "claude-sonnet-4-5"
        system_prompt = "You help."
        tools = ["lookup", "escalate_to_human"]
    "#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"), &no_env)
    }

    #[test]
    fn a_minimal_config_gets_safe_defaults() {
        let cfg = parse(MINIMAL).expect("valid");
        let agent = cfg.agent("support").expect("agent");
        assert_eq!(agent.pool.as_str(), "default");
        assert_eq!(agent.budget.max_steps, 25);
        assert_eq!(cfg.anthropic.version, "2023-06-01");
        assert_eq!(cfg.anthropic.auth, AuthStyle::XApiKey);
        assert!(cfg.anthropic.api_key.is_none());
    }

    #[test]
    fn env_overrides_the_file() {
        let env = |k: &str| match k {
            "AMQP_URL" => Some("amqp://u:p@rabbit:5672/%2f".to_owned()),
            "REDIS_URL" => Some("redis://cache:6379".to_owned()),
            "ANTHROPIC_BASE_URL" => Some("http://127.0.0.1:9".to_owned()),
            "ANTHROPIC_API_KEY" => Some("sk-test".to_owned()),
            _ => None,
        };
        let cfg = Config::parse(MINIMAL, Path::new("t.toml"), &env).expect("valid");
        assert_eq!(cfg.amqp.url, "amqp://u:p@rabbit:5672/%2f");
        assert_eq!(cfg.redis.url, "redis://cache:6379");
        assert_eq!(cfg.anthropic.base_url, "http://127.0.0.1:9");
        assert!(cfg.anthropic.api_key.is_some());
        assert!(!format!("{:?}", cfg.anthropic).contains("sk-test"));
    }

    #[test]
    fn errors_name_the_file_the_field_and_the_problem() {
        let bad_type = MINIMAL.replace("system_prompt = \"You help.\"", "system_prompt = 3");
        let e = parse(&bad_type).expect_err("wrong type");
        assert_eq!(e.field, "agents.support.system_prompt");
        assert!(e.to_string().starts_with("config error in test.toml: field `agents.support.system_prompt`"), "{e}");

        let unknown_tool = MINIMAL.replace("\"lookup\", ", "\"lookup\", \"nope\", ");
        let e = parse(&unknown_tool).expect_err("unknown tool");
        assert_eq!(e.field, "agents.support.tools[1]");

        let no_price = MINIMAL.replace("claude-sonnet-4-5", "gpt-imaginary");
        let e = parse(&no_price).expect_err("no price");
        assert_eq!(e.field, "agents.support.model");
        assert!(e.problem.contains("no price"));

        let typo = MINIMAL.replace("system_prompt", "sytem_prompt");
        let e = parse(&typo).expect_err("unknown field");
        assert!(e.problem.contains("unknown field"), "{e}");

        let bad_schema = MINIMAL.replace("type = \"object\", properties", "type = \"array\", properties");
        assert_eq!(parse(&bad_schema).expect_err("schema").field, "tools.lookup.input_schema");

        let e = parse("this is = = not toml").expect_err("syntax");
        assert_eq!(e.field, "(file)");
    }

    #[test]
    fn otlp_export_is_off_unless_an_endpoint_is_set_in_the_file_or_the_environment() {
        assert!(!parse(MINIMAL).expect("valid").telemetry.otlp.enabled());
        let env = |k: &str| (k == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://collector:4318/".to_owned());
        let cfg = Config::parse(MINIMAL, Path::new("test.toml"), &env).expect("valid");
        assert!(cfg.telemetry.otlp.enabled());
        assert_eq!(cfg.telemetry.otlp.traces_url(), "http://collector:4318/v1/traces");
        let text =
            format!("{MINIMAL}\n[telemetry.otlp]\nendpoint = \"https://otel.example/v1/traces\"\nsample_ratio = 0.25");
        let otlp = parse(&text).expect("valid").telemetry.otlp;
        assert_eq!((otlp.traces_url().as_str(), otlp.sample_ratio), ("https://otel.example/v1/traces", 0.25));
    }

    #[test]
    fn cost_is_rounded_up_micro_usd() {
        let sonnet = default_prices()["claude-sonnet-4-20250514"];
        let usage = crate::llm::Usage { input_tokens: 1_000, output_tokens: 100, ..Default::default() };
        // 1000 × 3 + 100 × 15 = 4500 micro-USD
        assert_eq!(sonnet.cost(&usage), MicroUsd::new(4_500));
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/agentfleet.toml");
        let cfg = Config::load(&path, &|_| None).expect("example config is valid");
        let support = cfg.agent("support").expect("support agent");
        let tools: Vec<&str> = support.tools.iter().map(Name::as_str).collect();
        assert_eq!(
            tools,
            ["search_knowledge_base", "lookup_customer", "create_ticket", "issue_refund", "escalate_to_human"]
        );
    }
}
