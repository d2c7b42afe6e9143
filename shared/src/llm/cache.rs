//! Prompt-cache breakpoints for the Messages API (`cache_control`).
//!
//! The API caches a request's prefix (tools, then system prompt, then messages) up to each block
//! marked with `cache_control`; a later request that starts with the same bytes reads it at about a
//! tenth of the input price. A session's conversation is append-only and its stored messages are
//! sent back byte for byte, so the request of step n+1 starts with the request of step n, whichever
//! worker runs either. [`Breakpoints`] marks, at most four:
//! - the last tool definition (the definitions are the same for every call of an agent);
//! - the system prompt (then sent as one text block);
//! - the last block of the message that was newest in the previous step's request (the third
//!   from last: that step's reply and the results came after it), which that step wrote: this call
//!   reads it however many blocks the step added (the API looks back only 20 blocks from a
//!   breakpoint);
//! - the last block of the newest message, which this call writes for the next.
//!
//! Each only where its prefix is at least the model's shortest cacheable length; the prefix is
//! measured in bytes at [`BYTES_PER_TOKEN`], which counts English text about right and JSON on the
//! low side, so a marked prefix is rarely below the real minimum (the API then caches nothing and
//! bills the call as plain input; nothing fails). A marker is inserted into the stored bytes, never
//! written over them: with the markers left out, what a call sends is what the stored messages are.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::Conversation;
use crate::config::CacheTtl;

/// Bytes counted as one token when a prefix is measured against the model's shortest cacheable
/// length.
pub const BYTES_PER_TOKEN: usize = 4;

/// The most breakpoints the API accepts in one request.
pub const MAX_BREAKPOINTS: usize = 4;

/// An agent's prompt-cache settings, as its calls mark breakpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSpec {
    /// The cache entries' lifetime.
    pub ttl: CacheTtl,
    /// The model's shortest cacheable prefix, in tokens.
    pub min_tokens: u32,
}

impl CacheSpec {
    /// The `cache_control` member inserted into a marked block.
    pub fn marker(&self) -> &'static str {
        match self.ttl {
            CacheTtl::FiveMinutes => r#""cache_control":{"type":"ephemeral"}"#,
            CacheTtl::OneHour => r#""cache_control":{"type":"ephemeral","ttl":"1h"}"#,
        }
    }

    /// True when a prefix of `bytes` is long enough to be cached.
    pub fn caches(&self, bytes: usize) -> bool {
        bytes / BYTES_PER_TOKEN >= self.min_tokens as usize
    }
}

/// Where a marker goes into a JSON text: before the closing brace of an object at `at`, after a
/// comma unless the object is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mark {
    at: usize,
    comma: bool,
}

impl Mark {
    /// `text` with `marker` inserted at this mark, appended to `out`.
    pub(crate) fn write(&self, out: &mut Vec<u8>, text: &str, marker: &str) {
        out.extend_from_slice(&text.as_bytes()[..self.at]);
        if self.comma {
            out.push(b',');
        }
        out.extend_from_slice(marker.as_bytes());
        out.extend_from_slice(&text.as_bytes()[self.at..]);
    }
}

/// The mark for a JSON object `text` that starts at `start` of the text it is part of: before its
/// closing brace.
fn object_mark(text: &str, start: usize) -> Option<Mark> {
    let inner = text.strip_prefix('{')?.strip_suffix('}')?;
    Some(Mark { at: start + text.len() - 1, comma: !inner.trim().is_empty() })
}

/// The mark on the last element of a JSON array of objects (the tool definitions).
pub(crate) fn last_element(array: &str) -> Option<Mark> {
    let body = array.trim_end().strip_suffix(']')?.trim_end();
    let close = body.len().checked_sub(1).filter(|_| body.ends_with('}'))?;
    let before = body[..close].trim_end();
    Some(Mark { at: close, comma: !before.ends_with('{') })
}

/// A stored message, read only for its content's place.
#[derive(Deserialize)]
struct Stored<'a> {
    #[serde(borrow)]
    content: &'a RawValue,
}

