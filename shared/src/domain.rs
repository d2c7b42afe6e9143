//! Domain types, validated once at the edge.
//!
//! Everything stored in Redis or carried on the wire has a type here with a `parse`/`FromStr` and a
//! `Display`, so the rest of the code never handles a raw string that might be malformed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A value did not have the shape its type requires.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{what}: {problem}")]
pub struct ParseError {
    what: &'static str,
    problem: String,
}

impl ParseError {
    fn new(what: &'static str, problem: impl Into<String>) -> Self {
        Self { what, problem: problem.into() }
    }
}

/// A session's id: `s_` followed by a ULID, e.g. `s_01JD3ZK8Q8YB3Y3C2K9Q2W7X4M`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(example = "s_01JD3ZK8Q8YB3Y3C2K9Q2W7X4M")]
pub struct SessionId(String);

impl SessionId {
    /// A new, time-ordered id.
    pub fn generate() -> Self {
        Self(format!("s_{}", ulid::Ulid::new()))
    }

    /// Checks the `s_<ULID>` shape.
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let ulid = s.strip_prefix("s_").ok_or_else(|| ParseError::new("session id", "must start with `s_`"))?;
        ulid::Ulid::from_string(ulid).map_err(|e| ParseError::new("session id", format!("invalid ULID: {e}")))?;
        Ok(Self(s.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for SessionId {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<SessionId> for String {
    fn from(id: SessionId) -> Self {
        id.0
    }
}

/// Names of agents, tools and pools: 1–64 of `[A-Za-z0-9_-]` (the Messages API's rule for tool
/// names, which also keeps them safe in AMQP routing keys and Redis keys).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    /// Checks the name's length and characters.
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let ok_len = (1..=64).contains(&s.len());
        let ok_chars = s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok_len && ok_chars {
            Ok(Self(s.to_owned()))
        } else {
            Err(ParseError::new("name", format!("`{s}` must be 1-64 characters of A-Z a-z 0-9 _ -")))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Name {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> Self {
        n.0
    }
}

/// A tenant: whose budget a session spends and whose sessions it is. Spelled like a [`Name`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, example = "acme")]
pub struct TenantId(String);

impl TenantId {
    /// Checks the tenant's length and characters (those of a [`Name`]).
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        Name::parse(s).map(|n| Self(n.0)).map_err(|e| ParseError::new("tenant", e.problem))
    }

    /// The tenant as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for TenantId {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<TenantId> for String {
    fn from(t: TenantId) -> Self {
        t.0
    }
}

/// Money as integer micro-USD: no float ever accumulates a rounding error in a budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MicroUsd(u64);

impl MicroUsd {
    /// No money.
    pub const ZERO: Self = Self(0);

    /// An amount of micro-USD.
    pub const fn new(micro_usd: u64) -> Self {
        Self(micro_usd)
    }

    /// The amount in micro-USD.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The sum, or `None` on overflow.
    pub fn checked_add(self, other: Self) -> Option<Self> {
        self.0.checked_add(other.0).map(Self)
    }

    /// The sum, capped at the largest amount.
    pub fn saturating_add(self, other: Self) -> Self {
        Self(self.0.saturating_add(other.0))
    }

    /// The difference, floored at zero.
    pub fn saturating_sub(self, other: Self) -> Self {
        Self(self.0.saturating_sub(other.0))
    }

    /// From dollars, rounded to the nearest micro-dollar; negative or non-finite values are an error.
    pub fn from_usd(usd: f64) -> Result<Self, ParseError> {
        if !usd.is_finite() || usd < 0.0 {
            return Err(ParseError::new("amount", format!("{usd} is not a non-negative number of USD")));
        }
        Ok(Self((usd * 1_000_000.0).round() as u64))
    }

    /// As dollars, for display.
    pub fn as_usd(self) -> f64 {
        self.0 as f64 / 1_000_000.0
    }
}

/// Which API an agent's model speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    /// The Anthropic Messages API.
    #[default]
    Anthropic,
    /// An OpenAI-compatible chat-completions API (Ollama, vLLM, llama.cpp, …).
    Openai,
}

impl Provider {
    /// The provider's name, for breakers, rate limits and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Anthropic => "anthropic",
            Self::Openai => "openai",
        }
    }
}

/// An approval rule that does not parse.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ApprovalRuleError {
    /// Not three words.
    #[error("`{0}` must read `<field> <op> <number>` or `sum(<field>) <op> <number>`, e.g. `amount > 100`")]
    Shape(String),
    /// An operator that is not a comparison.
    #[error("`{0}` is not one of > >= < <= == !=")]
    Operator(String),
    /// A value that is not a number.
    #[error("`{0}` is not a number")]
    Number(String),
}

