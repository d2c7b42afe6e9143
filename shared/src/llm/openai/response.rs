//! In: a chat completion → a [`ModelReply`] with canonical Anthropic-format blocks, its stop
//! reason and usage (see the parent module's docs).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::super::types::{Block, LlmError, ModelReply, StopReason, ToolUse, Usage};
use super::INVALID_ARGUMENTS_KEY;
use super::errors::error_message;
use super::request::parts_text;

/// The longest tool call id kept as sent.
const MAX_ID_CHARS: usize = 128;

#[derive(Deserialize)]
struct ChatResponse {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    choices: Option<Vec<Choice>>,
    #[serde(default)]
    usage: Option<Value>,
    /// Some proxies answer 2xx with an error body.
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    message: Option<ReplyMessage>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Default, Deserialize)]
struct ReplyMessage {
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    tool_calls: Option<Vec<ReplyToolCall>>,
    #[serde(default)]
    refusal: Option<String>,
}

#[derive(Deserialize)]
struct ReplyToolCall {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<ReplyFunction>,
}

#[derive(Default, Deserialize)]
struct ReplyFunction {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<Value>,
}

/// What the reply's content amounts to, for the stop reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    has_text: bool,
    has_calls: bool,
    refused: bool,
}

pub(super) fn parse_reply(bytes: &[u8], mut used_ids: HashSet<String>) -> Result<ModelReply, LlmError> {
    let body: ChatResponse = serde_json::from_slice(bytes).map_err(|e| LlmError::Decode(e.to_string()))?;
    let Some(choice) = body.choices.and_then(|c| c.into_iter().next()) else {
        return Err(LlmError::Decode(no_choices(body.error.as_ref())));
    };
    let message = choice.message.unwrap_or_default();
    let refusal = message.refusal.filter(|r| !r.is_empty());
    let text = message.content.as_ref().map(content_text).filter(|t| !t.is_empty()).or_else(|| refusal.clone());
    let calls = message.tool_calls.unwrap_or_default();
    let shape = Shape { has_text: text.is_some(), has_calls: !calls.is_empty(), refused: refusal.is_some() };
    let mut blocks = Vec::with_capacity(calls.len() + 1);
    blocks.extend(text.map(Block::Text));
    blocks.extend(calls.into_iter().map(|call| Block::ToolUse(tool_use(call, &mut used_ids))));
    let content = canonical_content(&blocks)?;
    let id = body.id.filter(|id| !id.is_empty()).unwrap_or_else(|| format!("chatcmpl-{}", ulid::Ulid::new()));
    let stop_reason = stop_reason(choice.finish_reason.as_deref(), shape);
    let usage = usage(body.usage.as_ref()).credible()?;
    Ok(ModelReply::new(id, &content, blocks, stop_reason, usage))
}

fn no_choices(error: Option<&Value>) -> String {
    match error.and_then(error_message) {
        Some(message) => format!("the response has no choices; it says: {message}"),
        None => "the response has no choices".to_owned(),
    }
}

/// `content` as text: a string, or the text of a list of parts; anything else is no text.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts_text(parts),
        _ => String::new(),
    }
}

