//! Following a session (`submit --wait`, `watch`) until it stops moving by itself.
//!
//! It reads the session's event stream (`GET /v1/sessions/{id}/events`, Server-Sent Events): each
//! trace record arrives as it is written, and the session is read again then, to print a line when
//! the step or the status changed — and, for `watch`, each new message of the conversation. A
//! dropped stream (a dispatcher restart) is opened again from its last event with `Last-Event-ID`;
//! a dispatcher without the stream is polled every [`POLL`] instead. A dispatcher that briefly does
//! not answer is retried for a while rather than ending the watch.

use std::time::Duration;

use eventsource_stream::Eventsource as _;
use futures::StreamExt as _;
use reqwest::StatusCode;
use serde_json::Value;

use crate::api::{Api, ApiError};
use crate::format;
use crate::model::{Session, is_settled, read};
use crate::output::Output;

/// How often to poll.
const POLL: Duration = Duration::from_millis(300);

/// Consecutive failed polls tolerated before giving up (about 15 s with the back-off).
const MAX_FAILURES: u32 = 15;

/// Follows session `id` until it is settled, printing progress (and messages with `messages`);
/// returns the last document.
pub(crate) async fn follow(api: &Api, out: Output, id: &str, messages: bool) -> anyhow::Result<Value> {
    let mut seen = Seen { messages, ..Seen::default() };
    // Where it stands now, then what happens next.
    let (v, settled) = refresh(api, out, id, &mut seen).await?;
    if settled {
        return Ok(v);
    }
    let mut last_event: Option<String> = None;
    let mut failures = 0;
    loop {
        let response = match api.events(id, last_event.as_deref()).await {
            Ok(response) => response,
            // A dispatcher without the stream (an older one): poll.
            Err(ApiError::Answered { status: StatusCode::NOT_FOUND, .. }) => {
                return poll_until_settled(api, out, id, seen).await;
            }
            Err(e) if e.is_transient() && failures < MAX_FAILURES => {
                failures += 1;
                tokio::time::sleep(POLL * failures.min(5)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if response.status() == StatusCode::NO_CONTENT {
            return poll(api, id).await;
        }
        let mut events = response.bytes_stream().eventsource();
        while let Some(event) = events.next().await {
            let Ok(event) = event else { break };
            failures = 0;
            if !event.id.is_empty() {
                last_event = Some(event.id.clone());
            }
            let (v, settled) = refresh(api, out, id, &mut seen).await?;
            if settled || event.event == "session.ended" {
                return Ok(v);
            }
        }
        // The stream ended without the session's end: a dispatcher going away. Open it again.
        failures += 1;
        if failures > MAX_FAILURES {
            anyhow::bail!("the event stream of {id} kept closing");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls session `id` every [`POLL`] until it is settled.
async fn poll_until_settled(api: &Api, out: Output, id: &str, mut seen: Seen) -> anyhow::Result<Value> {
    loop {
        let (v, settled) = refresh(api, out, id, &mut seen).await?;
        if settled {
            return Ok(v);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Reads session `id` once and prints what is new since `seen`: the document, and whether the
/// session is settled.
async fn refresh(api: &Api, out: Output, id: &str, seen: &mut Seen) -> anyhow::Result<(Value, bool)> {
    let v = poll(api, id).await?;
    let s: Session = read(&v)?;
    for line in seen.news(&s) {
        out.progress(&line)?;
    }
    Ok((v, is_settled(&s.status)))
}

/// One `GET`, retried while the failure may be transient.
async fn poll(api: &Api, id: &str) -> anyhow::Result<Value> {
    let mut failures = 0;
    loop {
        match api.session(id).await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && failures < MAX_FAILURES => {
                failures += 1;
                tokio::time::sleep(POLL * failures.min(5)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// What has been printed so far.
#[derive(Debug, Default)]
struct Seen {
    /// Print the conversation too.
    messages: bool,
    /// The last (step, status) printed.
    last: Option<(u64, String)>,
    /// How many messages were printed.
    printed: usize,
}

impl Seen {
    /// The lines to print for this poll: new messages, then progress if the step or status moved.
    fn news(&mut self, s: &Session) -> Vec<String> {
        let mut lines = if self.messages { self.new_messages(s) } else { Vec::new() };
        let now = (s.step, s.status.clone());
        if self.last.as_ref() != Some(&now) {
            lines.push(format::progress(s.step, &s.status, s.usage.total_tokens, s.usage.cost_usd));
            self.last = Some(now);
        }
        lines
    }

    fn new_messages(&mut self, s: &Session) -> Vec<String> {
        let tools = format::tool_names(&s.messages);
        let fresh = s.messages.iter().skip(self.printed);
        let lines = fresh.flat_map(|m| format::message_lines(m, &tools)).collect();
        self.printed = self.printed.max(s.messages.len());
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn session(step: u64, status: &str, messages: Value) -> anyhow::Result<Session> {
        read(&json!({"id": "s_1", "step": step, "status": status, "messages": messages,
                      "usage": {"total_tokens": 1234, "cost_usd": 0.0042}}))
    }

    #[test]
    fn progress_prints_only_when_the_step_or_status_moves() -> anyhow::Result<()> {
        let mut seen = Seen::default();
        assert_eq!(seen.news(&session(1, "running", json!([]))?), ["step 1  running  1,234 tokens  $0.0042"]);
        assert!(seen.news(&session(1, "running", json!([]))?).is_empty());
        assert_eq!(seen.news(&session(2, "running", json!([]))?).len(), 1);
        assert_eq!(seen.news(&session(2, "completed", json!([]))?).len(), 1);
        Ok(())
    }

    #[test]
    fn watch_prints_each_message_once() -> anyhow::Result<()> {
        let mut seen = Seen { messages: true, ..Seen::default() };
        let goal = json!({"role": "user", "content": "hello"});
        let answer = json!({"role": "assistant", "content": [{"type": "text", "text": "hi"}]});
        let first = seen.news(&session(1, "running", json!([goal]))?);
        assert_eq!(first, ["  user       hello", "step 1  running  1,234 tokens  $0.0042"]);
        let second = seen.news(&session(1, "running", json!([goal, answer]))?);
        assert_eq!(second, ["  assistant  hi"]);
        assert!(seen.news(&session(1, "running", json!([goal, answer]))?).is_empty());
        Ok(())
    }
}
