//! The types of a model call, shared by every provider: what is sent ([`CallSpec`]), what comes
//! back ([`ModelReply`], its blocks and [`Usage`]), how it fails ([`LlmError`]), and the stored
//! messages built from them.

use std::cell::Cell;
use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use thiserror::Error;

use crate::domain::Provider;

/// A failed model call, classified so the step can decide: retry later, or fail the session.
#[derive(Debug, Error)]
pub enum LlmError {
    /// The API answered with an error status and its error shape.
    #[error("model API error {status} {kind}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The error's `type` (`rate_limit_error`, `overloaded_error`, …).
        kind: String,
        /// The API's own message.
        message: String,
        /// The `retry-after` header, when sent.
        retry_after: Option<Duration>,
    },
    /// No answer: timeout, refused connection, reset.
    #[error("model API unreachable: {detail}")]
    Transport {
        /// Whether the request may have reached the API: `false` only when the connection was
        /// never made, so the call certainly cost nothing.
        sent: bool,
        /// What happened.
        detail: String,
    },
    /// A 2xx answer that is not a Messages API response.
    #[error("model API sent an unreadable response: {0}")]
    Decode(String),
    /// The request could not be built (no API key, bad header value).
    #[error("model request could not be built: {0}")]
    Request(String),
}

impl LlmError {
    /// True for errors that may pass: 408, 429 (unless the account's spend limit is reached),
    /// 5xx, 529, transport failures, and unreadable answers.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Api { status: 429, .. } => !self.is_spend_limit(),
            Self::Api { status, .. } => matches!(status, 408 | 500..=599),
            Self::Transport { .. } | Self::Decode(_) => true,
            Self::Request(_) => false,
        }
    }

    /// A refusal because the account's spend or credit limit is reached: waiting will not help.
    pub fn is_spend_limit(&self) -> bool {
        let Self::Api { message, .. } = self else { return false };
        let m = message.to_ascii_lowercase();
        ["spend limit", "spending limit", "credit balance", "usage limit", "billing"].iter().any(|w| m.contains(w))
    }

    /// True when the provider itself is failing (5xx, 529, timeouts, unreachable, garbage): what
    /// its circuit breaker counts. A 4xx or a 429 is an answer from a working provider.
    pub fn is_provider_failure(&self) -> bool {
        match self {
            Self::Api { status, .. } => *status >= 500,
            Self::Transport { .. } | Self::Decode(_) => true,
            Self::Request(_) => false,
        }
    }

    /// True when the call certainly cost nothing: the API answered with an error, the connection
    /// was never made, or the request was never sent. A timeout or an unreadable 2xx may have
    /// been billed.
    pub fn is_unbilled(&self) -> bool {
        match self {
            Self::Api { .. } | Self::Request(_) => true,
            Self::Transport { sent, .. } => !sent,
            Self::Decode(_) => false,
        }
    }

    /// A failed send or read: a timeout may have been billed, a refused connection cannot have been.
    pub(crate) fn transport(e: &reqwest::Error) -> Self {
        let (sent, detail) = if e.is_timeout() {
            (true, "timed out".to_owned())
        } else if e.is_connect() {
            (false, "connection failed".to_owned())
        } else {
            // reqwest's Display includes the URL (never headers): cut to scheme, host and path.
            (true, crate::scrub::error(e))
        };
        Self::Transport { sent, detail }
    }

    /// An error answer. A blank `kind` or `message` (an empty body, an error object without a
    /// message) is replaced, so that every refusal says something more than its status.
    pub(crate) fn api(status: u16, kind: String, message: String, retry_after: Option<Duration>) -> Self {
        let kind = if kind.trim().is_empty() { "api_error".to_owned() } else { kind };
        let message =
            if message.trim().is_empty() { format!("HTTP {status} without an error message") } else { message };
        Self::Api { status, kind, message, retry_after }
    }

    /// The server's `retry-after`, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Api { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// What one model call sends, besides the conversation.