/// A block as the Messages API writes it, `type` first.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum CanonicalBlock<'a> {
    Text { text: &'a str },
    ToolUse { id: &'a str, name: &'a str, input: &'a Value },
}

/// The `content` array of `blocks` as the Messages API writes it: what is stored and replayed.
fn canonical_content(blocks: &[Block]) -> Result<String, LlmError> {
    let canonical: Vec<CanonicalBlock<'_>> = blocks
        .iter()
        .filter_map(|block| match block {
            Block::Text(text) => Some(CanonicalBlock::Text { text }),
            Block::ToolUse(t) => Some(CanonicalBlock::ToolUse { id: &t.id, name: &t.name, input: &t.input }),
            Block::Other => None,
        })
        .collect();
    serde_json::to_string(&canonical).map_err(|e| LlmError::Decode(e.to_string()))
}

/// One tool call as a `tool_use` view.
fn tool_use(call: ReplyToolCall, used_ids: &mut HashSet<String>) -> ToolUse {
    let function = call.function.unwrap_or_default();
    let id = unique_id(call.id, used_ids);
    let input = parse_arguments(function.arguments);
    ToolUse { id, name: function.name.unwrap_or_default(), input }
}

/// The given id when usable and new in this conversation, else `call_<ulid>`; noted as used.
fn unique_id(given: Option<String>, used_ids: &mut HashSet<String>) -> String {
    let usable = |id: &String| is_portable_id(id) && !used_ids.contains(id);
    let id = given.filter(usable).unwrap_or_else(|| format!("call_{}", ulid::Ulid::new()));
    used_ids.insert(id.clone());
    id
}

/// `^[A-Za-z0-9_-]{1,128}$`.
fn is_portable_id(id: &str) -> bool {
    (1..=MAX_ID_CHARS).contains(&id.len()) && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// `arguments` as a `tool_use` input: a JSON object, `{}` for none, or the invalid-arguments marker.
fn parse_arguments(arguments: Option<Value>) -> Value {
    let text = match arguments {
        None | Some(Value::Null) => return json!({}),
        Some(Value::Object(object)) => return Value::Object(object),
        Some(Value::String(text)) if text.trim().is_empty() => return json!({}),
        Some(Value::String(text)) => text,
        Some(other) => other.to_string(),
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(object)) => Value::Object(object),
        _ => json!({ INVALID_ARGUMENTS_KEY: text }),
    }
}

/// See the module docs: tool calls win, then `finish_reason`.
fn stop_reason(finish_reason: Option<&str>, shape: Shape) -> StopReason {
    if shape.has_calls {
        return StopReason::ToolUse;
    }
    match finish_reason.filter(|r| !r.is_empty()) {
        _ if shape.refused => StopReason::Refusal,
        Some("stop") => StopReason::EndTurn,
        Some("length") => StopReason::MaxTokens,
        Some("content_filter") => StopReason::Refusal,
        Some("tool_calls" | "function_call") => StopReason::ToolUse,
        Some(other) => StopReason::Other(other.to_owned()),
        None if shape.has_text => StopReason::EndTurn,
        None => StopReason::Other("null".to_owned()),
    }
}

/// The usage object's counts; anything missing or not a non-negative integer is 0.
fn usage(usage: Option<&Value>) -> Usage {
    let count = |value: Option<&Value>| value.and_then(Value::as_u64).unwrap_or(0);
    let prompt = count(usage.and_then(|u| u.get("prompt_tokens")));
    let cached = count(usage.and_then(|u| u.pointer("/prompt_tokens_details/cached_tokens"))).min(prompt);
    Usage {
        input_tokens: prompt - cached,
        output_tokens: count(usage.and_then(|u| u.get("completion_tokens"))),
        cache_read_input_tokens: cached,
        ..Usage::default()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::llm::openai::invalid_arguments;
    use crate::llm::openai::test_support::*;

    #[test]
    fn tool_calls_become_tool_use_blocks() {
        let message = json!({"role": "assistant", "content": "Checking.", "tool_calls": [
            tool_call("call_a", "search_knowledge_base", r#"{"query":"refund"}"#),
            tool_call("call_b", "no_params", ""),
        ]});
        let reply = reply(&completion(message, json!("tool_calls")));
        assert_eq!(reply.id, "chatcmpl-1");
        assert_eq!(reply.stop_reason, StopReason::ToolUse);
        assert!(
            reply.content().starts_with(
                r#"[{"type":"text","text":"Checking."},{"type":"tool_use","id":"call_a","name":"search_knowledge_base","input":"#
            ),
            "{}",
            reply.content()
        );
        let stored = crate::llm::stored_content(&reply.assistant_message()).expect("stored");
        let views: Vec<Block> = stored.iter().map(|b| Block::view(b)).collect();
        assert_eq!(views, reply.block_views(), "the stored blocks read as the reply's views");
        assert_eq!(reply.text(), "Checking.");
        let uses = tool_uses(&reply);
        assert_eq!((uses[0].id.as_str(), uses[0].name.as_str()), ("call_a", "search_knowledge_base"));
        assert_eq!(uses[0].input, json!({"query": "refund"}));
        assert_eq!((uses[1].id.as_str(), &uses[1].input), ("call_b", &json!({})));
        assert_eq!(
            reply.usage,
            Usage { input_tokens: 40, output_tokens: 7, cache_read_input_tokens: 60, ..Usage::default() }
        );
    }

    #[test]
    fn tool_calls_win_over_finish_reason() {
        for finish in [json!("stop"), json!("length"), json!(null), json!("weird")] {
            let message = json!({"role": "assistant", "content": null, "tool_calls": [tool_call("c", "t", "{}")]});
            let reply = reply(&completion(message, finish.clone()));
            assert_eq!(reply.stop_reason, StopReason::ToolUse, "{finish}");
            assert_eq!(reply.block_views().len(), 1, "null content gives no text block");
        }
    }

    #[test]
    fn finish_reasons_map() {
        let text = json!({"role": "assistant", "content": "Hi."});
        let cases = [
            (json!("stop"), StopReason::EndTurn),
            (json!("length"), StopReason::MaxTokens),
            (json!("content_filter"), StopReason::Refusal),
            (json!("tool_calls"), StopReason::ToolUse),
            (json!("abort"), StopReason::Other("abort".into())),
            (json!(null), StopReason::EndTurn),
            (json!(""), StopReason::EndTurn),
        ];
        for (finish, expected) in cases {
            assert_eq!(reply(&completion(text.clone(), finish.clone())).stop_reason, expected, "{finish}");
        }
        let empty = reply(&completion(json!({"role": "assistant", "content": ""}), json!(null)));
        assert_eq!(empty.content(), "[]");
        assert_eq!((empty.stop_reason.clone(), empty.block_views().len()), (StopReason::Other("null".into()), 0));
        let empty_tool_calls = json!({"role": "assistant", "content": null, "tool_calls": []});
        assert_eq!(reply(&completion(empty_tool_calls, json!("stop"))).stop_reason, StopReason::EndTurn);
        let refused = reply(&completion(json!({"content": null, "refusal": "I can't."}), json!("stop")));
        assert_eq!((refused.stop_reason.clone(), refused.text()), (StopReason::Refusal, "I can't.".to_owned()));
    }

    #[test]
    fn content_parts_and_reasoning() {
        let message = json!({"role": "assistant", "reasoning_content": "thinking…", "content": [
            {"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]});
        let reply = reply(&completion(message, json!("stop")));
        assert_eq!(reply.text(), "a\nb");
        assert_eq!(reply.block_views().len(), 1);
    }

    #[test]
    fn invalid_arguments_are_kept_for_the_runner() {
        let cases = [
            ("{not json", json!({INVALID_ARGUMENTS_KEY: "{not json"})),
            ("[1,2]", json!({INVALID_ARGUMENTS_KEY: "[1,2]"})),
            ("\"text\"", json!({INVALID_ARGUMENTS_KEY: "\"text\""})),
            ("null", json!({INVALID_ARGUMENTS_KEY: "null"})),
            ("  ", json!({})),
            (r#"{"a":[1]}"#, json!({"a": [1]})),
        ];
        for (arguments, expected) in cases {
            let message = json!({"content": null, "tool_calls": [tool_call("c", "t", arguments)]});
            let uses = tool_uses(&reply(&completion(message, json!("tool_calls"))));
            assert_eq!(uses[0].input, expected, "{arguments}");
        }
        assert_eq!(parse_arguments(Some(json!({"a": 1}))), json!({"a": 1}), "object arguments are used as is");
        assert_eq!(parse_arguments(Some(json!(5))), json!({INVALID_ARGUMENTS_KEY: "5"}));
        assert_eq!(parse_arguments(None), json!({}));
        assert_eq!(invalid_arguments(&json!({INVALID_ARGUMENTS_KEY: "x", "other": 1})), None);
    }

    #[test]
    fn unusable_or_repeated_ids_are_replaced() {
        let message = json!({"content": null, "tool_calls": [
            tool_call("call_0", "t", "{}"),
            tool_call("call_0", "t", "{}"),
            tool_call("toolu_old", "t", "{}"),
            tool_call("has space", "t", "{}"),
            tool_call("", "t", "{}"),
            {"type": "function", "function": {"name": "t", "arguments": "{}"}},
            {"id": "x".repeat(MAX_ID_CHARS + 1), "function": {"name": "t"}},
            {"id": "kept-1"},
        ]});
        let used = HashSet::from(["toolu_old".to_owned()]);
        let reply = parse_reply(completion(message, json!("stop")).to_string().as_bytes(), used).expect("parses");
        let ids: Vec<String> = tool_uses(&reply).into_iter().map(|t| t.id).collect();
        assert_eq!(ids[0], "call_0");
        assert_eq!(ids[7], "kept-1");
        for id in &ids[1..7] {
            assert!(id.starts_with("call_") && id.len() == 5 + 26, "{id}");
        }
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len());
        assert_eq!(tool_uses(&reply)[7].name, "", "a call without a function still answers");
    }

    #[test]
    fn usage_is_tolerant() {
        assert_eq!(usage(None), Usage::default());
        let odd = json!({"prompt_tokens": 5, "completion_tokens": null, "prompt_tokens_details": {"cached_tokens": 9}});
        assert_eq!(usage(Some(&odd)), Usage { input_tokens: 0, cache_read_input_tokens: 5, ..Usage::default() });
        let negative = json!({"prompt_tokens": -1, "completion_tokens": 2.5});
        assert_eq!(usage(Some(&negative)), Usage::default());
        let no_usage = json!({"choices": [{"message": {"content": "x"}, "finish_reason": "stop"}]});
        let reply = reply(&no_usage);
        assert_eq!(reply.usage, Usage::default());
        assert!(reply.id.starts_with("chatcmpl-"));
    }

    #[test]
    fn malformed_replies_are_decode_errors() {
        let empty = HashSet::new;
        assert!(matches!(parse_reply(b"not json", empty()), Err(LlmError::Decode(_))));
        assert!(matches!(parse_reply(b"[]", empty()), Err(LlmError::Decode(_))));
        assert!(matches!(parse_reply(br#"{"choices":[]}"#, empty()), Err(LlmError::Decode(_))));
        assert!(matches!(parse_reply(br#"{"choices":null}"#, empty()), Err(LlmError::Decode(_))));
        let err = parse_reply(br#"{"error":{"message":"model is loading"}}"#, empty()).expect_err("decode");
        assert!(err.to_string().contains("model is loading"), "{err}");
        let bad_call = br#"{"choices":[{"message":{"tool_calls":[{"function":{"name":5}}]}}]}"#;
        assert!(matches!(parse_reply(bad_call, empty()), Err(LlmError::Decode(_))));
        let choice_without_message = parse_reply(br#"{"choices":[{}]}"#, empty()).expect("parses");
        assert_eq!(choice_without_message.stop_reason, StopReason::Other("null".into()));
    }
}
