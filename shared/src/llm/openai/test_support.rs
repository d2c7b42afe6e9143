//! Helpers of the OpenAI client's tests: stored messages, specs, and chat completions.

use std::collections::HashSet;

use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::request::prepare;
use super::response::parse_reply;
use crate::llm::{Block, CallSpec, Conversation, ModelReply, ToolUse};

pub(super) fn raw(text: &str) -> Box<RawValue> {
    RawValue::from_string(text.to_owned()).expect("raw json")
}

/// A stored message: its JSON text.
pub(super) fn stored(text: &str) -> String {
    text.to_owned()
}

pub(super) fn tools() -> Box<RawValue> {
    raw(r#"[
        {"name":"search_knowledge_base","description":"Search.","input_schema":{"type":"object","properties":{"query":{"type":"string"}}},"cache_control":{"type":"ephemeral"}},
        {"name":"no_params"},
        {"type":"web_search_20250305","name":"web_search","max_uses":2}
    ]"#)
}

pub(super) fn spec<'a>(tools: Option<&'a RawValue>) -> CallSpec<'a> {
    CallSpec { model: "qwen3:8b", system: "Be brief.", max_tokens: 256, tools, tool_choice: None, cache: None }
}

/// The request body as JSON.
pub(super) fn request(spec: &CallSpec<'_>, messages: &[String]) -> Value {
    serde_json::to_value(&prepare(spec, Conversation::new(messages)).expect("prepares").body).expect("serialises")
}

pub(super) fn reply(body: &Value) -> ModelReply {
    parse_reply(body.to_string().as_bytes(), HashSet::new()).expect("parses")
}

pub(super) fn completion(message: Value, finish_reason: Value) -> Value {
    json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m", "system_fingerprint": "fp",
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 7, "total_tokens": 107,
                  "prompt_tokens_details": {"cached_tokens": 60}, "completion_tokens_details": {"reasoning_tokens": 0}}
    })
}

pub(super) fn tool_call(id: &str, name: &str, arguments: &str) -> Value {
    json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
}

pub(super) fn tool_uses(reply: &ModelReply) -> Vec<ToolUse> {
    let uses = reply.block_views().iter().filter_map(|b| match b {
        Block::ToolUse(t) => Some(t.clone()),
        _ => None,
    });
    uses.collect()
}