#[derive(Debug, Clone, Copy)]
pub struct CallSpec<'a> {
    /// Model id.
    pub model: &'a str,
    /// System prompt (empty for none).
    pub system: &'a str,
    /// Output token cap.
    pub max_tokens: u32,
    /// The tool definitions as one JSON array, prepared once per agent; `None` for a tool-less call.
    pub tools: Option<&'a RawValue>,
    /// `tool_choice` type: `None` for the default (`auto`), `Some("none")` to forbid tool use while
    /// the definitions stay (the conversation may hold `tool_use` blocks, which need them).
    pub tool_choice: Option<&'a str>,
    /// Prompt-cache breakpoints to mark (Messages API): `None` for none.
    pub cache: Option<super::CacheSpec>,
}

/// One content block exactly as received.
pub type RawBlock = Box<RawValue>;

/// Token counts of one call, including the prompt-cache fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Uncached input tokens.
    #[serde(default)]
    pub input_tokens: u64,
    /// Output tokens.
    #[serde(default)]
    pub output_tokens: u64,
    /// Input tokens written to the cache.
    #[serde(default, deserialize_with = "null_as_zero")]
    pub cache_creation_input_tokens: u64,
    /// Input tokens read from the cache.
    #[serde(default, deserialize_with = "null_as_zero")]
    pub cache_read_input_tokens: u64,
    /// Of `cache_creation_input_tokens`, those written with the 1-hour TTL (the rest were written
    /// with the 5-minute one). Read from the API's `cache_creation` breakdown, or, without one,
    /// from the TTL the call asked for.
    #[serde(default, skip_serializing)]
    pub cache_creation_1h_input_tokens: u64,
}

/// The most tokens one count of one call may hold. No model reads or writes four billion tokens in
/// a call; a larger count is a broken answer, and letting it through would overflow the sums of a
/// step's tokens and the session's counters in Redis (64-bit signed).
pub const MAX_TOKENS_PER_CALL: u64 = u32::MAX as u64;

impl Usage {
    /// The usage, or a decode error naming the first count above [`MAX_TOKENS_PER_CALL`].
    pub(crate) fn credible(self) -> Result<Self, LlmError> {
        let counts = [
            ("input_tokens", self.input_tokens),
            ("output_tokens", self.output_tokens),
            ("cache_creation_input_tokens", self.cache_creation_input_tokens),
            ("cache_read_input_tokens", self.cache_read_input_tokens),
        ];
        match counts.into_iter().find(|(_, n)| *n > MAX_TOKENS_PER_CALL) {
            Some((field, n)) => Err(LlmError::Decode(format!("usage.{field}: {n} is not a credible token count"))),
            None => Ok(self),
        }
    }
}

fn null_as_zero<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(Option::<u64>::deserialize(d)?.unwrap_or(0))
}

/// Why the model stopped. Every documented value is its own variant, so each is handled on purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The model finished its turn.
    EndTurn,
    /// The model asked for tools.
    ToolUse,
    /// The output hit `max_tokens`.
    MaxTokens,
    /// A stop sequence matched.
    StopSequence,
    /// A long server-side turn was paused; send the content back to let it continue.
    PauseTurn,
    /// The model declined for safety reasons.
    Refusal,
    /// A value this version does not know.
    Other(String),
}

impl StopReason {
    pub(crate) fn parse(s: &str) -> Self {
        match s {
            "end_turn" => Self::EndTurn,
            "tool_use" => Self::ToolUse,
            "max_tokens" => Self::MaxTokens,
            "stop_sequence" => Self::StopSequence,
            "pause_turn" => Self::PauseTurn,
            "refusal" => Self::Refusal,
            other => Self::Other(other.to_owned()),
        }
    }

