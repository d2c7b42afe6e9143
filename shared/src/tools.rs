//! Tools: what the model may call, checked against its JSON Schema before anything runs.
//!
//! A failure of any kind — an unknown tool, input that breaks the schema or is too large, an HTTP
//! error, a timeout — becomes a `tool_result` with `is_error: true` that tells the model what went
//! wrong, and the session goes on. HTTP tools get `Idempotency-Key: <session_id>:<tool_use_id>`, so a
//! call repeated after a crash can be recognised by the service.
//!
//! Retries: timeouts, connection errors, 408, 429 and 5xx are retried with exponential backoff and
//! jitter (`retry-after` honoured), in-process only while the waits fit `max_inline_wait`; a longer
//! wait makes the call [`ToolRun::Later`], which the step sends through the delay queues. Other 4xx
//! are never retried. Each outcome carries its [`Health`] for the fleet-wide circuit breaker.
//!
//! A response body is read up to `max_result_bytes` and no further ([`crate::http_body`]); a
//! longer one reaches the model cut, with a marker that says how long it was.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::value::RawValue;
use thiserror::Error;

use crate::breaker::BreakerConfig;
use crate::config::{ESCALATE_TO_HUMAN, HandlerConfig, ToolConfig};
pub use crate::domain::ApprovalRule;
use crate::domain::Name;
use crate::http_body::{CappedBody, lossy_text, read_capped};
use crate::llm::{ToolOutcome, ToolUse};
use crate::scrub;
use crate::telemetry::metric;

/// A tool set that cannot be built.
#[derive(Debug, Error)]
#[error("tool `{tool}`: {problem}")]
pub struct ToolSetupError {
    tool: String,
    problem: ToolProblem,
}

/// Why one tool cannot be built.
#[derive(Debug, Error)]
pub enum ToolProblem {
    /// The input schema does not compile.
    #[error("{0}")]
    Schema(String),
    /// A `builtin` handler with a name the worker does not have.
    #[error("there is no built-in tool named `{0}`")]
    NoSuchBuiltin(Name),
    /// The HTTP client cannot be built.
    #[error("{0}")]
    Client(reqwest::Error),
    /// The HTTP method is not one.
    #[error("{0}")]
    Method(String),
    /// A header's environment variable is not set.
    #[error("header `{header}` needs the environment variable `{var}`")]
    MissingEnv {
        /// The header.
        header: String,
        /// The variable.
        var: String,
    },
    /// A header name that is not one.
    #[error("`{0}` is not a header name")]
    HeaderName(String),
    /// A header value (read from this variable) that cannot be sent.
    #[error("`{0}` is not a valid header value")]
    HeaderValue(String),
    /// The approval rule does not parse.
    #[error(transparent)]
    ApprovalRule(#[from] crate::domain::ApprovalRuleError),
    /// The definitions cannot be serialized.
    #[error("{0}")]
    Definitions(serde_json::Error),
}

/// Bounds that apply to every tool of a worker.
#[derive(Debug, Clone, Copy)]
pub struct ToolLimits {
    /// The longest in-process wait for retries of one call.
    pub max_inline_wait: Duration,
    /// Response bodies longer than this are cut, with a marker: reading stops there, so a long or
    /// endless body never takes more memory than this.
    pub max_result_bytes: usize,
    /// Inputs longer than this (as JSON) are refused.
    pub max_input_bytes: usize,
}

impl Default for ToolLimits {
    fn default() -> Self {
        Self { max_inline_wait: Duration::from_secs(2), max_result_bytes: 32 * 1024, max_input_bytes: 256 * 1024 }
    }
}

/// What a call says about the tool's health, for its circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// It answered (a 4xx refusal too: the service is up).
    Up,
    /// It timed out, was unreachable, or answered 5xx (after the retries).
    Down,
    /// The tool was not called (unknown tool, bad input): says nothing.
    Unrated,
}

