//! AMQP intake: business systems publish session requests to `<prefix>.requests` (DESIGN §4).
//!
//! A request is the JSON body of `POST /v1/sessions`, checked by the same extractor and the same
//! `create_session`, so both doors answer alike.
//!
//! The tenant comes from the credential, as over HTTP: the message's `user_id` property, which
//! RabbitMQ checks against the publishing connection's user (a message claiming another user is
//! refused by the broker), mapped to a tenant by `[auth] amqp_users`. A request without `user_id`, or
//! from a user not in the map, is refused with the reason and creates nothing. A `tenant` in the body
//! is refused unless it is the user's own tenant, so a business system learns of its mistake instead
//! of spending another tenant's budget by surprise. When `reply_to` is set the answer goes there
//! through the default exchange with the request's `correlation_id`: `{"id", "status"}`, or the
//! API's `{"error": {"type", "message"}}`. Then the request is acked.
//!
//! Nothing is dropped silently: an invalid request without `reply_to` goes to `<prefix>.dead` with
//! the reason in `x-agentfleet-reason`. A failure of Redis or the broker is never acked: the request
//! is retried with backoff while the delivery is held, and requeued on shutdown. A request whose
//! AMQP `message_id` is set (and whose body has no `idempotency_key`) gets `amqp:<message_id>` as
//! its idempotency key, so a retry or a redelivery returns the session it already created.

use std::sync::Arc;
use std::time::Duration;

use agentfleet::amqp::consumer::{self, Handler, QueueTag, Settings};
use agentfleet::amqp::{Backoff, PublishError};
use agentfleet::config::AuthConfig;
use agentfleet::domain::TenantId;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Acker, BasicProperties, Channel, Connection};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::AppState;
use crate::error::ApiError;
use crate::sessions::{CreateSession, Created, create_session};

/// Requests the broker pushes ahead, and requests handled at once.
const PREFETCH: u16 = 32;
/// How long a stopping intake waits for the requests in flight.
const GRACE: Duration = Duration::from_secs(10);
const CONSUMER_TAG: &str = "dispatcher-intake";
/// The longest idempotency key the API takes; a longer `message_id` is not used as one.
const MAX_KEY: usize = 255;

/// Consumes the requests queue until `shutdown`, reconnecting with backoff when the broker goes.
pub(crate) async fn run(state: AppState, shutdown: CancellationToken) {
    let settings = Settings {
        url: state.cfg.amqp.url.clone(),
        connection_name: "dispatcher/intake".into(),
        prefetch: PREFETCH,
        queues: vec![QueueTag {
            queue: state.publisher.topology().requests_queue(),
            consumer_tag: CONSUMER_TAG.into(),
            key: (),
        }],
        grace: GRACE,
        consuming: Default::default(),
    };
    consumer::run(settings, Arc::new(Intake { state, shutdown: shutdown.clone() }), shutdown).await;
    info!("intake stopped");
}

/// The intake's handler. It holds the shutdown token: a request retried while Redis or the broker
/// is down gives up (and is requeued) when the dispatcher stops.
struct Intake {
    state: AppState,
    shutdown: CancellationToken,
}

impl Handler for Intake {
    type Key = ();
    type Link = ();

    async fn declare(&self, _conn: &Connection, ch: &Channel) -> Result<(), lapin::Error> {
        Ok(self.state.publisher.topology().declare(ch, &crate::agent_pools(&self.state.cfg)).await?)
    }

    async fn handle(&self, delivery: Delivery, _queue: &QueueTag<()>, _link: &()) {
        handle(&self.state, delivery, &self.shutdown).await;
    }
}

/// How a delivery is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    /// Done with: answered, dead-lettered, or created without anyone to answer.
    Ack,
    /// Not done: the broker delivers it again.
    Requeue,
    /// Not done and never will be: the queue's dead-letter exchange takes it.
    Reject,
}

