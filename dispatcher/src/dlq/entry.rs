//! A dead letter as the store keeps it: what it was (its [`Kind`], from the queue it died in), why
//! it died, whose it is, and its AMQP headers and properties as JSON. The body is kept beside it,
//! as bytes, and shown through [`shown_body`], which never fails on garbage.

use agentfleet::amqp::{QUEUE_HEADER, REASON_HEADER, REDRIVEN_HEADER, TENANT_HEADER, Topology};
use agentfleet::domain::{StepMessage, TenantId};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

/// The most of a body an answer shows; the rest is counted, not sent.
pub(crate) const SHOWN_BODY_BYTES: usize = 64 * 1024;

/// What a dead letter was, by the queue it was taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Kind {
    /// A step message (`<prefix>.steps.<pool>`): re-driven through the step exchange.
    Step,
    /// A session request (`<prefix>.requests`): its publisher sends it again.
    Request,
    /// A lifecycle event on its way to a webhook (`<prefix>.webhooks`): re-driven to that queue.
    Webhook,
    /// Anything else (a body no consumer could read, from a queue this fleet does not know).
    Unknown,
}

impl Kind {
    /// The name, as the API and the metrics say it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Step => "step",
            Self::Request => "request",
            Self::Webhook => "webhook",
            Self::Unknown => "unknown",
        }
    }
}

/// A dead letter, without its body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// `d_` and a ULID: time-sortable.
    pub(crate) id: String,
    pub(crate) kind: Kind,
    /// The reason's code: the fleet's own (`unknown_session`, `malformed`, `invalid_request`, …) or
    /// the broker's (`delivery_limit`, `rejected`, `expired`, `maxlen`).
    pub(crate) reason: String,
    /// The rest of the fleet's reason, after `<code>: `.
    pub(crate) detail: Option<String>,
    /// The queue it was taken from.
    pub(crate) queue: Option<String>,
    /// The exchange and routing key it was first published with, when the broker says.
    pub(crate) exchange: Option<String>,
    pub(crate) routing_key: Option<String>,
    /// The session, for a step message or an event.
    pub(crate) session_id: Option<String>,
    /// The step, for a step message.
    pub(crate) step: Option<u32>,
    /// Whose it is; `None` when that cannot be known (admins only see it then).
    pub(crate) tenant: Option<String>,
    /// When it died (the broker's `x-death` time, else when it was stored), Unix ms.
    pub(crate) dead_at_ms: u64,
    /// When the dispatcher stored it, Unix ms.
    pub(crate) stored_at_ms: u64,
    /// Deliveries of the message before it died (`x-delivery-count`), when the broker says.
    pub(crate) delivery_count: Option<u64>,
    /// Times it was dead-lettered from its queue, as `x-death` counts them.
    pub(crate) deaths: u64,
    /// Times it had been re-driven before it died this time.
    pub(crate) redriven: u32,
    /// The body's whole length.
    pub(crate) body_bytes: u64,
    /// True when only the first `dispatcher.max_body_bytes` were kept.
    pub(crate) body_truncated: bool,
    /// The AMQP properties that were set (`content_type`, `message_id`, `type`, `user_id`, …).
    pub(crate) properties: Value,
    /// Every AMQP header, as JSON (`x-death` included).
    pub(crate) headers: Value,
}

/// What a delivery of the dead-letter queue brings: its body's length, routing and properties.
pub(crate) struct Arrival<'a> {
    pub(crate) body: &'a [u8],
    pub(crate) properties: &'a BasicProperties,
    pub(crate) routing_key: &'a str,
    pub(crate) kept_bytes: usize,
    pub(crate) now_ms: u64,
}

impl Entry {
    /// The entry of a delivery of the dead-letter queue, except its tenant (see `tenant_hint`,
    /// which the caller resolves against the sessions).
    pub(crate) fn of(a: &Arrival<'_>, topology: &Topology, prefix: &str) -> Self {
        let headers = a.properties.headers().clone().unwrap_or_default();
        let death = first_death(&headers);
        let (reason, detail) = reason_of(&headers, death.as_ref());
        let queue = text(&headers, QUEUE_HEADER).or_else(|| death.as_ref().and_then(|d| text(d, "queue")));
        let step = StepMessage::parse(a.body).ok();
        let kind = kind_of(queue.as_deref(), step.is_some(), topology, prefix);
        let exchange = death.as_ref().and_then(|d| text(d, "exchange"));
        let routing_key = death
            .as_ref()
            .and_then(routing_key_of)
            .or_else(|| Some(a.routing_key.to_owned()).filter(|k| !k.is_empty()));
        Self {
            id: format!("d_{}", next_ulid()),
            kind,
            reason,
            detail,
            queue,
            exchange,
            routing_key,
            session_id: step.as_ref().map(|m| m.session_id.to_string()).or_else(|| event_field(a.body, "session_id")),
            step: step.as_ref().map(|m| m.step),
            tenant: None,
            dead_at_ms: death.as_ref().and_then(|d| timestamp(d, "time")).unwrap_or(a.now_ms),
            stored_at_ms: a.now_ms,
            delivery_count: number(&headers, "x-delivery-count"),
            deaths: death.as_ref().and_then(|d| number(d, "count")).unwrap_or(0),
            redriven: number(&headers, REDRIVEN_HEADER).and_then(|n| u32::try_from(n).ok()).unwrap_or(0),
            body_bytes: a.body.len() as u64,
            body_truncated: a.body.len() > a.kept_bytes,
            properties: properties_json(a.properties),
            headers: json_of_table(&headers),
        }
    }