/// What running a tool call came to.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolRun {
    /// A result for the model (possibly an error result), and what it says of the tool's health.
    Done(ToolOutcome, Health),
    /// The built-in `escalate_to_human`: pause the session for a human.
    Escalate(serde_json::Value),
    /// The tool asked for a wait longer than the in-process bound: retry the step later.
    Later(Duration, String),
    /// The call was not run: the tool that would run it (a fallback) needs a person's approval.
    NeedsApproval {
        /// The tool that needs approval.
        tool: String,
        /// Why.
        reason: String,
    },
}

enum Handler {
    Http { client: reqwest::Client, url: String, method: reqwest::Method, headers: HeaderMap },
    Escalate,
}

struct Tool {
    validator: jsonschema::Validator,
    handler: Handler,
    retries: u32,
    backoff: Duration,
    breaker: BreakerConfig,
    fallback: Option<String>,
    approval: Approval,
}

/// When a tool's calls wait for a person.
#[derive(Debug, Clone)]
enum Approval {
    Never,
    Always,
    When(ApprovalRule),
}

/// The tools of one agent, with the JSON sent to the model prepared once.
pub struct ToolSet {
    tools: HashMap<String, Tool>,
    definitions: Box<RawValue>,
    limits: ToolLimits,
}

/// The built-in escalation tool's default definition.
pub fn escalate_definition() -> ToolConfig {
    ToolConfig {
        description: "Use this when the customer asks for a human, for a refund, or when you cannot resolve \
                      the request with the other tools. Hand over with a short reason and a summary."
            .into(),
        input_schema: serde_json::json!({
            "type": "object",
            "properties": {
                "reason": {"type": "string", "description": "Why a human is needed."},
                "summary": {"type": "string", "description": "What happened so far."},
                "suggested_team": {"type": "string", "enum": ["billing", "engineering", "account_management"]}
            },
            "required": ["reason", "summary"]
        }),
        handler: HandlerConfig::Builtin,
        retries: 0,
        retry_backoff_ms: 0,
        breaker: BreakerConfig::default(),
        fallback: None,
        requires_approval: false,
        approval_rule: None,
    }
}

/// The Messages API `tools` array of the tools `names`, as sent.
pub fn definitions(names: &[Name], defs: &BTreeMap<Name, ToolConfig>) -> Result<Box<RawValue>, serde_json::Error> {
    let definitions: Vec<serde_json::Value> = names
        .iter()
        .map(|name| {
            let def = defs.get(name).cloned().unwrap_or_else(escalate_definition);
            serde_json::json!({
                "name": name.as_str(),
                "description": def.description,
                "input_schema": def.input_schema,
            })
        })
        .collect();
    serde_json::value::to_raw_value(&definitions)
}

impl ToolSet {
    /// Builds the tools `names` from `defs`, reading header values from `env`.
    pub fn build(
        names: &[Name],
        defs: &BTreeMap<Name, ToolConfig>,
        env: &dyn Fn(&str) -> Option<String>,
        limits: ToolLimits,
    ) -> Result<Self, ToolSetupError> {
        let mut tools = HashMap::new();
        for name in names {
            let def = defs.get(name).cloned().unwrap_or_else(escalate_definition);
            let err = |problem: ToolProblem| ToolSetupError { tool: name.to_string(), problem };
            let validator =
                jsonschema::validator_for(&def.input_schema).map_err(|e| err(ToolProblem::Schema(e.to_string())))?;
            let handler = build_handler(name, &def.handler, env).map_err(err)?;
            let tool = Tool {
                validator,
                handler,
                retries: def.retries,
                backoff: Duration::from_millis(def.retry_backoff_ms),
                breaker: def.breaker.clone(),
                fallback: def.fallback.as_ref().filter(|f| names.contains(f)).map(Name::to_string),
                approval: match (&def.requires_approval, &def.approval_rule) {
                    (true, _) => Approval::Always,
                    (false, Some(rule)) => Approval::When(ApprovalRule::parse(rule).map_err(|e| err(e.into()))?),
                    (false, None) => Approval::Never,
                },
            };
            tools.insert(name.to_string(), tool);
        }
        let definitions = definitions(names, defs)
            .map_err(|e| ToolSetupError { tool: "(all)".into(), problem: ToolProblem::Definitions(e) })?;
        Ok(Self { tools, definitions, limits })
    }

