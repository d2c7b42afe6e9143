//! The Anthropic Messages API client (`POST /v1/messages`).
//!
//! Authentication and version headers are configurable: the documented pair is `x-api-key` with
//! `anthropic-version: 2023-06-01`; late-2026 SDKs send `Authorization: Bearer` and a newer version.
//! Unknown response fields are ignored; content blocks are kept raw (see [`super`]).

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::cache::Breakpoints;
use super::conversation::Conversation;
use super::transport::{Connections, STREAMS_PER_CONNECTION};
use super::types::{Block, Dialect, ModelReply, RequestBody, StopReason, Usage};
pub use super::types::{CallSpec, LlmError};
use crate::config::{AnthropicConfig, AuthStyle, CacheTtl};

#[derive(Deserialize)]
struct ResponseBody<'a> {
    #[serde(rename = "type")]
    kind: String,
    id: String,
    #[serde(borrow)]
    content: &'a RawValue,
    stop_reason: Option<String>,
    #[serde(default)]
    usage: WireUsage,
}

/// `usage` as the API sends it: the counts, and the cache writes by TTL.
#[derive(Deserialize, Default)]
struct WireUsage {
    #[serde(flatten)]
    counts: Usage,
    #[serde(default)]
    cache_creation: Option<CacheCreation>,
}

/// `usage.cache_creation`: the tokens written to the cache, by TTL.
#[derive(Deserialize, Default)]
struct CacheCreation {
    #[serde(default)]
    ephemeral_1h_input_tokens: Option<u64>,
}

impl WireUsage {
    /// The usage, with the 1-hour cache writes from the breakdown, or else from the TTL the call
    /// asked for (`asked`).
    fn usage(self, asked: Option<CacheTtl>) -> Usage {
        let mut u = self.counts;
        let written = u.cache_creation_input_tokens;
        u.cache_creation_1h_input_tokens = match self.cache_creation.and_then(|c| c.ephemeral_1h_input_tokens) {
            Some(n) => n.min(written),
            None if asked == Some(CacheTtl::OneHour) => written,
            None => 0,
        };
        u
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(rename = "type")]
    kind: String,
    message: String,
}

/// A Messages API client. Cheap to clone; one per process.
#[derive(Clone)]
pub struct AnthropicClient {
    http: Connections,
    /// `<base>/v1/messages`, parsed once (a string would be parsed again for every call).
    url: Result<reqwest::Url, String>,
    /// The request headers, built once; the error when the key is missing or unusable.
    headers: Result<HeaderMap, String>,
}

impl AnthropicClient {
    /// A client for the configured endpoint, with room for as many calls at once as one HTTP/2
    /// connection carries.
    pub fn new(cfg: &AnthropicConfig) -> Result<Self, LlmError> {
        Self::with_capacity(cfg, STREAMS_PER_CONNECTION)
    }

    /// A client for the configured endpoint, with room for `calls_in_flight` calls at once: over
    /// HTTP/2, enough connections that their streams hold them.
    pub fn with_capacity(cfg: &AnthropicConfig, calls_in_flight: usize) -> Result<Self, LlmError> {
        let http = Connections::new(cfg.http, cfg.timeout_ms, calls_in_flight)?;
        let version = HeaderValue::from_str(&cfg.version)
            .map_err(|_| LlmError::Request(format!("invalid anthropic version `{}`", cfg.version)))?;
        let url = format!("{}/v1/messages", cfg.base_url.trim_end_matches('/'));
        let url = reqwest::Url::parse(&url).map_err(|e| format!("invalid anthropic base URL `{url}`: {e}"));
        Ok(Self { http, url, headers: headers(cfg.api_key.as_ref(), cfg.auth, version) })
    }

