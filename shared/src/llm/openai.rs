//! An OpenAI-compatible chat-completions client (`POST {base_url}/chat/completions`), for local and
//! self-hosted model servers: Ollama, vLLM, llama.cpp's `llama-server`, and anything else that
//! speaks that dialect.
//!
//! # One stored format
//!
//! The conversation is stored in the Anthropic Messages format whatever the provider (see [`super`]),
//! so the engine, the store and the tool ledger never learn which provider ran a step. This client
//! translates at its edge, both ways, and returns the same [`ModelReply`] and [`LlmError`] as
//! [`super::AnthropicClient`]:
//!
//! - **out**: the system prompt becomes a `system` message; a user message's `tool_result` blocks
//!   become one `tool` message each (content prefixed with `Error: ` when `is_error`), its text blocks
//!   one `user` message after them; an assistant message's text blocks become `content` and its
//!   `tool_use` blocks `tool_calls`, with the input as JSON text. Blocks this dialect has no place for
//!   (thinking, redacted thinking, server tools, images) are dropped. The Anthropic `tools` array
//!   becomes `[{type:"function", function:{name, description, parameters}}]`.
//! - **in**: `message.content` becomes a `text` block and each `tool_calls[i]` a `tool_use` block, so
//!   the reply is stored and replayed exactly like an Anthropic one.
//!
//! # Arguments that are not JSON
//!
//! Small local models often write tool arguments that do not parse. Dropping such a call would hide
//! the mistake from the model; failing the call would waste the step. Instead the call still becomes
//! a `tool_use` block, whose `input` is `{"_invalid_arguments": "<the raw text>"}`
//! ([`INVALID_ARGUMENTS_KEY`]; [`invalid_arguments`] reads it back). The tool runner answers it with
//! an `is_error` result ("the arguments were not valid JSON: …") and the model can try again. On
//! replay that marker object is sent as the call's arguments — valid JSON, because some servers parse
//! the arguments of past calls and would reject the whole conversation over the raw text.
//! Arguments that are valid JSON but not an object count as invalid too; empty arguments (`""`, or
//! none) are `{}`, as models send for tools without parameters.
//!
//! # Edge cases, decided
//!
//! - **Stop reason**: a non-empty `tool_calls` means [`StopReason::ToolUse`] whatever `finish_reason`
//!   says (Ollama and several vLLM tool parsers say `stop`). Otherwise `stop` → `EndTurn`, `length` →
//!   `MaxTokens`, `content_filter` → `Refusal`, `tool_calls`/`function_call` without calls → `ToolUse`
//!   (the engine then nudges the model), a non-empty `refusal` → `Refusal`, any other value →
//!   `Other(value)`. A missing or null `finish_reason` is `EndTurn` when the reply has text (some
//!   servers and proxies leave it out of complete answers) and `Other("null")` when the reply is
//!   empty too: nothing to act on, so the engine fails the session rather than complete it blank.
//! - **Tool call ids**: the engine keys its tool ledger by id, so an id must be unique in the whole
//!   conversation. An id that is missing, empty, longer than 128 characters, outside
//!   `[A-Za-z0-9_-]` (the Anthropic pattern, so a stored conversation stays portable), or already
//!   used earlier in the conversation or the same reply is replaced by `call_<ulid>`. Some servers
//!   number calls per reply (`call_0`) and would otherwise make a later call look already done.
//! - **Content**: `null` or `""` gives no text block; a list of content parts gives their text.
//!   Reasoning fields (`reasoning_content`, `reasoning`) are dropped; only the first choice is read.
//! - **Usage**: `prompt_tokens − cached_tokens` → input, `cached_tokens` → cache read,
//!   `completion_tokens` → output; missing or non-integer counts are 0.
//! - **Errors**: non-2xx → [`LlmError::Api`] with `error.type`, else `error.code`, else `api_error` as
//!   the kind; `error.message`, else the start of the body, as the message (also for vLLM's older
//!   top-level shape and `{"error":"text"}`); `retry-after-ms` or `retry-after` as the wait. A 2xx
//!   body that is not a chat completion, or has no choices, is [`LlmError::Decode`]; a stored
//!   message that is not a Messages API message, or a `tools` array that is not Anthropic tool
//!   definitions, is [`LlmError::Request`]. No input makes this module panic.
//! - **Request**: `tool_choice` is sent only with a non-empty tool list (OpenAI rejects it without
//!   tools): `auto` by default, `none` for [`CallSpec::tool_choice`] `none` (tools defined, none to be
//!   called), `required` for `any`/`tool`. Anthropic server tools (a `type` other than `custom`) are
//!   left out.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};

