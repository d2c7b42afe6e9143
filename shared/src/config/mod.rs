//! Configuration: one TOML file plus environment overrides.
//!
//! The file defines the agents, their tools, model prices and the connection settings. The official
//! SDKs' variable names override the file (`AMQP_URL`, `REDIS_URL`, `ANTHROPIC_API_KEY`,
//! `ANTHROPIC_BASE_URL`), so the same file works locally and in Kubernetes. Parsing takes the
//! environment as a lookup function, so tests never touch the process environment.
//!
//! Every error names the file, the field and the problem: `config error in agentfleet.toml: field
//! `agents.support.model`: no price for model ...`.
//!
//! This module is a leaf: it uses only the `domain` module, so every other module may read the config
//! without an import cycle. The sections live in submodules and are re-exported here.

mod agents;
mod auth;
mod infra;
mod providers;
mod tools;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;
use thiserror::Error;

pub use agents::{
    AgentConfig, BudgetConfig, CacheTtl, OnDailyCap, OnDeadline, OnModelFailure, PromptCache, TenantConfig, WaitConfig,
};
pub use auth::{AuthConfig, Role, TenantDefaults, TokenConfig};
pub use infra::{
    AmqpConfig, DeadLettersConfig, DispatcherConfig, OtlpConfig, RedisConfig, RedisTarget, SessionsConfig,
    TelemetryConfig, WebhooksConfig, WorkerConfig,
};
pub use providers::{
    AdaptiveRate, AnthropicConfig, AuthStyle, BreakerConfig, DEFAULT_MIN_CACHE_TOKENS, HttpVersion, OpenAiConfig,
    Price, ProviderConfig, RAMP, RateLimit, default_prices,
};
pub use tools::{ESCALATE_TO_HUMAN, HandlerConfig, ToolConfig};

use crate::domain::{ApprovalRuleError, Name, ParseError, Provider};
use agents::validate_budget;
use auth::validate_auth;
use providers::check_price;
use tools::validate_tool;

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

