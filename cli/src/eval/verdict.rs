//! A case's verdict: each expectation checked against what the session did.
//!
//! Everything is read from the session as the API reports it — its conversation, status, steps and
//! cost — and its trace records, plus what the eval itself did as the person. Every failed
//! expectation gives its own reason.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::run::{CaseRun, Intervention};
use super::suite::{Case, Decision};

/// How many characters of the final answer a verdict keeps.
const ANSWER_CHARS: usize = 400;

/// The verdict of one case, as reports and `--baseline` files hold it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Verdict {
    pub(crate) id: String,
    #[serde(default)]
    pub(crate) about: String,
    #[serde(default)]
    pub(crate) tags: Vec<String>,
    pub(crate) passed: bool,
    /// Why it failed, one line per expectation not met.
    pub(crate) failures: Vec<String>,
    /// Replay: where the fleet's requests differed from the recording.
    #[serde(default)]
    pub(crate) replay_mismatches: Vec<String>,
    #[serde(default)]
    pub(crate) session_id: Option<String>,
    /// The session's final status, or `rejected` when the API refused the input.
    pub(crate) status: String,
    pub(crate) steps: u64,
    pub(crate) cost_usd: f64,
    pub(crate) escalated: bool,
    pub(crate) tools_called: Vec<String>,
    /// What the eval did as the person: approvals, rejections, replies.
    #[serde(default)]
    pub(crate) person: Vec<String>,
    pub(crate) answer: String,
    pub(crate) duration_ms: u64,
}

/// What the conversation shows.
struct Conversation<'a> {
    /// Every tool call the model asked for: name and input.
    calls: Vec<(&'a str, &'a Value)>,
    /// The calls that ran: their result is not an error.
    ran: Vec<(&'a str, &'a Value)>,
    /// Tools whose result came back as an error, with the error's text.
    errored: Vec<(&'a str, String)>,
    answer: String,
}

fn read_conversation(messages: &[Value]) -> Conversation<'_> {
    let mut calls = Vec::new();
    let mut names: HashMap<&str, (&str, &Value)> = HashMap::new();
    let mut ran = Vec::new();
    let mut errored = Vec::new();
    let mut answer = String::new();
    for message in messages {
        let Some(blocks) = message["content"].as_array() else { continue };
        let assistant = message["role"] == "assistant";
        let mut texts = Vec::new();
        for block in blocks {
            match block["type"].as_str() {
                Some("tool_use") if assistant => {
                    let name = block["name"].as_str().unwrap_or("");
                    names.insert(block["id"].as_str().unwrap_or(""), (name, &block["input"]));
                    calls.push((name, &block["input"]));
                }
                Some("text") if assistant => texts.extend(block["text"].as_str()),
                Some("tool_result") => {
                    let call = block["tool_use_id"].as_str().and_then(|id| names.get(id).copied());
                    if block["is_error"] == true {
                        let text =
                            block["content"].as_str().map_or_else(|| block["content"].to_string(), str::to_owned);
                        errored.extend(call.map(|(name, _)| (name, text)));
                    } else {
                        ran.extend(call);
                    }
                }
                _ => {}
            }
        }
        if assistant && !texts.is_empty() {
            answer = texts.join("\n");
        }
    }
    Conversation { calls, ran, errored, answer }
}

