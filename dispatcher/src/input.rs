//! A session's `input`: a text, or content blocks (text and images) as the Messages API takes
//! them, checked here so that the model never sees a block it would refuse.

use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// The most blocks one input may have.
const MAX_BLOCKS: usize = 20;

/// The image types the Messages API takes.
const IMAGE_TYPES: [&str; 4] = ["image/jpeg", "image/png", "image/gif", "image/webp"];

/// The first user message: a text, or a list of content blocks.
#[derive(Debug, Clone)]
pub enum Input {
    /// A text; not blank.
    Text(String),
    /// 1-20 content blocks: `{"type": "text", "text"}`, or `{"type": "image", "source": {"type":
    /// "base64", "media_type", "data"}}`.
    Blocks(Vec<Value>),
}

impl<'de> Deserialize<'de> for Input {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{Error, Unexpected};
        const EXPECTED: &str = "a string or an array of content blocks";
        match Value::deserialize(deserializer)? {
            Value::String(text) => Ok(Self::Text(text)),
            Value::Array(blocks) => Ok(Self::Blocks(blocks)),
            Value::Number(n) => Err(Error::invalid_type(
                match (n.as_i64(), n.as_u64()) {
                    (Some(i), _) => Unexpected::Signed(i),
                    (None, Some(u)) => Unexpected::Unsigned(u),
                    _ => Unexpected::Float(n.as_f64().unwrap_or(f64::NAN)),
                },
                &EXPECTED,
            )),
            Value::Bool(b) => Err(Error::invalid_type(Unexpected::Bool(b), &EXPECTED)),
            Value::Null => Err(Error::invalid_type(Unexpected::Unit, &EXPECTED)),
            Value::Object(_) => Err(Error::invalid_type(Unexpected::Map, &EXPECTED)),
        }
    }
}

/// The pattern of a base64 image's `data`.
const BASE64: &str =
    "^(?:[A-Za-z0-9+/]{4})+(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$|^(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)$";

/// Text that is not blank: at least one character that is not whitespace.
const NOT_BLANK: &str = r"[^\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]";

/// The OpenAPI schema of [`Input`]: a non-blank string, or 1-20 text and image blocks.
pub(crate) fn schema() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{AdditionalProperties, ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
    let string = || ObjectBuilder::new().schema_type(Type::String);
    let closed = || {
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
    };
    let text = string().min_length(Some(1)).pattern(Some(NOT_BLANK)).description(Some("A text; not blank."));
    let text_block = closed()
        .property("type", string().enum_values(Some(["text"])))
        .property("text", string().min_length(Some(1)).pattern(Some(NOT_BLANK)))
        .required("type")
        .required("text");
    let source = closed()
        .property("type", string().enum_values(Some(["base64"])))
        .property("media_type", string().enum_values(Some(IMAGE_TYPES)))
        .property("data", string().min_length(Some(4)).pattern(Some(BASE64)))
        .required("type")
        .required("media_type")
        .required("data");
    let image_block = closed()
        .property("type", string().enum_values(Some(["image"])))
        .property("source", source)
        .required("type")
        .required("source");
    let blocks = ArrayBuilder::new()
        .items(OneOfBuilder::new().item(text_block).item(image_block))
        .min_items(Some(1))
        .max_items(Some(MAX_BLOCKS))
        .description(Some("Content blocks as the Messages API takes them: text, and base64 images."));
    OneOfBuilder::new().item(text).item(blocks).into()
}

/// An input that passed the checks.
#[derive(Debug)]
pub(crate) struct CheckedInput {
    /// The first message as it is stored.
    pub(crate) message: String,
    /// Its text (the text blocks joined; `[image]` for each image), for summaries and events.
    pub(crate) text: String,
}

impl Input {
    /// Checks the input, at most `limit` bytes of stored message.
    pub(crate) fn check(self, limit: usize) -> Result<CheckedInput, ApiError> {
        let (message, text) = match self {
            Self::Text(text) => {
                if text.trim().is_empty() {
                    return Err(ApiError::invalid("input: must not be empty"));
                }
                if text.len() > limit {
                    return Err(ApiError::too_large(format!("input: is {} bytes; the limit is {limit}", text.len())));
                }
                (agentfleet::llm::user_message(&text), text)
            }
            Self::Blocks(blocks) => {
                if blocks.is_empty() || blocks.len() > MAX_BLOCKS {
                    return Err(ApiError::invalid(format!(
                        "input: 1 to {MAX_BLOCKS} content blocks, not {}",
                        blocks.len()
                    )));
                }
                let mut texts = Vec::with_capacity(blocks.len());
                for (i, block) in blocks.iter().enumerate() {
                    texts.push(check_block(block).map_err(|why| ApiError::invalid(format!("input[{i}]: {why}")))?);
                }
                if texts.iter().all(|t| t.trim().is_empty()) {
                    return Err(ApiError::invalid("input: must not be empty (every block is blank)"));
                }
                let message = agentfleet::llm::user_blocks(&blocks);
                if message.len() > limit {
                    let why = format!("input: is {} bytes; the limit is {limit}", message.len());
                    return Err(ApiError::too_large(why));
                }
                (message, texts.join("\n"))
            }
        };
        Ok(CheckedInput { message, text })
    }
}