    /// The `tools` array of the Messages API, as sent.
    pub fn definitions(&self) -> &RawValue {
        &self.definitions
    }

    /// True when the agent has no tools.
    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }

    /// True when the agent has a tool named `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tools.contains_key(name)
    }

    /// The breaker settings and the fallback of an HTTP tool; `None` for built-ins and unknown names.
    pub fn breaker(&self, name: &str) -> Option<(&BreakerConfig, Option<&str>)> {
        let tool = self.tools.get(name)?;
        matches!(tool.handler, Handler::Http { .. }).then(|| (&tool.breaker, tool.fallback.as_deref()))
    }

    /// True when some tool has a `sum(..)` approval rule, which reads the session's earlier calls.
    pub fn has_session_rules(&self) -> bool {
        self.tools.values().any(|t| matches!(&t.approval, Approval::When(r) if r.is_session_sum()))
    }

    /// Why this call must wait for a person's approval before it runs, or `None`. `session` holds
    /// the session's tool calls (earlier ones and this step's; `call` itself may be among them),
    /// which a `sum(..)` rule adds up. An unknown tool needs none: it is refused without running.
    pub fn needs_approval(&self, call: &ToolUse, session: &[ToolUse]) -> Option<String> {
        let rule = match &self.tools.get(&call.name)?.approval {
            Approval::Never => return None,
            Approval::Always => return Some(format!("`{}` always needs approval", call.name)),
            Approval::When(rule) => rule,
        };
        let others: Vec<&serde_json::Value> =
            session.iter().filter(|c| c.name == call.name && c.id != call.id).map(|c| &c.input).collect();
        rule.requires(&call.input, &others).then(|| match rule.is_session_sum() {
            true => format!("`{}` needs approval when {rule} over the session", call.name),
            false => format!("`{}` needs approval when {rule} (or when the field is not a number)", call.name),
        })
    }

    /// Validates and runs one call. Never fails: every failure is a result the model can read.
    pub async fn run(&self, call: &ToolUse, idempotency_key: &str) -> ToolRun {
        let Some(tool) = self.tools.get(&call.name) else {
            let mut known: Vec<&str> = self.tools.keys().map(String::as_str).collect();
            known.sort_unstable();
            let why = format!("Unknown tool `{}`. Available tools: {}.", call.name, known.join(", "));
            return ToolRun::Done(ToolOutcome::error(why), Health::Unrated);
        };
        if let Some(why) = self.refuse_input(tool, call) {
            return ToolRun::Done(ToolOutcome::error(why), Health::Unrated);
        }
        match &tool.handler {
            Handler::Escalate => ToolRun::Escalate(call.input.clone()),
            Handler::Http { client, url, method, headers } => {
                let req = HttpCall { client, url, method, headers, name: &call.name, tool, limits: &self.limits };
                req.run(&call.input, idempotency_key).await
            }
        }
    }

    fn refuse_input(&self, tool: &Tool, call: &ToolUse) -> Option<String> {
        if let Some(raw) = crate::llm::openai::invalid_arguments(&call.input) {
            let raw = crate::telemetry::summarize(raw, 200);
            return Some(format!(
                "The arguments for `{}` were not valid JSON: {raw}. Send the arguments as a JSON object.",
                call.name
            ));
        }
        let size = call.input.to_string().len();
        if size > self.limits.max_input_bytes {
            let limit = self.limits.max_input_bytes;
            return Some(format!("The input for `{}` is {size} bytes; the limit is {limit}. Send less.", call.name));
        }
        schema_problems(&tool.validator, &call.input)
            .map(|p| format!("Invalid input for `{}`: {p}. Fix the input and call the tool again.", call.name))
    }
}