/// One request: create the session, answer or dead-letter, settle.
#[tracing::instrument(skip_all, fields(correlation_id = prop(delivery.properties.correlation_id())))]
async fn handle(state: &AppState, delivery: Delivery, shutdown: &CancellationToken) {
    let settle = match create(state, &delivery, shutdown).await {
        Some(result) => answer(state, &delivery, result, shutdown).await,
        None => Settle::Requeue,
    };
    let settled = match settle {
        Settle::Ack => delivery.acker.ack(BasicAckOptions::default()).await,
        Settle::Requeue => delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await,
        Settle::Reject => delivery.acker.nack(BasicNackOptions { requeue: false, ..Default::default() }).await,
    };
    if let Err(e) = settled {
        warn!(error = %e, ?settle, "could not settle a request; the broker will deliver it again");
    }
}

/// Creates the session, retrying while Redis or the broker is down; `None` when it gave up for
/// now (shutdown, or the delivery's channel closed).
async fn create(state: &AppState, d: &Delivery, shutdown: &CancellationToken) -> Option<Result<Created, ApiError>> {
    let transient = |e: &ApiError| e.status().is_server_error();
    with_retries(shutdown, &d.acker, transient, move || async move { create_session(state, parse(state, d)?).await })
        .await
}

/// The request in the body, checked exactly as the HTTP API checks it, for the publisher's tenant.
fn parse(state: &AppState, d: &Delivery) -> Result<CreateSession, ApiError> {
    let limit = state.cfg.dispatcher.max_body_bytes;
    if d.data.len() > limit {
        return Err(ApiError::too_large(format!("body: is {} bytes; the limit is {limit}", d.data.len())));
    }
    let tenant = publisher_tenant(&state.cfg.auth, d)?;
    let axum::Json(_) = axum::Json::<CreateSession>::from_bytes(&d.data)?;
    let mut body: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&d.data).map_err(|e| ApiError::invalid(e.to_string()))?;
    claim_tenant(&mut body, tenant)?;
    key_by_message_id(&mut body, d);
    serde_json::from_value(body.into()).map_err(|e| ApiError::invalid(e.to_string()))
}

/// The tenant of the RabbitMQ user that published `d`, from its broker-checked `user_id`.
fn publisher_tenant<'a>(auth: &'a AuthConfig, d: &Delivery) -> Result<&'a TenantId, ApiError> {
    let Some(user) = prop(d.properties.user_id()) else {
        return Err(ApiError::invalid(
            "user_id: the message has no `user_id` property; set it to the RabbitMQ user that publishes",
        ));
    };
    auth.amqp_tenant(user).ok_or_else(|| {
        ApiError::invalid(format!("user_id: the RabbitMQ user `{user}` has no tenant in `[auth] amqp_users`"))
    })
}

/// Sets the body's `tenant` to the publisher's; a different one in the body is refused.
fn claim_tenant(body: &mut serde_json::Map<String, serde_json::Value>, tenant: &TenantId) -> Result<(), ApiError> {
    match body.get("tenant") {
        None | Some(serde_json::Value::Null) => {}
        Some(claimed) if claimed.as_str() == Some(tenant.as_str()) => {}
        Some(claimed) => {
            return Err(ApiError::invalid(format!(
                "tenant: is {claimed}, but this RabbitMQ user publishes for tenant `{tenant}`; leave `tenant` out"
            )));
        }
    }
    body.insert("tenant".into(), tenant.as_str().into());
    Ok(())
}

/// Sets `idempotency_key = "amqp:<message_id>"`, when the message has an id that makes a valid key
/// and the body no key of its own.
fn key_by_message_id(body: &mut serde_json::Map<String, serde_json::Value>, d: &Delivery) {
    let Some(id) = prop(d.properties.message_id()) else { return };
    let key = format!("amqp:{id}");
    if key.len() <= MAX_KEY && !key.chars().any(char::is_control) && !body.contains_key("idempotency_key") {
        body.insert("idempotency_key".into(), key.into());
    }
}

/// Answers the request: a reply when `reply_to` is set, else the dead-letter queue for a refusal.
async fn answer(
    state: &AppState,
    d: &Delivery,
    result: Result<Created, ApiError>,
    shutdown: &CancellationToken,
) -> Settle {
    if let Err(e) = &result {
        info!(kind = e.kind(), message = e.message(), "session request refused");
    }
    match (prop(d.properties.reply_to()), result) {
        (Some(to), result) => reply(state, d, to, &result, shutdown).await,
        (None, Ok(_)) => Settle::Ack,
        (None, Err(e)) => dead_letter(state, d, &e, shutdown).await,
    }
}