/// Checks one block; its text for summaries (`[image]` for an image).
fn check_block(block: &Value) -> Result<String, String> {
    let Some(fields) = block.as_object() else { return Err("expected a content block (an object)".into()) };
    let only = |allowed: &[&str]| match fields.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(extra) => Err(format!("unknown field `{extra}`")),
        None => Ok(()),
    };
    match fields.get("type").and_then(Value::as_str) {
        Some("text") => {
            only(&["type", "text"])?;
            match fields.get("text") {
                Some(Value::String(text)) if !text.trim().is_empty() => Ok(text.clone()),
                Some(Value::String(_)) => Err("text: must not be empty".into()),
                _ => Err("text: expected a string".into()),
            }
        }
        Some("image") => {
            only(&["type", "source"])?;
            check_image_source(fields.get("source").ok_or("source: field is required")?)?;
            Ok("[image]".into())
        }
        Some(other) => Err(format!("type: `{other}` is not a block an input may have (text, image)")),
        None => Err("type: expected `text` or `image`".into()),
    }
}

fn check_image_source(source: &Value) -> Result<(), String> {
    let Some(fields) = source.as_object() else { return Err("source: expected an object".into()) };
    let string = |key: &str| fields.get(key).and_then(Value::as_str).ok_or(format!("source.{key}: expected a string"));
    let only = |allowed: &[&str]| match fields.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(extra) => Err(format!("source: unknown field `{extra}`")),
        None => Ok(()),
    };
    match string("type")? {
        "base64" => {
            only(&["type", "media_type", "data"])?;
            let media = string("media_type")?;
            if !IMAGE_TYPES.contains(&media) {
                return Err(format!("source.media_type: `{media}` is not one of {}", IMAGE_TYPES.join(", ")));
            }
            if !is_base64(string("data")?) {
                return Err("source.data: expected base64".into());
            }
            Ok(())
        }
        other => Err(format!("source.type: `{other}` is not `base64`")),
    }
}

/// Standard base64 with padding, not empty: [`BASE64`].
fn is_base64(data: &str) -> bool {
    let bytes = data.as_bytes();
    let body = |c: &u8| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/');
    let padding = bytes.iter().rev().take_while(|c| **c == b'=').count();
    !bytes.is_empty()
        && bytes.len().is_multiple_of(4)
        && padding <= 2
        && bytes[..bytes.len() - padding].iter().all(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(v: Value) -> Result<CheckedInput, String> {
        let input: Input = serde_json::from_value(v).map_err(|e| e.to_string())?;
        input.check(65_536).map_err(|e| format!("{e:?}"))
    }

    const PNG: &str =
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";

    #[test]
    fn texts_and_images() {
        let ok = check(json!([{"type": "text", "text": "What is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]))
        .expect("valid");
        assert_eq!(ok.text, "What is this?\n[image]");
        assert!(
            ok.message.starts_with(r#"{"content":[{"text":"What is this?","type":"text"}"#)
                || ok.message.contains(r#""role":"user""#)
        );
        assert!(is_base64("QQ==") && is_base64("QUI=") && is_base64("QUJD") && !is_base64("Q===") && !is_base64("QQ"));
        assert_eq!(check(json!("hi")).expect("text").text, "hi");
    }

    #[test]
    fn bad_blocks_are_named() {
        let err = |v: Value| check(v).expect_err("refused");
        assert!(err(json!([])).contains("1 to 20"));
        assert!(err(json!([{"type": "text", "text": "  "}])).contains("must not be empty"));
        assert!(err(json!([{"type": "tool_result"}])).contains("input[0]: type"));
        assert!(
            err(json!([{"type": "image", "source": {"type": "base64", "media_type": "image/bmp", "data": PNG}}]))
                .contains("media_type")
        );
        assert!(err(json!([{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "not base64!"}}])).contains("base64"));
        assert!(
            err(json!([{"type": "image", "source": {"type": "url", "url": "https://x.y/a.png"}}])).contains("base64")
        );
        assert!(err(json!([{"type": "text", "text": "a", "cache_control": {}}])).contains("cache_control"));
        assert!(err(json!([1])).contains("content block"));
        assert!(err(json!("   ")).contains("must not be empty"));
        assert!(err(json!(42)).contains("invalid type: integer `42`"));
    }
}
