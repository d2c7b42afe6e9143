//! Re-driving a dead letter: where it goes again, per kind, and the publish.
//!
//! A re-driven message is a **new** message: the same body, published with a confirm to where its
//! kind is consumed, with `x-agentfleet-redriven: <n>` and without the broker's `x-death` or
//! delivery count, so whatever limit made it dead starts afresh. Only once the broker confirmed it
//! is the entry removed: a failure in between leaves the entry, and a second redrive publishes a
//! copy, at least once. A step message then goes through the claim like any other (DESIGN §3): a
//! step that is done by then is `stale` and dropped, a session that is gone is dead-lettered again
//! with `unknown_session`, so no copy of a step runs twice.
//!
//! | kind | goes to | refused when |
//! |---|---|---|
//! | `step` | `<prefix>.steps`, routing key the pool of its session's agent (or of the queue it died in, when the session is gone) | the body is not a step message, or was cut; no pool is known |
//! | `webhook` | `<prefix>.webhooks` (attempts counted afresh) | the body is not a lifecycle event, or was cut |
//! | `request` | — | always: its tenant is the broker-checked `user_id` of its publisher, which the dispatcher cannot publish as; the publisher sends it again |
//! | `unknown` | — | always: nothing of the fleet reads it |

use agentfleet::amqp::{PublishError, REDRIVEN_HEADER};
use agentfleet::domain::{SessionId, StepMessage};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use super::entry::{Entry, Kind, pool_of_queue};
use crate::AppState;
use crate::error::ApiError;

/// Where a dead letter goes again, and how.
pub(crate) struct Target {
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    props: BasicProperties,
}

/// Why a dead letter cannot be re-driven, for a `409`; `None` when it can (as far as the entry
/// tells: the store read its body when it took it; a step's pool is looked up at the redrive).
pub(crate) fn refusal(entry: &Entry) -> Option<String> {
    if entry.body_truncated {
        return Some(format!(
            "its body ({} bytes) was longer than the store keeps: it cannot be re-driven; discard it",
            entry.body_bytes
        ));
    }
    match entry.kind {
        Kind::Step if entry.step.is_none() => {
            Some("its body is not a step message: nothing would run it; discard it".into())
        }
        Kind::Webhook if entry.session_id.is_none() => {
            Some("its body is not a lifecycle event: nothing would deliver it; discard it".into())
        }
        Kind::Step | Kind::Webhook => None,
        Kind::Request => Some(
            "a session request is sent again by its publisher: its tenant is the RabbitMQ user that published it \
             (`user_id`, checked by the broker), which the dispatcher cannot publish as. Publish it again to the \
             requests queue, or discard it"
                .into(),
        ),
        Kind::Unknown => Some(
            "this message came from no queue of this fleet and is not a step message: nothing would read it; \
             discard it"
                .into(),
        ),
    }
}

/// Where `entry` goes again: 409 when it cannot be re-driven, 503 when Redis is down.
pub(crate) async fn target(s: &AppState, entry: &Entry, body: &[u8]) -> Result<Target, ApiError> {
    if let Some(why) = refusal(entry) {
        return Err(ApiError::conflict(format!("dead letter `{}`: {why}", entry.id)));
    }
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
        .with_headers(redriven(entry.redriven + 1));
    match entry.kind {
        Kind::Step => step_target(s, entry, body, props).await,
        _ => {
            event(body).map_err(|why| ApiError::conflict(format!("dead letter `{}`: {why}", entry.id)))?;
            let queue = agentfleet::webhooks::queue(&s.cfg.amqp.prefix);
            let kind = entry.properties.get("type").and_then(|t| t.as_str()).unwrap_or_default();
            let props = props.with_type(ShortString::from(kind));
            Ok(Target { exchange: String::new(), routing_key: queue, props })
        }
    }
}

/// A step message goes to the pool of its session's agent now; a session that is gone, to the
/// pool of the queue it died in (where a worker dead-letters it again, as `unknown_session`).
async fn step_target(s: &AppState, entry: &Entry, body: &[u8], props: BasicProperties) -> Result<Target, ApiError> {
    let msg = StepMessage::parse(body).map_err(|e| ApiError::conflict(e.to_string()))?;
    let meta = s.store.meta(&msg.session_id).await.map_err(|e| ApiError::unavailable(&e))?;
    let topology = s.publisher.topology();
    let pool = match &meta {
        Some(meta) => match s.cfg.agent(meta.agent.as_str()) {
            Some(agent) => agent.pool.to_string(),
            None => return Err(ApiError::conflict(format!("agent `{}` is no longer configured", meta.agent))),
        },
        None => {
            entry.queue.as_deref().and_then(|q| pool_of_queue(q, topology)).map(str::to_owned).ok_or_else(|| {
                ApiError::conflict(format!(
                    "session `{}` does not exist (expired, or never created) and the dead letter names no pool: \
                 nothing would run it; discard it",
                    msg.session_id
                ))
            })?
        }
    };
    let props = props.with_message_id(ShortString::from(msg.message_id()));
    Ok(Target { exchange: topology.steps_exchange(), routing_key: pool, props })
}

/// Publishes `body` to `target` and waits for the broker's confirm.
pub(crate) async fn publish(s: &AppState, target: &Target, body: &[u8]) -> Result<(), ApiError> {
    match s.publisher.publish(&target.exchange, &target.routing_key, body, target.props.clone()).await {
        Ok(()) => Ok(()),
        Err(PublishError::Unroutable(to)) => {
            Err(ApiError::conflict(format!("no queue takes it: unroutable to `{to}`")))
        }
        Err(e) => Err(ApiError::unavailable(&e)),
    }
}

/// The session of a step message or an event, when it names one.
pub(crate) fn session_of(entry: &Entry) -> Option<SessionId> {
    entry.session_id.as_deref().and_then(|s| SessionId::parse(s).ok())
}

fn redriven(n: u32) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(REDRIVEN_HEADER.into(), AMQPValue::LongLongInt(i64::from(n)));
    headers
}

/// A lifecycle event, as the webhook deliverer reads one.
fn event(body: &[u8]) -> Result<(), String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not a lifecycle event ({e}): discard it"))?;
    let named = |f: &str| v.get(f).and_then(serde_json::Value::as_str).is_some_and(|s| !s.is_empty());
    if named("type") && named("session_id") {
        Ok(())
    } else {
        Err("not a lifecycle event (no `type` or `session_id`): discard it".into())
    }
}