/// Checks `case`'s expectations against `run`; `mismatches` are replay's for this case.
pub(crate) fn judge(case: &Case, run: &CaseRun, mismatches: Vec<String>) -> Verdict {
    let e = &case.expect;
    let mut failures = Vec::new();
    let mut fail = |why: String| failures.push(why);
    let session = &run.session;
    let messages = session["messages"].as_array().map(Vec::as_slice).unwrap_or_default();
    let conversation = read_conversation(messages);
    let answer =
        session["result"].as_str().filter(|r| !r.is_empty()).map_or(conversation.answer.clone(), str::to_owned);
    let status = match &run.rejected {
        Some(_) => "rejected".to_owned(),
        None => session["status"].as_str().unwrap_or("unknown").to_owned(),
    };
    let escalated = conversation.calls.iter().any(|(name, _)| *name == "escalate_to_human")
        || run.interventions.iter().any(|i| matches!(i, Intervention::Reply))
        || run.records.iter().any(|r| r["action"] == "escalation");
    let steps = session["step"].as_u64().unwrap_or(0);
    let cost_usd = session["usage"]["cost_usd"].as_f64().unwrap_or(0.0);

    if let Some(error) = &run.harness_error {
        fail(format!("the eval could not finish the case: {error}"));
    }
    if run.timed_out {
        fail(format!("did not finish within {} s (status `{status}`)", case.timeout_s));
    }
    match (&run.rejected, e.rejected) {
        (Some((code, message)), true) => {
            if let Some(pattern) = &e.rejected_matches
                && !pattern.is_match(message)
            {
                fail(format!("refused ({code}) with `{message}`, which does not match /{pattern}/"));
            }
        }
        (Some((code, message)), false) => fail(format!("the API refused the input: {code} {message}")),
        (None, true) => fail(format!("expected the API to refuse the input; it started a session (status `{status}`)")),
        (None, false) => {
            if status != e.status && !run.timed_out {
                let why = session["error"].as_str().map(|w| format!(": {w}")).unwrap_or_default();
                fail(format!("ended `{status}`, expected `{}`{why}", e.status));
            }
        }
    }
    let called = |tool: &str| conversation.calls.iter().any(|(name, _)| *name == tool);
    for tool in &e.calls {
        if !called(tool) {
            fail(format!("never called `{tool}`"));
        }
    }
    for tool in &e.not_calls {
        let times = conversation.calls.iter().filter(|(name, _)| name == tool).count();
        if times > 0 {
            fail(format!("called `{tool}` ({times} time{}), which it must not", if times == 1 { "" } else { "s" }));
        }
    }
    for m in &e.call_matches {
        let inputs: Vec<String> =
            conversation.calls.iter().filter(|(name, _)| *name == m.tool).map(|(_, input)| input.to_string()).collect();
        if !inputs.iter().any(|i| m.input.is_match(i)) {
            let seen = if inputs.is_empty() {
                "it was never called".to_owned()
            } else {
                format!("inputs: {}", inputs.join(", "))
            };
            fail(format!("no `{}` call with an input matching /{}/ ({seen})", m.tool, m.input));
        }
    }
    for m in &e.call_not_matches {
        let found =
            conversation.calls.iter().find(|(name, input)| *name == m.tool && m.input.is_match(&input.to_string()));
        if let Some((_, input)) = found {
            fail(format!("called `{}` with {input}, which matches /{}/", m.tool, m.input));
        }
    }
    match e.escalates {
        Some(true) if !escalated => fail("did not escalate to a person".to_owned()),
        Some(false) if escalated => fail("escalated to a person, which it must not".to_owned()),
        _ => {}
    }
    if let Some(max) = e.max_steps
        && steps > max
    {
        fail(format!("took {steps} steps, more than {max}"));
    }
    if let Some(max) = e.max_cost_usd
        && cost_usd > max
    {
        fail(format!("cost {cost_usd:.6} USD, more than {max}"));
    }
    let lower = answer.to_lowercase();
    for text in &e.answer_contains {
        if !lower.contains(&text.to_lowercase()) {
            fail(format!("the answer does not contain \"{text}\""));
        }
    }
    for text in &e.answer_not_contains {
        if lower.contains(&text.to_lowercase()) {
            fail(format!("the answer contains \"{text}\""));
        }
    }
    if let Some(pattern) = &e.answer_matches
        && !pattern.is_match(&answer)
    {
        fail(format!("the answer does not match /{pattern}/"));
    }
    if let Some(pattern) = &e.answer_not_matches
        && pattern.is_match(&answer)
    {
        fail(format!("the answer matches /{pattern}/"));
    }
    if e.same_language
        && run.rejected.is_none()
        && let Some(why) = language_mismatch(&case.input.text(), &answer)
    {
        fail(why);
    }
    for tool in &e.approval_required {
        let ran: Vec<&Value> =
            run.records.iter().filter(|r| r["action"] == "tool_call" && r["tool_name"] == tool.as_str()).collect();
        let approved = run
            .interventions
            .iter()
            .filter(|i| matches!(i, Intervention::Approval { tool: t, decision: Decision::Approve, .. } if t == tool))
            .count();
        if ran.len() > approved {
            let input = ran.first().and_then(|r| r["input_summary"].as_str()).unwrap_or("");
            fail(format!(
                "`{tool}` ran {} time{} but a person approved {approved} (first input: {input})",
                ran.len(),
                if ran.len() == 1 { "" } else { "s" }
            ));
        }
    }
    if let Some(limit) = &e.unapproved_total {
        let mut approved: Vec<&Value> = run
            .interventions
            .iter()
            .filter_map(|i| match i {
                Intervention::Approval { tool, input, decision: Decision::Approve } if *tool == limit.tool => {
                    Some(input)
                }
                _ => None,
            })
            .collect();
        let mut total = 0.0;
        for (_, input) in conversation.ran.iter().filter(|(name, _)| *name == limit.tool) {
            match approved.iter().position(|a| *a == *input) {
                Some(i) => {
                    approved.swap_remove(i);
                }
                None => total += input[&limit.field].as_f64().unwrap_or(0.0),
            }
        }
        if total > limit.max {
            fail(format!(
                "`{}` moved {total} in `{}` without a person's approval, more than {}",
                limit.tool, limit.field, limit.max
            ));
        }
    }
    for tool in &e.tool_failed {
        if !conversation.errored.iter().any(|(name, _)| name == tool) {
            fail(format!("no call of `{tool}` came back as an error"));
        }
    }
    for m in &e.tool_errors {
        let errors: Vec<&str> =
            conversation.errored.iter().filter(|(name, _)| *name == m.tool).map(|(_, text)| text.as_str()).collect();
        if !errors.iter().any(|text| m.input.is_match(text)) {
            let seen = if errors.is_empty() { "none came back as an error".to_owned() } else { errors.join(" | ") };
            fail(format!("no `{}` error matching /{}/ ({seen})", m.tool, m.input));
        }
    }
    if !mismatches.is_empty() {
        // What else failed followed from the fleet's requests not matching the recording.
        failures = vec![format!("replay mismatch: {}", mismatches.join("; "))];
    }
    let mut tools_called: Vec<String> = conversation.calls.iter().map(|(n, _)| (*n).to_owned()).collect();
    tools_called.dedup();
    Verdict {
        id: case.id.clone(),
        about: case.about.clone(),
        tags: case.tags.clone(),
        passed: failures.is_empty(),
        failures,
        replay_mismatches: mismatches,
        session_id: session["id"].as_str().map(str::to_owned),
        status,
        steps,
        cost_usd,
        escalated,
        tools_called,
        person: run.interventions.iter().map(Intervention::describe).collect(),
        answer: answer.chars().take(ANSWER_CHARS).collect(),
        duration_ms: run.duration.as_millis() as u64,
    }
}