/// A rule on a tool's input that makes a call wait for approval: `<field> <op> <number>`, or
/// `sum(<field>) <op> <number>` to compare the sum of the field over every call of the tool in the
/// session (so splitting a large refund into small ones does not avoid it).
///
/// Rules fail closed: a call whose field is missing or not a number needs approval.
///
/// ```
/// use agentfleet::domain::ApprovalRule;
/// use serde_json::json;
///
/// let rule = ApprovalRule::parse("amount > 100").unwrap();
/// assert!(rule.requires(&json!({"amount": 150}), &[]));
/// assert!(rule.requires(&json!({"amount": "lots"}), &[])); // not a number: ask a person
/// let sum = ApprovalRule::parse("sum(amount) > 100").unwrap();
/// assert!(sum.requires(&json!({"amount": 60}), &[&json!({"amount": 60})]));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ApprovalRule {
    field: String,
    op: String,
    value: f64,
    /// Compares the sum over the session's calls of the tool, not one call's value.
    session_sum: bool,
}

impl ApprovalRule {
    /// Parses `amount > 100` or `sum(amount) > 100`.
    pub fn parse(rule: &str) -> Result<Self, ApprovalRuleError> {
        let parts: Vec<&str> = rule.split_whitespace().collect();
        let [field, op, value] = parts[..] else {
            return Err(ApprovalRuleError::Shape(rule.to_owned()));
        };
        if !["<", "<=", ">", ">=", "==", "!="].contains(&op) {
            return Err(ApprovalRuleError::Operator(op.to_owned()));
        }
        let value = value.parse::<f64>().map_err(|_| ApprovalRuleError::Number(value.to_owned()))?;
        if !value.is_finite() {
            return Err(ApprovalRuleError::Number(value.to_string()));
        }
        let (field, session_sum) = match field.strip_prefix("sum(").and_then(|f| f.strip_suffix(')')) {
            Some(inner) => (inner, true),
            None => (field, false),
        };
        if field.is_empty() || field.contains(['(', ')']) {
            return Err(ApprovalRuleError::Shape(rule.to_owned()));
        }
        Ok(Self { field: field.to_owned(), op: op.to_owned(), value, session_sum })
    }

    /// True for a `sum(<field>)` rule, which needs the tool's other calls in the session.
    pub fn is_session_sum(&self) -> bool {
        self.session_sum
    }

    /// True when a call with `input` must wait for approval. `others` are the inputs of the tool's
    /// other calls in the session; only a `sum(..)` rule reads them. A missing or non-numeric field
    /// (in any input that counts) requires approval.
    pub fn requires(&self, input: &serde_json::Value, others: &[&serde_json::Value]) -> bool {
        let counted = if self.session_sum { others } else { &[] };
        let values: Option<Vec<f64>> =
            std::iter::once(input).chain(counted.iter().copied()).map(|i| self.number(i)).collect();
        match values {
            Some(values) => self.compare(values.iter().sum()),
            None => true,
        }
    }

    fn number(&self, input: &serde_json::Value) -> Option<f64> {
        input.get(&self.field).and_then(serde_json::Value::as_f64).filter(|x| x.is_finite())
    }

    fn compare(&self, x: f64) -> bool {
        match self.op.as_str() {
            "<" => x < self.value,
            "<=" => x <= self.value,
            ">" => x > self.value,
            ">=" => x >= self.value,
            "==" => x == self.value,
            _ => x != self.value,
        }
    }
}

