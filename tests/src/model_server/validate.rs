//! The validation pipeline: rules 1 to 8 in order, the first failure wins.
//!
//! Each rule lives with its subject (`headers`, `request`, `tools`, `cache`, `conversation`); this
//! module only runs them in the documented order and bundles what passed into a [`Validated`] request.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::cache::CachePlan;
use super::error::{ApiError, ErrorKind};
use super::request::{self, MessagesRequest};
use super::tools::{self, ToolSet};
use super::{conversation, headers};

/// A request that passed every rule, with what the scripts and the response need.
#[derive(Debug, Clone)]
pub(crate) struct Validated {
    pub(crate) request: MessagesRequest,
    pub(crate) tools: ToolSet,
    /// The `tool_choice` type, or `"absent"`.
    pub(crate) tool_choice: String,
    /// The request's `cache_control` breakpoints and prompt prefixes.
    pub(crate) cache: CachePlan,
    /// The request body's size in bytes.
    pub(crate) body_bytes: usize,
    /// The request body as received.
    pub(crate) body: Bytes,
}

/// Runs rules 1 to 8 on one request.
pub(crate) fn validate(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    api_key: Option<&str>,
) -> Result<Validated, ApiError> {
    headers::check(headers, api_key)?;
    let bytes = body.map_err(body_error)?;
    let body = request::parse_body(&bytes)?;
    let request = request::parse(&body)?;
    let tools = tools::parse_tools(&body)?;
    let cache = CachePlan::read(&body, &request.model)?;
    let tool_choice = tools::check_tool_choice(&body)?;
    conversation::check_tool_pairing(&request.messages, &tools)?;
    conversation::check_thinking(&request.messages)?;
    Ok(Validated { request, tools, tool_choice, cache, body_bytes: bytes.len(), body: bytes })
}

/// Checks a stored conversation as the API would check a request that carries it (the message
/// rules, tool-use pairing, the thinking round-trip), with `tools` as the client tools it may call.
///
/// Returns the API's message for the first rule broken.
pub fn check_conversation(messages: &Value, tools: &[&str]) -> Result<(), String> {
    let tools: Vec<Value> =
        tools.iter().map(|name| json!({ "name": name, "input_schema": { "type": "object" } })).collect();
    let body = json!({ "model": "conversation-check", "max_tokens": 1024, "messages": messages, "tools": tools });
    let Value::Object(body) = body else { return Err("the check's own request is not an object".to_owned()) };
    let check = || -> Result<(), ApiError> {
        let request = request::parse(&body)?;
        let tools = tools::parse_tools(&body)?;
        conversation::check_tool_pairing(&request.messages, &tools)?;
        conversation::check_thinking(&request.messages)
    };
    check().map_err(|e| e.message)
}

/// A body that could not be read: too large, or broken on the wire.
fn body_error(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(ErrorKind::RequestTooLarge, "Request exceeds the maximum allowed number of bytes.");
    }
    ApiError::invalid(format!("body: could not read the request body: {}", rejection.body_text()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good_headers() -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert("x-api-key", "k".parse().expect("value"));
        map.insert("anthropic-version", "2023-06-01".parse().expect("value"));
        map
    }

    fn run(headers: &HeaderMap, body: &Value) -> Result<Validated, ApiError> {
        validate(headers, Ok(Bytes::from(body.to_string())), Some("k"))
    }

    fn body() -> Value {
        json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
    }

    #[test]
    fn valid_request_passes_with_its_size() {
        let valid = run(&good_headers(), &body()).expect("valid");
        assert_eq!(valid.body_bytes, body().to_string().len());
        assert_eq!(valid.tool_choice, "absent");
    }

    #[test]
    fn first_failure_wins() {
        let mut bad_body = body();
        bad_body["max_tokens"] = json!(0);
        let no_auth = validate(&HeaderMap::new(), Ok(Bytes::from_static(b"nope")), None).expect_err("no auth");
        assert_eq!(no_auth.kind, ErrorKind::Authentication);
        let bad_json = validate(&good_headers(), Ok(Bytes::from_static(b"nope")), None).expect_err("json");
        assert!(bad_json.message.starts_with("body:"));
        assert!(run(&good_headers(), &bad_body).expect_err("max_tokens").message.starts_with("max_tokens"));
    }

    #[test]
    fn stored_conversations_are_checked_like_requests() {
        let call = json!({"type": "tool_use", "id": "toolu_1", "name": "search", "input": {}});
        let result = json!({"type": "tool_result", "tool_use_id": "toolu_1", "content": "found"});
        let good = json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [call]},
            {"role": "user", "content": [result]},
            {"role": "assistant", "content": "done"},
        ]);
        assert_eq!(check_conversation(&good, &["search"]), Ok(()));
        let unknown = check_conversation(&good, &["other"]).expect_err("unknown tool");
        assert!(unknown.contains("unknown tool `search`"), "{unknown}");
        let unanswered = json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": [call]}, {"role": "user", "content": "?"}]);
        assert!(check_conversation(&unanswered, &["search"]).is_err());
        assert!(check_conversation(&json!([]), &[]).is_err());
    }

    #[test]
    fn cache_control_is_checked_with_the_plan() {
        let mut marked = body();
        marked["system"] = json!([{"type": "text", "text": "s", "cache_control": {"type": "ephemeral", "ttl": "1d"}}]);
        let err = run(&good_headers(), &marked).expect_err("ttl");
        assert_eq!(err.message, "system.0.cache_control.ttl: Input should be '5m' or '1h'");
        marked["system"][0]["cache_control"]["ttl"] = json!("1h");
        assert!(run(&good_headers(), &marked).is_ok());
    }

    #[test]
    fn tool_rules_run_after_message_rules() {
        let mut both = body();
        both["messages"] = json!([]);
        both["tool_choice"] = json!({"type": "any"});
        assert!(run(&good_headers(), &both).expect_err("messages").message.starts_with("messages"));
        both["messages"] = body()["messages"].clone();
        assert!(run(&good_headers(), &both).expect_err("choice").message.contains("tool_choice"));
    }
}
