//! Request validation, in order, the first failure wins:
//!
//! 1. auth: when a key is configured, `Authorization: Bearer <key>` (401 otherwise);
//! 2. the body is a JSON object; `model` a non-empty string; `max_tokens`/`max_completion_tokens`,
//!    when given, positive integers; `stream` not `true`;
//! 3. `tools`, when given, a non-empty list of `{type:"function", function:{name, description?,
//!    parameters?}}` with unique `^[a-zA-Z0-9_-]{1,64}$` names and object `parameters`;
//! 4. `tool_choice` only with `tools`, and `none`, `auto`, `required` or a defined function;
//! 5. `messages` a non-empty list; each a known role (`system`, `developer`, `user`, `assistant`,
//!    `tool`) with the content that role needs; assistant `tool_calls[]` carry a non-empty `id`,
//!    `type:"function"`, a `function.name` and `function.arguments` that is a JSON object as text;
//! 6. pairing: the messages right after an assistant turn with `tool_calls` are `tool` messages
//!    answering each of its ids exactly once, before any other message; a `tool` message answers
//!    a pending call; when `tools` is given, every call names one of them (a tool-less request may
//!    still carry past calls, as OpenAI allows); and, stricter than OpenAI because the fleet keys
//!    its tool ledger by it, a call id is never reused within the conversation.

use std::collections::HashSet;

use axum::http::HeaderMap;
use serde_json::{Map, Value};

use super::error::ApiError;

type Object = Map<String, Value>;

/// A request that passed every rule, with what the script and the response need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Validated {
    pub(crate) model: String,
    /// The first user message's text.
    pub(crate) goal: String,
    /// How many assistant messages the request holds.
    pub(crate) turn: usize,
    /// The defined tool names (empty without `tools`).
    pub(crate) tools: Vec<String>,
    /// `absent`, `none`, `auto`, `required` or `function`.
    pub(crate) tool_choice: String,
    /// The content of the last `tool` message.
    pub(crate) last_tool_result: Option<String>,
    /// Bytes of system and developer text.
    pub(crate) system_bytes: usize,
    /// Bytes of the whole body.
    pub(crate) body_bytes: usize,
}

/// One message, reduced to what the rules and the script need.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Message {
    System(String),
    User(String),
    Assistant(Vec<Call>),
    Tool { call_id: String, content: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Call {
    id: String,
    name: String,
}

/// Runs every rule on one request.
pub(crate) fn validate(headers: &HeaderMap, body: &[u8], api_key: Option<&str>) -> Result<Validated, ApiError> {
    check_auth(headers, api_key)?;
    let object = parse_body(body)?;
    let model = check_model(&object)?;
    check_limits(&object)?;
    let tools = parse_tools(&object)?;
    let tool_choice = check_tool_choice(&object, tools.as_deref())?;
    let messages = parse_messages(&object)?;
    check_pairing(&messages, tools.as_deref())?;
    Ok(Validated {
        model,
        goal: goal(&messages),
        turn: messages.iter().filter(|m| matches!(m, Message::Assistant(_))).count(),
        tools: tools.unwrap_or_default(),
        tool_choice,
        last_tool_result: last_tool_result(&messages),
        system_bytes: messages.iter().map(|m| if let Message::System(t) = m { t.len() } else { 0 }).sum(),
        body_bytes: body.len(),
    })
}

fn check_auth(headers: &HeaderMap, api_key: Option<&str>) -> Result<(), ApiError> {
    let Some(key) = api_key else {
        return Ok(());
    };
    let sent = headers.get("authorization").and_then(|v| v.to_str().ok());
    if sent.and_then(|v| v.strip_prefix("Bearer ")) == Some(key) { Ok(()) } else { Err(ApiError::unauthorized()) }
}

fn parse_body(body: &[u8]) -> Result<Object, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(ApiError::at("body", "the request body must be a JSON object")),
        Err(e) => Err(ApiError::at("body", format!("the request body is not valid JSON: {e}"))),
    }
}

fn check_model(body: &Object) -> Result<String, ApiError> {
    match body.get("model") {
        Some(Value::String(model)) if !model.is_empty() => Ok(model.clone()),
        Some(_) => Err(ApiError::at("model", "must be a non-empty string")),
        None => Err(ApiError::at("model", "required")),
    }
}

