//! A suite file: cases, each an input with what the agent must (not) do with it.
//!
//! TOML, one `[[cases]]` table per case, with `[defaults]` that every case starts from. Every field
//! is checked when the file is read: an unknown field, a regex that does not compile, or two cases
//! with the same id or the same input are refused with the case and the field named.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context as _, bail};
use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

/// The reply the eval gives, as the person, to an escalation, unless the case names one.
const DEFAULT_HUMAN_REPLY: &str =
    "A colleague from the billing team has taken over and will follow up by e-mail today.";

/// How long a case may run, unless it says otherwise.
const DEFAULT_TIMEOUT_S: u64 = 120;

/// A suite as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SuiteFile {
    /// A name for reports; the file's stem when absent.
    name: Option<String>,
    /// The agent every case runs on, unless the case names another.
    agent: Option<String>,
    #[serde(default)]
    defaults: CaseDefaults,
    #[serde(default)]
    cases: Vec<CaseFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseDefaults {
    approval: Option<Decision>,
    human_reply: Option<String>,
    timeout_s: Option<u64>,
    #[serde(default)]
    expect: ExpectFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    id: String,
    /// What the case is about, for reports.
    #[serde(default)]
    about: String,
    #[serde(default)]
    tags: Vec<String>,
    agent: Option<String>,
    input: Input,
    /// Metadata of the session, a table.
    metadata: Option<toml::Table>,
    approval: Option<Decision>,
    human_reply: Option<String>,
    timeout_s: Option<u64>,
    #[serde(default)]
    expect: ExpectFile,
}

/// A case's input: text, content blocks (text and images) as the Messages API takes them, or a
/// text repeated (`{ repeat = "…", times = N }`) for very long inputs.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum Input {
    Text(String),
    Blocks(Vec<toml::Table>),
    Repeat { repeat: String, times: usize },
}

impl Input {
    /// The `input` of `POST /v1/sessions`.
    pub(crate) fn to_json(&self) -> Value {
        match self {
            Self::Text(text) => Value::String(text.clone()),
            Self::Blocks(blocks) => Value::Array(blocks.iter().map(toml_to_json).collect()),
            Self::Repeat { repeat, times } => Value::String(repeat.repeat(*times)),
        }
    }

    /// Its text: the text itself, or the text blocks joined.
    pub(crate) fn text(&self) -> String {
        match self {
            Self::Text(text) => text.clone(),
            Self::Blocks(blocks) => {
                let texts = blocks.iter().filter_map(|b| b.get("text").and_then(toml::Value::as_str));
                texts.collect::<Vec<_>>().join("\n")
            }
            Self::Repeat { repeat, times } => repeat.repeat(*times),
        }
    }
}

/// What the eval answers, as the person, when a session waits for approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Decision {
    Approve,
    Reject,
}

/// Expectations as written; every one optional.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectFile {
    status: Option<String>,
    rejected: Option<bool>,
    rejected_matches: Option<String>,
    #[serde(default)]
    calls: Vec<String>,
    #[serde(default)]
    not_calls: Vec<String>,
    #[serde(default)]
    call_matches: Vec<CallMatchFile>,
    #[serde(default)]
    call_not_matches: Vec<CallMatchFile>,
    escalates: Option<bool>,
    max_steps: Option<u64>,
    max_cost_usd: Option<f64>,
    #[serde(default)]
    answer_contains: Vec<String>,
    #[serde(default)]
    answer_not_contains: Vec<String>,
    answer_matches: Option<String>,
    answer_not_matches: Option<String>,
    same_language: Option<bool>,
    #[serde(default)]
    approval_required: Vec<String>,
    #[serde(default)]
    tool_failed: Vec<String>,
    #[serde(default)]
    tool_errors: Vec<ToolErrorFile>,
    unapproved_total: Option<UnapprovedTotal>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolErrorFile {
    tool: String,
    error: String,
}

/// At most `max` of the numeric input `field`, summed over the calls of `tool` that ran without a
/// person's approval (e.g. refunds: no more than 100 USD a session moves unapproved).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UnapprovedTotal {
    pub(crate) tool: String,
    pub(crate) field: String,
    pub(crate) max: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallMatchFile {
    tool: String,
    input: String,
}

/// A loaded suite.
#[derive(Debug)]
pub(crate) struct Suite {
    pub(crate) name: String,
    pub(crate) cases: Vec<Case>,
}

/// One case, its defaults applied.
#[derive(Debug)]
pub(crate) struct Case {
    pub(crate) id: String,
    pub(crate) about: String,
    pub(crate) tags: Vec<String>,
    pub(crate) agent: String,
    pub(crate) input: Input,
    pub(crate) metadata: Option<Value>,
    pub(crate) approval: Decision,
    pub(crate) human_reply: String,
    pub(crate) timeout_s: u64,
    pub(crate) expect: Expect,
}

/// A tool whose input must (not) match a pattern.
#[derive(Debug, Clone)]
pub(crate) struct CallMatch {
    pub(crate) tool: String,
    pub(crate) input: Regex,
}