/// The parts of a content block that decide whether it may carry a marker.
#[derive(Deserialize)]
struct BlockHead<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
    cache_control: Option<serde::de::IgnoredAny>,
}

/// How a stored message is sent with a breakpoint on its last block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MessageMark {
    /// The content is a list of blocks: the marker goes into the last one.
    Block(Mark),
    /// The content is a string, at `start..end` of the message: it is sent as one text block that
    /// carries the marker.
    Text {
        /// Where the string starts.
        start: usize,
        /// Where it ends.
        end: usize,
    },
}

impl MessageMark {
    /// `message` with the breakpoint, appended to `out`.
    pub(crate) fn write(&self, out: &mut Vec<u8>, message: &str, marker: &str) {
        match *self {
            Self::Block(mark) => mark.write(out, message, marker),
            Self::Text { start, end } => {
                out.extend_from_slice(&message.as_bytes()[..start]);
                out.extend_from_slice(br#"[{"type":"text","text":"#);
                out.extend_from_slice(&message.as_bytes()[start..end]);
                out.push(b',');
                out.extend_from_slice(marker.as_bytes());
                out.extend_from_slice(b"}]");
                out.extend_from_slice(&message.as_bytes()[end..]);
            }
        }
    }
}

/// Where a breakpoint on the last block of `message` goes; `None` when that block may not carry
/// one: a thinking block, an empty text, a block that already has one, or no block at all.
pub(crate) fn message_mark(message: &str) -> Option<MessageMark> {
    let stored: Stored<'_> = serde_json::from_str(message).ok()?;
    let content = stored.content.get();
    let start = content.as_ptr() as usize - message.as_ptr() as usize;
    if content.starts_with('"') {
        return (content != r#""""#).then_some(MessageMark::Text { start, end: start + content.len() });
    }
    let blocks: Vec<&RawValue> = serde_json::from_str(content).ok()?;
    let last = blocks.last()?;
    let head: BlockHead<'_> = serde_json::from_str(last.get()).ok()?;
    let kind = head.kind.as_deref().unwrap_or_default();
    let empty_text = kind == "text" && head.text.as_deref().is_none_or(str::is_empty);
    if head.cache_control.is_some() || empty_text || matches!(kind, "thinking" | "redacted_thinking" | "") {
        return None;
    }
    let at = last.get().as_ptr() as usize - message.as_ptr() as usize;
    object_mark(last.get(), at).map(MessageMark::Block)
}

/// The breakpoints of one call: which parts of the request carry a marker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Breakpoints {
    /// The last tool definition.
    pub(crate) tools: Option<Mark>,
    /// The system prompt, sent as one text block.
    pub(crate) system: bool,
    /// Messages, by index, and where their marker goes (the previous step's newest, then this
    /// call's newest).
    pub(crate) messages: [Option<(usize, MessageMark)>; 2],
}

impl Breakpoints {
    /// The breakpoints of a call with these tool definitions, system prompt and messages.
    pub(crate) fn place(spec: &CacheSpec, tools: Option<&str>, system: &str, messages: Conversation<'_>) -> Self {
        let mut out = Self::default();
        let mut prefix = tools.map_or(0, str::len);
        if let Some(tools) = tools
            && spec.caches(prefix)
        {
            out.tools = last_element(tools);
        }
        prefix += system.len();
        out.system = !system.is_empty() && spec.caches(prefix);
        let count = messages.len();
        let marked = [count.checked_sub(3), count.checked_sub(1)];
        let mut slot = 0;
        for (i, message) in messages.iter().enumerate() {
            prefix += message.len();
            if marked.contains(&Some(i))
                && spec.caches(prefix)
                && let Some(mark) = message_mark(message)
            {
                out.messages[slot] = Some((i, mark));
                slot += 1;
            }
        }
        debug_assert!(out.count() <= MAX_BREAKPOINTS);
        out
    }

    /// How many markers the call carries (never more than [`MAX_BREAKPOINTS`]).
    pub(crate) fn count(&self) -> usize {
        usize::from(self.tools.is_some()) + usize::from(self.system) + self.messages.iter().flatten().count()
    }

