//! The Anthropic Messages API client (`POST /v1/messages`).
//!
//! Authentication and version headers are configurable: the documented pair is `x-api-key` with
//! `anthropic-version: 2023-06-01`; late-2026 SDKs send `Authorization: Bearer` and a newer version.
//! Unknown response fields are ignored; content blocks are kept raw (see [`super`]).

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

pub use super::types::{CallSpec, LlmError};
use super::types::{ModelReply, RawBlock, StopReason, Usage};
use crate::config::{AnthropicConfig, AuthStyle};

#[derive(Serialize)]
struct RequestBody<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "str::is_empty")]
    system: &'a str,
    messages: &'a [Box<RawValue>],
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<ToolChoice<'a>>,
}

#[derive(Serialize)]
struct ToolChoice<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
}

#[derive(Deserialize)]
struct ResponseBody {
    #[serde(rename = "type")]
    kind: String,
    id: String,
    content: Vec<RawBlock>,
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Usage,
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
    http: reqwest::Client,
    url: String,
    auth: AuthStyle,
    version: HeaderValue,
    key: Option<SecretString>,
}

impl AnthropicClient {
    /// A client for the configured endpoint.
    pub fn new(cfg: &AnthropicConfig) -> Result<Self, LlmError> {
        let http = super::types::http_client(cfg.timeout_ms)?;
        let version = HeaderValue::from_str(&cfg.version)
            .map_err(|_| LlmError::Request(format!("invalid anthropic version `{}`", cfg.version)))?;
        Ok(Self {
            http,
            url: format!("{}/v1/messages", cfg.base_url.trim_end_matches('/')),
            auth: cfg.auth,
            version,
            key: cfg.api_key.clone(),
        })
    }

    /// Sends the conversation and returns the model's reply.
    pub async fn create_message(
        &self,
        spec: &CallSpec<'_>,
        messages: &[Box<RawValue>],
    ) -> Result<ModelReply, LlmError> {
        let body = RequestBody {
            model: spec.model,
            max_tokens: spec.max_tokens,
            system: spec.system,
            messages,
            tools: spec.tools,
            tool_choice: spec.tool_choice.map(|kind| ToolChoice { kind }),
        };
        let body = serde_json::to_vec(&body).map_err(|e| LlmError::Request(e.to_string()))?;
        let response = self
            .http
            .post(&self.url)
            .headers(self.headers()?)
            .body(body)
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
        let mut reply = parse_reply(&bytes)?;
        reply.rate_headers = rate_headers;
        Ok(reply)
    }

    fn headers(&self) -> Result<HeaderMap, LlmError> {
        let key = self.key.as_ref().ok_or_else(|| LlmError::Request("ANTHROPIC_API_KEY is not set".into()))?;
        let mut h = HeaderMap::new();
        h.insert("anthropic-version", self.version.clone());
        h.insert("content-type", HeaderValue::from_static("application/json"));
        let (name, value) = match self.auth {
            AuthStyle::XApiKey => ("x-api-key", key.expose_secret().to_owned()),
            AuthStyle::Bearer => ("authorization", format!("Bearer {}", key.expose_secret())),
        };
        let mut value = HeaderValue::from_str(&value)
            .map_err(|_| LlmError::Request("the API key is not a valid header value".into()))?;
        value.set_sensitive(true);
        h.insert(name, value);
        Ok(h)
    }
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get("retry-after")?.to_str().ok()?;
    let secs: f64 = text.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)))
}

fn parse_reply(bytes: &[u8]) -> Result<ModelReply, LlmError> {
    let body: ResponseBody = serde_json::from_slice(bytes).map_err(|e| LlmError::Decode(e.to_string()))?;
    if body.kind != "message" {
        return Err(LlmError::Decode(format!("expected type `message`, got `{}`", body.kind)));
    }
    readable_blocks(&body.content)?;
    let stop_reason = body
        .stop_reason
        .map(|s| StopReason::parse(&s))
        .ok_or_else(|| LlmError::Decode("missing stop_reason".into()))?;
    Ok(ModelReply {
        id: body.id,
        content: body.content,
        stop_reason,
        usage: body.usage.credible()?,
        rate_headers: Default::default(),
    })
}

/// Every block must be JSON that decodes, not only JSON that scans: a lone surrogate escape
/// (`"\ud800"`) passes as a raw value, but would be stored, shown and sent back as text that no
/// JSON reader accepts.
fn readable_blocks(content: &[RawBlock]) -> Result<(), LlmError> {
    for (i, block) in content.iter().enumerate() {
        serde_json::from_str::<serde_json::Value>(block.get())
            .map_err(|e| LlmError::Decode(format!("content block {i} is not valid JSON text: {e}")))?;
    }
    Ok(())
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
        let reply = parse_reply(body).expect("parses");
        assert_eq!(reply.stop_reason, StopReason::EndTurn);
        assert_eq!(
            reply.usage,
            Usage { input_tokens: 5, output_tokens: 2, cache_creation_input_tokens: 0, cache_read_input_tokens: 3 }
        );
        assert_eq!(reply.content[0].get(), r#"{"type":"thinking","thinking":"x","signature":"s"}"#);
        assert_eq!(reply.text(), "hi");
    }

    #[test]
    fn malformed_replies_are_decode_errors() {
        assert!(matches!(parse_reply(b"not json"), Err(LlmError::Decode(_))));
        assert!(parse_reply(b"not json").err().is_some_and(|e| e.is_retryable() && !e.is_unbilled()));
        assert!(matches!(parse_reply(br#"{"type":"error","id":"x","content":[]}"#), Err(LlmError::Decode(_))));
        let surrogate =
            br#"{"type":"message","id":"x","content":[{"type":"text","text":"\ud800"}],"stop_reason":"end_turn"}"#;
        let e = parse_reply(surrogate).expect_err("a lone surrogate");
        assert!(e.to_string().contains("content block 0 is not valid JSON text"), "{e}");
        let no_stop = br#"{"type":"message","id":"x","content":[],"stop_reason":null}"#;
        assert!(matches!(parse_reply(no_stop), Err(LlmError::Decode(_))));
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