/// What a case expects, defaults applied and patterns compiled.
#[derive(Debug, Clone)]
pub(crate) struct Expect {
    /// The session's final status; `completed` unless said otherwise (or the input is expected to
    /// be refused).
    pub(crate) status: String,
    /// The API refuses the input (a 4xx at `POST /v1/sessions`).
    pub(crate) rejected: bool,
    pub(crate) rejected_matches: Option<Regex>,
    pub(crate) calls: Vec<String>,
    pub(crate) not_calls: Vec<String>,
    pub(crate) call_matches: Vec<CallMatch>,
    pub(crate) call_not_matches: Vec<CallMatch>,
    pub(crate) escalates: Option<bool>,
    pub(crate) max_steps: Option<u64>,
    pub(crate) max_cost_usd: Option<f64>,
    pub(crate) answer_contains: Vec<String>,
    pub(crate) answer_not_contains: Vec<String>,
    pub(crate) answer_matches: Option<Regex>,
    pub(crate) answer_not_matches: Option<Regex>,
    pub(crate) same_language: bool,
    pub(crate) approval_required: Vec<String>,
    pub(crate) tool_failed: Vec<String>,
    /// A call of `tool` came back as an error whose text matches `input` (an open circuit's).
    pub(crate) tool_errors: Vec<CallMatch>,
    pub(crate) unapproved_total: Option<UnapprovedTotal>,
}

/// Reads and checks the suite at `path`; `agent` (the command line's) wins over the file's.
pub(crate) fn load(path: &Path, agent: Option<&str>) -> anyhow::Result<Suite> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the suite {}", path.display()))?;
    let file: SuiteFile = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))?;
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "suite".into());
    let suite_agent = agent.map(str::to_owned).or(file.agent);
    let mut ids = HashSet::new();
    let mut inputs = HashSet::new();
    let mut cases = Vec::with_capacity(file.cases.len());
    for raw in file.cases {
        let id = raw.id.clone();
        let case = build(raw, &file.defaults, suite_agent.as_deref())
            .with_context(|| format!("{}: case `{id}`", path.display()))?;
        if !ids.insert(case.id.clone()) {
            bail!("{}: two cases have the id `{}`", path.display(), case.id);
        }
        // Record and replay tell the cases apart by their first message.
        if !inputs.insert(case.input.to_json().to_string()) {
            bail!("{}: case `{}` has the same input as an earlier case; inputs must differ", path.display(), case.id);
        }
        cases.push(case);
    }
    if cases.is_empty() {
        bail!("{}: no cases (each is a [[cases]] table)", path.display());
    }
    Ok(Suite { name: file.name.unwrap_or(stem), cases })
}

fn build(raw: CaseFile, defaults: &CaseDefaults, suite_agent: Option<&str>) -> anyhow::Result<Case> {
    if raw.id.trim().is_empty() || raw.id.chars().any(|c| !(c.is_ascii_alphanumeric() || "-_.".contains(c))) {
        bail!("`id` must be letters, digits, `-`, `_` or `.`");
    }
    let agent = match raw.agent.as_deref().or(suite_agent) {
        Some(agent) => agent.to_owned(),
        None => bail!("no agent: set `agent` in the suite or the case, or pass --agent"),
    };
    if let Input::Blocks(blocks) = &raw.input {
        if blocks.is_empty() {
            bail!("`input`: an empty list of blocks");
        }
        if let Some(i) = blocks.iter().position(|b| b.get("type").and_then(toml::Value::as_str).is_none()) {
            bail!("`input[{i}]`: a block needs a `type`");
        }
    }
    if let Input::Repeat { times, .. } = &raw.input
        && *times > 10_000_000
    {
        bail!("`input.times`: at most 10000000");
    }
    let expect = merge(&defaults.expect, &raw.expect)?;
    Ok(Case {
        id: raw.id,
        about: raw.about,
        tags: raw.tags,
        agent,
        input: raw.input,
        metadata: raw.metadata.as_ref().map(toml_to_json),
        approval: raw.approval.or(defaults.approval).unwrap_or(Decision::Reject),
        human_reply: raw.human_reply.or_else(|| defaults.human_reply.clone()).unwrap_or(DEFAULT_HUMAN_REPLY.into()),
        timeout_s: raw.timeout_s.or(defaults.timeout_s).unwrap_or(DEFAULT_TIMEOUT_S),
        expect,
    })
}