pub use crate::config::OpenAiConfig;

use super::types::{CallSpec, LlmError, ModelReply, RawBlock, StopReason, Usage};

/// The one key of a `tool_use` input that stands for arguments that were not a JSON object; its value
/// is the raw text the model wrote. See the module docs.
pub const INVALID_ARGUMENTS_KEY: &str = "_invalid_arguments";

/// How much of an unreadable error body goes into the error message.
const BODY_EXCERPT_BYTES: usize = 200;

/// The longest API error message kept, in characters.
const MAX_ERROR_MESSAGE_CHARS: usize = 1000;

/// The longest tool call id kept as sent.
const MAX_ID_CHARS: usize = 128;

/// The longest wait a `retry-after` header may ask for.
const MAX_RETRY_AFTER_SECS: f64 = 86_400.0;

/// The raw text of arguments that were not a JSON object, when `input` is the
/// [`INVALID_ARGUMENTS_KEY`] marker this client made.
///
/// ```
/// use agentfleet::llm::openai::invalid_arguments;
/// let input = serde_json::json!({ "_invalid_arguments": "{not json" });
/// assert_eq!(invalid_arguments(&input), Some("{not json"));
/// assert_eq!(invalid_arguments(&serde_json::json!({ "query": "x" })), None);
/// ```
pub fn invalid_arguments(input: &Value) -> Option<&str> {
    let object = input.as_object().filter(|o| o.len() == 1)?;
    object.get(INVALID_ARGUMENTS_KEY)?.as_str()
}

/// A chat-completions client. Cheap to clone; one per process.
#[derive(Clone)]
pub struct OpenAiClient {
    http: reqwest::Client,
    url: String,
    headers: HeaderMap,
}

impl fmt::Debug for OpenAiClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let has_key = self.headers.contains_key(AUTHORIZATION);
        f.debug_struct("OpenAiClient")
            .field("url", &self.url)
            .field("api_key", &has_key.then_some("[redacted]"))
            .finish()
    }
}

impl OpenAiClient {
    /// A client for the configured endpoint; fails on a base URL that is not `http(s)://…` or a key
    /// that cannot be a header value.
    pub fn new(cfg: &OpenAiConfig) -> Result<Self, LlmError> {
        let url = chat_url(&cfg.base_url)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(256)
            .build()
            .map_err(|e| LlmError::Request(e.to_string()))?;
        Ok(Self { http, url, headers: headers(cfg.api_key.as_ref())? })
    }

    /// Sends the conversation (stored Anthropic format) and returns the model's reply as canonical
    /// Anthropic-format blocks.
    pub async fn create_message(
        &self,
        spec: &CallSpec<'_>,
        messages: &[Box<RawValue>],
    ) -> Result<ModelReply, LlmError> {
        let prepared = prepare(spec, messages)?;
        let body = serde_json::to_vec(&prepared.body).map_err(|e| LlmError::Request(e.to_string()))?;
        let response = self
            .http
            .post(&self.url)
            .headers(self.headers.clone())
            .body(body)
            .send()
            .await
            .map_err(|e| LlmError::transport(&e))?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let bytes = response.bytes().await.map_err(|e| LlmError::transport(&e))?;
        if status.is_success() {
            parse_reply(&bytes, prepared.used_ids)
        } else {
            Err(parse_error(status.as_u16(), &bytes, retry_after))
        }
    }
}

/// `{base_url}/chat/completions`, after checking the base is an http(s) URL.
fn chat_url(base_url: &str) -> Result<String, LlmError> {
    let parsed = url::Url::parse(base_url)
        .map_err(|e| LlmError::Request(format!("invalid OpenAI base URL `{base_url}`: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(LlmError::Request(format!("the OpenAI base URL `{base_url}` is not http(s)")));
    }
    Ok(format!("{}/chat/completions", base_url.trim_end_matches('/')))
}

/// The fixed headers: JSON, and the bearer key when there is one (marked sensitive).
fn headers(key: Option<&SecretString>) -> Result<HeaderMap, LlmError> {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some(key) = key {
        let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose_secret()))
            .map_err(|_| LlmError::Request("the OpenAI API key is not a valid header value".into()))?;
        value.set_sensitive(true);
        headers.insert(AUTHORIZATION, value);
    }
    Ok(headers)
}