fn build_handler(
    name: &Name,
    cfg: &HandlerConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Handler, ToolProblem> {
    match cfg {
        HandlerConfig::Builtin if name.as_str() == ESCALATE_TO_HUMAN => Ok(Handler::Escalate),
        HandlerConfig::Builtin => Err(ToolProblem::NoSuchBuiltin(name.clone())),
        HandlerConfig::Http { url, method, timeout_ms, headers_from_env } => {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_millis(*timeout_ms))
                .build()
                .map_err(ToolProblem::Client)?;
            let method =
                reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| ToolProblem::Method(e.to_string()))?;
            let headers = env_headers(headers_from_env, env)?;
            Ok(Handler::Http { client, url: url.clone(), method, headers })
        }
    }
}

fn env_headers(
    spec: &BTreeMap<String, String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<HeaderMap, ToolProblem> {
    let mut headers = HeaderMap::new();
    for (header, var) in spec {
        let missing = || ToolProblem::MissingEnv { header: header.clone(), var: var.clone() };
        let value = env(var).ok_or_else(missing)?;
        let name = HeaderName::from_bytes(header.as_bytes()).map_err(|_| ToolProblem::HeaderName(header.clone()))?;
        let mut value = HeaderValue::from_str(&value).map_err(|_| ToolProblem::HeaderValue(var.clone()))?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    Ok(headers)
}

fn schema_problems(validator: &jsonschema::Validator, input: &serde_json::Value) -> Option<String> {
    let problems: Vec<String> = validator
        .iter_errors(input)
        .take(5)
        .map(|e| {
            let at = e.instance_path().to_string();
            if at.is_empty() { e.to_string() } else { format!("{at}: {e}") }
        })
        .collect();
    (!problems.is_empty()).then(|| problems.join("; "))
}

struct HttpCall<'a> {
    client: &'a reqwest::Client,
    url: &'a str,
    method: &'a reqwest::Method,
    headers: &'a HeaderMap,
    name: &'a str,
    tool: &'a Tool,
    limits: &'a ToolLimits,
}

enum Attempt {
    Done(ToolOutcome, Health),
    Retry(String, Option<Duration>),
}

impl HttpCall<'_> {
    async fn run(&self, input: &serde_json::Value, idempotency_key: &str) -> ToolRun {
        let mut waited = Duration::ZERO;
        let mut last = String::new();
        for attempt in 0..=self.tool.retries {
            match self.attempt(input, idempotency_key).await {
                Attempt::Done(outcome, health) => return ToolRun::Done(outcome, health),
                Attempt::Retry(why, after) => {
                    last = why;
                    if attempt == self.tool.retries {
                        break;
                    }
                    let wait = after.unwrap_or_else(|| backoff(self.tool.backoff, attempt));
                    if waited + wait > self.limits.max_inline_wait {
                        return ToolRun::Later(wait, last);
                    }
                    metric::inline_retry_sleep(wait);
                    tokio::time::sleep(wait).await;
                    waited += wait;
                }
            }
        }
        let why = format!("Tool `{}` is failing: {last}. Try again later or another way.", self.name);
        ToolRun::Done(ToolOutcome::error(why), Health::Down)
    }

    async fn attempt(&self, input: &serde_json::Value, idempotency_key: &str) -> Attempt {
        let mut req = self
            .client
            .request(self.method.clone(), self.url)
            .headers(self.headers.clone())
            .header("Idempotency-Key", idempotency_key);
        req = if self.method == reqwest::Method::GET { req.query(&query_pairs(input)) } else { req.json(input) };
        let response = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Attempt::Retry("timed out".into(), None),
            Err(e) if e.is_connect() => return Attempt::Retry("connection failed".into(), None),
            Err(e) => return Attempt::Retry(format!("request failed: {}", scrub::error(&e)), None),
        };
        let status = response.status();
        let after = retry_after(response.headers());
        let body = match read_capped(response, self.limits.max_result_bytes).await {
            Ok(b) => capped_text(b, self.limits.max_result_bytes),
            Err(e) if e.is_timeout() => return Attempt::Retry("timed out reading the response".into(), None),
            Err(e) => return Attempt::Retry(format!("reading the response failed: {}", scrub::error(&e)), None),
        };
        match status.as_u16() {
            200..=299 => Attempt::Done(ToolOutcome::ok(body), Health::Up),
            408 | 429 | 500..=599 => Attempt::Retry(format!("HTTP {status}: {body}"), after),
            _ => {
                let why = format!("Tool `{}` rejected the call: HTTP {status}: {body}", self.name);
                Attempt::Done(ToolOutcome::error(why), Health::Up)
            }
        }
    }
}