impl fmt::Display for ApprovalRule {
    /// `amount > 100` or `sum(amount) > 100`, with the number as parsed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.session_sum {
            true => write!(f, "sum({}) {} {}", self.field, self.op, self.value),
            false => write!(f, "{} {} {}", self.field, self.op, self.value),
        }
    }
}

/// Where a session is in its life. Stored in Redis as its `Display` text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    /// Created; its first step is queued.
    Queued,
    /// A step has run or is running.
    Running,
    /// Paused by `escalate_to_human` until a human replies.
    AwaitingHuman,
    /// Paused before a tool that needs approval.
    AwaitingApproval,
    /// Waiting for a fleet-wide daily cap to allow it again; retried periodically.
    Paused,
    /// The agent finished (`end_turn`).
    Completed,
    /// Ended by an error it could not recover from.
    Failed,
    /// Ended by a budget limit.
    BudgetExhausted,
    /// Ended by a cancel request.
    Cancelled,
}

impl SessionStatus {
    const ALL: [SessionStatus; 9] = [
        Self::Queued,
        Self::Running,
        Self::AwaitingHuman,
        Self::AwaitingApproval,
        Self::Paused,
        Self::Completed,
        Self::Failed,
        Self::BudgetExhausted,
        Self::Cancelled,
    ];

    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::AwaitingHuman => "awaiting_human",
            Self::AwaitingApproval => "awaiting_approval",
            Self::Paused => "paused",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::BudgetExhausted => "budget_exhausted",
            Self::Cancelled => "cancelled",
        }
    }

    /// True once nothing more will happen to the session.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::BudgetExhausted | Self::Cancelled)
    }
}

impl fmt::Display for SessionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SessionStatus {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| ParseError::new("session status", format!("unknown status `{s}`")))
    }
}

/// Which half of a step the session is in: the model call, or the tool calls it asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The next thing to do is call the model.
    Llm,
    /// The model's `tool_use` blocks are stored; the next thing is to run them.
    Tools,
    /// The session has ended.
    Done,
}

impl Phase {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Llm => "llm",
            Self::Tools => "tools",
            Self::Done => "done",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Phase {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "llm" => Ok(Self::Llm),
            "tools" => Ok(Self::Tools),
            "done" => Ok(Self::Done),
            other => Err(ParseError::new("phase", format!("unknown phase `{other}`"))),
        }
    }
}

/// The body of a step message: run step `step` of `session_id`. Steps count from 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepMessage {
    /// The session to advance.
    pub session_id: SessionId,
    /// The step to run.
    pub step: u32,
    /// How many times this step has been sent back through a delay tier (0 on the first try).
    #[serde(default)]
    pub attempt: u32,
}

impl StepMessage {
    /// Parses and validates a message body.
    pub fn parse(body: &[u8]) -> Result<Self, ParseError> {
        let msg: Self = serde_json::from_slice(body).map_err(|e| ParseError::new("step message", e.to_string()))?;
        if msg.step == 0 {
            return Err(ParseError::new("step message", "`step` counts from 1"));
        }
        Ok(msg)
    }