    /// A bounded label for metrics (`other` for unknown values).
    pub fn label(&self) -> &'static str {
        match self {
            Self::Other(_) => "other",
            known => match known.as_str() {
                "end_turn" => "end_turn",
                "tool_use" => "tool_use",
                "max_tokens" => "max_tokens",
                "stop_sequence" => "stop_sequence",
                "pause_turn" => "pause_turn",
                _ => "refusal",
            },
        }
    }

    /// The API's text.
    pub fn as_str(&self) -> &str {
        match self {
            Self::EndTurn => "end_turn",
            Self::ToolUse => "tool_use",
            Self::MaxTokens => "max_tokens",
            Self::StopSequence => "stop_sequence",
            Self::PauseTurn => "pause_turn",
            Self::Refusal => "refusal",
            Self::Other(s) => s,
        }
    }
}

/// The parts of a content block the fleet acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    /// Text for the user.
    Text(String),
    /// A tool call.
    ToolUse(ToolUse),
    /// Anything else (thinking, redacted thinking, server tools, future types): kept, not read.
    Other,
}

/// A `tool_use` block.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ToolUse {
    /// The id a `tool_result` must answer.
    pub id: String,
    /// The tool's name.
    pub name: String,
    /// The input the model gave; may be anything, it is validated before the tool runs.
    #[serde(default)]
    pub input: serde_json::Value,
}

impl Block {
    /// Reads the view of a raw block; a block that does not parse as a known type is `Other`.
    pub fn view(raw: &RawValue) -> Block {
        serde_json::from_str(raw.get()).unwrap_or(Block::Other)
    }

    /// The views of a reply's `content` array, read in one pass that decodes every string of every
    /// block, known or not: a lone surrogate escape (`"\ud800"`) passes a raw scan, but would be
    /// stored, shown and sent back as text that no JSON reader accepts.
    pub(crate) fn read_all(content: &RawValue) -> Result<Vec<Block>, LlmError> {
        let reading = Cell::new(None);
        let mut de = serde_json::Deserializer::from_str(content.get());
        BlockList { reading: &reading }.deserialize(&mut de).map_err(|e| match reading.get() {
            Some(i) => LlmError::Decode(format!("content block {i} is not valid JSON text: {e}")),
            None => LlmError::Decode(format!("content is not a list of blocks: {e}")),
        })
    }
}

/// The blocks of a `content` array; `reading` holds the index of the block being read.
struct BlockList<'r> {
    reading: &'r Cell<Option<usize>>,
}

impl<'de> DeserializeSeed<'de> for BlockList<'_> {
    type Value = Vec<Block>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<Block>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for BlockList<'_> {
    type Value = Vec<Block>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of content blocks")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Block>, A::Error> {
        let mut blocks = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        self.reading.set(Some(0));
        while let Some(block) = seq.next_element()? {
            blocks.push(block);
            self.reading.set(Some(blocks.len()));
        }
        Ok(blocks)
    }
}

impl<'de> Deserialize<'de> for Block {
    /// Any JSON value: an object of a known `type` with the fields it needs is its view, anything
    /// else `Other`. Only text that is not JSON is an error.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Block, D::Error> {
        d.deserialize_any(BlockVisitor)
    }
}

/// The fields a view is made of; every other field is read (so checked) and dropped.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum BlockField {
    Type,
    Text,
    Id,
    Name,
    Input,
    #[serde(other)]
    Other,
}

/// The values of a block's [`BlockField`]s, as found.
#[derive(Default)]
struct BlockFields {
    kind: Option<Value>,
    text: Option<Value>,
    id: Option<Value>,
    name: Option<Value>,
    input: Option<Value>,
}

impl BlockFields {
    /// The view: `text` and `tool_use` blocks with fields of the right types, else `Other`.
    fn view(self) -> Block {
        let Self { kind, text, id, name, input } = self;
        match (kind.as_ref().and_then(Value::as_str), text, id, name) {
            (Some("text"), Some(Value::String(text)), _, _) => Block::Text(text),
            (Some("tool_use"), _, Some(Value::String(id)), Some(Value::String(name))) => {
                Block::ToolUse(ToolUse { id, name, input: input.unwrap_or_default() })
            }
            _ => Block::Other,
        }
    }
}