fn query_pairs(input: &serde_json::Value) -> Vec<(String, String)> {
    let Some(obj) = input.as_object() else { return Vec::new() };
    obj.iter().map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_owned))).collect()
}

fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let secs: f64 = h.get("retry-after")?.to_str().ok()?.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)))
}

/// `base · 2^attempt`, plus up to as much again of jitter.
fn backoff(base: Duration, attempt: u32) -> Duration {
    let ms = (base.as_millis() as u64).max(1) << attempt.min(10);
    Duration::from_millis(ms + rand::rng().random_range(0..=ms))
}

/// A response body as the model reads it: the text, and when the body was longer than the cap, a
/// marker that says so.
///
/// Why a cut result and not an error: the service did answer, and the call may have had effects;
/// the head of a long answer (search hits, records) is usually what the model needs, and the marker
/// tells it to ask for less. An error would throw the answer away and invite a retry that gets the
/// same long body again.
fn capped_text(body: CappedBody, cap: usize) -> String {
    let text = lossy_text(&body.bytes);
    match body.cut {
        None => text,
        Some(cut) => {
            let shown = text.len();
            format!("{text}… [truncated: the first {shown} bytes of a response {} are shown]", cut.describe(cap))
        }
    }
}

/// Cuts `text` to `max` bytes on a character boundary, with a marker.
pub fn truncate(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… [truncated: {} of {} bytes shown]", &text[..cut], cut, text.len())
}