/// What is wrong with a field's value.
#[derive(Debug, Error)]
pub enum Problem {
    /// Not a URL at all.
    #[error("`{url}` is not a URL: {error}")]
    NotAUrl {
        /// The value.
        url: String,
        /// Why it does not parse.
        error: url::ParseError,
    },
    /// A URL with a scheme this field does not take.
    #[error("`{url}` must use one of the schemes {schemes:?}")]
    Scheme {
        /// The value.
        url: String,
        /// The schemes allowed.
        schemes: &'static [&'static str],
    },
    /// A count or duration below its minimum.
    #[error("must be at least {0}")]
    AtLeast(u64),
    /// A sampling ratio outside 0.0..=1.0.
    #[error("must be a number from 0.0 to 1.0")]
    NotAFraction,
    /// An alert threshold outside (0, 1].
    #[error("must be a fraction in (0, 1]")]
    NotAnAlertFraction,
    /// A negative or non-finite price.
    #[error("prices must be non-negative numbers of USD per million tokens")]
    NegativePrice,
    /// An amount of money that is not positive.
    #[error("must be a positive number of USD")]
    NotPositiveUsd,
    /// A per-step cost cap above the session's.
    #[error("must not exceed max_cost_usd")]
    StepCostOverTotal,
    /// A zero token limit.
    #[error("token limits must be at least 1")]
    ZeroTokenLimit,
    /// No `[agents]` at all.
    #[error("at least one agent is required")]
    NoAgents,
    /// An agent's model has no price.
    #[error("no price for model `{0}`: add `[prices.\"{0}\"]`")]
    NoPrice(String),
    /// An agent names a tool that is not defined.
    #[error("no tool named `{0}` in [tools]")]
    UnknownTool(Name),
    /// Escalations can only fail at their deadline.
    #[error("a wait for a human reply can only `fail` at its deadline")]
    HumanWaitMustFail,
    /// A tool's fallback that is itself or not a tool.
    #[error("`{0}` must be another tool in [tools]")]
    BadFallback(Name),
    /// An input schema that does not describe an object.
    #[error("must be a JSON Schema with `type = \"object\"`")]
    NotAnObjectSchema,
    /// An input schema that is not a JSON Schema.
    #[error("not a valid JSON Schema: {0}")]
    BadSchema(String),
    /// An HTTP method that is not one.
    #[error("`{0}` is not an HTTP method")]
    BadMethod(String),
    /// A name (prefix) of the wrong shape.
    #[error(transparent)]
    Name(#[from] ParseError),
    /// An environment variable that is not set.
    #[error("the environment variable `{0}` is not set")]
    EnvUnset(String),
    /// A file that cannot be read.
    #[error("cannot read {0}")]
    Unreadable(String),
    /// A token with no hash source, or more than one.
    #[error("set exactly one of `sha256`, `sha256_env`, `sha256_file`")]
    OneHashSource,
    /// A hash that is not 64 hex digits.
    #[error("must be a SHA-256 as 64 hex digits (the output of sha256sum)")]
    NotASha256,
    /// A token without roles.
    #[error("must name at least one of submit, read, operate, approve, admin")]
    NoRoles,
    /// A name used twice.
    #[error("`{0}` is used twice")]
    Duplicate(String),
    /// A required field that is absent.
    #[error("is required: {0}")]
    Required(&'static str),
    /// An approval rule that does not parse.
    #[error(transparent)]
    ApprovalRule(#[from] ApprovalRuleError),
    /// A callback prefix that could be extended to another host or that carries userinfo.
    #[error("`{0}` must be an http(s) URL without userinfo, query or fragment, ending in `/`")]
    BadCallbackPrefix(String),
    /// A Redis Cluster URL that does not parse.
    #[error("`{0}` must be `redis+cluster://[user:password@]host:port[,host:port…]` (or `rediss+cluster://`)")]
    ClusterUrl(String),
    /// Cluster seed nodes for a single Redis.
    #[error("seed nodes need `cluster = true` (or a `redis+cluster://` url)")]
    ClusterNodesWithoutCluster,
    /// Cluster seed nodes of which some use TLS and some do not.
    #[error("the cluster's seed nodes must all use `redis://` or all `rediss://`")]
    MixedTls,
    /// A system prompt over the agent's token limit.
    #[error(
        "is {tokens} tokens ({how}), over the limit of {limit}: shorten it, or allow more with `max_system_prompt_tokens`"
    )]
    SystemPromptTooLong {
        /// Its size in tokens.
        tokens: u64,
        /// The agent's limit.
        limit: u32,
        /// How it was counted.
        how: &'static str,
    },
}

/// A field that failed validation: its dotted path (relative to where it was checked) and why.
#[derive(Debug, Error)]
#[error("field `{field}`: {problem}")]
struct Invalid {
    field: String,
    problem: Problem,
}

impl Invalid {
    fn new(field: impl Into<String>, problem: Problem) -> Self {
        Self { field: field.into(), problem }
    }

    /// The same problem, with the field's path under `prefix`.
    fn within(self, prefix: &str) -> Self {
        Self { field: format!("{prefix}.{}", self.field), problem: self.problem }
    }
}

/// How [`estimate_tokens`] counts, as error messages say it.
pub const ESTIMATE_METHOD: &str = "estimated at one token per 4 bytes";