fn check_limits(body: &Object) -> Result<(), ApiError> {
    for key in ["max_tokens", "max_completion_tokens"] {
        match body.get(key) {
            None | Some(Value::Null) => {}
            Some(value) if value.as_u64().is_some_and(|n| n > 0) => {}
            Some(_) => return Err(ApiError::at(key, "must be a positive integer")),
        }
    }
    match body.get("stream") {
        Some(Value::Bool(true)) => Err(ApiError::at("stream", "streaming is not supported by the scripted server")),
        None | Some(Value::Null | Value::Bool(false)) => Ok(()),
        Some(_) => Err(ApiError::at("stream", "must be a boolean")),
    }
}

/// The defined tool names, or `None` without `tools`.
fn parse_tools(body: &Object) -> Result<Option<Vec<String>>, ApiError> {
    let Some(value) = body.get("tools") else {
        return Ok(None);
    };
    let tools = value.as_array().ok_or_else(|| ApiError::at("tools", "must be a list"))?;
    if tools.is_empty() {
        return Err(ApiError::at("tools", "[] is too short; leave `tools` out instead"));
    }
    let mut names = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        let name = parse_tool(tool, &format!("tools.{i}"))?;
        if names.contains(&name) {
            return Err(ApiError::at("tools", format!("tool names must be unique; `{name}` appears twice")));
        }
        names.push(name);
    }
    Ok(Some(names))
}

fn parse_tool(tool: &Value, path: &str) -> Result<String, ApiError> {
    let tool = object(tool, path)?;
    if tool.get("type").and_then(Value::as_str) != Some("function") {
        return Err(ApiError::at(&format!("{path}.type"), "must be 'function'"));
    }
    let path = format!("{path}.function");
    let function = object(tool.get("function").unwrap_or(&Value::Null), &path)?;
    let name = function.get("name").and_then(Value::as_str).unwrap_or_default();
    if !is_identifier(name) {
        return Err(ApiError::at(&format!("{path}.name"), "must match '^[a-zA-Z0-9_-]{1,64}$'"));
    }
    if function.get("description").is_some_and(|d| !d.is_string()) {
        return Err(ApiError::at(&format!("{path}.description"), "must be a string"));
    }
    if let Some(parameters) = function.get("parameters") {
        let parameters = object(parameters, &format!("{path}.parameters"))?;
        if parameters.get("type").and_then(Value::as_str) != Some("object") {
            return Err(ApiError::at(&format!("{path}.parameters.type"), "must be 'object'"));
        }
    }
    Ok(name.to_owned())
}

fn is_identifier(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The `tool_choice` kind for the stats.
fn check_tool_choice(body: &Object, tools: Option<&[String]>) -> Result<String, ApiError> {
    let Some(choice) = body.get("tool_choice") else {
        return Ok("absent".to_owned());
    };
    let Some(tools) = tools else {
        return Err(ApiError::at("tool_choice", "'tool_choice' is only allowed when 'tools' are specified"));
    };
    match choice {
        Value::String(mode) if matches!(mode.as_str(), "none" | "auto" | "required") => Ok(mode.clone()),
        Value::Object(named) if named.get("type").and_then(Value::as_str) == Some("function") => {
            let name = named.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
            match name {
                Some(name) if tools.iter().any(|t| t == name) => Ok("function".to_owned()),
                _ => Err(ApiError::at("tool_choice.function.name", "must name a tool defined in 'tools'")),
            }
        }
        _ => Err(ApiError::at("tool_choice", "must be 'none', 'auto', 'required' or a named function")),
    }
}

fn parse_messages(body: &Object) -> Result<Vec<Message>, ApiError> {
    let messages = body.get("messages").ok_or_else(|| ApiError::at("messages", "required"))?;
    let messages = messages.as_array().ok_or_else(|| ApiError::at("messages", "must be a list"))?;
    if messages.is_empty() {
        return Err(ApiError::at("messages", "at least one message is required"));
    }
    messages.iter().enumerate().map(|(i, m)| parse_message(m, &format!("messages.{i}"))).collect()
}

fn parse_message(value: &Value, path: &str) -> Result<Message, ApiError> {
    let message = object(value, path)?;
    let content = message.get("content");
    match message.get("role").and_then(Value::as_str) {
        Some("system" | "developer") => Ok(Message::System(required_text(content, path)?)),
        Some("user") => Ok(Message::User(required_text(content, path)?)),
        Some("assistant") => parse_assistant(message, path),
        Some("tool") => {
            let call_id = message.get("tool_call_id").and_then(Value::as_str).unwrap_or_default();
            if call_id.is_empty() {
                return Err(ApiError::at(&format!("{path}.tool_call_id"), "required for role 'tool'"));
            }
            Ok(Message::Tool { call_id: call_id.to_owned(), content: required_text(content, path)? })
        }
        _ => Err(ApiError::at(
            &format!("{path}.role"),
            "must be one of 'system', 'developer', 'user', 'assistant', 'tool'",
        )),
    }
}

/// `content` as text: a string, or a list of parts whose text parts are joined.
fn required_text(content: Option<&Value>, path: &str) -> Result<String, ApiError> {
    text_of(content).ok_or_else(|| ApiError::at(&format!("{path}.content"), "must be a string or a list of parts"))
}

fn text_of(content: Option<&Value>) -> Option<String> {
    match content? {
        Value::String(text) => Some(text.clone()),
        Value::Array(parts) if parts.iter().all(Value::is_object) => {
            let texts = parts.iter().filter(|p| p.get("type").and_then(Value::as_str) == Some("text"));
            Some(texts.filter_map(|p| p.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("\n"))
        }
        _ => None,
    }
}

fn parse_assistant(message: &Object, path: &str) -> Result<Message, ApiError> {
    let content = message.get("content").filter(|c| !c.is_null());
    if content.is_some() && text_of(content).is_none() {
        return Err(ApiError::at(&format!("{path}.content"), "must be a string, a list of parts or null"));
    }
    let calls = match message.get("tool_calls") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(calls)) => {
            let parsed = calls.iter().enumerate().map(|(j, c)| parse_call(c, &format!("{path}.tool_calls.{j}")));
            parsed.collect::<Result<Vec<_>, _>>()?
        }
        Some(_) => return Err(ApiError::at(&format!("{path}.tool_calls"), "must be a list")),
    };
    if content.is_none() && calls.is_empty() {
        return Err(ApiError::at(&format!("{path}.content"), "required unless 'tool_calls' is given"));
    }
    Ok(Message::Assistant(calls))
}