    /// The AMQP `message_id`: `<session>:<step>`, the same for every copy of this step.
    pub fn message_id(&self) -> String {
        format!("{}:{}", self.session_id, self.step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approval_rules_parse_a_field_or_a_session_sum() {
        let rule = ApprovalRule::parse("amount > 100").expect("parses");
        assert!(!rule.is_session_sum());
        assert_eq!(rule.to_string(), "amount > 100");
        let sum = ApprovalRule::parse("sum(amount) >= 250.5").expect("parses");
        assert!(sum.is_session_sum());
        assert_eq!(sum.to_string(), "sum(amount) >= 250.5");
        for bad in ["amount >> 1", "amount > x", "amount", "sum() > 1", "sum(a(b)) > 1", "amount > inf", "amount > NaN"]
        {
            assert!(ApprovalRule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn approval_rules_fail_closed_on_a_missing_or_non_numeric_field() {
        let rule = ApprovalRule::parse("amount > 100").expect("parses");
        use serde_json::json;
        assert!(rule.requires(&json!({"amount": 150}), &[]));
        assert!(!rule.requires(&json!({"amount": 100}), &[]));
        assert!(rule.requires(&json!({"amount": "150"}), &[]), "a string is not a number");
        assert!(rule.requires(&json!({"amount": null}), &[]));
        assert!(rule.requires(&json!({}), &[]), "a missing field");
        assert!(rule.requires(&json!("amount"), &[]), "not an object");
        let small = ApprovalRule::parse("amount < 5").expect("parses");
        assert!(small.requires(&json!({"total": 1000}), &[]), "a missing field needs approval whatever the op");
    }

    #[test]
    fn a_call_rule_ignores_the_other_calls() {
        let rule = ApprovalRule::parse("amount > 100").expect("parses");
        let earlier = serde_json::json!({"amount": 90});
        assert!(!rule.requires(&serde_json::json!({"amount": 90}), &[&earlier]));
    }

    #[test]
    fn a_sum_rule_adds_the_field_over_the_session() {
        let rule = ApprovalRule::parse("sum(amount) > 100").expect("parses");
        use serde_json::json;
        let (a, b) = (json!({"amount": 40}), json!({"amount": 50}));
        assert!(!rule.requires(&json!({"amount": 10}), &[&a, &b]), "exactly 100");
        assert!(rule.requires(&json!({"amount": 11}), &[&a, &b]), "101 split into three");
        assert!(!rule.requires(&json!({"amount": 100}), &[]), "alone, 100 passes");
        assert!(rule.requires(&json!({"amount": 1}), &[&a, &json!({"amount": "x"})]), "an unreadable earlier call");
        assert!(rule.requires(&json!({}), &[]), "a missing field");
    }

    #[test]
    fn session_ids_round_trip_and_reject_garbage() {
        let id = SessionId::generate();
        assert_eq!(SessionId::parse(id.as_str()), Ok(id.clone()));
        assert!(SessionId::parse("x_01JD3ZK8Q8YB3Y3C2K9Q2W7X4M").is_err());
        assert!(SessionId::parse("s_notaulid").is_err());
        assert!(SessionId::parse("s_").is_err());
    }

    #[test]
    fn names_follow_the_tool_name_rule() {
        assert!(Name::parse("search_knowledge_base").is_ok());
        assert!(Name::parse("").is_err());
        assert!(Name::parse("a b").is_err());
        assert!(Name::parse(&"x".repeat(65)).is_err());
    }

    #[test]
    fn statuses_round_trip_through_text() {
        for st in SessionStatus::ALL {
            assert_eq!(st.as_str().parse::<SessionStatus>(), Ok(st));
        }
        assert!("nope".parse::<SessionStatus>().is_err());
    }

    #[test]
    fn step_messages_are_strict() {
        let id = SessionId::generate();
        let body = format!(r#"{{"session_id":"{id}","step":3,"attempt":1}}"#);
        let msg = StepMessage::parse(body.as_bytes()).expect("valid");
        assert_eq!(msg.message_id(), format!("{id}:3"));
        assert!(StepMessage::parse(b"{").is_err());
        assert!(StepMessage::parse(br#"{"session_id":"s_x","step":1}"#).is_err());
        let zero = format!(r#"{{"session_id":"{id}","step":0}}"#);
        assert!(StepMessage::parse(zero.as_bytes()).is_err());
        let extra = format!(r#"{{"session_id":"{id}","step":1,"evil":true}}"#);
        assert!(StepMessage::parse(extra.as_bytes()).is_err());
    }

    #[test]
    fn money_is_integer_micro_usd() {
        assert_eq!(MicroUsd::from_usd(1.5), Ok(MicroUsd::new(1_500_000)));
        assert!(MicroUsd::from_usd(-1.0).is_err());
        assert!(MicroUsd::from_usd(f64::NAN).is_err());
    }
}
