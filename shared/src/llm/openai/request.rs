//! Out: stored Anthropic messages → a chat-completions request (see the parent module's docs).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use super::super::conversation::Conversation;
use super::super::types::{CallSpec, LlmError};

#[derive(Debug, Serialize)]
pub(super) struct ChatRequest<'a> {
    model: &'a str,
    max_tokens: u32,
    messages: Vec<ChatMessage>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<ChatTool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<&'static str>,
}

#[derive(Debug, Serialize)]
#[serde(tag = "role", rename_all = "snake_case")]
enum ChatMessage {
    System {
        content: String,
    },
    User {
        content: String,
    },
    Assistant {
        /// `null` when the turn only calls tools.
        content: Option<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        tool_calls: Vec<ChatToolCall>,
    },
    Tool {
        tool_call_id: String,
        content: String,
    },
}

#[derive(Debug, Serialize)]
struct ChatToolCall {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    function: ChatFunctionCall,
}

#[derive(Debug, Serialize)]
struct ChatFunctionCall {
    name: String,
    /// The input as JSON text.
    arguments: String,
}

#[derive(Debug, Serialize)]
struct ChatTool {
    #[serde(rename = "type")]
    kind: &'static str,
    function: ChatFunction,
}

#[derive(Debug, Serialize)]
struct ChatFunction {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    parameters: Box<RawValue>,
}

/// One stored message, as far as this provider reads it.
#[derive(Deserialize)]
struct StoredMessage {
    role: StoredRole,
    content: StoredContent,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum StoredRole {
    User,
    Assistant,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StoredContent {
    Text(String),
    Blocks(Vec<StoredBlock>),
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StoredBlock {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        #[serde(default)]
        content: Option<ToolResultContent>,
        #[serde(default)]
        is_error: Option<bool>,
    },
    /// Thinking, server tools, images, future types: no place for them in this dialect.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ToolResultContent {
    Text(String),
    Blocks(Vec<Value>),
}

/// An Anthropic tool definition.
#[derive(Deserialize)]
struct AnthropicTool {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    input_schema: Option<Box<RawValue>>,
}

/// The request body, and every tool call id the conversation already uses.
#[derive(Debug)]
pub(super) struct Prepared<'a> {
    pub(super) body: ChatRequest<'a>,
    pub(super) used_ids: HashSet<String>,
}

pub(super) fn prepare<'a>(spec: &CallSpec<'a>, messages: Conversation<'_>) -> Result<Prepared<'a>, LlmError> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    if !spec.system.is_empty() {
        out.push(ChatMessage::System { content: spec.system.to_owned() });
    }
    let mut used_ids = HashSet::new();
    for (i, text) in messages.iter().enumerate() {
        let stored: StoredMessage = serde_json::from_str(text)
            .map_err(|e| LlmError::Request(format!("stored message {i} is not a Messages API message: {e}")))?;
        match stored.role {
            StoredRole::User => push_user(stored.content, &mut out),
            StoredRole::Assistant => push_assistant(stored.content, &mut out, &mut used_ids),
        }
    }
    let tools = spec.tools.map(convert_tools).transpose()?.unwrap_or_default();
    let tool_choice = (!tools.is_empty()).then(|| tool_choice(spec.tool_choice));
    let body = ChatRequest { model: spec.model, max_tokens: spec.max_tokens, messages: out, tools, tool_choice };
    Ok(Prepared { body, used_ids })
}

/// Tool results first (one `tool` message each), then the text as one `user` message.
fn push_user(content: StoredContent, out: &mut Vec<ChatMessage>) {
    let blocks = match content {
        StoredContent::Text(text) => return out.push(ChatMessage::User { content: text }),
        StoredContent::Blocks(blocks) => blocks,
    };
    let mut texts = Vec::new();
    for block in blocks {
        match block {
            StoredBlock::ToolResult { tool_use_id, content, is_error } => out.push(ChatMessage::Tool {
                tool_call_id: tool_use_id,
                content: tool_result_text(content, is_error.unwrap_or(false)),
            }),
            StoredBlock::Text { text } => texts.push(text),
            StoredBlock::ToolUse { .. } | StoredBlock::Other => {}
        }
    }
    if !texts.is_empty() {
        out.push(ChatMessage::User { content: texts.join("\n") });
    }
}

