//! Tool definitions and `tool_choice`, validation rules 5 and 6, plus `cache_control` values and their
//! limit (where they may sit and in what order is [`super::cache`]'s).
//!
//! Client tools need a name matching `^[a-zA-Z0-9_-]{1,64}$`, unique, and an object `input_schema`.
//! Server tools (a `type` other than `custom`, e.g. `web_search_20250305`) only need a name. Because
//! the scripted models always think, a `tool_choice` that forces tool use is refused, as the real API
//! refuses it when thinking is enabled.

use std::collections::BTreeSet;

use serde_json::Value;

use super::cache::Ttl;
use super::error::ApiError;
use super::fields::{Object, array, invalid_at, is_identifier, join, object, required, required_str};

/// The most blocks that may carry `cache_control` in one request.
const MAX_CACHE_CONTROL_BLOCKS: usize = 4;

/// The tools a request defines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ToolSet {
    /// Client tools, whose `tool_use` blocks the client answers.
    pub(crate) client: Vec<String>,
}

impl ToolSet {
    /// Whether the client defined a tool called `name`.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.client.iter().any(|tool| tool == name)
    }
}

/// Rule 5: `tools`, when present, is a list of well-formed, uniquely named tools.
pub(crate) fn parse_tools(body: &Object) -> Result<ToolSet, ApiError> {
    let Some(value) = body.get("tools") else {
        return Ok(ToolSet::default());
    };
    let mut names = BTreeSet::new();
    let mut set = ToolSet::default();
    for (i, tool) in array(value, "tools")?.iter().enumerate() {
        let (name, is_client) = parse_tool(tool, &join("tools", i))?;
        if !names.insert(name.clone()) {
            return Err(ApiError::invalid(format!("tools: Tool names must be unique; `{name}` appears twice")));
        }
        if is_client {
            set.client.push(name);
        }
    }
    Ok(set)
}

/// One tool: its name and whether it is a client tool.
fn parse_tool(value: &Value, path: &str) -> Result<(String, bool), ApiError> {
    let tool = object(value, path)?;
    let name = required_str(tool, "name", path)?;
    let is_client = matches!(tool.get("type").and_then(Value::as_str), None | Some("custom"));
    if is_client {
        check_client_tool(tool, name, path)?;
    }
    Ok((name.to_owned(), is_client))
}

fn check_client_tool(tool: &Object, name: &str, path: &str) -> Result<(), ApiError> {
    if !is_identifier(name, 64) {
        return Err(invalid_at(&join(path, "name"), "String should match pattern '^[a-zA-Z0-9_-]{1,64}$'"));
    }
    if let Some(description) = tool.get("description") {
        super::fields::string(description, &join(path, "description"))?;
    }
    let schema_path = join(path, "input_schema");
    let schema = object(required(tool, "input_schema", path)?, &schema_path)?;
    if schema.get("type").and_then(Value::as_str) != Some("object") {
        return Err(invalid_at(&join(&schema_path, "type"), "Input should be 'object'"));
    }
    Ok(())
}

/// Rule 6: returns the `tool_choice` type (`"absent"` when not given) for the stats.
pub(crate) fn check_tool_choice(body: &Object) -> Result<String, ApiError> {
    let Some(value) = body.get("tool_choice") else {
        return Ok("absent".to_owned());
    };
    let choice = object(value, "tool_choice")?;
    let kind = required_str(choice, "type", "tool_choice")?;
    match kind {
        "auto" | "none" => Ok(kind.to_owned()),
        "any" | "tool" => Err(ApiError::invalid("Thinking may not be enabled when tool_choice forces tool use.")),
        _ => Err(invalid_at("tool_choice.type", "Input should be 'auto', 'any', 'tool' or 'none'")),
    }
}

/// A `cache_control` value: `{"type": "ephemeral"}` with an optional `ttl` of `"5m"` (the default)
/// or `"1h"`. Returns its TTL.
pub(crate) fn cache_control_ttl(value: &Value, path: &str) -> Result<Ttl, ApiError> {
    let control = object(value, path)?;
    if required_str(control, "type", path)? != "ephemeral" {
        return Err(invalid_at(&join(path, "type"), "Input should be 'ephemeral'"));
    }
    match control.get("ttl") {
        None | Some(Value::Null) => Ok(Ttl::FiveMinutes),
        Some(Value::String(ttl)) if ttl == "5m" => Ok(Ttl::FiveMinutes),
        Some(Value::String(ttl)) if ttl == "1h" => Ok(Ttl::OneHour),
        Some(_) => Err(invalid_at(&join(path, "ttl"), "Input should be '5m' or '1h'")),
    }
}