/// `retry-after-ms` (OpenAI's own) or `retry-after` in seconds.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok();
    let secs = number("retry-after-ms").map(|ms| ms / 1000.0).or_else(|| number("retry-after"))?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(MAX_RETRY_AFTER_SECS)))
}

// ---------------------------------------------------------------------------------------------
// Out: stored Anthropic messages → a chat-completions request.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct ChatRequest<'a> {
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
struct Prepared<'a> {
    body: ChatRequest<'a>,
    used_ids: HashSet<String>,
}

fn prepare<'a>(spec: &CallSpec<'a>, messages: &[Box<RawValue>]) -> Result<Prepared<'a>, LlmError> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    if !spec.system.is_empty() {
        out.push(ChatMessage::System { content: spec.system.to_owned() });
    }
    let mut used_ids = HashSet::new();
    for (i, raw) in messages.iter().enumerate() {
        let stored: StoredMessage = serde_json::from_str(raw.get())
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
fn parts_text(parts: &[Value]) -> String {
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

// ---------------------------------------------------------------------------------------------
// In: a chat completion → a ModelReply with canonical Anthropic-format blocks.
// ---------------------------------------------------------------------------------------------

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

fn parse_reply(bytes: &[u8], mut used_ids: HashSet<String>) -> Result<ModelReply, LlmError> {
    let body: ChatResponse = serde_json::from_slice(bytes).map_err(|e| LlmError::Decode(e.to_string()))?;
    let Some(choice) = body.choices.and_then(|c| c.into_iter().next()) else {
        return Err(LlmError::Decode(no_choices(body.error.as_ref())));
    };
    let message = choice.message.unwrap_or_default();
    let refusal = message.refusal.filter(|r| !r.is_empty());
    let text = message.content.as_ref().map(content_text).filter(|t| !t.is_empty()).or_else(|| refusal.clone());
    let calls = message.tool_calls.unwrap_or_default();
    let shape = Shape { has_text: text.is_some(), has_calls: !calls.is_empty(), refused: refusal.is_some() };
    let mut content = Vec::with_capacity(calls.len() + 1);
    if let Some(text) = text {
        content.push(raw_block(&CanonicalBlock::Text { text: &text })?);
    }
    for call in calls {
        content.push(tool_use_block(call, &mut used_ids)?);
    }
    let id = body.id.filter(|id| !id.is_empty()).unwrap_or_else(|| format!("chatcmpl-{}", ulid::Ulid::new()));
    let stop_reason = stop_reason(choice.finish_reason.as_deref(), shape);
    Ok(ModelReply { id, content, stop_reason, usage: usage(body.usage.as_ref()), rate_headers: Default::default() })
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

fn raw_block(block: &CanonicalBlock<'_>) -> Result<RawBlock, LlmError> {
    serde_json::value::to_raw_value(block).map_err(|e| LlmError::Decode(e.to_string()))
}

/// One tool call as a canonical `tool_use` block.
fn tool_use_block(call: ReplyToolCall, used_ids: &mut HashSet<String>) -> Result<RawBlock, LlmError> {
    let function = call.function.unwrap_or_default();
    let id = unique_id(call.id, used_ids);
    let input = parse_arguments(function.arguments);
    let name = function.name.unwrap_or_default();
    raw_block(&CanonicalBlock::ToolUse { id: &id, name: &name, input: &input })
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
        cache_creation_input_tokens: 0,
        cache_read_input_tokens: cached,
    }
}

// ---------------------------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------------------------

/// A non-2xx answer as [`LlmError::Api`], whatever shape its body has.
fn parse_error(status: u16, bytes: &[u8], retry_after: Option<Duration>) -> LlmError {
    let body: Option<Value> = serde_json::from_slice(bytes).ok();
    let detail = body.as_ref().map(|b| b.get("error").unwrap_or(b));
    let kind = detail.and_then(error_kind).unwrap_or_else(|| "api_error".to_owned());
    let message = detail.and_then(error_message).unwrap_or_else(|| excerpt(bytes));
    LlmError::Api { status, kind, message, retry_after }
}

/// `type`, else `code` (a string or a number).
fn error_kind(detail: &Value) -> Option<String> {
    let text = |value: &Value| match value {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    detail.get("type").and_then(text).or_else(|| detail.get("code").and_then(text))
}

/// `message`, or the detail itself when it is a string; capped in length.
fn error_message(detail: &Value) -> Option<String> {
    let message = match detail {
        Value::String(text) => text.as_str(),
        other => other.get("message")?.as_str()?,
    };
    Some(message.chars().take(MAX_ERROR_MESSAGE_CHARS).collect())
}

fn excerpt(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(BODY_EXCERPT_BYTES)]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{Block, ToolOutcome, assistant_message, tool_results_message, user_message};

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).expect("raw json")
    }

    fn tools() -> Box<RawValue> {
        raw(r#"[
            {"name":"search_knowledge_base","description":"Search.","input_schema":{"type":"object","properties":{"query":{"type":"string"}}},"cache_control":{"type":"ephemeral"}},
            {"name":"no_params"},
            {"type":"web_search_20250305","name":"web_search","max_uses":2}
        ]"#)
    }

    fn spec<'a>(tools: Option<&'a RawValue>) -> CallSpec<'a> {
        CallSpec { model: "qwen3:8b", system: "Be brief.", max_tokens: 256, tools, tool_choice: None }
    }

    /// The request body as JSON.
    fn request(spec: &CallSpec<'_>, messages: &[Box<RawValue>]) -> Value {
        serde_json::to_value(&prepare(spec, messages).expect("prepares").body).expect("serialises")
    }

    fn reply(body: &Value) -> ModelReply {
        parse_reply(body.to_string().as_bytes(), HashSet::new()).expect("parses")
    }

    fn completion(message: Value, finish_reason: Value) -> Value {
        json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m", "system_fingerprint": "fp",
            "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 7, "total_tokens": 107,
                      "prompt_tokens_details": {"cached_tokens": 60}, "completion_tokens_details": {"reasoning_tokens": 0}}
        })
    }

    fn tool_call(id: &str, name: &str, arguments: &str) -> Value {
        json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
    }

    fn tool_uses(reply: &ModelReply) -> Vec<crate::llm::ToolUse> {
        let uses = reply.blocks().into_iter().filter_map(|b| match b {
            Block::ToolUse(t) => Some(t),
            _ => None,
        });
        uses.collect()
    }

    #[test]
    fn stored_conversation_becomes_chat_messages() {
        let messages = [
            raw(&user_message("Find the refund policy.")),
            raw(
                r#"{"role":"assistant","content":[{"type":"thinking","thinking":"hm","signature":"c2ln"},{"type":"text","text":"Looking."},{"type":"tool_use","id":"toolu_1","name":"search_knowledge_base","input":{"query":"refund"}},{"type":"tool_use","id":"toolu_2","name":"no_params","input":{}}]}"#,
            ),
            raw(&tool_results_message(&[
                ("toolu_1".into(), ToolOutcome::ok("30 days")),
                ("toolu_2".into(), ToolOutcome::error("timed out")),
            ])),
            raw(
                r#"{"role":"user","content":[{"type":"text","text":"Also:"},{"type":"image","source":{}},{"type":"text","text":"be quick"}]}"#,
            ),
            raw(r#"{"role":"assistant","content":[{"type":"redacted_thinking","data":"x"}]}"#),
            raw(
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
            raw(&user_message("go")),
            raw(&assistant_message(&[raw(r#"{"type":"tool_use","id":"a","name":"t","input":null}"#)])),
        ];
        let body = request(&spec(None), &messages);
        assert_eq!(
            body["messages"][2],
            json!({"role": "assistant", "content": null, "tool_calls": [tool_call("a", "t", "{}")]})
        );
    }

    #[test]
    fn no_tools_means_no_tool_choice() {
        let messages = [raw(&user_message("hi"))];
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
        let messages = [raw(&user_message("hi"))];
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
            raw(r#"{"role":"system","content":"x"}"#),
            raw(r#"{"role":"user"}"#),
            raw(r#"[1,2]"#),
            raw(r#"{"role":"assistant","content":[{"type":"tool_use","name":"t"}]}"#),
        ];
        for message in bad {
            let err = prepare(&spec(None), std::slice::from_ref(&message)).expect_err("rejected");
            assert!(matches!(&err, LlmError::Request(m) if m.starts_with("stored message 0")), "{err}");
        }
        let not_tools = raw(r#"{"name":"t"}"#);
        let err = prepare(&spec(Some(&not_tools)), &[raw(&user_message("hi"))]).expect_err("rejected");
        assert!(matches!(err, LlmError::Request(_)));
    }

    #[test]
    fn tool_calls_become_tool_use_blocks() {
        let message = json!({"role": "assistant", "content": "Checking.", "tool_calls": [
            tool_call("call_a", "search_knowledge_base", r#"{"query":"refund"}"#),
            tool_call("call_b", "no_params", ""),
        ]});
        let reply = reply(&completion(message, json!("tool_calls")));
        assert_eq!(reply.id, "chatcmpl-1");
        assert_eq!(reply.stop_reason, StopReason::ToolUse);
        assert_eq!(reply.content[0].get(), r#"{"type":"text","text":"Checking."}"#);
        assert!(
            reply.content[1]
                .get()
                .starts_with(r#"{"type":"tool_use","id":"call_a","name":"search_knowledge_base","input":"#)
        );
        assert_eq!(reply.text(), "Checking.");
        let uses = tool_uses(&reply);
        assert_eq!((uses[0].id.as_str(), uses[0].name.as_str()), ("call_a", "search_knowledge_base"));
        assert_eq!(uses[0].input, json!({"query": "refund"}));
        assert_eq!((uses[1].id.as_str(), &uses[1].input), ("call_b", &json!({})));
        assert_eq!(
            reply.usage,
            Usage { input_tokens: 40, output_tokens: 7, cache_creation_input_tokens: 0, cache_read_input_tokens: 60 }
        );
    }

    #[test]
    fn tool_calls_win_over_finish_reason() {
        for finish in [json!("stop"), json!("length"), json!(null), json!("weird")] {
            let message = json!({"role": "assistant", "content": null, "tool_calls": [tool_call("c", "t", "{}")]});
            let reply = reply(&completion(message, finish.clone()));
            assert_eq!(reply.stop_reason, StopReason::ToolUse, "{finish}");
            assert_eq!(reply.content.len(), 1, "null content gives no text block");
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
        assert_eq!((empty.stop_reason, empty.content.len()), (StopReason::Other("null".into()), 0));
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
        assert_eq!(reply.content.len(), 1);
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
    fn conversation_round_trips() {
        // Step 1: the goal goes out, a tool call comes back and is stored the way the engine stores it.
        let tools = tools();
        let spec = spec(Some(&tools));
        let mut messages = vec![raw(&user_message("[steps=2]"))];
        let first = prepare(&spec, &messages).expect("prepares");
        let call = tool_call("call_x", "search_knowledge_base", r#"{"query":"step 1 of 2"}"#);
        let sent = json!({"role": "assistant", "content": "Step 1 of 2.", "tool_calls": [call]});
        let reply1 = parse_reply(completion(sent.clone(), json!("stop")).to_string().as_bytes(), first.used_ids)
            .expect("parses");
        assert_eq!(reply1.stop_reason, StopReason::ToolUse);
        messages.push(raw(&reply1.assistant_message()));
        let ids: Vec<(String, ToolOutcome)> =
            tool_uses(&reply1).into_iter().map(|t| (t.id, ToolOutcome::ok("found"))).collect();
        messages.push(raw(&tool_results_message(&ids)));
        // Step 2: the stored reply replays as the message the server sent.
        let second = prepare(&spec, &messages).expect("prepares");
        let body = serde_json::to_value(&second.body).expect("json");
        assert_eq!(body["messages"][2], sent);
        assert_eq!(body["messages"][3], json!({"role": "tool", "tool_call_id": "call_x", "content": "found"}));
        assert!(second.used_ids.contains("call_x"));
        let done = json!({"role": "assistant", "content": "Done after 2 steps."});
        let reply2 =
            parse_reply(completion(done, json!("stop")).to_string().as_bytes(), second.used_ids).expect("parses");
        assert_eq!(
            (reply2.stop_reason.clone(), reply2.text()),
            (StopReason::EndTurn, "Done after 2 steps.".to_owned())
        );
    }

    #[test]
    fn invalid_arguments_replay_as_json() {
        let message = json!({"content": null, "tool_calls": [tool_call("c1", "t", "{not json")]});
        let reply = reply(&completion(message, json!("tool_calls")));
        let messages = [raw(&user_message("go")), raw(&reply.assistant_message())];
        let body = request(&spec(None), &messages);
        let arguments = body["messages"][2]["tool_calls"][0]["function"]["arguments"].as_str().expect("text");
        let parsed: Value = serde_json::from_str(arguments).expect("valid JSON");
        assert_eq!(invalid_arguments(&parsed), Some("{not json"));
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

    #[test]
    fn api_errors_keep_status_kind_and_message() {
        let api = |status, body: &[u8]| match parse_error(status, body, None) {
            LlmError::Api { kind, message, .. } => (kind, message),
            other => panic!("not an API error: {other}"),
        };
        let openai = br#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
        assert_eq!(api(429, openai), ("requests".into(), "Rate limit reached".into()));
        let code_only = br#"{"error":{"message":"bad key","type":null,"code":"invalid_api_key"}}"#;
        assert_eq!(api(401, code_only), ("invalid_api_key".into(), "bad key".into()));
        let numeric = br#"{"error":{"message":"m","code":400}}"#;
        assert_eq!(api(400, numeric).0, "400");
        let vllm_old = br#"{"object":"error","message":"too long","type":"BadRequestError","param":null,"code":400}"#;
        assert_eq!(api(400, vllm_old), ("BadRequestError".into(), "too long".into()));
        assert_eq!(api(404, br#"{"error":"model 'x' not found"}"#), ("api_error".into(), "model 'x' not found".into()));
        assert_eq!(api(502, b"<html>bad gateway</html>"), ("api_error".into(), "<html>bad gateway</html>".into()));
        let long = format!("a{}", "é".repeat(300));
        let cut = format!("a{}\u{FFFD}", "é".repeat(99));
        assert_eq!(api(500, long.as_bytes()).1, cut, "a character split by the excerpt is replaced");
        assert!(parse_error(503, b"", None).is_retryable());
        assert!(!parse_error(400, openai, None).is_retryable());
    }

    #[test]
    fn retry_after_reads_ms_then_seconds() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert("retry-after-ms", HeaderValue::from_static("1500"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        h.insert("retry-after-ms", HeaderValue::from_static("-3"));
        assert_eq!(retry_after(&h), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn config_reads_and_never_prints_the_key() {
        let cfg: OpenAiConfig = toml::from_str(r#"base_url = "http://gpu:8000/v1""#).expect("parses");
        assert_eq!(
            (cfg.base_url.as_str(), cfg.timeout_ms, cfg.api_key.is_none()),
            ("http://gpu:8000/v1", 300_000, true)
        );
        assert!(toml::from_str::<OpenAiConfig>(r#"api_key = "sk""#).is_err(), "the key is never read from the file");
        let cfg = OpenAiConfig { api_key: Some("sk-secret".into()), ..OpenAiConfig::default() };
        assert!(!format!("{cfg:?}").contains("sk-secret"));
        let client = OpenAiClient::new(&cfg).expect("builds");
        assert!(!format!("{client:?}").contains("sk-secret"));
        assert_eq!(client.url, "http://127.0.0.1:11434/v1/chat/completions");
    }

    #[test]
    fn bad_endpoints_are_refused() {
        for base_url in ["not a url", "ftp://x/v1", ""] {
            let cfg = OpenAiConfig { base_url: base_url.into(), ..OpenAiConfig::default() };
            assert!(matches!(OpenAiClient::new(&cfg), Err(LlmError::Request(_))), "{base_url}");
        }
        let cfg = OpenAiConfig { api_key: Some("bad\nkey".into()), ..OpenAiConfig::default() };
        assert!(matches!(OpenAiClient::new(&cfg), Err(LlmError::Request(_))));
        let cfg = OpenAiConfig { base_url: "http://h/v1/".into(), ..OpenAiConfig::default() };
        assert_eq!(OpenAiClient::new(&cfg).expect("builds").url, "http://h/v1/chat/completions");
    }
}