fn parse_call(value: &Value, path: &str) -> Result<Call, ApiError> {
    let call = object(value, path)?;
    let id = call.get("id").and_then(Value::as_str).filter(|id| !id.is_empty());
    let id = id.ok_or_else(|| ApiError::at(&format!("{path}.id"), "must be a non-empty string"))?;
    if call.get("type").and_then(Value::as_str) != Some("function") {
        return Err(ApiError::at(&format!("{path}.type"), "must be 'function'"));
    }
    let function = object(call.get("function").unwrap_or(&Value::Null), &format!("{path}.function"))?;
    let name = function.get("name").and_then(Value::as_str).filter(|n| !n.is_empty());
    let name = name.ok_or_else(|| ApiError::at(&format!("{path}.function.name"), "must be a non-empty string"))?;
    let arguments = function.get("arguments").and_then(Value::as_str);
    if !arguments.is_some_and(|a| matches!(serde_json::from_str::<Value>(a), Ok(Value::Object(_)))) {
        return Err(ApiError::at(&format!("{path}.function.arguments"), "must be a JSON object encoded as a string"));
    }
    Ok(Call { id: id.to_owned(), name: name.to_owned() })
}

/// Rule 6.
fn check_pairing(messages: &[Message], tools: Option<&[String]>) -> Result<(), ApiError> {
    let mut pending: Vec<&str> = Vec::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for (i, message) in messages.iter().enumerate() {
        let path = format!("messages.{i}");
        if let Message::Tool { call_id, .. } = message {
            answer(&mut pending, call_id, &path)?;
            continue;
        }
        check_all_answered(&pending, &path)?;
        if let Message::Assistant(calls) = message {
            pending = check_calls(calls, tools, &mut seen, &path)?;
        }
    }
    check_all_answered(&pending, &format!("messages.{}", messages.len()))
}

fn answer(pending: &mut Vec<&str>, call_id: &str, path: &str) -> Result<(), ApiError> {
    let Some(position) = pending.iter().position(|id| *id == call_id) else {
        let what = format!(
            "messages with role 'tool' must be a response to a preceding message with 'tool_calls'; \
             `{call_id}` is not a pending tool call id"
        );
        return Err(ApiError::at(path, what));
    };
    pending.remove(position);
    Ok(())
}

fn check_all_answered(pending: &[&str], path: &str) -> Result<(), ApiError> {
    if pending.is_empty() {
        return Ok(());
    }
    let what = format!(
        "an assistant message with 'tool_calls' must be followed by tool messages responding to each \
         'tool_call_id'. The following tool_call_ids did not have response messages: {}",
        pending.join(", ")
    );
    Err(ApiError::at(path, what))
}