/// An estimate of the tokens of `text` where the model's tokenizer is out of reach: one per 4 bytes
/// of UTF-8, rounded up. English prose runs about 4 characters a token, so this is close for it and
/// high for code or non-Latin scripts, which use more bytes per character. The workers count with
/// the API's `count_tokens` endpoint when they have an API key.
pub fn estimate_tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4)
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
    pub openai: OpenAiConfig,
    /// Worker settings.
    #[serde(default)]
    pub worker: WorkerConfig,
    /// Dispatcher settings.
    #[serde(default)]
    pub dispatcher: DispatcherConfig,
    /// Retention of finished sessions.
    #[serde(default)]
    pub sessions: SessionsConfig,
    /// The dead-letter store the `/v1/dlq` API reads.
    #[serde(default)]
    pub dead_letters: DeadLettersConfig,
    /// Prices per model in USD per million tokens; merged over the built-in defaults.
    #[serde(default)]
    pub prices: BTreeMap<String, Price>,
    /// Tools that agents may use, by name.
    #[serde(default)]
    pub tools: BTreeMap<Name, ToolConfig>,
    /// The agents, by name.
    pub agents: BTreeMap<Name, AgentConfig>,
    /// Tenants with their own limits, by name (the tenant comes from the caller's token).
    #[serde(default)]
    pub tenants: BTreeMap<Name, TenantConfig>,
    /// The limits of tenants not in `[tenants]`; `daily_cap_usd` is required.
    #[serde(default)]
    pub tenant_defaults: TenantDefaults,
    /// API tokens (`[[auth.tokens]]`) and the tenants of AMQP publishers (`[auth] amqp_users`).
    #[serde(default)]
    pub auth: AuthConfig,
    /// Fleet-wide breaker and rate limits per model provider (`anthropic`, `openai`).
    #[serde(default)]
    pub providers: BTreeMap<Provider, ProviderConfig>,
    /// Signed webhooks of lifecycle events (the `webhooks` module).
    #[serde(default)]
    pub webhooks: WebhooksConfig,
    /// Logging, tracing and redaction.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

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
            // An error of the file as a whole (a missing table) has the empty path, shown as `.`.
            let field = match e.path().to_string() {
                root if root == "." => "(file)".to_owned(),
                path => path,
            };
            err(field, e.into_inner().message().trim().to_owned())
        })?;
        cfg.apply_env(env);
        validate_auth(&mut cfg.auth, env).map_err(|e| err(e.field, e.problem.to_string()))?;
        cfg.prices = default_prices().into_iter().chain(std::mem::take(&mut cfg.prices)).collect();
        cfg.validate().map_err(|e| err(e.field, e.problem.to_string()))?;
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
        for tenant in self.tenants.values_mut() {
            let secret = tenant.webhook_secret_env.as_deref().and_then(env).filter(|k| !k.is_empty());
            tenant.webhook_secret = secret.map(SecretString::from);
        }
    }

    fn validate(&self) -> Result<(), Invalid> {
        check_url(&self.amqp.url, &["amqp", "amqps"]).map_err(|p| Invalid::new("amqp.url", p))?;
        self.redis.validate().map_err(|e| e.within("redis"))?;
        check_url(&self.anthropic.base_url, &["http", "https"]).map_err(|p| Invalid::new("anthropic.base_url", p))?;
        check_url(&self.openai.base_url, &["http", "https"]).map_err(|p| Invalid::new("openai.base_url", p))?;
        Name::parse(&self.amqp.prefix).map_err(|e| Invalid::new("amqp.prefix", e.into()))?;
        self.amqp.validate().map_err(|e| e.within("amqp"))?;
        self.dead_letters.validate().map_err(|e| e.within("dead_letters"))?;
        Name::parse(&self.redis.key_prefix).map_err(|e| Invalid::new("redis.key_prefix", e.into()))?;
        if self.worker.concurrency == 0 {
            return Err(Invalid::new("worker.concurrency", Problem::AtLeast(1)));
        }
        if self.worker.lease_ms < 1_000 {
            return Err(Invalid::new("worker.lease_ms", Problem::AtLeast(1_000)));
        }
        if self.sessions.retention_ms == 0 {
            return Err(Invalid::new("sessions.retention_ms", Problem::AtLeast(1)));
        }
        for (name, price) in &self.prices {
            check_price(price).map_err(|p| Invalid::new(format!("prices.{name}"), p))?;
        }
        for (name, tool) in &self.tools {
            validate_tool(tool, name, &self.tools).map_err(|e| e.within(&format!("tools.{name}")))?;
        }
        if self.agents.is_empty() {
            return Err(Invalid::new("agents", Problem::NoAgents));
        }
        for (name, agent) in &self.agents {
            self.validate_agent(agent).map_err(|e| e.within(&format!("agents.{name}")))?;
        }
        self.telemetry.otlp.validate().map_err(|e| e.within("telemetry.otlp"))?;
        for (name, tenant) in &self.tenants {
            if let Some(cap) = tenant.daily_cap_usd
                && (!cap.is_finite() || cap <= 0.0)
            {
                return Err(Invalid::new(format!("tenants.{name}.daily_cap_usd"), Problem::NotPositiveUsd));
            }
            for (i, prefix) in tenant.callback_prefixes.iter().enumerate() {
                check_prefix(prefix).map_err(|p| Invalid::new(format!("tenants.{name}.callback_prefixes[{i}]"), p))?;
            }
            if tenant.max_live_sessions == Some(0) {
                return Err(Invalid::new(format!("tenants.{name}.max_live_sessions"), Problem::AtLeast(1)));
            }
        }
        self.validate_tenant_defaults()
    }

    fn validate_tenant_defaults(&self) -> Result<(), Invalid> {
        let d = &self.tenant_defaults;
        let Some(cap) = d.daily_cap_usd else {
            let why = "the daily cap of tenants without their own (there is no unlimited)";
            return Err(Invalid::new("tenant_defaults.daily_cap_usd", Problem::Required(why)));
        };
        if !cap.is_finite() || cap <= 0.0 {
            return Err(Invalid::new("tenant_defaults.daily_cap_usd", Problem::NotPositiveUsd));
        }
        if d.max_live_sessions == Some(0) {
            return Err(Invalid::new("tenant_defaults.max_live_sessions", Problem::AtLeast(1)));
        }
        if self.dispatcher.request_timeout_ms == 0 {
            return Err(Invalid::new("dispatcher.request_timeout_ms", Problem::AtLeast(1)));
        }
        Ok(())
    }

    fn validate_agent(&self, agent: &AgentConfig) -> Result<(), Invalid> {
        if !self.prices.contains_key(&agent.model) {
            return Err(Invalid::new("model", Problem::NoPrice(agent.model.clone())));
        }
        for (i, tool) in agent.tools.iter().enumerate() {
            if !self.tools.contains_key(tool) && tool.as_str() != ESCALATE_TO_HUMAN {
                return Err(Invalid::new(format!("tools[{i}]"), Problem::UnknownTool(tool.clone())));
            }
        }
        if agent.max_tokens == 0 {
            return Err(Invalid::new("max_tokens", Problem::AtLeast(1)));
        }
        if let Some(url) = &agent.webhook_url {
            check_url(url, &["http", "https"]).map_err(|p| Invalid::new("webhook_url", p))?;
        }
        if agent.human_wait.on_deadline != OnDeadline::Fail {
            return Err(Invalid::new("human_wait.on_deadline", Problem::HumanWaitMustFail));
        }
        let tokens = estimate_tokens(&agent.system_prompt);
        if tokens > u64::from(agent.max_system_prompt_tokens) {
            let problem =
                Problem::SystemPromptTooLong { tokens, limit: agent.max_system_prompt_tokens, how: ESTIMATE_METHOD };
            return Err(Invalid::new("system_prompt", problem));
        }
        validate_budget(&agent.budget).map_err(|e| e.within("budget"))
    }

    /// The settings of `tenant`, if it has any.
    pub fn tenant(&self, tenant: &str) -> Option<&TenantConfig> {
        self.tenants.iter().find(|(n, _)| n.as_str() == tenant).map(|(_, t)| t)
    }

    /// The daily cap of `tenant`, USD: its own, else `tenant_defaults.daily_cap_usd`.
    pub fn tenant_daily_cap(&self, tenant: &str) -> f64 {
        let own = self.tenants.iter().find(|(n, _)| n.as_str() == tenant).and_then(|(_, t)| t.daily_cap_usd);
        // Validation makes the default present; the fallback is never reached.
        own.or(self.tenant_defaults.daily_cap_usd).unwrap_or(0.0)
    }

    /// The most live sessions `tenant` may have: its own limit, else the default (1000).
    pub fn tenant_max_live(&self, tenant: &str) -> u32 {
        let own = self.tenants.iter().find(|(n, _)| n.as_str() == tenant).and_then(|(_, t)| t.max_live_sessions);
        own.or(self.tenant_defaults.max_live_sessions).unwrap_or(1000)
    }

    /// Every secret value this config uses, for redaction: the API keys, tool header values, the
    /// webhook signing secrets (the fleet's and each tenant's) and the passwords in the RabbitMQ and
    /// Redis URLs (as written and percent-decoded).
    pub fn secrets(&self, env: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
        use secrecy::ExposeSecret;
        let keys = [&self.anthropic.api_key, &self.openai.api_key, &self.webhooks.secret];
        let tenant_keys = self.tenants.values().map(|t| &t.webhook_secret);
        let mut out: Vec<String> =
            keys.into_iter().chain(tenant_keys).flatten().map(|k| k.expose_secret().to_owned()).collect();
        for tool in self.tools.values() {
            if let HandlerConfig::Http { headers_from_env, .. } = &tool.handler {
                out.extend(headers_from_env.values().filter_map(|var| env(var)));
            }
        }
        out.extend(url_password(&self.amqp.url));
        out.extend(self.redis.node_urls().iter().flat_map(|u| url_password(u)));
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

/// A callback prefix: an http(s) URL without userinfo whose path ends in `/`, so that
/// `https://hooks.acme.example/` cannot be extended to `https://hooks.acme.example.evil.test/`.
fn check_prefix(prefix: &str) -> Result<(), Problem> {
    check_url(prefix, &["http", "https"])?;
    let parsed = url::Url::parse(prefix).map_err(|error| Problem::NotAUrl { url: prefix.to_owned(), error })?;
    let userinfo = !parsed.username().is_empty() || parsed.password().is_some();
    let plain = parsed.query().is_none() && parsed.fragment().is_none() && parsed.path().ends_with('/');
    if userinfo || !plain || !prefix.ends_with('/') {
        return Err(Problem::BadCallbackPrefix(prefix.to_owned()));
    }
    Ok(())
}

/// The password in `url`, as written and, when it has escapes, percent-decoded.
fn url_password(url: &str) -> Vec<String> {
    let Some(written) = url::Url::parse(url).ok().and_then(|u| u.password().map(str::to_owned)) else {
        return Vec::new();
    };
    let decoded = percent_decoded(&written);
    if decoded == written { vec![written] } else { vec![written, decoded] }
}

/// `text` with each `%XX` escape decoded (invalid escapes and bytes stay as they are).
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks `url`'s form and scheme. A problem shows the URL without its password or query.
fn check_url(url: &str, schemes: &'static [&'static str]) -> Result<(), Problem> {
    let shown = || crate::scrub::urls_in(url);
    let parsed = url::Url::parse(url).map_err(|error| Problem::NotAUrl { url: shown(), error })?;
    if schemes.contains(&parsed.scheme()) { Ok(()) } else { Err(Problem::Scheme { url: shown(), schemes }) }
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

        [tenant_defaults]
        daily_cap_usd = 100.0
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
    fn model_clients_speak_auto_http_unless_told_and_a_bad_version_names_the_field() {
        let cfg = parse(MINIMAL).expect("valid");
        assert_eq!((cfg.anthropic.http, cfg.openai.http), (HttpVersion::Auto, HttpVersion::Auto));
        let told = format!("{MINIMAL}\n[anthropic]\nhttp = \"http2\"\n\n[openai]\nhttp = \"http1\"\n");
        let cfg = parse(&told).expect("valid");
        assert_eq!((cfg.anthropic.http, cfg.openai.http), (HttpVersion::Http2, HttpVersion::Http1));
        assert!(format!("{:?}", cfg.anthropic).contains("http: Http2"));
        for bad in ["\"h2\"", "\"HTTP2\"", "2"] {
            let e = parse(&format!("{MINIMAL}\n[anthropic]\nhttp = {bad}\n")).expect_err(bad);
            assert_eq!(e.field, "anthropic.http", "{e}");
        }
        let e = parse(&format!("{MINIMAL}\n[openai]\nhttp = \"h2c\"\n")).expect_err("h2c");
        assert_eq!(
            e.to_string(),
            "config error in test.toml: field `openai.http`: unknown variant `h2c`, expected one of `auto`, `http1`, \
             `http2`"
        );
    }

    #[test]
    fn finished_sessions_are_kept_thirty_days_unless_told_and_never_zero() {
        assert_eq!(parse(MINIMAL).expect("valid").sessions.retention_ms, 30 * 24 * 3_600_000);
        let short = format!("{MINIMAL}\n[sessions]\nretention_ms = 1500\n");
        assert_eq!(parse(&short).expect("valid").sessions.retention_ms, 1_500);
        let zero = format!("{MINIMAL}\n[sessions]\nretention_ms = 0\n");
        assert_eq!(parse(&zero).expect_err("zero").field, "sessions.retention_ms");
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

        let e = parse("[tenant_defaults]\ndaily_cap_usd = 1.0").expect_err("no agents");
        assert_eq!((e.field.as_str(), e.problem.as_str()), ("(file)", "missing field `agents`"));
    }

    #[test]
    fn error_texts_are_stable() {
        let no_price = MINIMAL.replace("claude-sonnet-4-5", "gpt-imaginary");
        assert_eq!(
            parse(&no_price).expect_err("no price").to_string(),
            "config error in test.toml: field `agents.support.model`: no price for model `gpt-imaginary`: add \
             `[prices.\"gpt-imaginary\"]`"
        );
        let bad_rule = MINIMAL.replace("handler = {", "approval_rule = \"amount ~ 3\"\nhandler = {");
        let e = parse(&bad_rule).expect_err("bad rule");
        assert_eq!(
            (e.field.as_str(), e.problem.as_str()),
            ("tools.lookup.approval_rule", "`~` is not one of > >= < <= == !=")
        );
        let bad_url = format!("{MINIMAL}\n[amqp]\nurl = \"http://rabbit\"");
        let e = parse(&bad_url).expect_err("bad scheme");
        assert_eq!(e.problem, r#"`http://rabbit` must use one of the schemes ["amqp", "amqps"]"#);
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
    fn amqp_users_map_to_tenants() {
        assert!(parse(MINIMAL).expect("valid").auth.amqp_users.is_empty());
        let cfg = parse(&format!("{MINIMAL}\n[auth.amqp_users]\nguest = \"acme\"")).expect("valid");
        assert_eq!(cfg.auth.amqp_tenant("guest").map(|t| t.as_str()), Some("acme"));
        assert!(cfg.auth.amqp_tenant("bob").is_none());
        let e = parse(&format!("{MINIMAL}\n[auth]\namqp_users = {{ guest = \"no way\" }}")).expect_err("bad tenant");
        assert_eq!(e.field, "auth.amqp_users.guest");
    }

    #[test]
    fn durability_is_asked_for_in_the_redis_table() {
        assert!(!parse(MINIMAL).expect("valid").redis.require_durable);
        let cfg = parse(&format!("{MINIMAL}\n[redis]\nrequire_durable = true")).expect("valid");
        assert!(cfg.redis.require_durable);
    }

    #[test]
    fn secrets_cover_broker_and_redis_passwords_and_webhook_secrets() {
        let text = format!(
            "{MINIMAL}\n[amqp]\nurl = \"amqp://fleet:amqp%2Fpass@mq:5672/%2f\"\n\
             [redis]\nurl = \"redis://:redis-pass-1@cache:6379\"\n\
             [tenants.acme]\nwebhook_secret_env = \"ACME_HOOK_SECRET\""
        );
        let env = |k: &str| match k {
            "AGENTFLEET_WEBHOOK_SECRET" => Some("fleet-hook-secret".to_owned()),
            "ACME_HOOK_SECRET" => Some("acme-hook-secret".to_owned()),
            _ => None,
        };
        let cfg = Config::parse(&text, Path::new("test.toml"), &env).expect("valid");
        let secrets = cfg.secrets(&env);
        for s in ["amqp%2Fpass", "amqp/pass", "redis-pass-1", "fleet-hook-secret", "acme-hook-secret"] {
            assert!(secrets.iter().any(|x| x == s), "{s} is missing from {secrets:?}");
        }
    }

    #[test]
    fn a_cluster_is_named_by_its_url_or_by_the_cluster_flag() {
        let target = |redis: &str| parse(&format!("{MINIMAL}\n[redis]\n{redis}")).map(|c| c.redis.target());
        assert_eq!(target("").expect("valid").expect("target"), RedisTarget::Single("redis://127.0.0.1:6379".into()));
        let by_url = target("url = \"rediss+cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2:7001/?protocol=3\"");
        assert_eq!(
            by_url.expect("valid").expect("target"),
            RedisTarget::Cluster(vec![
                "rediss://u:p%40ss@10.0.0.1:7000/?protocol=3".into(),
                "rediss://u:p%40ss@10.0.0.2:7001/?protocol=3".into()
            ])
        );
        let by_flag = target("url = \"redis://a:7000\"\ncluster = true\ncluster_nodes = [\"redis://b:7000\"]");
        assert_eq!(
            by_flag.expect("valid").expect("target"),
            RedisTarget::Cluster(vec!["redis://a:7000".into(), "redis://b:7000".into()])
        );
        let env = |k: &str| (k == "REDIS_URL").then(|| "redis+cluster://c1:7101,c2:7102".to_owned());
        let cfg = Config::parse(MINIMAL, Path::new("test.toml"), &env).expect("valid");
        assert_eq!(
            cfg.redis.target().expect("target"),
            RedisTarget::Cluster(vec!["redis://c1:7101".into(), "redis://c2:7102".into()])
        );
    }

    #[test]
    fn bad_cluster_settings_name_the_field() {
        let field = |redis: &str| parse(&format!("{MINIMAL}\n[redis]\n{redis}")).expect_err("invalid").field;
        assert_eq!(field("url = \"redis+cluster://:pw@a:1,,b:2\""), "redis.url");
        assert_eq!(field("url = \"redis+cluster://\""), "redis.url");
        assert_eq!(field("cluster_nodes = [\"redis://b:7000\"]"), "redis.cluster_nodes");
        assert_eq!(field("cluster = true\ncluster_nodes = [\"http://b:7000\"]"), "redis.cluster_nodes[0]");
        assert_eq!(field("cluster = true\ncluster_nodes = [\"rediss://b:7000\"]"), "redis.cluster_nodes");
        let e = parse(&format!("{MINIMAL}\n[redis]\nurl = \"redis+cluster://:hunter22@a:1,,b:2\"")).expect_err("bad");
        assert!(!e.to_string().contains("hunter22") && e.to_string().contains("redis+cluster://"), "{e}");
    }

    #[test]
    fn secrets_cover_the_password_of_a_cluster_url() {
        let text = format!("{MINIMAL}\n[redis]\nurl = \"redis+cluster://:cluster-pass-1@a:7000,b:7000\"");
        let secrets = parse(&text).expect("valid").secrets(&no_env);
        assert!(secrets.iter().any(|x| x == "cluster-pass-1"), "{secrets:?}");
    }

    #[test]
    fn a_bad_url_is_shown_without_its_password() {
        let e = parse(&format!("{MINIMAL}\n[redis]\nurl = \"http://:hunter22@cache:6379/?k=v\"")).expect_err("scheme");
        assert_eq!(e.field, "redis.url");
        assert!(!e.to_string().contains("hunter22") && !e.to_string().contains("k=v"), "{e}");
    }

    #[test]
    fn percent_escapes_decode() {
        assert_eq!(percent_decoded("a%2Fb%zz%4"), "a/b%zz%4");
        assert_eq!(percent_decoded("%+1x"), "%+1x");
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local/agentfleet.toml");
        let hash = |k: &str| (k == "AGENTFLEET_ADMIN_TOKEN_SHA256").then(|| "ab".repeat(32));
        let cfg = Config::load(&path, &hash).expect("example config is valid");
        assert_eq!(cfg.auth.tokens.len(), 1);
        let support = cfg.agent("support").expect("support agent");
        let tools: Vec<&str> = support.tools.iter().map(Name::as_str).collect();
        assert_eq!(
            tools,
            [
                "search_knowledge_base",
                "lookup_customer",
                "check_order_status",
                "create_ticket",
                "issue_refund",
                "escalate_to_human"
            ]
        );
    }
}