/// At most four blocks may carry `cache_control`.
pub(crate) fn check_breakpoint_count(count: usize) -> Result<(), ApiError> {
    if count > MAX_CACHE_CONTROL_BLOCKS {
        let message = format!(
            "A maximum of {MAX_CACHE_CONTROL_BLOCKS} blocks with cache_control may be provided. Found {count}."
        );
        return Err(ApiError::invalid(message));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tools(list: Value) -> Result<ToolSet, ApiError> {
        let body = json!({ "tools": list });
        parse_tools(body.as_object().expect("object"))
    }

    fn tool(name: &str) -> Value {
        json!({"name": name, "description": "d", "input_schema": {"type": "object", "properties": {}}})
    }

    #[test]
    fn well_formed_tools_are_accepted() {
        let set = tools(json!([tool("search_knowledge_base"), tool("lookup-customer")])).expect("valid");
        assert!(set.has("search_knowledge_base"));
        assert!(set.has("lookup-customer"));
        assert!(!set.has("create_ticket"));
        assert!(tools(json!([])).expect("empty").client.is_empty());
    }

    #[test]
    fn server_tools_are_accepted_but_not_client_tools() {
        let set = tools(json!([{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}])).expect("valid");
        assert!(!set.has("web_search"));
    }

    #[test]
    fn tool_names_must_match_the_pattern() {
        assert!(tools(json!([tool("has space")])).expect_err("space").message.contains("pattern"));
        assert!(tools(json!([tool(&"x".repeat(65))])).is_err());
        assert!(tools(json!([tool("")])).is_err());
    }

    #[test]
    fn tool_names_must_be_unique() {
        let err = tools(json!([tool("a"), tool("a")])).expect_err("duplicate");
        assert!(err.message.contains("unique"));
    }

    #[test]
    fn input_schema_must_be_an_object_schema() {
        let missing = tools(json!([{"name": "a"}])).expect_err("missing");
        assert_eq!(missing.message, "tools.0.input_schema: Field required");
        let array_schema = tools(json!([{"name": "a", "input_schema": {"type": "array"}}])).expect_err("array");
        assert_eq!(array_schema.message, "tools.0.input_schema.type: Input should be 'object'");
        assert!(tools(json!({"name": "a"})).is_err());
    }

    #[test]
    fn forced_tool_choice_is_refused() {
        for kind in ["any", "tool"] {
            let body = json!({"tool_choice": {"type": kind, "name": "a"}});
            let err = check_tool_choice(body.as_object().expect("object")).expect_err("forced");
            assert_eq!(err.message, "Thinking may not be enabled when tool_choice forces tool use.");
        }
    }

    #[test]
    fn auto_and_none_tool_choice_are_fine() {
        for kind in ["auto", "none"] {
            let body = json!({"tool_choice": {"type": kind}});
            assert_eq!(check_tool_choice(body.as_object().expect("object")).expect("ok"), kind);
        }
        assert_eq!(check_tool_choice(&Object::new()).expect("absent"), "absent");
        let bad = json!({"tool_choice": {"type": "maybe"}});
        assert!(check_tool_choice(bad.as_object().expect("object")).is_err());
    }

    #[test]
    fn cache_control_values_and_count() {
        let ttl = |value: Value| cache_control_ttl(&value, "tools.0.cache_control");
        assert_eq!(ttl(json!({"type": "ephemeral"})).expect("default"), Ttl::FiveMinutes);
        assert_eq!(ttl(json!({"type": "ephemeral", "ttl": "5m"})).expect("5m"), Ttl::FiveMinutes);
        assert_eq!(ttl(json!({"type": "ephemeral", "ttl": "1h"})).expect("1h"), Ttl::OneHour);
        let err = ttl(json!({"type": "forever"})).expect_err("type");
        assert_eq!(err.message, "tools.0.cache_control.type: Input should be 'ephemeral'");
        let err = ttl(json!({"type": "ephemeral", "ttl": "10m"})).expect_err("ttl");
        assert_eq!(err.message, "tools.0.cache_control.ttl: Input should be '5m' or '1h'");
        assert!(ttl(json!({"type": "ephemeral", "ttl": 300})).is_err());
        assert!(check_breakpoint_count(4).is_ok());
        let err = check_breakpoint_count(5).expect_err("five");
        assert_eq!(err.message, "A maximum of 4 blocks with cache_control may be provided. Found 5.");
    }
}