    /// The mark of message `i`, if it carries one.
    pub(crate) fn message(&self, i: usize) -> Option<MessageMark> {
        self.messages.iter().flatten().find(|(at, _)| *at == i).map(|(_, mark)| *mark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: CacheSpec = CacheSpec { ttl: CacheTtl::FiveMinutes, min_tokens: 4 };

    fn marked(text: &str, mark: MessageMark) -> String {
        let mut out = Vec::new();
        mark.write(&mut out, text, SPEC.marker());
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn the_last_tool_gets_the_marker() {
        let tools = r#"[{"name":"a"}, {"name":"b","input_schema":{"x":{}}} ] "#;
        let mark = last_element(tools).expect("a mark");
        let mut out = Vec::new();
        mark.write(&mut out, tools, SPEC.marker());
        let text = String::from_utf8(out).expect("utf-8");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v[1]["cache_control"]["type"], "ephemeral");
        assert!(v[0].get("cache_control").is_none());
        assert_eq!(text.replace(r#","cache_control":{"type":"ephemeral"}"#, ""), tools);
        assert_eq!(last_element("[]"), None);
        assert_eq!(last_element(r#"[{}]"#), Some(Mark { at: 2, comma: false }));
    }

    #[test]
    fn a_message_is_marked_on_its_last_block_without_other_changes() {
        let m = r#"{"role":"user","content":[{"type":"tool_result","tool_use_id":"a","content":"x"},{"type":"text","text":"hi"} ]}"#;
        let out = marked(m, message_mark(m).expect("a mark"));
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v["content"][1]["cache_control"]["type"], "ephemeral");
        assert_eq!(out.replace(r#","cache_control":{"type":"ephemeral"}"#, ""), m);

        let s = r#"{"role":"user","content":"caf\u00e9"}"#;
        let out = marked(s, message_mark(s).expect("a mark"));
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(
            v["content"][0],
            serde_json::json!({"type":"text","text":"café","cache_control":{"type":"ephemeral"}})
        );
    }

    #[test]
    fn blocks_that_may_not_be_marked_are_left_alone() {
        for m in [
            r#"{"role":"user","content":""}"#,
            r#"{"role":"user","content":[]}"#,
            r#"{"role":"user","content":[{"type":"text","text":""}]}"#,
            r#"{"role":"assistant","content":[{"type":"thinking","thinking":"x","signature":"s"}]}"#,
            r#"{"role":"user","content":[{"type":"text","text":"x","cache_control":{"type":"ephemeral"}}]}"#,
            r#"{"role":"user","content":[7]}"#,
            "not json",
        ] {
            assert_eq!(message_mark(m), None, "{m}");
        }
    }

    fn msgs_of(msgs: &[&str]) -> Conversation<'static> {
        let stored: Vec<String> = msgs.iter().map(|m| (*m).to_owned()).collect();
        Conversation::new(Vec::leak(stored))
    }

    #[test]
    fn breakpoints_go_where_the_prefix_is_long_enough() {
        let msgs = [
            r#"{"role":"user","content":[{"type":"text","text":"goal"}]}"#,
            r#"{"role":"assistant","content":[{"type":"text","text":"ok"}]}"#,
            r#"{"role":"user","content":[{"type":"text","text":"more"}]}"#,
        ];
        let all = Breakpoints::place(&SPEC, Some(r#"[{"name":"toolname"}]"#), "a system prompt", msgs_of(&msgs));
        assert!(all.tools.is_some() && all.system);
        assert_eq!(all.messages.map(|m| m.map(|(i, _)| i)), [Some(0), Some(2)]);
        assert_eq!(all.count(), MAX_BREAKPOINTS);
        let long = CacheSpec { min_tokens: 1_000, ..SPEC };
        assert_eq!(Breakpoints::place(&long, Some("[{}]"), "s", msgs_of(&msgs)).count(), 0);
        let short_tools = Breakpoints::place(&SPEC, Some("[{}]"), "", msgs_of(&msgs[..1]));
        assert_eq!((short_tools.tools, short_tools.system, short_tools.count()), (None, false, 1));
    }
}