struct BlockVisitor;

impl<'de> Visitor<'de> for BlockVisitor {
    type Value = Block;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a content block")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Block, A::Error> {
        let mut fields = BlockFields::default();
        while let Some(field) = map.next_key()? {
            let slot = match field {
                BlockField::Type => &mut fields.kind,
                BlockField::Text => &mut fields.text,
                BlockField::Id => &mut fields.id,
                BlockField::Name => &mut fields.name,
                BlockField::Input => &mut fields.input,
                BlockField::Other => {
                    map.next_value::<Checked>()?;
                    continue;
                }
            };
            *slot = Some(map.next_value()?);
        }
        Ok(fields.view())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Block, A::Error> {
        CheckedVisitor.visit_seq(seq).map(|_| Block::Other)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Block, E> {
        Ok(Block::Other)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Block, E> {
        Ok(Block::Other)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Block, E> {
        Ok(Block::Other)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Block, E> {
        Ok(Block::Other)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Block, E> {
        Ok(Block::Other)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Block, E> {
        Ok(Block::Other)
    }
}

/// Any JSON value, read and dropped. Unlike [`de::IgnoredAny`], which only scans, it decodes every
/// string (keys too), so text that is not valid JSON is an error; it allocates nothing.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Checked, D::Error> {
        d.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> Visitor<'de> for CheckedVisitor {
    type Value = Checked;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_entry::<Checked, Checked>()?.is_some() {}
        Ok(Checked)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
}

/// A model's answer, read once: the views of its blocks for the fleet to act on, and the assistant
/// message to store, made of the `content` array exactly as received.
#[derive(Debug)]
pub struct ModelReply {
    /// The API's message id.
    pub id: String,
    /// `{"role":"assistant","content":[…]}`, the content as received.
    message: String,
    /// The views of the content blocks, in order.
    blocks: Vec<Block>,
    /// Why the model stopped.
    pub stop_reason: StopReason,
    /// Token counts.
    pub usage: Usage,
    /// What the `anthropic-ratelimit-*` headers said remains, for the fleet's rate limiter.
    pub rate_headers: crate::ratelimit::RateHeaders,
}

/// What comes before the content array in a stored assistant message.
const ASSISTANT_PREFIX: &str = r#"{"role":"assistant","content":"#;

impl ModelReply {
    /// A reply whose `content` array is the JSON text `content`, and `blocks` its views.
    pub(crate) fn new(id: String, content: &str, blocks: Vec<Block>, stop_reason: StopReason, usage: Usage) -> Self {
        let mut message = String::with_capacity(ASSISTANT_PREFIX.len() + content.len() + 1);
        message.push_str(ASSISTANT_PREFIX);
        message.push_str(content);
        message.push('}');
        Self { id, message, blocks, stop_reason, usage, rate_headers: Default::default() }
    }

    /// The views of the content blocks, in order.
    pub fn block_views(&self) -> &[Block] {
        &self.blocks
    }

    /// A copy of the views of the content blocks (no parse: they were read with the reply).
    pub fn blocks(&self) -> Vec<Block> {
        self.blocks.clone()
    }

    /// All text blocks joined with newlines.
    pub fn text(&self) -> String {
        text_of(&self.blocks)
    }

    /// The `content` array exactly as received.
    pub fn content(&self) -> &str {
        &self.message[ASSISTANT_PREFIX.len()..self.message.len() - 1]
    }

    /// The assistant message to append to the conversation: the content as received.
    pub fn assistant_message(&self) -> String {
        self.message.clone()
    }
}

/// A model call's request body, written before the call is sent. It owns its bytes and borrows
/// nothing, so the conversation it was written from can be dropped before the call is awaited.
#[derive(Debug)]
pub struct RequestBody {
    bytes: Vec<u8>,
    dialect: Dialect,
}

/// Whose API a body is written for, and what reading its reply needs.
#[derive(Debug)]
pub(crate) enum Dialect {
    /// The Messages API: the TTL the call's cache breakpoints asked for, if it has any.
    Anthropic {
        /// The TTL.
        cache: Option<crate::config::CacheTtl>,
    },
    /// Chat completions: the tool call ids the conversation already uses, so a reply's ids can be
    /// kept unique.
    OpenAi {
        /// The ids.
        used_ids: HashSet<String>,
    },
}

impl RequestBody {
    pub(crate) fn new(bytes: Vec<u8>, dialect: Dialect) -> Self {
        Self { bytes, dialect }
    }

    /// The provider the body is written for.
    pub fn provider(&self) -> Provider {
        match self.dialect {
            Dialect::Anthropic { .. } => Provider::Anthropic,
            Dialect::OpenAi { .. } => Provider::Openai,
        }
    }

    /// The body's bytes (JSON).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub(crate) fn into_parts(self) -> (Vec<u8>, Dialect) {
        (self.bytes, self.dialect)
    }
}

/// The longest model API response body read: far above any real reply (a reply of the largest
/// `max_tokens` is well under a MiB of JSON), so only a broken or hostile endpoint reaches it.
pub const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;

/// A model API response body, read up to [`MAX_RESPONSE_BYTES`]. A 2xx body over the cap is refused
/// ([`LlmError::Decode`]): before any of it is read when its `Content-Length` says so, else as
/// soon as it passes the cap. An error status keeps its first bytes, enough for the error shape.
pub(crate) async fn read_body(response: reqwest::Response) -> Result<Vec<u8>, LlmError> {
    let cap = MAX_RESPONSE_BYTES;
    let too_long = |of: String| LlmError::Decode(format!("the response body {of} is over the limit of {cap} bytes"));
    let success = response.status().is_success();
    if success && let Some(n) = crate::http_body::declared_over(&response, cap) {
        return Err(too_long(crate::http_body::Cut::Declared(n).describe(cap)));
    }
    let body = crate::http_body::read_capped(response, cap).await.map_err(|e| LlmError::transport(&e))?;
    match body.cut {
        Some(cut) if success => Err(too_long(cut.describe(cap))),
        _ => Ok(body.bytes),
    }
}

/// All text blocks of `blocks` joined with newlines.
pub fn text_of(blocks: &[Block]) -> String {
    let texts: Vec<&str> = blocks
        .iter()
        .filter_map(|b| match b {
            Block::Text(t) => Some(t.as_str()),
            _ => None,
        })
        .collect();
    texts.join("\n")
}

/// `{"role":"assistant","content":[…]}` with each block's bytes unchanged.
pub fn assistant_message(content: &[RawBlock]) -> String {
    let blocks: Vec<&str> = content.iter().map(|b| b.get()).collect();
    format!(r#"{{"role":"assistant","content":[{}]}}"#, blocks.join(","))
}

/// The content blocks of a stored assistant message, raw.
pub fn stored_content(message: &str) -> Result<Vec<RawBlock>, serde_json::Error> {
    #[derive(Deserialize)]
    struct Stored {
        content: Vec<RawBlock>,
    }
    Ok(serde_json::from_str::<Stored>(message)?.content)
}

/// A user message carrying `tool_result` blocks, in the order given.
pub fn tool_results_message(results: &[(String, ToolOutcome)]) -> String {
    let blocks: Vec<serde_json::Value> = results
        .iter()
        .map(|(id, out)| {
            serde_json::json!({
                "type": "tool_result",
                "tool_use_id": id,
                "content": out.content,
                "is_error": out.is_error,
            })
        })
        .collect();
    serde_json::json!({ "role": "user", "content": blocks }).to_string()
}

/// A plain user text message, as one text block (an empty text as an empty string). A block, not
/// a string, so that a prompt-cache marker on it never changes how the rest of it is written.
pub fn user_message(text: &str) -> String {
    if text.is_empty() {
        return r#"{"role":"user","content":""}"#.to_owned();
    }
    serde_json::json!({ "role": "user", "content": [{ "type": "text", "text": text }] }).to_string()
}

/// A user message of content blocks (text and images), as the Messages API takes them. The
/// blocks are the dispatcher's, checked there.
pub fn user_blocks(blocks: &[serde_json::Value]) -> String {
    serde_json::json!({ "role": "user", "content": blocks }).to_string()
}

/// What a tool call produced, as the model will see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolOutcome {
    /// The result text (JSON text for HTTP tools).
    pub content: String,
    /// True when the call failed; the text says why.
    pub is_error: bool,
}

impl ToolOutcome {
    /// A successful result.
    pub fn ok(content: impl Into<String>) -> Self {
        Self { content: content.into(), is_error: false }
    }

    /// A failed call, explained to the model.
    pub fn error(content: impl Into<String>) -> Self {
        Self { content: content.into(), is_error: true }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_blocks_survive_byte_for_byte() {
        let body = r#"[{"type":"thinking","thinking":"hm","signature":"c2ln=="},{"type":"text","text":"hi"},{"type":"tool_use","id":"toolu_1","name":"t","input":{"a":1}},{"type":"brand_new","x":[1, 2]}]"#;
        let content: Vec<RawBlock> = serde_json::from_str(body).expect("json");
        let msg = assistant_message(&content);
        assert_eq!(msg, format!(r#"{{"role":"assistant","content":{body}}}"#));
        let views: Vec<Block> = content.iter().map(|b| Block::view(b)).collect();
        assert_eq!(views[0], Block::Other);
        assert_eq!(views[1], Block::Text("hi".into()));
        assert!(matches!(&views[2], Block::ToolUse(t) if t.name == "t" && t.input["a"] == 1));
        assert_eq!(views[3], Block::Other);
        let back = stored_content(&msg).expect("stored");
        assert_eq!(back.iter().map(|b| b.get()).collect::<Vec<_>>().join(","), body[1..body.len() - 1]);
    }

    #[test]
    fn token_counts_past_four_billion_are_refused() {
        let fine = Usage { input_tokens: MAX_TOKENS_PER_CALL, ..Usage::default() };
        assert_eq!(fine.credible().ok(), Some(fine));
        let absurd = Usage { cache_creation_input_tokens: u64::MAX, ..Usage::default() };
        let e = absurd.credible().expect_err("absurd");
        assert_eq!(
            e.to_string(),
            "model API sent an unreadable response: usage.cache_creation_input_tokens: 18446744073709551615 is not \
             a credible token count"
        );
    }

    #[test]
    fn every_stop_reason_is_distinct() {
        for s in ["end_turn", "tool_use", "max_tokens", "stop_sequence", "pause_turn", "refusal"] {
            let r = StopReason::parse(s);
            assert!(!matches!(r, StopReason::Other(_)), "{s}");
            assert_eq!(r.as_str(), s);
        }
        assert_eq!(StopReason::parse("model_context_window_exceeded").as_str(), "model_context_window_exceeded");
    }

    #[test]
    fn tool_results_keep_order_and_error_flag() {
        let msg = tool_results_message(&[("a".into(), ToolOutcome::ok("1")), ("b".into(), ToolOutcome::error("no"))]);
        let v: serde_json::Value = serde_json::from_str(&msg).expect("json");
        assert_eq!(v["content"][0]["tool_use_id"], "a");
        assert_eq!(v["content"][1]["is_error"], true);
    }
}

#[cfg(test)]
mod error_tests {
    use super::*;

    #[test]
    fn only_a_request_that_never_left_is_unbilled_among_transport_errors() {
        let refused = LlmError::Transport { sent: false, detail: "connection failed".into() };
        let timed_out = LlmError::Transport { sent: true, detail: "timed out".into() };
        assert!(refused.is_unbilled() && refused.is_retryable() && refused.is_provider_failure());
        assert!(!timed_out.is_unbilled() && timed_out.is_retryable());
        assert_eq!(refused.to_string(), "model API unreachable: connection failed");
    }
}