    /// Sends the conversation and returns the model's reply: [`Self::request_body`], then
    /// [`Self::send`].
    pub async fn create_message<'m>(
        &self,
        spec: &CallSpec<'_>,
        messages: impl Into<Conversation<'m>>,
    ) -> Result<ModelReply, LlmError> {
        let body = self.request_body(spec, messages.into())?;
        self.send(body).await
    }

    /// The request body of a call, written in one pass (see [`write_body`]).
    pub fn request_body(&self, spec: &CallSpec<'_>, messages: Conversation<'_>) -> Result<RequestBody, LlmError> {
        let dialect = Dialect::Anthropic { cache: spec.cache.map(|c| c.ttl) };
        Ok(RequestBody::new(write_body(spec, messages)?, dialect))
    }

    /// The tokens of `system` for `model`, by the API's `count_tokens` endpoint: the count of a
    /// request with that system prompt and a one-character message, so a few tokens more than the
    /// prompt alone.
    pub async fn count_tokens(&self, model: &str, system: &str) -> Result<u64, LlmError> {
        #[derive(Deserialize)]
        struct Counted {
            input_tokens: u64,
        }
        let mut url = self.url.clone().map_err(LlmError::Request)?;
        url.set_path(&format!("{}/count_tokens", url.path()));
        let body =
            serde_json::json!({ "model": model, "system": system, "messages": [{ "role": "user", "content": "." }] });
        let response = self
            .http
            .next()
            .post(url)
            .headers(self.headers.clone().map_err(LlmError::Request)?)
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| LlmError::transport(&e))?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let bytes = super::types::read_body(response).await?;
        if !status.is_success() {
            return Err(parse_error(status.as_u16(), &bytes, retry_after));
        }
        let counted: Counted = serde_json::from_slice(&bytes)
            .map_err(|e| LlmError::Request(format!("count_tokens answered an unexpected body: {e}")))?;
        Ok(counted.input_tokens)
    }

    /// Sends a request body written by [`Self::request_body`] and returns the model's reply.
    pub async fn send(&self, body: RequestBody) -> Result<ModelReply, LlmError> {
        let (bytes, Dialect::Anthropic { cache }) = body.into_parts() else {
            return Err(LlmError::Request("a request body written for another provider".into()));
        };
        let response = self
            .http
            .next()
            .post(self.url.clone().map_err(LlmError::Request)?)
            .headers(self.headers.clone().map_err(LlmError::Request)?)
            .body(bytes)
            .send()
            .await
            .map_err(|e| LlmError::transport(&e))?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let rate_headers = crate::ratelimit::parse_ratelimit_headers(response.headers());
        let bytes = super::types::read_body(response).await?;
        if !status.is_success() {
            return Err(parse_error(status.as_u16(), &bytes, retry_after));
        }
        let mut reply = parse_reply(&bytes, cache)?;
        reply.rate_headers = rate_headers;
        Ok(reply)
    }
}

