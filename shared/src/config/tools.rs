//! The tools agents may use: what the model sees and how each runs.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::providers::BreakerConfig;
use super::{Invalid, Problem, check_url};
use crate::domain::{ApprovalRule, Name};

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
    /// The tool's fleet-wide circuit breaker. Default: [`BreakerConfig::default`].
    #[serde(default)]
    pub breaker: BreakerConfig,
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

/// The name of the built-in escalation tool.
pub const ESCALATE_TO_HUMAN: &str = "escalate_to_human";

pub(super) fn validate_tool(tool: &ToolConfig, name: &Name, tools: &BTreeMap<Name, ToolConfig>) -> Result<(), Invalid> {
    if let Some(rule) = &tool.approval_rule {
        ApprovalRule::parse(rule).map_err(|e| Invalid::new("approval_rule", e.into()))?;
    }
    if let Some(fallback) = &tool.fallback
        && (fallback == name || !tools.contains_key(fallback))
    {
        return Err(Invalid::new("fallback", Problem::BadFallback(fallback.clone())));
    }
    if tool.input_schema.get("type").and_then(|t| t.as_str()) != Some("object") {
        return Err(Invalid::new("input_schema", Problem::NotAnObjectSchema));
    }
    jsonschema::validator_for(&tool.input_schema)
        .map_err(|e| Invalid::new("input_schema", Problem::BadSchema(e.to_string())))?;
    match &tool.handler {
        HandlerConfig::Http { url, method, timeout_ms, .. } => {
            check_url(url, &["http", "https"]).map_err(|p| Invalid::new("handler.url", p))?;
            reqwest::Method::from_bytes(method.as_bytes())
                .map_err(|_| Invalid::new("handler.method", Problem::BadMethod(method.clone())))?;
            if *timeout_ms == 0 {
                return Err(Invalid::new("handler.timeout_ms", Problem::AtLeast(1)));
            }
            Ok(())
        }
        HandlerConfig::Builtin => Ok(()),
    }
}