/// The ids of one assistant turn's calls, after checking names and uniqueness.
fn check_calls<'a>(
    calls: &'a [Call],
    tools: Option<&[String]>,
    seen: &mut HashSet<&'a str>,
    path: &str,
) -> Result<Vec<&'a str>, ApiError> {
    let mut ids = Vec::with_capacity(calls.len());
    for (j, call) in calls.iter().enumerate() {
        let call_path = format!("{path}.tool_calls.{j}");
        if tools.is_some_and(|tools| !tools.contains(&call.name)) {
            let what = format!("unknown tool `{}`: not defined in 'tools'", call.name);
            return Err(ApiError::at(&format!("{call_path}.function.name"), what));
        }
        if !seen.insert(&call.id) {
            return Err(ApiError::at(&format!("{call_path}.id"), format!("tool call id `{}` is used twice", call.id)));
        }
        ids.push(call.id.as_str());
    }
    Ok(ids)
}

fn object<'a>(value: &'a Value, path: &str) -> Result<&'a Object, ApiError> {
    value.as_object().ok_or_else(|| ApiError::at(path, "must be an object"))
}

fn goal(messages: &[Message]) -> String {
    let first_user = messages.iter().find_map(|m| if let Message::User(text) = m { Some(text) } else { None });
    first_user.cloned().unwrap_or_default()
}

