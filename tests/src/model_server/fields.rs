//! Typed reads of JSON fields that fail with the API's path-prefixed messages.
//!
//! The real API names the offending field in every validation message (`messages.1.content.0.id:
//! Field required`); these helpers keep that uniform across the validation modules.

use serde_json::{Map, Value};

use super::error::ApiError;

/// A JSON object, as parsed by `serde_json`.
pub(crate) type Object = Map<String, Value>;

/// `path.key`, or just `key` at the top level.
pub(crate) fn join(path: &str, key: impl std::fmt::Display) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

/// A 400 whose message is `path: what`.
pub(crate) fn invalid_at(path: &str, what: impl std::fmt::Display) -> ApiError {
    ApiError::invalid(format!("{path}: {what}"))
}

/// The value of a required field.
pub(crate) fn required<'a>(obj: &'a Object, key: &str, path: &str) -> Result<&'a Value, ApiError> {
    obj.get(key).ok_or_else(|| invalid_at(&join(path, key), "Field required"))
}

/// The value as a string.
pub(crate) fn string<'a>(value: &'a Value, path: &str) -> Result<&'a str, ApiError> {
    value.as_str().ok_or_else(|| invalid_at(path, "Input should be a valid string"))
}

/// The value as an object.
pub(crate) fn object<'a>(value: &'a Value, path: &str) -> Result<&'a Object, ApiError> {
    value.as_object().ok_or_else(|| invalid_at(path, "Input should be a valid dictionary"))
}

/// The value as an array.
pub(crate) fn array<'a>(value: &'a Value, path: &str) -> Result<&'a [Value], ApiError> {
    value.as_array().map(Vec::as_slice).ok_or_else(|| invalid_at(path, "Input should be a valid list"))
}

/// A required string field.
pub(crate) fn required_str<'a>(obj: &'a Object, key: &str, path: &str) -> Result<&'a str, ApiError> {
    string(required(obj, key, path)?, &join(path, key))
}

/// An optional boolean field.
pub(crate) fn optional_bool(obj: &Object, key: &str, path: &str) -> Result<Option<bool>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(flag)) => Ok(Some(*flag)),
        Some(_) => Err(invalid_at(&join(path, key), "Input should be a valid boolean")),
    }
}

/// Whether `name` matches `^[a-zA-Z0-9_-]{1,max}$`.
pub(crate) fn is_identifier(name: &str, max: usize) -> bool {
    let allowed = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    (1..=max).contains(&name.len()) && name.chars().all(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn join_handles_the_top_level() {
        assert_eq!(join("", "model"), "model");
        assert_eq!(join("messages.0", "content"), "messages.0.content");
    }

    #[test]
    fn required_names_the_path() {
        let obj = Object::new();
        let err = required(&obj, "id", "messages.1.content.0").expect_err("missing");
        assert_eq!(err.message, "messages.1.content.0.id: Field required");
    }

    #[test]
    fn typed_reads_reject_other_types() {
        assert!(string(&json!(1), "x").is_err());
        assert!(object(&json!([]), "x").is_err());
        assert!(array(&json!({}), "x").is_err());
        let obj = json!({"flag": "yes"});
        assert!(optional_bool(obj.as_object().expect("object"), "flag", "").is_err());
    }

    #[test]
    fn identifiers() {
        assert!(is_identifier("search_knowledge_base", 64));
        assert!(is_identifier("a-b_9", 64));
        assert!(!is_identifier("", 64));
        assert!(!is_identifier("has space", 64));
        assert!(!is_identifier(&"x".repeat(65), 64));
    }
}