/// The tools of every agent, by agent name.
pub type AgentTools = HashMap<String, Arc<ToolSet>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<Name> {
        n.iter().map(|s| Name::parse(s).expect("name")).collect()
    }

    fn call(name: &str, input: serde_json::Value) -> ToolUse {
        ToolUse { id: "toolu_1".into(), name: name.into(), input }
    }

    #[tokio::test]
    async fn unknown_tools_and_bad_input_become_error_results() {
        let set = ToolSet::build(&names(&["escalate_to_human"]), &BTreeMap::new(), &|_| None, ToolLimits::default())
            .expect("builds");
        let ToolRun::Done(out, _) = set.run(&call("nope", serde_json::json!({})), "k").await else {
            panic!("not done")
        };
        assert!(out.is_error && out.content.contains("Unknown tool `nope`"), "{out:?}");
        let ToolRun::Done(out, _) = set.run(&call("escalate_to_human", serde_json::json!({"reason": 3})), "k").await
        else {
            panic!("not done")
        };
        assert!(out.is_error && out.content.contains("Invalid input"), "{out:?}");
        let good = serde_json::json!({"reason": "refund", "summary": "wants money back"});
        assert_eq!(set.run(&call("escalate_to_human", good.clone()), "k").await, ToolRun::Escalate(good));
    }

    #[test]
    fn definitions_are_the_messages_api_shape() {
        let set = ToolSet::build(&names(&["escalate_to_human"]), &BTreeMap::new(), &|_| None, ToolLimits::default())
            .expect("builds");
        let defs: serde_json::Value = serde_json::from_str(set.definitions().get()).expect("json");
        assert_eq!(defs[0]["name"], "escalate_to_human");
        assert_eq!(defs[0]["input_schema"]["type"], "object");
    }

    #[test]
    fn missing_header_env_is_a_setup_error() {
        let mut defs = BTreeMap::new();
        let mut headers = BTreeMap::new();
        headers.insert("Authorization".to_owned(), "KB_TOKEN".to_owned());
        defs.insert(
            Name::parse("kb").expect("name"),
            ToolConfig {
                description: "d".into(),
                input_schema: serde_json::json!({"type": "object"}),
                handler: HandlerConfig::Http {
                    url: "http://x/".into(),
                    method: "POST".into(),
                    timeout_ms: 10,
                    headers_from_env: headers,
                },
                ..escalate_definition()
            },
        );
        let e = ToolSet::build(&names(&["kb"]), &defs, &|_| None, ToolLimits::default()).err().expect("fails");
        assert!(e.to_string().contains("KB_TOKEN"), "{e}");
    }

    fn refund_tools(rule: &str) -> ToolSet {
        let mut defs = BTreeMap::new();
        let def = |rule: Option<&str>, always: bool| ToolConfig {
            description: "d".into(),
            input_schema: serde_json::json!({"type": "object"}),
            handler: HandlerConfig::Http {
                url: "http://x/".into(),
                method: "POST".into(),
                timeout_ms: 10,
                headers_from_env: BTreeMap::new(),
            },
            approval_rule: rule.map(str::to_owned),
            requires_approval: always,
            ..escalate_definition()
        };
        defs.insert(Name::parse("refund").expect("name"), def(Some(rule), false));
        defs.insert(Name::parse("manual").expect("name"), def(None, true));
        defs.insert(Name::parse("kb").expect("name"), def(None, false));
        ToolSet::build(&names(&["refund", "manual", "kb"]), &defs, &|_| None, ToolLimits::default()).expect("builds")
    }

    fn use_of(id: &str, name: &str, input: serde_json::Value) -> ToolUse {
        ToolUse { id: id.into(), name: name.into(), input }
    }

    #[test]
    fn approval_rules_fail_closed() {
        let tools = refund_tools("amount > 100");
        assert!(!tools.has_session_rules());
        let json = |v: serde_json::Value| serde_json::json!({ "amount": v });
        assert!(tools.needs_approval(&use_of("a", "refund", json(150.into())), &[]).is_some());
        assert!(tools.needs_approval(&use_of("a", "refund", json(100.into())), &[]).is_none());
        assert!(tools.needs_approval(&use_of("a", "refund", json("lots".into())), &[]).is_some());
        assert!(tools.needs_approval(&use_of("a", "refund", serde_json::json!({})), &[]).is_some());
        assert!(tools.needs_approval(&use_of("a", "manual", json(1.into())), &[]).is_some());
        assert!(tools.needs_approval(&use_of("a", "kb", serde_json::json!({})), &[]).is_none());
        assert!(tools.needs_approval(&use_of("a", "nope", serde_json::json!({})), &[]).is_none());
    }

    #[test]
    fn a_session_sum_rule_counts_the_tools_other_calls_once() {
        let tools = refund_tools("sum(amount) > 100");
        assert!(tools.has_session_rules());
        let amount = |v: u64| serde_json::json!({ "amount": v });
        let now = use_of("c", "refund", amount(40));
        let session = [
            use_of("a", "refund", amount(40)),
            use_of("b", "kb", amount(1_000)),
            now.clone(), // the pending call itself is not counted twice
        ];
        assert!(tools.needs_approval(&now, &session).is_none(), "40 + 40 = 80");
        let more = [use_of("z", "refund", amount(30)), session[0].clone(), now.clone()];
        let why = tools.needs_approval(&now, &more).expect("30 + 40 + 40 = 110");
        assert!(why.contains("sum(amount) > 100"), "{why}");
    }

    #[test]
    fn long_results_are_cut_with_a_marker() {
        let cut = truncate("é".repeat(1000), 999);
        assert!(cut.len() < 1100);
        assert!(cut.contains("[truncated: 998 of 2000 bytes shown]"), "{cut}");
        assert_eq!(truncate("short".into(), 10), "short");
    }
}