    /// The tenant the message itself names: the fleet's header, a request's RabbitMQ user
    /// (mapped by the caller), or an event's `tenant`. A session's tenant, when the session still
    /// exists, goes before the event's (the caller looks it up).
    pub(crate) fn tenant_header(&self) -> Option<String> {
        let named = self.headers.get(TENANT_HEADER).and_then(Value::as_str)?;
        TenantId::parse(named).ok().map(String::from)
    }

    /// The `user_id` property (a request's publisher, checked by the broker).
    pub(crate) fn user_id(&self) -> Option<&str> {
        self.properties.get("user_id").and_then(Value::as_str)
    }
}

/// A ULID after every one this process made before, also within a millisecond, so dead letters
/// stored one after the other list in that order.
fn next_ulid() -> ulid::Ulid {
    static GENERATOR: std::sync::Mutex<ulid::Generator> = std::sync::Mutex::new(ulid::Generator::new());
    // (Not `unwrap_or_default`: a default ULID is the nil one.)
    let Some(next) = GENERATOR.lock().ok().and_then(|mut g| g.generate().ok()) else { return ulid::Ulid::new() };
    next
}

/// The kind, from the queue it died in, else from what the body is.
fn kind_of(queue: Option<&str>, is_step: bool, topology: &Topology, prefix: &str) -> Kind {
    match queue {
        Some(q) if q == topology.requests_queue() => Kind::Request,
        Some(q) if q == agentfleet::webhooks::queue(prefix) => Kind::Webhook,
        Some(q) if q.starts_with(&format!("{}.", topology.steps_exchange())) => Kind::Step,
        // The workers dead-letter what they refuse without saying where it came from.
        _ if is_step => Kind::Step,
        _ => Kind::Unknown,
    }
}

/// The pool of a step queue `<prefix>.steps.<pool>`.
pub(crate) fn pool_of_queue<'a>(queue: &'a str, topology: &Topology) -> Option<&'a str> {
    queue.strip_prefix(&format!("{}.", topology.steps_exchange())).filter(|p| !p.is_empty())
}

/// The fleet's own reason (`<code>: <detail>`), else the broker's.
fn reason_of(headers: &FieldTable, death: Option<&FieldTable>) -> (String, Option<String>) {
    if let Some(reason) = text(headers, REASON_HEADER) {
        return match reason.split_once(": ") {
            Some((code, detail)) => (code.to_owned(), Some(detail.to_owned())),
            None => (reason, None),
        };
    }
    let broker = death.and_then(|d| text(d, "reason")).or_else(|| text(headers, "x-first-death-reason"));
    (broker.unwrap_or_else(|| "unknown".into()), None)
}

/// The newest `x-death` entry (RabbitMQ puts it first).
fn first_death(headers: &FieldTable) -> Option<FieldTable> {
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else { return None };
    deaths.as_slice().iter().find_map(|d| match d {
        AMQPValue::FieldTable(t) => Some(t.clone()),
        _ => None,
    })
}

fn routing_key_of(death: &FieldTable) -> Option<String> {
    let Some(AMQPValue::FieldArray(keys)) = death.inner().get("routing-keys") else { return None };
    keys.as_slice().iter().find_map(string_of)
}

fn text(table: &FieldTable, name: &str) -> Option<String> {
    table.inner().get(name).and_then(string_of)
}

fn string_of(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn number(table: &FieldTable, name: &str) -> Option<u64> {
    match table.inner().get(name)? {
        AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::Timestamp(n) => Some(*n),
        _ => None,
    }
}

/// An AMQP timestamp (seconds) as Unix ms.
fn timestamp(table: &FieldTable, name: &str) -> Option<u64> {
    match table.inner().get(name)? {
        AMQPValue::Timestamp(s) => Some(s.saturating_mul(1000)),
        _ => None,
    }
}

/// A field of the body, when it is a JSON object (an event's `session_id`).
fn event_field(body: &[u8], field: &str) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.get(field)?.as_str().filter(|s| !s.is_empty()).map(str::to_owned)
}

