//! The request body, validation rules 3 and 4: JSON, top-level fields and message structure.
//!
//! The body is parsed into a typed [`MessagesRequest`] once; the later rules (tools, conversation,
//! signatures) and the scripts read that view rather than the raw JSON.

use serde_json::Value;

use super::error::ApiError;
use super::fields::{
    Object, array, invalid_at, is_identifier, join, object, optional_bool, required, required_str, string,
};

/// The largest `max_tokens` the server accepts.
pub(crate) const MAX_OUTPUT_TOKENS: u64 = 128_000;

/// The smallest thinking budget the API accepts.
const MIN_THINKING_BUDGET: u64 = 1024;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    User,
    Assistant,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Assistant => "assistant",
        }
    }
}

/// One content block, reduced to what the later rules and the scripts need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Block {
    Text(String),
    Thinking {
        thinking: String,
        signature: String,
    },
    RedactedThinking {
        data: String,
    },
    ToolUse {
        id: String,
        name: String,
    },
    ToolResult {
        tool_use_id: String,
        text: String,
    },
    /// A block nothing here looks into (images, documents, server tool blocks), by its type.
    Opaque(String),
}

/// One message of the conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message {
    pub(crate) role: Role,
    pub(crate) blocks: Vec<Block>,
}

/// The validated top level of a Messages request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MessagesRequest {
    pub(crate) model: String,
    pub(crate) max_tokens: u64,
    /// The system prompt's text, when there is one.
    pub(crate) system: Option<String>,
    pub(crate) messages: Vec<Message>,
}

impl MessagesRequest {
    /// The text of the first user message: what the scripts read their directives from.
    pub(crate) fn goal(&self) -> String {
        self.messages.first().map(Message::text).unwrap_or_default()
    }

    /// How many assistant turns the conversation already has: the script's turn index.
    pub(crate) fn assistant_turns(&self) -> usize {
        self.messages.iter().filter(|m| m.role == Role::Assistant).count()
    }