/// A tool result's text: a string, or the text blocks of a list; `Error: ` in front of a failure.
fn tool_result_text(content: Option<ToolResultContent>, is_error: bool) -> String {
    let text = match content {
        None => String::new(),
        Some(ToolResultContent::Text(text)) => text,
        Some(ToolResultContent::Blocks(blocks)) => parts_text(&blocks),
    };
    if is_error { format!("Error: {text}") } else { text }
}

/// The `text` of every `{"type":"text"}` part, joined by newlines.
pub(super) fn parts_text(parts: &[Value]) -> String {
    let texts = parts.iter().filter(|p| p.get("type").and_then(Value::as_str) == Some("text"));
    texts.filter_map(|p| p.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("\n")
}

/// Text blocks → `content`, `tool_use` blocks → `tool_calls`; their ids are noted as used.
fn push_assistant(content: StoredContent, out: &mut Vec<ChatMessage>, used_ids: &mut HashSet<String>) {
    let blocks = match content {
        StoredContent::Text(text) => vec![StoredBlock::Text { text }],
        StoredContent::Blocks(blocks) => blocks,
    };
    let mut texts = Vec::new();
    let mut tool_calls = Vec::new();
    for block in blocks {
        match block {
            StoredBlock::Text { text } => texts.push(text),
            StoredBlock::ToolUse { id, name, input } => {
                used_ids.insert(id.clone());
                let function = ChatFunctionCall { name, arguments: arguments_text(&input) };
                tool_calls.push(ChatToolCall { id, kind: "function", function });
            }
            StoredBlock::ToolResult { .. } | StoredBlock::Other => {}
        }
    }
    let text = texts.join("\n");
    let content = if text.is_empty() && !tool_calls.is_empty() { None } else { Some(text) };
    out.push(ChatMessage::Assistant { content, tool_calls });
}

/// A stored input as the `arguments` JSON text (`{}` for none).
fn arguments_text(input: &Value) -> String {
    match input {
        Value::Null => "{}".to_owned(),
        other => other.to_string(),
    }
}

/// The Anthropic `tool_choice` type as OpenAI's: `none` stays, `any` (and `tool`, whose name a
/// [`CallSpec`] does not carry) is `required`, anything else `auto`.
fn tool_choice(anthropic: Option<&str>) -> &'static str {
    match anthropic {
        Some("none") => "none",
        Some("any" | "tool") => "required",
        _ => "auto",
    }
}

/// The Anthropic `tools` array as function tools; server tools are left out.
fn convert_tools(tools: &RawValue) -> Result<Vec<ChatTool>, LlmError> {
    let tools: Vec<AnthropicTool> = serde_json::from_str(tools.get())
        .map_err(|e| LlmError::Request(format!("the tools are not Anthropic tool definitions: {e}")))?;
    let client_tools = tools.into_iter().filter(|t| matches!(t.kind.as_deref(), None | Some("custom")));
    client_tools.map(convert_tool).collect()
}