/// The properties that were set, by their AMQP names.
fn properties_json(p: &BasicProperties) -> Value {
    let mut out = Map::new();
    let short = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| Value::from(s.as_str()));
    let fields = [
        ("content_type", short(p.content_type())),
        ("content_encoding", short(p.content_encoding())),
        ("correlation_id", short(p.correlation_id())),
        ("reply_to", short(p.reply_to())),
        ("expiration", short(p.expiration())),
        ("message_id", short(p.message_id())),
        ("type", short(p.kind())),
        ("user_id", short(p.user_id())),
        ("app_id", short(p.app_id())),
        ("delivery_mode", p.delivery_mode().map(Value::from)),
        ("priority", p.priority().map(Value::from)),
        ("timestamp", p.timestamp().map(Value::from)),
    ];
    for (name, value) in fields {
        if let Some(v) = value {
            out.insert(name.to_owned(), v);
        }
    }
    Value::Object(out)
}

/// A header table as JSON: strings as text (bytes that are not UTF-8 escaped), numbers as numbers.
pub(crate) fn json_of_table(t: &FieldTable) -> Value {
    Value::Object(t.inner().iter().map(|(k, v)| (k.as_str().to_owned(), json_of(v))).collect())
}

fn json_of(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(x) => json!(x),
        AMQPValue::Double(x) => json!(x),
        AMQPValue::DecimalValue(d) => json!(f64::from(d.value) / 10f64.powi(i32::from(d.scale))),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(escaped(s.as_bytes())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(json_of).collect()),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldTable(t) => json_of_table(t),
        AMQPValue::ByteArray(b) => json!(escaped(b.as_slice())),
        AMQPValue::Void => Value::Null,
    }
}

/// Bytes as text: UTF-8 as it is, any other byte as `\xNN`.
pub(crate) fn escaped(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// How a body is shown: as JSON when it is JSON, else as text with non-UTF-8 bytes escaped; at
/// most [`SHOWN_BODY_BYTES`] of it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ShownBody {
    /// `json` (the body parsed: see `json`), `text` (UTF-8), or `escaped` (bytes that are not
    /// UTF-8 shown as `\xNN`).
    #[schema(example = "json")]
    pub(crate) encoding: &'static str,
    /// The body as text (cut when `cut`).
    pub(crate) text: String,
    /// The body, parsed, when it is whole and JSON.
    #[schema(value_type = Option<Object>)]
    pub(crate) json: Option<Value>,
    /// True when the text shows only the first 64 KiB of what is stored.
    pub(crate) cut: bool,
}

/// The body as the API shows it.
pub(crate) fn shown_body(body: &[u8]) -> ShownBody {
    let cut = body.len() > SHOWN_BODY_BYTES;
    let head = &body[..body.len().min(SHOWN_BODY_BYTES)];
    let json = if cut { None } else { serde_json::from_slice::<Value>(body).ok() };
    let encoding = match (&json, std::str::from_utf8(head)) {
        (Some(_), _) => "json",
        (None, Ok(_)) => "text",
        // A cut in the middle of a character is not garbage.
        (None, Err(e)) if cut && e.error_len().is_none() => "text",
        (None, Err(_)) => "escaped",
    };
    ShownBody { encoding, text: escaped(head), json, cut }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_shown_escaped_and_json_parsed() {
        let shown = shown_body(b"\xff\xfeok\x00");
        assert_eq!((shown.encoding, shown.text.as_str()), ("escaped", "\\xff\\xfeok\u{0}"));
        let shown = shown_body(br#"{"a":1}"#);
        assert_eq!((shown.encoding, shown.json), ("json", Some(json!({"a": 1}))));
        let big = vec![b'x'; SHOWN_BODY_BYTES + 10];
        let shown = shown_body(&big);
        assert!(shown.cut && shown.text.len() == SHOWN_BODY_BYTES && shown.encoding == "text");
    }

    #[test]
    fn a_reason_splits_into_its_code_and_detail() {
        let mut h = FieldTable::default();
        h.insert(REASON_HEADER.into(), AMQPValue::LongString("unknown_session: no such session".into()));
        assert_eq!(reason_of(&h, None), ("unknown_session".into(), Some("no such session".into())));
        let mut death = FieldTable::default();
        death.insert("reason".into(), AMQPValue::LongString("delivery_limit".into()));
        assert_eq!(reason_of(&FieldTable::default(), Some(&death)), ("delivery_limit".into(), None));
        assert_eq!(reason_of(&FieldTable::default(), None).0, "unknown");
    }

    #[test]
    fn the_kind_comes_from_the_queue_else_the_body() {
        let t = Topology::new("af", 5);
        assert_eq!(kind_of(Some("af.steps.default"), false, &t, "af"), Kind::Step);
        assert_eq!(kind_of(Some("af.requests"), false, &t, "af"), Kind::Request);
        assert_eq!(kind_of(Some("af.webhooks"), false, &t, "af"), Kind::Webhook);
        assert_eq!(kind_of(None, true, &t, "af"), Kind::Step);
        assert_eq!(kind_of(None, false, &t, "af"), Kind::Unknown);
        assert_eq!(pool_of_queue("af.steps.heavy", &t), Some("heavy"));
        assert_eq!(pool_of_queue("af.requests", &t), None);
    }
}