/// The Messages API request body, `{"model","max_tokens","system","messages","tools","tool_choice"}`,
/// written into one buffer in one pass. The messages go in as the JSON text they are stored as:
/// the fleet wrote them, and parsing or re-encoding them for every step would cost as much as the
/// call's own bytes. (A stored message that is not JSON would make the API answer 400; the step
/// checks them before planning the call.) With `spec.cache`, prompt-cache markers are inserted
/// where [`Breakpoints::place`] puts them, and the system prompt, when marked, goes as one text
/// block.
fn write_body(spec: &CallSpec<'_>, messages: Conversation<'_>) -> Result<Vec<u8>, LlmError> {
    let tools = spec.tools.map(RawValue::get);
    let fixed = spec.model.len() + spec.system.len() + tools.map_or(0, str::len) + 128;
    let mut out = Vec::with_capacity(messages.text_len() + messages.len() + fixed);
    let marks = spec.cache.map(|c| (c.marker(), Breakpoints::place(&c, tools, spec.system, messages)));
    out.extend_from_slice(br#"{"model":"#);
    json_string(&mut out, spec.model)?;
    out.extend_from_slice(format!(r#","max_tokens":{}"#, spec.max_tokens).as_bytes());
    if !spec.system.is_empty() {
        out.extend_from_slice(br#","system":"#);
        match marks {
            Some((marker, b)) if b.system => {
                out.extend_from_slice(br#"[{"type":"text","text":"#);
                json_string(&mut out, spec.system)?;
                out.push(b',');
                out.extend_from_slice(marker.as_bytes());
                out.extend_from_slice(b"}]");
            }
            _ => json_string(&mut out, spec.system)?,
        }
    }
    out.extend_from_slice(br#","messages":["#);
    for (i, message) in messages.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match marks.and_then(|(marker, b)| Some((marker, b.message(i)?))) {
            Some((marker, mark)) => mark.write(&mut out, message, marker),
            None => out.extend_from_slice(message.as_bytes()),
        }
    }
    out.push(b']');
    if let Some(tools) = tools {
        out.extend_from_slice(br#","tools":"#);
        match marks.and_then(|(marker, b)| Some((marker, b.tools?))) {
            Some((marker, mark)) => mark.write(&mut out, tools, marker),
            None => out.extend_from_slice(tools.as_bytes()),
        }
    }
    if let Some(kind) = spec.tool_choice {
        out.extend_from_slice(br#","tool_choice":{"type":"#);
        json_string(&mut out, kind)?;
        out.push(b'}');
    }
    out.push(b'}');
    Ok(out)
}

/// Appends `text` as a JSON string.
fn json_string(out: &mut Vec<u8>, text: &str) -> Result<(), LlmError> {
    serde_json::to_writer(out, text).map_err(|e| LlmError::Request(e.to_string()))
}

/// The headers of every request: version, content type and the key, marked sensitive.
fn headers(key: Option<&SecretString>, auth: AuthStyle, version: HeaderValue) -> Result<HeaderMap, String> {
    let key = key.ok_or("ANTHROPIC_API_KEY is not set")?;
    let mut h = HeaderMap::new();
    h.insert("anthropic-version", version);
    h.insert("content-type", HeaderValue::from_static("application/json"));
    let (name, value) = match auth {
        AuthStyle::XApiKey => ("x-api-key", key.expose_secret().to_owned()),
        AuthStyle::Bearer => ("authorization", format!("Bearer {}", key.expose_secret())),
    };
    let mut value = HeaderValue::from_str(&value).map_err(|_| "the API key is not a valid header value")?;
    value.set_sensitive(true);
    h.insert(name, value);
    Ok(h)
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get("retry-after")?.to_str().ok()?;
    let secs: f64 = text.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)))
}

/// The reply, parsed once: the body with `content` kept as the raw text it is, then that text read
/// into the blocks' views.
fn parse_reply(bytes: &[u8], asked: Option<CacheTtl>) -> Result<ModelReply, LlmError> {
    let body: ResponseBody<'_> = serde_json::from_slice(bytes).map_err(|e| LlmError::Decode(e.to_string()))?;
    if body.kind != "message" {
        return Err(LlmError::Decode(format!("expected type `message`, got `{}`", body.kind)));
    }
    let blocks = Block::read_all(body.content)?;
    let stop_reason = body
        .stop_reason
        .map(|s| StopReason::parse(&s))
        .ok_or_else(|| LlmError::Decode("missing stop_reason".into()))?;
    Ok(ModelReply::new(body.id, body.content.get(), blocks, stop_reason, body.usage.usage(asked).credible()?))
}

fn parse_error(status: u16, bytes: &[u8], retry_after: Option<Duration>) -> LlmError {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(b) => LlmError::api(status, b.error.kind, b.error.message, retry_after),
        Err(_) => {
            let excerpt = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
            LlmError::api(status, "unknown_error".into(), excerpt, retry_after)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_tolerate_unknown_fields_and_keep_blocks() {
        let body = br#"{"id":"msg_1","type":"message","role":"assistant","model":"m","content":[{"type":"thinking","thinking":"x","signature":"s"},{"type":"text","text":"hi"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":5,"output_tokens":2,"cache_creation_input_tokens":null,"cache_read_input_tokens":3,"service_tier":"standard"},"container":null}"#;
        let reply = parse_reply(body, None).expect("parses");
        assert_eq!(reply.stop_reason, StopReason::EndTurn);
        assert_eq!(
            reply.usage,
            Usage { input_tokens: 5, output_tokens: 2, cache_read_input_tokens: 3, ..Usage::default() }
        );
        assert_eq!(
            reply.content(),
            r#"[{"type":"thinking","thinking":"x","signature":"s"},{"type":"text","text":"hi"}]"#
        );
        assert_eq!(reply.block_views(), [Block::Other, Block::Text("hi".into())]);
        assert_eq!(reply.text(), "hi");
    }

    #[test]
    fn the_stored_turn_is_the_content_as_received() {
        let content = r#"[ {"type":"text", "text":"caf\u00e9"} ,{"signature":"c2ln==","type":"thinking","thinking":"hm"},
            {"type":"tool_use","id":"toolu_1","name":"t","input":{"b":1.50,"a":[]}}, {"type":"brand_new","x":[1, 2]}, 7 ]"#;
        let body = format!(r#"{{"type":"message","id":"m","content":{content},"stop_reason":"tool_use"}}"#);
        let reply = parse_reply(body.as_bytes(), None).expect("parses");
        assert_eq!(reply.assistant_message(), format!(r#"{{"role":"assistant","content":{content}}}"#));
        assert_eq!(reply.content(), content);
        let views = reply.block_views();
        assert_eq!(views[0], Block::Text("café".into()));
        assert!(matches!(&views[2], Block::ToolUse(t) if t.id == "toolu_1" && t.input["b"] == 1.5));
        assert_eq!((&views[1], &views[3], &views[4]), (&Block::Other, &Block::Other, &Block::Other));
        let stored = super::super::stored_content(&reply.assistant_message()).expect("stored");
        let views_again: Vec<Block> = stored.iter().map(|b| Block::view(b)).collect();
        assert_eq!(views_again, views, "a stored block reads as the reply's");
    }

    #[test]
    fn odd_blocks_are_other_and_only_unreadable_text_is_refused() {
        let reply = |content: &str| {
            let body = format!(r#"{{"type":"message","id":"m","content":{content},"stop_reason":"end_turn"}}"#);
            parse_reply(body.as_bytes(), None)
        };
        let odd = r#"[{"type":"text","text":5},{"type":"tool_use","id":1,"name":"t"},{"type":3},{"text":"no type"},[1],null]"#;
        assert!(reply(odd).expect("parses").block_views().iter().all(|b| *b == Block::Other));
        let tool = reply(r#"[{"type":"tool_use","id":"a","name":"t"}]"#).expect("parses");
        assert!(matches!(&tool.block_views()[0], Block::ToolUse(t) if t.input.is_null()));
        for (content, block) in [
            (r#"[{"type":"text","text":"ok"},{"type":"thinking","thinking":"\ud800"}]"#, 1),
            (r#"[{"type":"x","\udc00":1}]"#, 0),
            (r#"[{"type":"x","deep":[{"a":"\ud800"}]}]"#, 0),
            (r#"[{"type":"x","n":1e400}]"#, 0),
        ] {
            let e = reply(content).expect_err(content);
            assert!(e.to_string().contains(&format!("content block {block} is not valid JSON text")), "{e}");
        }
        let e = reply(r#"{"type":"text","text":"hi"}"#).expect_err("not a list");
        assert!(e.to_string().contains("content is not a list of blocks"), "{e}");
    }

    /// The body as serde would write it from the same parts, for comparison.
    #[derive(serde::Serialize)]
    struct SerdeBody<'a> {
        model: &'a str,
        max_tokens: u32,
        #[serde(skip_serializing_if = "str::is_empty")]
        system: &'a str,
        messages: Vec<&'a RawValue>,
        #[serde(skip_serializing_if = "Option::is_none")]
        tools: Option<&'a RawValue>,
        #[serde(skip_serializing_if = "Option::is_none")]
        tool_choice: Option<serde_json::Value>,
    }

    fn serde_body(spec: &CallSpec<'_>, messages: &[String]) -> serde_json::Value {
        let messages = messages.iter().map(|m| serde_json::from_str(m).expect("json")).collect();
        let tool_choice = spec.tool_choice.map(|kind| serde_json::json!({ "type": kind }));
        let body = SerdeBody {
            model: spec.model,
            max_tokens: spec.max_tokens,
            system: spec.system,
            messages,
            tools: spec.tools,
            tool_choice,
        };
        serde_json::to_value(&body).expect("serialises")
    }

    #[test]
    fn the_body_is_what_serde_would_write_with_the_stored_bytes_verbatim() {
        let stored = vec![
            r#"{"role":"user","content":"caf\u00e9 \"quoted\" \n"}"#.to_owned(),
            r#"{ "role" : "assistant", "content" : [ {"type":"thinking","thinking":"x","signature":"c2ln=="}, {"type":"tool_use","id":"a","name":"t","input":{"n":1.50}} ] }"#.to_owned(),
            r#"{"role":"user","content":[{"type":"tool_result","tool_use_id":"a","content":"r"}]}"#.to_owned(),
        ];
        let tools =
            RawValue::from_string(r#"[{"name":"t","input_schema":{"type":"object"}}]"#.to_owned()).expect("json");
        let specs = [
            CallSpec {
                model: "m\"1",
                system: "Be \"brief\".\n\u{1}é",
                max_tokens: 7,
                tools: Some(&tools),
                tool_choice: None,
                cache: None,
            },
            CallSpec {
                model: "m",
                system: "",
                max_tokens: 0,
                tools: Some(&tools),
                tool_choice: Some("none"),
                cache: None,
            },
            CallSpec { model: "m", system: "s", max_tokens: u32::MAX, tools: None, tool_choice: None, cache: None },
        ];
        for spec in &specs {
            for messages in [Conversation::new(&stored), Conversation::new(&stored[..1]), Conversation::new(&[])] {
                let body = write_body(spec, messages).expect("writes");
                let sent: Vec<String> = messages.iter().map(str::to_owned).collect();
                let parsed: serde_json::Value = serde_json::from_slice(&body).expect("the body is JSON");
                assert_eq!(parsed, serde_body(spec, &sent), "{}", String::from_utf8_lossy(&body));
                let text = std::str::from_utf8(&body).expect("utf-8");
                assert!(text.contains(&format!(r#""messages":[{}]"#, sent.join(","))), "{text}");
            }
        }
    }

    #[test]
    fn the_summary_call_ends_with_its_own_message() {
        let stored =
            vec![r#"{"role":"user","content":"goal"}"#.to_owned(), r#"{"role":"assistant","content":[]}"#.to_owned()];
        let last = r#"{"role":"user","content":"sum up"}"#;
        let spec =
            CallSpec { model: "m", system: "", max_tokens: 1, tools: None, tool_choice: Some("none"), cache: None };
        let body = write_body(&spec, Conversation::ending_with(&stored, last)).expect("writes");
        let text = std::str::from_utf8(&body).expect("utf-8");
        assert!(text.contains(&format!(r#""messages":[{},{},{last}]"#, stored[0], stored[1])), "{text}");
    }

    #[test]
    fn cache_breakpoints_are_inserted_into_the_stored_bytes() {
        use crate::config::CacheTtl;
        use crate::llm::CacheSpec;
        let long = "x".repeat(5_000);
        let stored = vec![
            super::super::user_message(&long),
            r#"{"role":"assistant","content":[{"type":"text","text":"ok"},{"type":"tool_use","id":"a","name":"t","input":{}}]}"#.to_owned(),
            r#"{"role":"user","content":[{"type":"tool_result","tool_use_id":"a","content":"r"}]}"#.to_owned(),
        ];
        let tools = RawValue::from_string(format!(r#"[{{"name":"t","description":"{long}","input_schema":{{}}}}]"#))
            .expect("json");
        for (ttl, marker) in [
            (CacheTtl::FiveMinutes, r#","cache_control":{"type":"ephemeral"}"#),
            (CacheTtl::OneHour, r#","cache_control":{"type":"ephemeral","ttl":"1h"}"#),
        ] {
            let cache = Some(CacheSpec { ttl, min_tokens: 1024 });
            let spec = CallSpec {
                model: "m",
                system: "Be brief.",
                max_tokens: 9,
                tools: Some(&tools),
                tool_choice: None,
                cache,
            };
            let body =
                String::from_utf8(write_body(&spec, Conversation::new(&stored)).expect("writes")).expect("utf-8");
            let v: serde_json::Value = serde_json::from_str(&body).expect("the body is JSON");
            assert_eq!(body.matches(marker).count(), 4, "tools, system, goal, newest: {body}");
            assert!(v["tools"][0]["cache_control"].is_object() && v["system"][0]["cache_control"].is_object());
            assert!(v["messages"][0]["content"][0]["cache_control"].is_object());
            assert!(v["messages"][2]["content"][0]["cache_control"].is_object());
            let plain = write_body(&CallSpec { cache: None, ..spec }, Conversation::new(&stored)).expect("writes");
            let unmarked =
                body.replace(marker, "").replace(r#"[{"type":"text","text":"Be brief."}]"#, r#""Be brief.""#);
            assert_eq!(unmarked.as_bytes(), plain, "markers are all that differs");
        }
        // A short request gets none: every prefix is under the model's minimum.
        let short = vec![super::super::user_message("hi")];
        let cache = Some(CacheSpec { ttl: CacheTtl::FiveMinutes, min_tokens: 1024 });
        let spec = CallSpec { model: "m", system: "s", max_tokens: 9, tools: None, tool_choice: None, cache };
        let body = write_body(&spec, Conversation::new(&short)).expect("writes");
        assert!(!String::from_utf8_lossy(&body).contains("cache_control"));
    }

    #[test]
    fn cache_writes_are_split_by_ttl() {
        let with = br#"{"type":"message","id":"m","content":[],"stop_reason":"end_turn","usage":{"input_tokens":1,"output_tokens":2,"cache_creation_input_tokens":30,"cache_read_input_tokens":4,"cache_creation":{"ephemeral_5m_input_tokens":10,"ephemeral_1h_input_tokens":20}}}"#;
        let u = parse_reply(with, None).expect("parses").usage;
        assert_eq!(
            (u.cache_creation_input_tokens, u.cache_creation_1h_input_tokens, u.cache_read_input_tokens),
            (30, 20, 4)
        );
        let without = br#"{"type":"message","id":"m","content":[],"stop_reason":"end_turn","usage":{"input_tokens":1,"output_tokens":2,"cache_creation_input_tokens":30}}"#;
        assert_eq!(
            parse_reply(without, Some(CacheTtl::OneHour)).expect("parses").usage.cache_creation_1h_input_tokens,
            30
        );
        assert_eq!(
            parse_reply(without, Some(CacheTtl::FiveMinutes)).expect("parses").usage.cache_creation_1h_input_tokens,
            0
        );
    }

    #[tokio::test]
    async fn a_body_for_another_provider_is_refused() {
        let client = AnthropicClient::new(&AnthropicConfig::default()).expect("client");
        let body = RequestBody::new(b"{}".to_vec(), Dialect::OpenAi { used_ids: Default::default() });
        let e = client.send(body).await.expect_err("refused");
        assert!(matches!(e, LlmError::Request(_)) && e.is_unbilled(), "{e}");
    }

    #[test]
    fn malformed_replies_are_decode_errors() {
        assert!(matches!(parse_reply(b"not json", None), Err(LlmError::Decode(_))));
        assert!(parse_reply(b"not json", None).err().is_some_and(|e| e.is_retryable() && !e.is_unbilled()));
        assert!(matches!(parse_reply(br#"{"type":"error","id":"x","content":[]}"#, None), Err(LlmError::Decode(_))));
        let surrogate =
            br#"{"type":"message","id":"x","content":[{"type":"text","text":"\ud800"}],"stop_reason":"end_turn"}"#;
        let e = parse_reply(surrogate, None).expect_err("a lone surrogate");
        assert!(e.to_string().contains("content block 0 is not valid JSON text"), "{e}");
        let no_stop = br#"{"type":"message","id":"x","content":[],"stop_reason":null}"#;
        assert!(matches!(parse_reply(no_stop, None), Err(LlmError::Decode(_))));
    }

    #[test]
    fn api_errors_keep_status_type_and_message() {
        let e =
            parse_error(529, br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#, None);
        assert!(e.is_retryable());
        assert!(matches!(&e, LlmError::Api { kind, .. } if kind == "overloaded_error"));
        let e = parse_error(400, br#"{"type":"error","error":{"type":"invalid_request_error","message":"bad"}}"#, None);
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("bad"));
        let e = parse_error(502, b"<html>bad gateway</html>", None);
        assert!(e.is_retryable() && e.is_provider_failure());
        let e = parse_error(304, b"", None);
        assert_eq!(e.to_string(), "model API error 304 unknown_error: HTTP 304 without an error message");
        let blank = parse_error(400, br#"{"type":"error","error":{"type":"","message":" "}}"#, None);
        assert_eq!(blank.to_string(), "model API error 400 api_error: HTTP 400 without an error message");
        let limit = br#"{"type":"error","error":{"type":"rate_limit_error","message":"You have reached your specified API usage limits."}}"#;
        let e = parse_error(429, limit, None);
        assert!(!e.is_retryable() && !e.is_provider_failure(), "a spend limit is not retried");
        let e =
            parse_error(429, br#"{"type":"error","error":{"type":"rate_limit_error","message":"Rate limited"}}"#, None);
        assert!(e.is_retryable() && !e.is_provider_failure());
    }

    #[test]
    fn retry_after_is_read_in_seconds() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }
}
