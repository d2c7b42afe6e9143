//! `GET /v1/sessions/{id}/events`: a session's trace records as Server-Sent Events, as they are
//! written, then one `session.ended` event.
//!
//! The session's trace stream in Redis is the source, so a client that reconnects with
//! `Last-Event-ID` — to this dispatcher or another, after a restart — gets every later event once,
//! in order. Each event's id is its stream entry's id (`<ms>-<seq>`); the end's is the last
//! record's id with `-end`, and a client that resumes from it is answered 204 (an `EventSource`
//! stops reconnecting on 204).
//!
//! Each stream reads on a Redis connection of its own, waiting with `XREAD BLOCK` (never more than
//! [`BLOCK_MS`], so a draining dispatcher ends its streams within a second); at most
//! [`MAX_STREAMS`] are open at once per dispatcher, beyond which the answer is 503.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use redis::streams::{StreamReadOptions, StreamReadReply};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use agentfleet::config::Role;
use agentfleet::domain::SessionId;
use agentfleet::redis_conn::RedisConn;
use agentfleet::store::SessionStore;

use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::session_ref::{load_for, path_id};

/// Event streams open at once on one dispatcher.
pub(crate) const MAX_STREAMS: usize = 1000;

/// The longest one `XREAD BLOCK` waits (less when `redis.response_timeout_ms` is shorter).
const BLOCK_MS: u64 = 1000;

/// Records read at once.
const BATCH: usize = 100;

/// How often an idle stream sends a comment, so proxies keep it open.
const HEARTBEAT: Duration = Duration::from_secs(15);

/// Where a stream starts.
#[derive(Debug, PartialEq, Eq)]
enum Resume {
    /// After this stream entry id (`0-0` for the beginning).
    After(String),
    /// The client has seen the end.
    Ended,
}

/// Reads `Last-Event-ID`: absent, an entry id, or an end id.
fn resume(headers: &HeaderMap) -> Result<Resume, ApiError> {
    let Some(value) = headers.get("last-event-id") else { return Ok(Resume::After("0-0".into())) };
    let text = value.to_str().map_err(|_| ApiError::invalid("Last-Event-ID: not text"))?;
    let entry = |t: &str| t.split_once('-').is_some_and(|(ms, seq)| is_number(ms) && is_number(seq));
    match text.strip_suffix("-end") {
        Some(last) if entry(last) => Ok(Resume::Ended),
        None if entry(text) => Ok(Resume::After(text.to_owned())),
        _ => Err(ApiError::invalid("Last-Event-ID: expected the id of an event of this stream")),
    }
}

fn is_number(text: &str) -> bool {
    !text.is_empty() && text.len() <= 20 && text.bytes().all(|b| b.is_ascii_digit())
}

/// One event of the stream, as `text/event-stream` frames it.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub(crate) struct SseEvent {
    /// `<ms>-<seq>`, the trace entry's id; the end's is the last one's with `-end`.
    id: String,
    /// The record's `action` (`model_call`, `tool_call`, `escalation`, …), or `session.ended`.
    event: String,
    /// The trace record (JSON), or for `session.ended` `{session_id, status, step, result, error}`.
    data: String,
}

/// A session's events, live.
#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/events",
    tag = "sessions",
    params(
        ("id" = String, Path, description = "The session id", pattern = "^s_[0-9A-HJKMNP-TV-Z]{26}$"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event (the `id` of the last event received)", nullable = false, pattern = "^[0-9]{1,20}-[0-9]{1,20}(-end)?$"),
    ),
    responses(
        (status = 200, description = "`text/event-stream`: one event per trace record (`event` is its `action`, `data` the record), then `session.ended` with the final status; a comment every 15 s while idle", content_type = "text/event-stream", body = SseEvent),
        (status = 204, description = "`Last-Event-ID` is the end: nothing follows"),
        (status = 400, description = "`id` or `Last-Event-ID` is malformed", body = crate::error::ErrorBody),
        (status = 404, description = "No such session", body = crate::error::ErrorBody),
        (status = 503, description = "Redis is down, or too many streams are open", body = crate::error::ErrorBody),
    )
)]
pub(crate) async fn events(
    caller: Caller,
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    caller.require(Role::Read)?;
    let id = path_id(&id)?;
    load_for(&s, &caller, &id).await?;
    let after = match resume(&headers)? {
        Resume::Ended => return Ok(StatusCode::NO_CONTENT.into_response()),
        Resume::After(after) => after,
    };
    let permit = slot(&s)?;
    let conn = RedisConn::connect(&s.cfg.redis).await.map_err(|e| ApiError::unavailable(&e))?;
    let key = agentfleet::store::trace_key(&s.cfg.redis.key_prefix, &id);
    let block_ms = (s.cfg.redis.response_timeout_ms / 2).clamp(10, BLOCK_MS) as usize;
    let follower = Follower {
        block_ms,
        conn,
        key,
        after,
        id,
        store: s.store.clone(),
        draining: s.draining.clone(),
        queued: VecDeque::new(),
        done: false,
        _permit: permit,
    };
    let stream = futures::stream::unfold(follower, |mut f| async move {
        let event = f.next().await?;
        Some((Ok::<_, Infallible>(event), f))
    });
    Ok(respond(stream))
}

