//! Errors: a non-2xx answer of any shape as [`LlmError::Api`], and the wait it asks for.

use std::time::Duration;

use reqwest::header::HeaderMap;
use serde_json::Value;

use super::super::types::LlmError;

/// How much of an unreadable error body goes into the error message.
const BODY_EXCERPT_BYTES: usize = 200;

/// The longest API error message kept, in characters.
const MAX_ERROR_MESSAGE_CHARS: usize = 1000;

/// The longest wait a `retry-after` header may ask for.
const MAX_RETRY_AFTER_SECS: f64 = 86_400.0;

pub(super) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok();
    let secs = number("retry-after-ms").map(|ms| ms / 1000.0).or_else(|| number("retry-after"))?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(MAX_RETRY_AFTER_SECS)))
}

/// A non-2xx answer as [`LlmError::Api`], whatever shape its body has.
pub(super) fn parse_error(status: u16, bytes: &[u8], retry_after: Option<Duration>) -> LlmError {
    let body: Option<Value> = serde_json::from_slice(bytes).ok();
    let detail = body.as_ref().map(|b| b.get("error").unwrap_or(b));
    let kind = detail.and_then(error_kind).unwrap_or_else(|| "api_error".to_owned());
    let message = detail.and_then(error_message).unwrap_or_else(|| excerpt(bytes));
    LlmError::api(status, kind, message, retry_after)
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
pub(super) fn error_message(detail: &Value) -> Option<String> {
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
    use reqwest::header::HeaderValue;

    use super::*;

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
        assert_eq!(api(503, b""), ("api_error".into(), "HTTP 503 without an error message".into()));
        assert_eq!(api(400, br#"{"error":{"message":""}}"#).1, "HTTP 400 without an error message");
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
}