    /// The text of every `tool_result`, in order.
    pub(crate) fn tool_results(&self) -> Vec<&str> {
        let blocks = self.messages.iter().flat_map(|m| &m.blocks);
        blocks
            .filter_map(|block| match block {
                Block::ToolResult { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The text of the last `tool_result` in the final message.
    pub(crate) fn last_tool_result(&self) -> Option<&str> {
        let last = self.messages.last()?;
        last.blocks.iter().rev().find_map(|block| match block {
            Block::ToolResult { text, .. } => Some(text.as_str()),
            _ => None,
        })
    }
}

impl Message {
    /// The message's text blocks joined by newlines.
    pub(crate) fn text(&self) -> String {
        let texts = self.blocks.iter().filter_map(|block| match block {
            Block::Text(text) => Some(text.as_str()),
            _ => None,
        });
        texts.collect::<Vec<_>>().join("\n")
    }
}

/// Rule 3: the body is a JSON object.
pub(crate) fn parse_body(bytes: &[u8]) -> Result<Object, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("body: request body is not valid JSON: {e}")))?;
    match value {
        Value::Object(obj) => Ok(obj),
        _ => Err(ApiError::invalid("body: request body must be a JSON object")),
    }
}

/// Rule 4: the top-level fields and the messages' structure.
pub(crate) fn parse(body: &Object) -> Result<MessagesRequest, ApiError> {
    let model = parse_model(body)?;
    let max_tokens = parse_max_tokens(required(body, "max_tokens", "")?, &model)?;
    let messages = parse_messages(required(body, "messages", "")?)?;
    let system = body.get("system").map(parse_system).transpose()?;
    check_stream(body)?;
    check_thinking(body, max_tokens)?;
    Ok(MessagesRequest { model, max_tokens, system, messages })
}

fn parse_model(body: &Object) -> Result<String, ApiError> {
    let model = required_str(body, "model", "")?;
    if model.is_empty() {
        return Err(invalid_at("model", "String should have at least 1 character"));
    }
    Ok(model.to_owned())
}

fn parse_max_tokens(value: &Value, model: &str) -> Result<u64, ApiError> {
    let Some(number) = value.as_number() else {
        return Err(invalid_at("max_tokens", "Input should be a valid integer"));
    };
    match (number.as_u64(), number.as_i64()) {
        (Some(0), _) | (None, Some(_)) => Err(invalid_at("max_tokens", "Input should be greater than or equal to 1")),
        (Some(n), _) if n > MAX_OUTPUT_TOKENS => Err(invalid_at(
            "max_tokens",
            format!("{n} > {MAX_OUTPUT_TOKENS}, which is the maximum allowed number of output tokens for {model}"),
        )),
        (Some(n), _) => Ok(n),
        (None, None) => Err(invalid_at("max_tokens", "Input should be a valid integer")),
    }
}

/// `stream` must be a boolean; streaming itself is not something this server speaks.
fn check_stream(body: &Object) -> Result<(), ApiError> {
    match optional_bool(body, "stream", "")? {
        Some(true) => Err(invalid_at("stream", "streaming is not supported by the scripted model server")),
        _ => Ok(()),
    }
}

/// `thinking`, when given, is `enabled` with a budget in `1024..max_tokens`, `disabled` or `adaptive`.
fn check_thinking(body: &Object, max_tokens: u64) -> Result<(), ApiError> {
    let Some(value) = body.get("thinking") else {
        return Ok(());
    };
    let thinking = object(value, "thinking")?;
    match required_str(thinking, "type", "thinking")? {
        "enabled" => check_budget(thinking, max_tokens),
        "disabled" | "adaptive" => Ok(()),
        _ => Err(invalid_at("thinking.type", "Input should be 'enabled', 'disabled' or 'adaptive'")),
    }
}

fn check_budget(thinking: &Object, max_tokens: u64) -> Result<(), ApiError> {
    let path = "thinking.enabled.budget_tokens";
    let budget = required(thinking, "budget_tokens", "thinking.enabled")?;
    let budget = budget.as_u64().ok_or_else(|| invalid_at(path, "Input should be a valid integer"))?;
    if budget < MIN_THINKING_BUDGET {
        return Err(invalid_at(path, format!("Input should be greater than or equal to {MIN_THINKING_BUDGET}")));
    }
    if budget >= max_tokens {
        return Err(ApiError::invalid("`max_tokens` must be greater than `thinking.budget_tokens`"));
    }
    Ok(())
}

/// `system` is a string or a list of text blocks; returns its text.
fn parse_system(value: &Value) -> Result<String, ApiError> {
    if let Value::String(text) = value {
        return Ok(text.clone());
    }
    let blocks = array(value, "system")?;
    let texts = blocks.iter().enumerate().map(|(i, block)| parse_system_block(block, &join("system", i)));
    Ok(texts.collect::<Result<Vec<_>, _>>()?.join("\n"))
}

fn parse_system_block(value: &Value, path: &str) -> Result<String, ApiError> {
    let block = object(value, path)?;
    if required_str(block, "type", path)? != "text" {
        return Err(invalid_at(&join(path, "type"), "Input should be 'text'"));
    }
    parse_text(block, path)
}

/// Rule 4 for `messages`: a non-empty list of well-formed messages with alternating roles.
fn parse_messages(value: &Value) -> Result<Vec<Message>, ApiError> {
    let items = array(value, "messages")?;
    if items.is_empty() {
        return Err(invalid_at("messages", "at least one message is required"));
    }
    let parsed = items.iter().enumerate().map(|(i, item)| parse_message(item, &join("messages", i)));
    let messages = parsed.collect::<Result<Vec<_>, _>>()?;
    check_roles(&messages)?;
    Ok(messages)
}

fn parse_message(value: &Value, path: &str) -> Result<Message, ApiError> {
    let message = object(value, path)?;
    let role = parse_role(required(message, "role", path)?, &join(path, "role"))?;
    let blocks = parse_content(required(message, "content", path)?, role, path)?;
    Ok(Message { role, blocks })
}

fn parse_role(value: &Value, path: &str) -> Result<Role, ApiError> {
    match string(value, path)? {
        "user" => Ok(Role::User),
        "assistant" => Ok(Role::Assistant),
        _ => Err(invalid_at(path, "Input should be 'user' or 'assistant'")),
    }
}

/// A message's content: a non-empty string or a non-empty list of blocks.
fn parse_content(value: &Value, role: Role, message_path: &str) -> Result<Vec<Block>, ApiError> {
    let path = join(message_path, "content");
    let empty = || invalid_at(message_path, "all messages must have non-empty content");
    match value {
        Value::String(text) if text.is_empty() => Err(empty()),
        Value::String(text) => Ok(vec![Block::Text(text.clone())]),
        Value::Array(items) if items.is_empty() => Err(empty()),
        Value::Array(items) => {
            let blocks = items.iter().enumerate().map(|(j, item)| parse_block(item, role, &join(&path, j)));
            blocks.collect()
        }
        _ => Err(invalid_at(&path, "Input should be a valid string or a list of content blocks")),
    }
}

/// One content block, checked against the role that wrote it.
fn parse_block(value: &Value, role: Role, path: &str) -> Result<Block, ApiError> {
    let block = object(value, path)?;
    let kind = required_str(block, "type", path)?;
    check_role_allows(kind, role, path)?;
    match kind {
        "text" => parse_text(block, path).map(Block::Text),
        "thinking" => parse_thinking(block, path),
        "redacted_thinking" => Ok(Block::RedactedThinking { data: required_str(block, "data", path)?.to_owned() }),
        "tool_use" => parse_tool_use(block, path),
        "tool_result" => parse_tool_result(block, path),
        other => Ok(Block::Opaque(other.to_owned())),
    }
}

/// Block types each role may write; the assistant also echoes server tool blocks back.
fn check_role_allows(kind: &str, role: Role, path: &str) -> Result<(), ApiError> {
    let allowed = match role {
        Role::User => matches!(kind, "text" | "image" | "document" | "search_result" | "tool_result"),
        Role::Assistant => is_assistant_block(kind),
    };
    if allowed {
        return Ok(());
    }
    if is_assistant_block(kind) || kind == "tool_result" || kind == "image" || kind == "document" {
        let what = format!("`{kind}` blocks are not allowed in `{}` messages", role.as_str());
        return Err(invalid_at(&join(path, "type"), what));
    }
    Err(invalid_at(&join(path, "type"), format!("unknown content block type '{kind}'")))
}

fn is_assistant_block(kind: &str) -> bool {
    let server_result = kind.ends_with("_tool_result") && kind != "tool_result";
    server_result
        || matches!(kind, "text" | "thinking" | "redacted_thinking" | "tool_use" | "server_tool_use" | "mcp_tool_use")
}

/// A text block's text, which must contain something other than whitespace.
fn parse_text(block: &Object, path: &str) -> Result<String, ApiError> {
    let text = required_str(block, "text", path)?;
    let text_path = join(path, "text");
    if text.is_empty() {
        return Err(invalid_at(&text_path, "text content blocks must be non-empty"));
    }
    if text.trim().is_empty() {
        return Err(invalid_at(&text_path, "text content blocks must contain non-whitespace text"));
    }
    Ok(text.to_owned())
}

fn parse_thinking(block: &Object, path: &str) -> Result<Block, ApiError> {
    let thinking = required_str(block, "thinking", path)?.to_owned();
    let signature = required_str(block, "signature", path)?.to_owned();
    Ok(Block::Thinking { thinking, signature })
}

fn parse_tool_use(block: &Object, path: &str) -> Result<Block, ApiError> {
    let id = required_str(block, "id", path)?;
    if !is_identifier(id, usize::MAX) {
        return Err(invalid_at(&join(path, "id"), "String should match pattern '^[a-zA-Z0-9_-]+$'"));
    }
    let name = required_str(block, "name", path)?.to_owned();
    object(required(block, "input", path)?, &join(path, "input"))?;
    Ok(Block::ToolUse { id: id.to_owned(), name })
}

fn parse_tool_result(block: &Object, path: &str) -> Result<Block, ApiError> {
    let tool_use_id = required_str(block, "tool_use_id", path)?.to_owned();
    optional_bool(block, "is_error", path)?;
    let text = match block.get("content") {
        None => String::new(),
        Some(content) => tool_result_text(content, &join(path, "content"))?,
    };
    Ok(Block::ToolResult { tool_use_id, text })
}

/// A `tool_result`'s content, a string or a list of blocks, as text.
fn tool_result_text(content: &Value, path: &str) -> Result<String, ApiError> {
    if let Value::String(text) = content {
        return Ok(text.clone());
    }
    let items = array(content, path)?;
    let texts = items.iter().enumerate().map(|(i, item)| tool_result_item(item, &join(path, i)));
    let texts = texts.collect::<Result<Vec<_>, _>>()?;
    Ok(texts.into_iter().flatten().collect::<Vec<_>>().join("\n"))
}

fn tool_result_item(value: &Value, path: &str) -> Result<Option<String>, ApiError> {
    let block = object(value, path)?;
    match required_str(block, "type", path)? {
        "text" => parse_text(block, path).map(Some),
        "image" | "document" | "search_result" => Ok(None),
        other => Err(invalid_at(&join(path, "type"), format!("unknown tool_result content type '{other}'"))),
    }
}

/// First message from the user, roles strictly alternating. A final assistant message is allowed, as
/// in the real API: it is how a `pause_turn` response is sent back to let the model continue.
fn check_roles(messages: &[Message]) -> Result<(), ApiError> {
    if messages.first().is_some_and(|m| m.role != Role::User) {
        return Err(invalid_at("messages.0.role", "first message must use the \"user\" role"));
    }
    if let Some(i) = (1..messages.len()).find(|&i| messages[i].role == messages[i - 1].role) {
        let role = messages[i].role.as_str();
        let what = format!(
            "roles must alternate between \"user\" and \"assistant\", but found two \"{role}\" messages in a row"
        );
        return Err(invalid_at(&format!("messages.{i}.role"), what));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_json(body: Value) -> Result<MessagesRequest, ApiError> {
        parse(body.as_object().expect("test bodies are objects"))
    }

    fn rejected(body: Value) -> String {
        parse_json(body).expect_err("should be rejected").message
    }

    fn base() -> Value {
        json!({"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]})
    }

    fn with(key: &str, value: Value) -> Value {
        let mut body = base();
        body[key] = value;
        body
    }

    #[test]
    fn body_must_be_a_json_object() {
        assert!(parse_body(b"{not json").expect_err("bad").message.contains("not valid JSON"));
        assert!(parse_body(b"[1]").expect_err("array").message.contains("JSON object"));
        assert!(parse_body(b"{}").is_ok());
    }

    #[test]
    fn minimal_request_is_accepted() {
        let request = parse_json(base()).expect("valid");
        assert_eq!(request.model, "m");
        assert_eq!(request.goal(), "hi");
        assert_eq!(request.assistant_turns(), 0);
    }

    #[test]
    fn unknown_top_level_fields_are_allowed() {
        let mut body = base();
        body["metadata"] = json!({"user_id": "u"});
        body["temperature"] = json!(0.2);
        body["stop_sequences"] = json!(["###"]);
        body["thinking"] = json!({"type": "enabled", "budget_tokens": 1024});
        body["max_tokens"] = json!(2048);
        assert!(parse_json(body).is_ok());
    }

    #[test]
    fn model_is_required_and_non_empty() {
        let mut body = base();
        body.as_object_mut().expect("object").remove("model");
        assert_eq!(rejected(body), "model: Field required");
        assert!(rejected(with("model", json!(""))).starts_with("model:"));
        assert!(rejected(with("model", json!(7))).starts_with("model:"));
    }

    #[test]
    fn max_tokens_bounds() {
        assert!(rejected(with("max_tokens", json!(0))).starts_with("max_tokens:"));
        assert!(rejected(with("max_tokens", json!(-5))).starts_with("max_tokens:"));
        assert!(rejected(with("max_tokens", json!(1.5))).starts_with("max_tokens:"));
        assert!(rejected(with("max_tokens", json!("10"))).starts_with("max_tokens:"));
        assert!(rejected(with("max_tokens", json!(128_001))).contains("128000"));
        assert_eq!(parse_json(with("max_tokens", json!(128_000))).expect("max").max_tokens, 128_000);
        assert_eq!(parse_json(with("max_tokens", json!(1))).expect("min").max_tokens, 1);
    }

    #[test]
    fn messages_must_be_a_non_empty_list() {
        assert!(rejected(with("messages", json!([]))).starts_with("messages:"));
        assert!(rejected(with("messages", json!("hi"))).starts_with("messages:"));
    }

    #[test]
    fn message_shape() {
        let bad_role = json!([{"role": "system", "content": "hi"}]);
        assert!(rejected(with("messages", bad_role)).starts_with("messages.0.role"));
        let empty = json!([{"role": "user", "content": ""}]);
        assert!(rejected(with("messages", empty)).contains("non-empty content"));
        let number = json!([{"role": "user", "content": 3}]);
        assert!(rejected(with("messages", number)).starts_with("messages.0.content"));
        let blocks =
            json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]);
        assert_eq!(parse_json(with("messages", blocks)).expect("blocks").goal(), "a\nb");
    }

    #[test]
    fn empty_text_blocks_are_rejected() {
        let blank = json!([{"role": "user", "content": [{"type": "text", "text": "  "}]}]);
        assert!(rejected(with("messages", blank)).contains("non-whitespace"));
    }

    #[test]
    fn first_message_must_be_user() {
        let messages = json!([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]);
        assert!(rejected(with("messages", messages)).contains("first message"));
    }

    #[test]
    fn roles_must_alternate() {
        let messages = json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]);
        assert!(rejected(with("messages", messages)).contains("alternate"));
        let ok = json!([
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}
        ]);
        assert_eq!(parse_json(with("messages", ok)).expect("alternating").assistant_turns(), 1);
    }

    #[test]
    fn a_final_assistant_message_continues_a_paused_turn() {
        let messages = json!([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]);
        assert_eq!(parse_json(with("messages", messages)).expect("continuation").assistant_turns(), 1);
    }

    #[test]
    fn blocks_are_checked_against_the_role() {
        let tool_use = json!({"type": "tool_use", "id": "toolu_1", "name": "t", "input": {}});
        let in_user = json!([{"role": "user", "content": [tool_use]}]);
        assert!(rejected(with("messages", in_user)).contains("not allowed in `user` messages"));
        let unknown = json!([{"role": "user", "content": [{"type": "hologram"}]}]);
        assert!(rejected(with("messages", unknown)).contains("unknown content block type"));
    }

    #[test]
    fn tool_blocks_need_their_fields() {
        let no_input = json!({"type": "tool_use", "id": "toolu_1", "name": "t"});
        let messages = json!([{"role": "user", "content": "a"}, {"role": "assistant", "content": [no_input]}, {"role": "user", "content": "b"}]);
        assert_eq!(rejected(with("messages", messages)), "messages.1.content.0.input: Field required");
        let bad_flag = json!({"type": "tool_result", "tool_use_id": "x", "is_error": "yes"});
        let messages = json!([{"role": "user", "content": [bad_flag]}]);
        assert!(rejected(with("messages", messages)).ends_with("is_error: Input should be a valid boolean"));
    }

    #[test]
    fn tool_result_content_forms() {
        let as_string = json!({"type": "tool_result", "tool_use_id": "x", "content": "found it", "is_error": true});
        let request = parse_json(with("messages", json!([{"role": "user", "content": [as_string]}]))).expect("string");
        assert_eq!(request.last_tool_result(), Some("found it"));
        let as_blocks = json!({"type": "tool_result", "tool_use_id": "x", "content": [{"type": "text", "text": "a"}]});
        let request = parse_json(with("messages", json!([{"role": "user", "content": [as_blocks]}]))).expect("blocks");
        assert_eq!(request.last_tool_result(), Some("a"));
        let as_number = json!({"type": "tool_result", "tool_use_id": "x", "content": 5});
        assert!(rejected(with("messages", json!([{"role": "user", "content": [as_number]}]))).contains("content"));
    }

    #[test]
    fn system_forms() {
        assert_eq!(parse_json(with("system", json!("be kind"))).expect("string").system.as_deref(), Some("be kind"));
        let blocks = json!([{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}]);
        assert_eq!(parse_json(with("system", blocks)).expect("blocks").system.as_deref(), Some("a"));
        assert!(rejected(with("system", json!([{"type": "image"}]))).starts_with("system.0.type"));
        assert!(rejected(with("system", json!(4))).starts_with("system"));
    }

    #[test]
    fn thinking_budget_must_fit() {
        let low = with("thinking", json!({"type": "enabled", "budget_tokens": 10}));
        assert!(rejected(low).contains("greater than or equal to 1024"));
        let over = with("thinking", json!({"type": "enabled", "budget_tokens": 2000}));
        assert!(rejected(over).contains("max_tokens"));
        assert!(rejected(with("thinking", json!({"type": "sometimes"}))).starts_with("thinking.type"));
        assert!(parse_json(with("thinking", json!({"type": "adaptive"}))).is_ok());
    }

    #[test]
    fn streaming_is_refused_clearly() {
        assert!(rejected(with("stream", json!(true))).starts_with("stream:"));
        assert!(parse_json(with("stream", json!(false))).is_ok());
    }
}
