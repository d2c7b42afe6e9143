//! Conversation rules 7 and 8: tool-use pairing and the thinking round-trip.
//!
//! These are the rules a client breaks when it mishandles history: a `tool_use` without its
//! `tool_result` right after, a result for a call that was never made, tool results placed after
//! text, thinking blocks edited, dropped or reordered. The real API rejects all of them, so the
//! scripted server does too.

use std::collections::BTreeSet;

use super::error::ApiError;
use super::fields::invalid_at;
use super::request::{Block, Message, Role};
use super::signature;
use super::tools::ToolSet;

/// Rule 7: every `tool_use` names a defined tool and is answered exactly once in the next message.
pub(crate) fn check_tool_pairing(messages: &[Message], tools: &ToolSet) -> Result<(), ApiError> {
    let mut pending: Vec<&str> = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        match message.role {
            Role::Assistant => pending = check_tool_uses(i, message, tools)?,
            Role::User => check_tool_results(i, message, &std::mem::take(&mut pending))?,
        }
    }
    Ok(())
}

/// An assistant message's `tool_use` ids, after checking each names a client tool.
fn check_tool_uses<'a>(i: usize, message: &'a Message, tools: &ToolSet) -> Result<Vec<&'a str>, ApiError> {
    let mut ids = Vec::new();
    for (j, block) in message.blocks.iter().enumerate() {
        let Block::ToolUse { id, name } = block else {
            continue;
        };
        if !tools.has(name) {
            let what = format!("unknown tool `{name}`: tool_use blocks must name a tool defined in `tools`");
            return Err(invalid_at(&format!("messages.{i}.content.{j}"), what));
        }
        ids.push(id.as_str());
    }
    Ok(ids)
}

/// A user message answers exactly the `expected` ids, with its tool results before anything else.
fn check_tool_results(i: usize, message: &Message, expected: &[&str]) -> Result<(), ApiError> {
    let mut answered = BTreeSet::new();
    let mut other_seen = false;
    for (j, block) in message.blocks.iter().enumerate() {
        let Block::ToolResult { tool_use_id, .. } = block else {
            other_seen = true;
            continue;
        };
        let path = format!("messages.{i}.content.{j}");
        check_one_result(&path, tool_use_id, expected, other_seen)?;
        if !answered.insert(tool_use_id.as_str()) {
            let what = format!("tool_result block for tool_use_id `{tool_use_id}` is provided more than once");
            return Err(invalid_at(&path, what));
        }
    }
    check_all_answered(i, expected, &answered)
}

fn check_one_result(path: &str, id: &str, expected: &[&str], other_seen: bool) -> Result<(), ApiError> {
    if !expected.contains(&id) {
        let what = format!(
            "tool_result block(s) provided with tool_use_id `{id}` without corresponding tool_use in the previous message"
        );
        return Err(invalid_at(path, what));
    }
    if other_seen {
        return Err(invalid_at(path, "tool_result blocks must come first in the content, before any other block"));
    }
    Ok(())
}