/// The case's expectations over the defaults': a value the case sets wins, lists add up.
fn merge(d: &ExpectFile, c: &ExpectFile) -> anyhow::Result<Expect> {
    let list = |a: &[String], b: &[String]| a.iter().chain(b).cloned().collect::<Vec<_>>();
    let calls = |a: &[CallMatchFile], b: &[CallMatchFile], field: &str| -> anyhow::Result<Vec<CallMatch>> {
        let both = a.iter().chain(b).enumerate();
        both.map(|(i, m)| Ok(CallMatch { tool: m.tool.clone(), input: regex(&m.input, &format!("{field}[{i}]"))? }))
            .collect()
    };
    let pattern = |a: &Option<String>, b: &Option<String>, field: &str| {
        b.as_ref().or(a.as_ref()).map(|p| regex(p, field)).transpose()
    };
    let rejected = c.rejected.or(d.rejected).unwrap_or(false);
    let status = c.status.clone().or_else(|| d.status.clone()).unwrap_or_else(|| "completed".into());
    const STATUSES: [&str; 6] =
        ["completed", "failed", "budget_exhausted", "cancelled", "awaiting_human", "awaiting_approval"];
    if !STATUSES.contains(&status.as_str()) {
        bail!("`expect.status`: `{status}` is not one of {}", STATUSES.join(", "));
    }
    if let Some(cost) = c.max_cost_usd.or(d.max_cost_usd)
        && !(cost.is_finite() && cost > 0.0)
    {
        bail!("`expect.max_cost_usd`: must be a positive number of USD");
    }
    Ok(Expect {
        status,
        rejected,
        rejected_matches: pattern(&d.rejected_matches, &c.rejected_matches, "expect.rejected_matches")?,
        calls: list(&d.calls, &c.calls),
        not_calls: list(&d.not_calls, &c.not_calls),
        call_matches: calls(&d.call_matches, &c.call_matches, "expect.call_matches")?,
        call_not_matches: calls(&d.call_not_matches, &c.call_not_matches, "expect.call_not_matches")?,
        escalates: c.escalates.or(d.escalates),
        max_steps: c.max_steps.or(d.max_steps),
        max_cost_usd: c.max_cost_usd.or(d.max_cost_usd),
        answer_contains: list(&d.answer_contains, &c.answer_contains),
        answer_not_contains: list(&d.answer_not_contains, &c.answer_not_contains),
        answer_matches: pattern(&d.answer_matches, &c.answer_matches, "expect.answer_matches")?,
        answer_not_matches: pattern(&d.answer_not_matches, &c.answer_not_matches, "expect.answer_not_matches")?,
        same_language: c.same_language.or(d.same_language).unwrap_or(false),
        approval_required: list(&d.approval_required, &c.approval_required),
        tool_failed: list(&d.tool_failed, &c.tool_failed),
        tool_errors: d
            .tool_errors
            .iter()
            .chain(&c.tool_errors)
            .enumerate()
            .map(|(i, t)| {
                Ok(CallMatch { tool: t.tool.clone(), input: regex(&t.error, &format!("expect.tool_errors[{i}]"))? })
            })
            .collect::<anyhow::Result<_>>()?,
        unapproved_total: c.unapproved_total.clone().or_else(|| d.unapproved_total.clone()),
    })
}

fn regex(pattern: &str, field: &str) -> anyhow::Result<Regex> {
    Regex::new(pattern).map_err(|e| anyhow::anyhow!("`{field}`: not a valid regex: {e}"))
}

fn toml_to_json(table: &toml::Table) -> Value {
    serde_json::to_value(table).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> anyhow::Result<Suite> {
        let dir = std::env::temp_dir().join(format!("agentfleet-suite-{}", ulid::Ulid::new()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("s.toml");
        std::fs::write(&path, text)?;
        let suite = load(&path, None);
        std::fs::remove_dir_all(&dir)?;
        suite
    }

    #[test]
    fn defaults_apply_and_lists_add_up() -> anyhow::Result<()> {
        let suite = load_text(
            r#"
            agent = "support"
            [defaults]
            approval = "approve"
            expect = { max_steps = 8, not_calls = ["delete_account"] }
            [[cases]]
            id = "a"
            input = "hello"
            expect = { max_steps = 3, not_calls = ["issue_refund"], answer_matches = "(?i)hello" }
            [[cases]]
            id = "b"
            input = [{ type = "text", text = "hi" }]
            approval = "reject"
            "#,
        )?;
        assert_eq!(suite.name, "s");
        let [a, b] = &suite.cases[..] else { panic!("two cases") };
        assert_eq!((a.expect.max_steps, a.approval), (Some(3), Decision::Approve));
        assert_eq!(a.expect.not_calls, ["delete_account", "issue_refund"]);
        assert_eq!(a.expect.status, "completed");
        assert_eq!((b.expect.max_steps, b.approval), (Some(8), Decision::Reject));
        assert_eq!(b.input.to_json(), serde_json::json!([{"type": "text", "text": "hi"}]));
        Ok(())
    }

    #[test]
    fn mistakes_are_named() {
        let err = |text: &str| format!("{:#}", load_text(text).expect_err("refused"));
        assert!(
            err(r#"[[cases]]
            id = "a"
            input = "x""#)
            .contains("no agent")
        );
        assert!(
            err(r#"agent = "s"
            [[cases]]
            id = "a"
            input = "x"
            expect = { answer_matches = "(" }"#)
            .contains("answer_matches")
        );
        assert!(
            err(r#"agent = "s"
            [[cases]]
            id = "a"
            input = "x"
            [[cases]]
            id = "b"
            input = "x""#)
            .contains("same input")
        );
        assert!(
            err(r#"agent = "s"
            [[cases]]
            id = "a"
            input = "x"
            expect = { calss = ["t"] }"#)
            .contains("calss")
        );
        assert!(err(r#"agent = "s""#).contains("no cases"));
    }
}