/// One of the dispatcher's [`MAX_STREAMS`] event-stream slots, held while the stream is open; 503
/// when none is free. Shared by a session's stream and the tenant's (`live`).
pub(crate) fn slot(s: &AppState) -> Result<OwnedSemaphorePermit, ApiError> {
    s.event_streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::unavailable(&format!("{MAX_STREAMS} event streams are open on this dispatcher")))
}

/// The `text/event-stream` answer of `events`, with a comment every [`HEARTBEAT`] while idle.
pub(crate) fn respond(events: impl futures::Stream<Item = Result<Event, Infallible>> + Send + 'static) -> Response {
    Sse::new(events).keep_alive(KeepAlive::new().interval(HEARTBEAT).text("keep-alive")).into_response()
}

/// One client's place in one session's stream.
struct Follower {
    /// How long one read waits for a new entry.
    block_ms: usize,
    conn: RedisConn,
    key: String,
    /// The id of the last entry sent.
    after: String,
    id: SessionId,
    store: Arc<dyn SessionStore>,
    draining: Arc<AtomicBool>,
    queued: VecDeque<Event>,
    done: bool,
    _permit: OwnedSemaphorePermit,
}

impl Follower {
    /// The next event; `None` once the end was sent, when the dispatcher drains (the client
    /// resumes elsewhere), or when Redis fails (likewise).
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.queued.pop_front() {
                return Some(event);
            }
            if self.done || self.draining.load(Ordering::Relaxed) {
                return None;
            }
            // What is there already; then, with nothing new, whether the session has ended (its
            // last record is written with its final status); then wait for more.
            if self.read(None).await? > 0 {
                continue;
            }
            let meta = match self.store.meta(&self.id).await {
                Ok(meta) => meta,
                Err(e) => {
                    tracing::warn!(session = %self.id, error = %e, "event stream: cannot read the session");
                    return None;
                }
            };
            match meta {
                Some(meta) if meta.status.is_terminal() => {
                    let data = serde_json::json!({
                        "session_id": self.id,
                        "status": meta.status,
                        "step": meta.step,
                        "result": meta.result,
                        "error": meta.error,
                    });
                    let end = Event::default().id(format!("{}-end", self.after)).event("session.ended");
                    self.queued.push_back(end.data(data.to_string()));
                    self.done = true;
                }
                Some(_) => {
                    self.read(Some(self.block_ms)).await?;
                }
                // Gone (its retention passed while the stream was open).
                None => return None,
            }
        }
    }

    /// Queues the entries after `self.after`, waiting up to `block_ms` for one; how many.
    async fn read(&mut self, block_ms: Option<usize>) -> Option<usize> {
        let mut options = StreamReadOptions::default().count(BATCH);
        if let Some(ms) = block_ms {
            options = options.block(ms);
        }
        let mut cmd = redis::cmd("XREAD");
        cmd.arg(&options).arg("STREAMS").arg(&self.key).arg(&self.after);
        let reply: Option<StreamReadReply> = match cmd.query_async(&mut self.conn).await {
            Ok(reply) => reply,
            Err(e) => {
                tracing::warn!(session = %self.id, error = %e, "event stream: cannot read the trace");
                return None;
            }
        };
        let entries = reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids);
        let mut n = 0;
        for entry in entries {
            let record: Option<String> = entry.get("r");
            let record = record.unwrap_or_default();
            let action = serde_json::from_str::<serde_json::Value>(&record)
                .ok()
                .and_then(|v| v["action"].as_str().map(str::to_owned))
                .unwrap_or_else(|| "trace".to_owned());
            self.queued.push_back(Event::default().id(entry.id.clone()).event(action).data(record));
            self.after = entry.id;
            n += 1;
        }
        Some(n)
    }
}

/// The semaphore of a dispatcher's event streams.
pub(crate) fn slots() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(MAX_STREAMS))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("last-event-id", value.parse().expect("header"));
        h
    }

    #[test]
    fn resume_points() {
        assert_eq!(resume(&HeaderMap::new()).ok(), Some(Resume::After("0-0".into())));
        assert_eq!(resume(&with("1733100000000-3")).ok(), Some(Resume::After("1733100000000-3".into())));
        assert_eq!(resume(&with("1733100000000-3-end")).ok(), Some(Resume::Ended));
        assert_eq!(resume(&with("0-0-end")).ok(), Some(Resume::Ended));
        for bad in ["", "abc", "1-", "-1", "1-2-3", "1-x-end", "99999999999999999999999-1"] {
            assert!(resume(&with(bad)).is_err(), "{bad}");
        }
    }
}