fn check_all_answered(i: usize, expected: &[&str], answered: &BTreeSet<&str>) -> Result<(), ApiError> {
    let missing: Vec<&str> = expected.iter().copied().filter(|id| !answered.contains(id)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let what = format!(
        "`tool_use` ids were found without `tool_result` blocks immediately after: {}. Each `tool_use` block must have a corresponding `tool_result` block in the next message.",
        missing.join(", ")
    );
    Err(invalid_at(&format!("messages.{i}"), what))
}

/// Rule 8: thinking blocks come back unchanged, and a turn in a tool loop still starts with one.
pub(crate) fn check_thinking(messages: &[Message]) -> Result<(), ApiError> {
    for (i, message) in messages.iter().enumerate().filter(|(_, m)| m.role == Role::Assistant) {
        check_signatures(i, message)?;
    }
    check_final_turn_thinks(messages)
}

fn check_signatures(i: usize, message: &Message) -> Result<(), ApiError> {
    for (j, block) in message.blocks.iter().enumerate() {
        let path = format!("messages.{i}.content.{j}");
        match block {
            Block::Thinking { thinking, signature } if !signature::verify_thinking(thinking, signature) => {
                return Err(invalid_at(&path, "Invalid `signature` in `thinking` block"));
            }
            Block::RedactedThinking { data } if !signature::verify_redacted(data) => {
                return Err(invalid_at(
                    &path,
                    "Invalid `signature` in `redacted_thinking` block: its `data` was changed",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The last assistant turn, when it called tools, must start with its thinking block.
fn check_final_turn_thinks(messages: &[Message]) -> Result<(), ApiError> {
    let Some((i, last)) = messages.iter().enumerate().rev().find(|(_, m)| m.role == Role::Assistant) else {
        return Ok(());
    };
    let calls_tools = last.blocks.iter().any(|b| matches!(b, Block::ToolUse { .. }));
    let first = last.blocks.first();
    if !calls_tools || matches!(first, Some(Block::Thinking { .. } | Block::RedactedThinking { .. })) {
        return Ok(());
    }
    let what = "Expected `thinking` or `redacted_thinking` at the start of the final `assistant` message: \
                when thinking is enabled, the turn that made the last `tool_use` blocks must keep its thinking block first";
    Err(invalid_at(&format!("messages.{i}.content.0.type"), what))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(blocks: Vec<Block>) -> Message {
        Message { role: Role::User, blocks }
    }

    fn assistant(blocks: Vec<Block>) -> Message {
        Message { role: Role::Assistant, blocks }
    }

    fn text(t: &str) -> Block {
        Block::Text(t.to_owned())
    }

    fn thinking(t: &str) -> Block {
        Block::Thinking { thinking: t.to_owned(), signature: signature::sign_thinking(t) }
    }

    fn call(id: &str, name: &str) -> Block {
        Block::ToolUse { id: id.to_owned(), name: name.to_owned() }
    }

    fn result(id: &str) -> Block {
        Block::ToolResult { tool_use_id: id.to_owned(), text: "ok".to_owned() }
    }

    fn tools() -> ToolSet {
        ToolSet { client: vec!["search".to_owned()] }
    }

    fn pairing_error(messages: &[Message]) -> String {
        check_tool_pairing(messages, &tools()).expect_err("should be rejected").message
    }

    #[test]
    fn answered_tool_use_is_accepted() {
        let messages = [
            user(vec![text("hi")]),
            assistant(vec![thinking("t"), call("a", "search"), call("b", "search")]),
            user(vec![result("b"), result("a"), text("and more")]),
        ];
        assert!(check_tool_pairing(&messages, &tools()).is_ok());
        assert!(check_thinking(&messages).is_ok());
    }

    #[test]
    fn unknown_tool_is_rejected() {
        let messages = [user(vec![text("hi")]), assistant(vec![call("a", "nope")]), user(vec![result("a")])];
        assert!(pairing_error(&messages).contains("unknown tool"));
    }

    #[test]
    fn missing_tool_result_is_rejected() {
        let messages = [
            user(vec![text("hi")]),
            assistant(vec![call("a", "search"), call("b", "search")]),
            user(vec![result("a")]),
        ];
        let message = pairing_error(&messages);
        assert!(
            message
                .starts_with("messages.2: `tool_use` ids were found without `tool_result` blocks immediately after: b")
        );
        let plain = [user(vec![text("hi")]), assistant(vec![call("a", "search")]), user(vec![text("go on")])];
        assert!(pairing_error(&plain).contains("without `tool_result`"));
    }

    #[test]
    fn unexpected_tool_result_is_rejected() {
        let messages =
            [user(vec![text("hi")]), assistant(vec![call("a", "search")]), user(vec![result("a"), result("z")])];
        assert!(
            pairing_error(&messages)
                .contains("tool_result block(s) provided with tool_use_id `z` without corresponding tool_use")
        );
    }

    #[test]
    fn tool_result_outside_a_tool_turn_is_rejected() {
        assert!(pairing_error(&[user(vec![result("a")])]).contains("without corresponding tool_use"));
        let messages = [user(vec![text("hi")]), assistant(vec![text("hello")]), user(vec![result("a")])];
        assert!(pairing_error(&messages).contains("without corresponding tool_use"));
    }

    #[test]
    fn duplicate_tool_result_is_rejected() {
        let messages =
            [user(vec![text("hi")]), assistant(vec![call("a", "search")]), user(vec![result("a"), result("a")])];
        assert!(pairing_error(&messages).contains("more than once"));
    }

    #[test]
    fn tool_results_must_come_first() {
        let messages =
            [user(vec![text("hi")]), assistant(vec![call("a", "search")]), user(vec![text("x"), result("a")])];
        assert!(pairing_error(&messages).contains("must come first"));
    }

    #[test]
    fn tampered_thinking_is_rejected() {
        let tampered =
            Block::Thinking { thinking: "edited".to_owned(), signature: signature::sign_thinking("original") };
        let messages = [user(vec![text("hi")]), assistant(vec![tampered, text("a")]), user(vec![text("b")])];
        let err = check_thinking(&messages).expect_err("tampered");
        assert_eq!(err.message, "messages.1.content.0: Invalid `signature` in `thinking` block");
    }

    #[test]
    fn redacted_thinking_must_verify() {
        let good = Block::RedactedThinking { data: signature::redacted_data() };
        let messages = [user(vec![text("hi")]), assistant(vec![good, text("a")]), user(vec![text("b")])];
        assert!(check_thinking(&messages).is_ok());
        let bad = Block::RedactedThinking { data: "made-up".to_owned() };
        let messages = [user(vec![text("hi")]), assistant(vec![bad, text("a")]), user(vec![text("b")])];
        assert!(check_thinking(&messages).expect_err("forged").message.contains("Invalid `signature`"));
    }

    #[test]
    fn tool_turn_without_its_thinking_is_rejected() {
        let messages =
            [user(vec![text("hi")]), assistant(vec![text("a"), call("a", "search")]), user(vec![result("a")])];
        assert!(check_thinking(&messages).expect_err("dropped").message.contains("Expected `thinking`"));
        let no_tools = [user(vec![text("hi")]), assistant(vec![text("a")]), user(vec![text("b")])];
        assert!(check_thinking(&no_tools).is_ok());
    }
}