fn last_tool_result(messages: &[Message]) -> Option<String> {
    messages.iter().rev().find_map(|m| if let Message::Tool { content, .. } = m { Some(content.clone()) } else { None })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tools() -> Value {
        json!([{"type": "function", "function": {"name": "search", "description": "d",
                "parameters": {"type": "object", "properties": {}}}}])
    }

    fn call(id: &str, name: &str) -> Value {
        json!({"id": id, "type": "function", "function": {"name": name, "arguments": "{\"q\":1}"}})
    }

    fn body(messages: Value) -> Value {
        json!({"model": "m", "max_tokens": 10, "messages": messages, "tools": tools(), "tool_choice": "auto"})
    }

    fn run(body: &Value) -> Result<Validated, ApiError> {
        validate(&HeaderMap::new(), body.to_string().as_bytes(), None)
    }

    fn reason(body: &Value) -> String {
        run(body).expect_err("should be rejected").message
    }

    fn conversation() -> Value {
        json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "goal [steps=3]"},
            {"role": "assistant", "content": null, "tool_calls": [call("a", "search"), call("b", "search")]},
            {"role": "tool", "tool_call_id": "b", "content": "two"},
            {"role": "tool", "tool_call_id": "a", "content": "Error: one"},
            {"role": "user", "content": [{"type": "text", "text": "more"}]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "go on"},
        ])
    }

    #[test]
    fn a_full_conversation_passes() {
        let valid = run(&body(conversation())).expect("valid");
        assert_eq!((valid.goal.as_str(), valid.turn, valid.tool_choice.as_str()), ("goal [steps=3]", 2, "auto"));
        assert_eq!(
            (valid.tools, valid.last_tool_result.as_deref(), valid.system_bytes),
            (vec!["search".to_owned()], Some("Error: one"), 9)
        );
    }

    #[test]
    fn top_level_fields_are_checked() {
        let mut b = body(json!([{"role": "user", "content": "hi"}]));
        b["model"] = json!("");
        assert!(reason(&b).starts_with("model:"));
        b.as_object_mut().expect("object").remove("model");
        assert_eq!(reason(&b), "model: required");
        let mut b = body(json!([]));
        assert!(reason(&b).starts_with("messages: at least one"));
        b["messages"] = json!([{"role": "user", "content": "hi"}]);
        b["max_tokens"] = json!(0);
        assert!(reason(&b).starts_with("max_tokens:"));
        b["max_tokens"] = json!(5);
        b["stream"] = json!(true);
        assert!(reason(&b).starts_with("stream:"));
        assert!(validate(&HeaderMap::new(), b"[1]", None).expect_err("array").message.starts_with("body:"));
        assert!(validate(&HeaderMap::new(), b"{nope", None).expect_err("json").message.starts_with("body:"));
    }

    #[test]
    fn roles_and_contents_are_checked() {
        let bad = [
            (json!([{"role": "robot", "content": "x"}]), "messages.0.role:"),
            (json!([{"role": "user"}]), "messages.0.content:"),
            (json!([{"role": "user", "content": 5}]), "messages.0.content:"),
            (json!([{"role": "user", "content": "x"}, {"role": "assistant", "content": null}]), "messages.1.content:"),
            (json!([{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}]), "messages.1.tool_call_id:"),
            (json!(["hi"]), "messages.0: must be an object"),
        ];
        for (messages, prefix) in bad {
            assert!(
                reason(&body(messages.clone())).starts_with(prefix),
                "{messages}: {}",
                reason(&body(messages.clone()))
            );
        }
    }

    #[test]
    fn tool_calls_are_well_formed() {
        let with_call = |call: Value| {
            body(json!([{"role": "user", "content": "x"}, {"role": "assistant", "content": null, "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": "a", "content": "r"}]))
        };
        let mut bad_args = call("a", "search");
        bad_args["function"]["arguments"] = json!("{not json");
        assert!(reason(&with_call(bad_args)).contains("arguments: must be a JSON object"));
        let mut object_args = call("a", "search");
        object_args["function"]["arguments"] = json!({"q": 1});
        assert!(reason(&with_call(object_args)).contains("arguments"));
        assert!(reason(&with_call(call("", "search"))).contains("tool_calls.0.id"));
        assert!(reason(&with_call(call("a", "nope"))).contains("unknown tool `nope`"));
        let mut untyped = call("a", "search");
        untyped.as_object_mut().expect("object").remove("type");
        assert!(reason(&with_call(untyped)).contains("tool_calls.0.type"));
    }

    #[test]
    fn every_call_is_answered_before_anything_else() {
        let user = json!({"role": "user", "content": "x"});
        let asks =
            json!({"role": "assistant", "content": "", "tool_calls": [call("a", "search"), call("b", "search")]});
        let answer = |id: &str| json!({"role": "tool", "tool_call_id": id, "content": "r"});
        let missing = reason(&body(json!([user, asks, answer("a"), user])));
        assert!(
            missing.starts_with("messages.3: an assistant message with 'tool_calls'") && missing.ends_with(": b"),
            "{missing}"
        );
        assert!(reason(&body(json!([user, asks, answer("a")]))).starts_with("messages.3:"));
        assert!(reason(&body(json!([user, asks, answer("a"), answer("b"), answer("a")]))).contains("not a pending"));
        assert!(reason(&body(json!([user, answer("a")]))).contains("must be a response to a preceding"));
        let reused = json!([user, asks, answer("a"), answer("b"), {"role": "assistant", "content": null, "tool_calls": [call("a", "search")]}, answer("a")]);
        assert!(reason(&body(reused)).contains("used twice"));
        let twice_in_one = json!([user, {"role": "assistant", "content": null, "tool_calls": [call("a", "search"), call("a", "search")]}]);
        assert!(reason(&body(twice_in_one)).contains("used twice"));
    }

    #[test]
    fn tools_and_tool_choice_are_checked() {
        let messages = json!([{"role": "user", "content": "x"}]);
        let mut b = body(messages.clone());
        b["tools"] = json!([]);
        assert!(reason(&b).starts_with("tools:"));
        b["tools"] = json!([{"type": "function", "function": {"name": "has space"}}]);
        assert!(reason(&b).starts_with("tools.0.function.name"));
        b["tools"] = json!([{"type": "function", "function": {"name": "s", "parameters": {"type": "string"}}}]);
        assert!(reason(&b).starts_with("tools.0.function.parameters.type"));
        b["tools"] =
            json!([{"type": "function", "function": {"name": "s"}}, {"type": "function", "function": {"name": "s"}}]);
        assert!(reason(&b).contains("unique"));
        let mut b = body(messages.clone());
        b["tool_choice"] = json!("any");
        assert!(reason(&b).starts_with("tool_choice:"));
        b["tool_choice"] = json!({"type": "function", "function": {"name": "search"}});
        assert_eq!(run(&b).expect("named").tool_choice, "function");
        b.as_object_mut().expect("object").remove("tools");
        assert!(reason(&b).contains("only allowed when 'tools'"));
    }

    #[test]
    fn a_tool_less_request_may_carry_past_calls() {
        let mut b = body(conversation());
        let object = b.as_object_mut().expect("object");
        object.remove("tools");
        object.remove("tool_choice");
        let valid = run(&b).expect("valid");
        assert_eq!((valid.tool_choice.as_str(), valid.tools.len()), ("absent", 0));
    }

    #[test]
    fn auth_is_checked_only_when_configured() {
        let b = body(json!([{"role": "user", "content": "x"}])).to_string();
        let mut headers = HeaderMap::new();
        assert_eq!(validate(&headers, b.as_bytes(), Some("k")).expect_err("no key").status, 401);
        headers.insert("authorization", "Bearer nope".parse().expect("value"));
        assert_eq!(validate(&headers, b.as_bytes(), Some("k")).expect_err("wrong key").status, 401);
        assert!(validate(&headers, b.as_bytes(), None).is_ok(), "any key without a configured one");
        headers.insert("authorization", "Bearer k".parse().expect("value"));
        assert!(validate(&headers, b.as_bytes(), Some("k")).is_ok());
    }
}
