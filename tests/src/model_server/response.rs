//! The success response: body in the real API's field order, usage and rate-limit headers.
//!
//! The body carries `"container": null`, a field clients don't model, on purpose: a client must
//! ignore fields it does not know.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::cache::CacheOutcome;
use super::script::{ContentBlock, Turn};
use super::validate::Validated;

/// The request limit the rate-limit headers advertise.
const REQUESTS_LIMIT: u64 = 4_000;

/// The token limit the rate-limit headers advertise.
const TOKENS_LIMIT: u64 = 2_000_000;

#[derive(Serialize)]
struct MessageBody<'a> {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: &'a [ContentBlock],
    stop_reason: &'a str,
    stop_sequence: Option<&'a str>,
    usage: Usage,
    container: Option<()>,
}

/// Token counts, derived from sizes and the prompt cache so tests can predict them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct Usage {
    pub(crate) input_tokens: u64,
    pub(crate) cache_creation_input_tokens: u64,
    pub(crate) cache_read_input_tokens: u64,
    pub(crate) cache_creation: CacheCreation,
    pub(crate) output_tokens: u64,
    pub(crate) service_tier: &'static str,
}

/// `cache_creation_input_tokens` split by the TTL of the entries written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub(crate) struct CacheCreation {
    pub(crate) ephemeral_5m_input_tokens: u64,
    pub(crate) ephemeral_1h_input_tokens: u64,
}

/// The 200 response for a validated request and the turn its script produced.
///
/// `cache` is what the prompt cache did for it ([`super::cache::CacheStore::apply`] with
/// [`total_input_tokens`]).
pub(crate) fn success(valid: &Validated, turn: &Turn, cache: &CacheOutcome) -> (Response, Usage) {
    let mut usage = usage(valid, &turn.content, cache);
    // Like the real API, output never exceeds `max_tokens`: the turn is cut there.
    let cut = usage.output_tokens > valid.request.max_tokens;
    usage.output_tokens = usage.output_tokens.min(valid.request.max_tokens);
    let stop_reason = if cut { "max_tokens" } else { turn.stop_reason.as_str() };
    let body = MessageBody {
        id: format!("msg_{}", ulid::Ulid::new()),
        kind: "message",
        role: "assistant",
        model: &valid.request.model,
        content: &turn.content,
        stop_reason,
        stop_sequence: turn.stop_sequence.as_deref(),
        usage,
        container: None,
    };
    ((StatusCode::OK, rate_limit_headers(usage.input_tokens), Json(body)).into_response(), usage)
}

/// The request's whole input, cached or not: `T = ceil(body bytes / 4)`.
pub(crate) fn total_input_tokens(valid: &Validated) -> u64 {
    to_u64(valid.body_bytes.div_ceil(4))
}

/// The usage of an answer. With `T` = [`total_input_tokens`]:
/// - `cache_read_input_tokens` = the tokens of the longest cached prefix found (0 without a hit),
/// - `cache_creation_input_tokens` = the tokens written to the cache past it (0 when nothing was),
///   split by TTL in `cache_creation`,
/// - `input_tokens` = `T` minus both (the cache caps them so they never exceed `T`),
/// - `output_tokens` = ceil(content JSON bytes / 4), at least 1.
///
/// A request without `cache_control` reads and writes nothing: all of `T` is `input_tokens`.
pub(crate) fn usage(valid: &Validated, content: &[ContentBlock], cache: &CacheOutcome) -> Usage {
    let content_bytes = serde_json::to_vec(content).map_or(0, |bytes| bytes.len());
    let creation = cache.creation();
    Usage {
        input_tokens: total_input_tokens(valid).saturating_sub(cache.read).saturating_sub(creation),
        cache_creation_input_tokens: creation,
        cache_read_input_tokens: cache.read,
        cache_creation: CacheCreation {
            ephemeral_5m_input_tokens: cache.creation_5m,
            ephemeral_1h_input_tokens: cache.creation_1h,
        },
        output_tokens: to_u64(content_bytes.div_ceil(4)).max(1),
        service_tier: "standard",
    }
}

fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// The `anthropic-ratelimit-*` headers, with plausible numbers.
fn rate_limit_headers(input_tokens: u64) -> HeaderMap {
    let reset = rfc3339(SystemTime::now() + Duration::from_secs(60));
    let pairs = [
        ("anthropic-ratelimit-requests-limit", REQUESTS_LIMIT.to_string()),
        ("anthropic-ratelimit-requests-remaining", (REQUESTS_LIMIT - 1).to_string()),
        ("anthropic-ratelimit-requests-reset", reset),
        ("anthropic-ratelimit-tokens-limit", TOKENS_LIMIT.to_string()),
        ("anthropic-ratelimit-tokens-remaining", TOKENS_LIMIT.saturating_sub(input_tokens).to_string()),
    ];
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    headers
}

/// `time` as `YYYY-MM-DDTHH:MM:SSZ`.
fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let (year, month, day) = civil_from_days(days);
    let rest = secs % 86_400;
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model_server::cache::CachePlan;
    use crate::model_server::request::{Block, Message, MessagesRequest, Role};
    use crate::model_server::tools::ToolSet;

    fn validated(system: Option<&str>, body_bytes: usize) -> Validated {
        let messages = vec![Message { role: Role::User, blocks: vec![Block::Text("hi".to_owned())] }];
        let request =
            MessagesRequest { model: "m".to_owned(), max_tokens: 10, system: system.map(str::to_owned), messages };
        Validated {
            request,
            tools: ToolSet::default(),
            tool_choice: "absent".to_owned(),
            cache: CachePlan::default(),
            body_bytes,
            body: axum::body::Bytes::new(),
        }
    }

    fn text(t: &str) -> Vec<ContentBlock> {
        vec![ContentBlock::Text { text: t.to_owned() }]
    }

    #[test]
    fn usage_follows_sizes_and_the_cache() {
        let cache = CacheOutcome { breakpoints: true, read: 40, creation_5m: 20, creation_1h: 10, wrote: true };
        let usage = usage(&validated(None, 401), &text("x"), &cache);
        assert_eq!(usage.input_tokens, 101 - 40 - 30);
        assert_eq!((usage.cache_read_input_tokens, usage.cache_creation_input_tokens), (40, 30));
        assert_eq!(
            usage.cache_creation,
            CacheCreation { ephemeral_5m_input_tokens: 20, ephemeral_1h_input_tokens: 10 }
        );
        let content_bytes = serde_json::to_vec(&text("x")).expect("json").len();
        assert_eq!(usage.output_tokens, to_u64(content_bytes.div_ceil(4)));
    }

    #[test]
    fn nothing_is_cached_without_cache_control() {
        let usage = usage(&validated(Some("12345678"), 4), &[], &CacheOutcome::default());
        assert_eq!((usage.input_tokens, usage.cache_read_input_tokens, usage.cache_creation_input_tokens), (1, 0, 0));
        assert_eq!(usage.output_tokens, 1);
    }

    #[tokio::test]
    async fn body_fields_come_in_api_order() {
        let turn = Turn { content: text("hi"), stop_reason: "end_turn".to_owned(), stop_sequence: None };
        let (response, _) = success(&validated(None, 8), &turn, &CacheOutcome::default());
        assert!(response.headers().contains_key("anthropic-ratelimit-requests-reset"));
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16).await.expect("body");
        let body = std::str::from_utf8(&bytes).expect("utf8");
        let order = [
            "\"id\":\"msg_",
            "\"type\":\"message\"",
            "\"role\":\"assistant\"",
            "\"model\":\"m\"",
            "\"content\":[{\"type\":\"text\",\"text\":\"hi\"}]",
            "\"stop_reason\":\"end_turn\"",
            "\"stop_sequence\":null",
            "\"usage\":{\"input_tokens\":2,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,",
            "\"cache_creation\":{\"ephemeral_5m_input_tokens\":0,\"ephemeral_1h_input_tokens\":0},",
            "\"output_tokens\":",
            "\"service_tier\":\"standard\"}",
            "\"container\":null}",
        ];
        let positions: Vec<usize> = order.iter().map(|part| body.find(part).expect(part)).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{body}");
    }

    #[test]
    fn dates_format() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(951_827_696)), "2000-02-29T12:34:56Z");
    }
}