/// Publishes the answer to `to` through the default exchange, with the request's correlation id.
async fn reply(
    state: &AppState,
    d: &Delivery,
    to: &str,
    result: &Result<Created, ApiError>,
    shutdown: &CancellationToken,
) -> Settle {
    let (body, props) = (&reply_body(result).to_string(), &reply_props(d, result));
    let publish = move || state.publisher.publish("", to, body.as_bytes(), props.clone());
    match with_retries(shutdown, &d.acker, transient_publish, publish).await {
        Some(Ok(())) => Settle::Ack,
        Some(Err(e)) => {
            // The requester's queue is gone: there is no one left to answer.
            warn!(error = %e, reply_to = to, "the reply could not be delivered; dropping it");
            Settle::Ack
        }
        None => Settle::Requeue,
    }
}

/// `{"id", "status"}`, or the API's error body.
fn reply_body(result: &Result<Created, ApiError>) -> serde_json::Value {
    match result {
        Ok(c) => serde_json::json!({ "id": c.id, "status": c.status }),
        Err(e) => serde_json::json!({ "error": { "type": e.kind(), "message": e.message() } }),
    }
}

/// JSON, the request's correlation id, and `idempotent-replayed` as the HTTP API sets it.
fn reply_props(d: &Delivery, result: &Result<Created, ApiError>) -> BasicProperties {
    let mut props = BasicProperties::default().with_delivery_mode(2).with_content_type("application/json".into());
    if let Some(id) = d.properties.correlation_id() {
        props = props.with_correlation_id(id.clone());
    }
    if let Ok(c) = result {
        let mut headers = FieldTable::default();
        headers.insert("idempotent-replayed".into(), AMQPValue::Boolean(!c.created));
        props = props.with_headers(headers);
    }
    props
}

/// Sends a refused request nobody waits for to `<prefix>.dead` with the reason; if that fails for
/// good, rejects it into the queue's dead-letter exchange (without the reason, but not lost).
async fn dead_letter(state: &AppState, d: &Delivery, e: &ApiError, shutdown: &CancellationToken) -> Settle {
    let reason = &format!("{}: {}", e.kind(), e.message());
    let queue = &state.publisher.topology().requests_queue();
    // The publisher's tenant, when its user is known, so that tenant sees the dead letter.
    let tenant = publisher_tenant(&state.cfg.auth, d).ok().map(|t| t.as_str());
    let publish = move || state.publisher.dead_letter_from(&d.data, reason, Some(queue), tenant);
    match with_retries(shutdown, &d.acker, transient_publish, publish).await {
        Some(Ok(())) => Settle::Ack,
        Some(Err(e)) => {
            warn!(error = %e, "dead-lettering a refused request failed; rejecting it");
            Settle::Reject
        }
        None => Settle::Requeue,
    }
}

/// A publish that may succeed if tried again (an unroutable one will not).
fn transient_publish(e: &PublishError) -> bool {
    matches!(e, PublishError::Nacked | PublishError::Broker(_))
}

/// Runs `attempt` until it succeeds or fails for good, backing off between transient failures.
/// `None` when shutdown came first, or the delivery can no longer be settled (its channel closed,
/// so the broker will deliver it again).
async fn with_retries<T, E: std::fmt::Debug, F: Future<Output = Result<T, E>>>(
    shutdown: &CancellationToken,
    acker: &Acker,
    transient: impl Fn(&E) -> bool,
    mut attempt: impl FnMut() -> F,
) -> Option<Result<T, E>> {
    let mut backoff = Backoff::default();
    loop {
        match attempt().await {
            Err(e) if transient(&e) => {
                warn!(error = ?e, retry_in_ms = backoff.peek().as_millis() as u64, "session request failed for now; retrying");
            }
            done => return Some(done),
        }
        if !acker.usable() {
            return None;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(backoff.next_wait()) => {}
        }
    }
}

/// A message property as text, when set and not empty.
fn prop(p: &Option<ShortString>) -> Option<&str> {
    p.as_ref().map(ShortString::as_str).filter(|s| !s.is_empty())
}
