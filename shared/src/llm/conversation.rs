//! The messages of one model call, as a step hands them to a client.
//!
//! A session's conversation is stored as JSON text this fleet wrote, one string per message. The
//! Anthropic client writes those strings into the request body as they are: no parse, and no copy
//! besides the body itself. Only the summary call ends differently — its last user message gets the
//! summary prompt joined to it, or the prompt comes as one more message — so a call's messages are
//! the stored ones, or all but the last, then at most one message of the call's own.

/// The messages one call sends: stored messages, then at most one message of the call's own. Each
/// is JSON text.
///
/// ```
/// use agentfleet::llm::Conversation;
/// let stored = vec![r#"{"role":"user","content":"hi"}"#.to_owned()];
/// let all: Vec<&str> = Conversation::new(&stored).iter().collect();
/// assert_eq!(all, [stored[0].as_str()]);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Conversation<'a> {
    stored: &'a [String],
    last: Option<&'a str>,
}

impl<'a> Conversation<'a> {
    /// The stored messages as they are.
    pub fn new(stored: &'a [String]) -> Self {
        Self { stored, last: None }
    }

    /// `stored`, then `last`.
    pub fn ending_with(stored: &'a [String], last: &'a str) -> Self {
        Self { stored, last: Some(last) }
    }

    /// How many messages the call sends.
    pub fn len(&self) -> usize {
        self.stored.len() + usize::from(self.last.is_some())
    }

    /// True when there is no message at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each message's JSON text, in order.
    pub fn iter(&self) -> impl Iterator<Item = &'a str> + use<'a> {
        self.stored.iter().map(String::as_str).chain(self.last)
    }

    /// The length of all messages' text together.
    pub(crate) fn text_len(&self) -> usize {
        self.iter().map(str::len).sum()
    }
}

impl<'a> From<&'a [String]> for Conversation<'a> {
    fn from(stored: &'a [String]) -> Self {
        Self::new(stored)
    }
}

impl<'a> From<&'a Vec<String>> for Conversation<'a> {
    fn from(stored: &'a Vec<String>) -> Self {
        Self::new(stored)
    }
}

impl<'a, const N: usize> From<&'a [String; N]> for Conversation<'a> {
    fn from(stored: &'a [String; N]) -> Self {
        Self::new(stored)
    }
}

/// The messages of a planned call, without the conversation itself: how many stored messages it
/// sends, and the message it ends with, if any. It owns nothing of the conversation, so a step can
/// keep it beside the state that holds the conversation, and lend that to it when the request is
/// written ([`MessagePlan::over`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessagePlan {
    keep: usize,
    last: Option<String>,
}

impl MessagePlan {
    /// All `len` messages of the stored conversation, as they are.
    pub fn stored(len: usize) -> Self {
        Self { keep: len, last: None }
    }

    /// The first `keep` stored messages, then `last` (JSON text).
    pub fn ending_with(keep: usize, last: String) -> Self {
        Self { keep, last: Some(last) }
    }

    /// How many messages the call sends.
    pub fn len(&self) -> usize {
        self.keep + usize::from(self.last.is_some())
    }

    /// True when the call sends no message at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The call's messages over `stored`, the conversation the plan was made for.
    pub fn over<'a>(&'a self, stored: &'a [String]) -> Conversation<'a> {
        let stored = &stored[..self.keep.min(stored.len())];
        Conversation { stored, last: self.last.as_deref() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_sends_the_stored_messages_then_its_own() {
        let stored: Vec<String> = ["a", "b", "c"].map(str::to_owned).into();
        let as_is = MessagePlan::stored(3);
        assert_eq!(as_is.over(&stored).iter().collect::<Vec<_>>(), ["a", "b", "c"]);
        let replaced = MessagePlan::ending_with(2, "C".into());
        assert_eq!(replaced.over(&stored).iter().collect::<Vec<_>>(), ["a", "b", "C"]);
        assert_eq!((replaced.len(), replaced.over(&stored).text_len()), (3, 3));
        let appended = MessagePlan::ending_with(3, "d".into());
        assert_eq!(appended.over(&stored).iter().collect::<Vec<_>>(), ["a", "b", "c", "d"]);
        assert_eq!(appended.len(), 4);
        let shorter: Vec<String> = vec!["a".into()];
        assert_eq!(as_is.over(&shorter).len(), 1, "never past the conversation it is lent");
        assert!(MessagePlan::stored(0).is_empty() && Conversation::new(&[]).is_empty());
    }
}
