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
//! - **Stop reason**: a non-empty `tool_calls` means [`StopReason::ToolUse`](super::StopReason::ToolUse) whatever `finish_reason`
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

mod errors;
mod request;
mod response;
#[cfg(test)]
mod test_support;

use std::fmt;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

pub use crate::config::OpenAiConfig;

use super::conversation::Conversation;
use super::transport::{Connections, STREAMS_PER_CONNECTION};
use super::types::{CallSpec, Dialect, LlmError, ModelReply, RequestBody};
use errors::{parse_error, retry_after};
use request::prepare;
use response::parse_reply;

/// The one key of a `tool_use` input that stands for arguments that were not a JSON object; its value
/// is the raw text the model wrote. See the module docs.
pub const INVALID_ARGUMENTS_KEY: &str = "_invalid_arguments";

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
    http: Connections,
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
    /// A client for the configured endpoint, with room for as many calls at once as one HTTP/2
    /// connection carries; fails on a base URL that is not `http(s)://…` or a key that cannot be a
    /// header value.
    pub fn new(cfg: &OpenAiConfig) -> Result<Self, LlmError> {
        Self::with_capacity(cfg, STREAMS_PER_CONNECTION)
    }

    /// A client for the configured endpoint, with room for `calls_in_flight` calls at once.
    pub fn with_capacity(cfg: &OpenAiConfig, calls_in_flight: usize) -> Result<Self, LlmError> {
        let url = chat_url(&cfg.base_url)?;
        let http = Connections::new(cfg.http, cfg.timeout_ms, calls_in_flight)?;
        Ok(Self { http, url, headers: headers(cfg.api_key.as_ref())? })
    }

    /// Sends the conversation (stored Anthropic format) and returns the model's reply as canonical
    /// Anthropic-format blocks: [`Self::request_body`], then [`Self::send`].
    pub async fn create_message<'m>(
        &self,
        spec: &CallSpec<'_>,
        messages: impl Into<Conversation<'m>>,
    ) -> Result<ModelReply, LlmError> {
        let body = self.request_body(spec, messages.into())?;
        self.send(body).await
    }

    /// The chat-completions request body of a call: each stored message is read and translated
    /// (see the module docs).
    pub fn request_body(&self, spec: &CallSpec<'_>, messages: Conversation<'_>) -> Result<RequestBody, LlmError> {
        let prepared = prepare(spec, messages)?;
        let bytes = serde_json::to_vec(&prepared.body).map_err(|e| LlmError::Request(e.to_string()))?;
        Ok(RequestBody::new(bytes, Dialect::OpenAi { used_ids: prepared.used_ids }))
    }

    /// Sends a request body written by [`Self::request_body`] and returns the model's reply.
    pub async fn send(&self, body: RequestBody) -> Result<ModelReply, LlmError> {
        let (bytes, Dialect::OpenAi { used_ids }) = body.into_parts() else {
            return Err(LlmError::Request("a request body written for another provider".into()));
        };
        let response = self
            .http
            .next()
            .post(&self.url)
            .headers(self.headers.clone())
            .body(bytes)
            .send()
            .await
            .map_err(|e| LlmError::transport(&e))?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let bytes = crate::llm::types::read_body(response).await?;
        if status.is_success() {
            parse_reply(&bytes, used_ids)
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

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::test_support::*;
    use super::*;
    use crate::llm::{StopReason, ToolOutcome, tool_results_message, user_message};

    #[test]
    fn conversation_round_trips() {
        // Step 1: the goal goes out, a tool call comes back and is stored the way the engine stores it.
        let tools = tools();
        let spec = spec(Some(&tools));
        let mut messages = vec![user_message("[steps=2]")];
        let first = prepare(&spec, Conversation::new(&messages)).expect("prepares");
        let call = tool_call("call_x", "search_knowledge_base", r#"{"query":"step 1 of 2"}"#);
        let sent = json!({"role": "assistant", "content": "Step 1 of 2.", "tool_calls": [call]});
        let reply1 = parse_reply(completion(sent.clone(), json!("stop")).to_string().as_bytes(), first.used_ids)
            .expect("parses");
        assert_eq!(reply1.stop_reason, StopReason::ToolUse);
        messages.push(reply1.assistant_message());
        let ids: Vec<(String, ToolOutcome)> =
            tool_uses(&reply1).into_iter().map(|t| (t.id, ToolOutcome::ok("found"))).collect();
        messages.push(tool_results_message(&ids));
        // Step 2: the stored reply replays as the message the server sent.
        let second = prepare(&spec, Conversation::new(&messages)).expect("prepares");
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
        let messages = [user_message("go"), reply.assistant_message()];
        let body = request(&spec(None), &messages);
        let arguments = body["messages"][2]["tool_calls"][0]["function"]["arguments"].as_str().expect("text");
        let parsed: Value = serde_json::from_str(arguments).expect("valid JSON");
        assert_eq!(invalid_arguments(&parsed), Some("{not json"));
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