fn convert_tool(tool: AnthropicTool) -> Result<ChatTool, LlmError> {
    let parameters = match tool.input_schema {
        Some(schema) => schema,
        None => RawValue::from_string(r#"{"type":"object","properties":{}}"#.to_owned())
            .map_err(|e| LlmError::Request(e.to_string()))?,
    };
    let function = ChatFunction { name: tool.name, description: tool.description, parameters };
    Ok(ChatTool { kind: "function", function })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::llm::openai::test_support::*;
    use crate::llm::{ToolOutcome, assistant_message, tool_results_message, user_message};

    #[test]
    fn stored_conversation_becomes_chat_messages() {
        let messages = [
            stored(&user_message("Find the refund policy.")),
            stored(
                r#"{"role":"assistant","content":[{"type":"thinking","thinking":"hm","signature":"c2ln"},{"type":"text","text":"Looking."},{"type":"tool_use","id":"toolu_1","name":"search_knowledge_base","input":{"query":"refund"}},{"type":"tool_use","id":"toolu_2","name":"no_params","input":{}}]}"#,
            ),
            stored(&tool_results_message(&[
                ("toolu_1".into(), ToolOutcome::ok("30 days")),
                ("toolu_2".into(), ToolOutcome::error("timed out")),
            ])),
            stored(
                r#"{"role":"user","content":[{"type":"text","text":"Also:"},{"type":"image","source":{}},{"type":"text","text":"be quick"}]}"#,
            ),
            stored(r#"{"role":"assistant","content":[{"type":"redacted_thinking","data":"x"}]}"#),
            stored(
                r#"{"role":"user","content":[{"type":"tool_result","tool_use_id":"t9","content":[{"type":"text","text":"a"},{"type":"image"},{"type":"text","text":"b"}]}]}"#,
            ),
        ];
        let tools = tools();
        let body = request(&spec(Some(&tools)), &messages);
        let expected = json!({
            "model": "qwen3:8b",
            "max_tokens": 256,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Find the refund policy."},
                {"role": "assistant", "content": "Looking.", "tool_calls": [
                    tool_call("toolu_1", "search_knowledge_base", r#"{"query":"refund"}"#),
                    tool_call("toolu_2", "no_params", "{}"),
                ]},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "30 days"},
                {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: timed out"},
                {"role": "user", "content": "Also:\nbe quick"},
                {"role": "assistant", "content": ""},
                {"role": "tool", "tool_call_id": "t9", "content": "a\nb"},
            ],
            "tools": [
                {"type": "function", "function": {"name": "search_knowledge_base", "description": "Search.",
                  "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}},
                {"type": "function", "function": {"name": "no_params", "parameters": {"type": "object", "properties": {}}}},
            ],
            "tool_choice": "auto",
        });
        assert_eq!(body, expected);
    }

    #[test]
    fn tool_only_turns_send_null_content() {
        let messages = [
            stored(&user_message("go")),
            stored(&assistant_message(&[raw(r#"{"type":"tool_use","id":"a","name":"t","input":null}"#)])),
        ];
        let body = request(&spec(None), &messages);
        assert_eq!(
            body["messages"][2],
            json!({"role": "assistant", "content": null, "tool_calls": [tool_call("a", "t", "{}")]})
        );
    }

    #[test]
    fn no_tools_means_no_tool_choice() {
        let messages = [stored(&user_message("hi"))];
        let no_system = CallSpec { system: "", ..spec(None) };
        let body = request(&no_system, &messages);
        assert_eq!(
            body,
            json!({"model": "qwen3:8b", "max_tokens": 256, "messages": [{"role": "user", "content": "hi"}]})
        );
        let only_server_tools = raw(r#"[{"type":"web_search_20250305","name":"web_search"}]"#);
        let body = request(&spec(Some(&only_server_tools)), &messages);
        assert!(body.get("tools").is_none() && body.get("tool_choice").is_none(), "{body}");
    }

    #[test]
    fn tool_choice_follows_the_spec() {
        let tools = tools();
        let messages = [stored(&user_message("hi"))];
        for (anthropic, openai) in
            [(None, "auto"), (Some("auto"), "auto"), (Some("none"), "none"), (Some("any"), "required")]
        {
            let spec = CallSpec { tool_choice: anthropic, ..spec(Some(&tools)) };
            assert_eq!(request(&spec, &messages)["tool_choice"], openai, "{anthropic:?}");
        }
        let spec = CallSpec { tool_choice: Some("none"), ..spec(None) };
        assert!(request(&spec, &messages).get("tool_choice").is_none(), "never without tools");
    }

    #[test]
    fn unreadable_input_is_a_request_error() {
        let bad = [
            stored(r#"{"role":"system","content":"x"}"#),
            stored(r#"{"role":"user"}"#),
            stored(r#"[1,2]"#),
            stored(r#"{"role":"assistant","content":[{"type":"tool_use","name":"t"}]}"#),
        ];
        for message in bad {
            let err = prepare(&spec(None), Conversation::new(std::slice::from_ref(&message))).expect_err("rejected");
            assert!(matches!(&err, LlmError::Request(m) if m.starts_with("stored message 0")), "{err}");
        }
        let not_tools = raw(r#"{"name":"t"}"#);
        let err = prepare(&spec(Some(&not_tools)), Conversation::new(&[user_message("hi")])).expect_err("rejected");
        assert!(matches!(err, LlmError::Request(_)));
    }
}