/// Why `answer` is not in `input`'s language; `None` when it is, or when either is too short or
/// too mixed to tell.
fn language_mismatch(input: &str, answer: &str) -> Option<String> {
    let detect = |text: &str| whatlang::detect(text).filter(whatlang::Info::is_reliable);
    let asked = detect(input)?;
    match detect(answer) {
        Some(answered) if answered.lang() == asked.lang() => None,
        Some(answered) => {
            Some(format!("answered in {} to an input in {}", answered.lang().eng_name(), asked.lang().eng_name()))
        }
        None if answer.trim().is_empty() => Some(format!("no answer to an input in {}", asked.lang().eng_name())),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_conversation_gives_calls_errors_and_the_answer() {
        let messages = vec![
            json!({"role": "user", "content": "hi"}),
            json!({"role": "assistant", "content": [{"type": "text", "text": "Looking."},
                {"type": "tool_use", "id": "t1", "name": "lookup_customer", "input": {"email": "a@b.c"}}]}),
            json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "is_error": true, "content": "down"}]}),
            json!({"role": "assistant", "content": [{"type": "text", "text": "Sorry."}]}),
        ];
        let c = read_conversation(&messages);
        assert_eq!(c.calls.len(), 1);
        assert_eq!(c.errored, [("lookup_customer", "down".to_owned())]);
        assert_eq!(c.answer, "Sorry.");
    }

    #[test]
    fn languages() {
        let spanish = "Hola, me cobraron dos veces este mes y quiero que me devuelvan el dinero, por favor.";
        let english = "Here is what I found about your invoice: the second charge was a duplicate and the \
            billing team will refund it within five business days. Let me know if there is anything else.";
        assert_eq!(language_mismatch(spanish, "Gracias, hemos recibido su mensaje y lo revisaremos hoy mismo."), None);
        assert!(language_mismatch(spanish, english).expect("differs").contains("Spanish"));
        assert_eq!(language_mismatch("ok", english), None);
    }
}
