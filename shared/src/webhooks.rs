//! Signed webhooks: how lifecycle events are signed for their receivers, and how a receiver checks.
//!
//! The dispatcher POSTs every `session.*` event to the session's `callback_url` (or else its
//! agent's `webhook_url`) with the event's JSON body unchanged and these headers:
//!
//! | header | value |
//! |---|---|
//! | `Content-Type` | `application/json` |
//! | `X-Agentfleet-Event` | the event type, e.g. `session.completed` |
//! | `X-Agentfleet-Delivery` | the event's id, the same on every retry (deduplicate on it) |
//! | `X-Agentfleet-Timestamp` | Unix seconds when this attempt was signed |
//! | `X-Agentfleet-Signature` | `v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>` |
//!
//! Each attempt is signed afresh, so a receiver can refuse old timestamps (replays) without
//! refusing late retries. A signature header may carry several comma-separated `v1=` values (one
//! per secret while a secret is rotated); [`verify`] accepts the request when any of them matches.
//! Delivery is at least once: a receiver sees an event again when its answer was lost, so it should
//! deduplicate on `X-Agentfleet-Delivery`.
//!
//! ```
//! use std::time::Duration;
//! use agentfleet::webhooks::{sign, verify};
//!
//! let body = br#"{"type":"session.completed"}"#;
//! let signature = sign(b"s3cret", 1_700_000_000, body);
//! assert!(signature.starts_with("v1="));
//! let tolerance = Duration::from_secs(300);
//! assert!(verify(b"s3cret", "1700000000", body, &signature, 1_700_000_060, tolerance).is_ok());
//! assert!(verify(b"other", "1700000000", body, &signature, 1_700_000_060, tolerance).is_err());
//! ```

use std::fmt;
use std::time::Duration;

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// The event type header.
pub const EVENT_HEADER: &str = "x-agentfleet-event";
/// The delivery id header: one id per event, stable across retries.
pub const DELIVERY_HEADER: &str = "x-agentfleet-delivery";
/// The timestamp header: Unix seconds of the signature.
pub const TIMESTAMP_HEADER: &str = "x-agentfleet-timestamp";
/// The signature header: `v1=<hex>`.
pub const SIGNATURE_HEADER: &str = "x-agentfleet-signature";

/// The AMQP header counting the delivery attempts an event has had so far.
pub const ATTEMPT_HEADER: &str = "x-agentfleet-attempt";

/// The retry tiers of a failed delivery: name and wait. The `n`-th failed attempt waits in tier
/// `min(n, 5) - 1`: 1 s, 5 s, 30 s, 2 min, then every 10 min until `max_attempts`.
pub const RETRY_TIERS: [(&str, Duration); 5] = [
    ("1s", Duration::from_secs(1)),
    ("5s", Duration::from_secs(5)),
    ("30s", Duration::from_secs(30)),
    ("2m", Duration::from_secs(120)),
    ("10m", Duration::from_secs(600)),
];

/// How long a receiver should accept a signature by default: five minutes either way.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

const SCHEME: &str = "v1=";

type HmacSha256 = Hmac<Sha256>;

/// Why a webhook request is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VerifyError {
    /// The timestamp header is not Unix seconds.
    #[error("the timestamp is not a number of Unix seconds")]
    BadTimestamp,
    /// The timestamp is further from now than the tolerance (a replay, or a clock far off).
    #[error("the timestamp is {age_s} s away from now, more than the tolerance")]
    Stale {
        /// How far the timestamp is from now, in seconds.
        age_s: u64,
    },
    /// The signature header holds no `v1=<hex>` value.
    #[error("the signature header holds no v1 signature")]
    Malformed,
    /// No signature matches the body, the timestamp and the secret.
    #[error("the signature does not match")]
    Mismatch,
}

/// The `X-Agentfleet-Signature` value of `body` signed at `timestamp` (Unix seconds).
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mac = signed_payload(secret, &timestamp.to_string(), body);
    format!("{SCHEME}{}", hex::encode(mac.finalize().into_bytes()))
}

/// Signs bodies with the fleet's secret, which it never prints.
#[derive(Clone)]
pub struct Signer {
    secret: SecretString,
}

impl Signer {
    /// A signer with `secret` (`WebhooksConfig.secret`).
    pub fn new(secret: SecretString) -> Self {
        Self { secret }
    }

    /// The `X-Agentfleet-Timestamp` and `X-Agentfleet-Signature` values of `body` signed at `now`
    /// (Unix seconds).
    pub fn headers(&self, now: u64, body: &[u8]) -> (String, String) {
        (now.to_string(), sign(self.secret.expose_secret().as_bytes(), now, body))
    }
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Signer([redacted])")
    }
}

/// Checks a webhook request: `timestamp` and `signature` are the header values as received, `now`
/// is the receiver's Unix time in seconds. The comparison takes constant time.
pub fn verify(
    secret: &[u8],
    timestamp: &str,
    body: &[u8],
    signature: &str,
    now: u64,
    tolerance: Duration,
) -> Result<(), VerifyError> {
    let at: u64 = timestamp.trim().parse().map_err(|_| VerifyError::BadTimestamp)?;
    let age_s = now.abs_diff(at);
    if age_s > tolerance.as_secs() {
        return Err(VerifyError::Stale { age_s });
    }
    let candidates: Vec<Vec<u8>> = signature
        .split(',')
        .filter_map(|part| part.trim().strip_prefix(SCHEME))
        .filter_map(|h| hex::decode(h).ok())
        .collect();
    if candidates.is_empty() {
        return Err(VerifyError::Malformed);
    }
    let expected = signed_payload(secret, timestamp.trim(), body);
    let matches = candidates.iter().any(|c| expected.clone().verify_slice(c).is_ok());
    if matches { Ok(()) } else { Err(VerifyError::Mismatch) }
}

/// The `X-Agentfleet-Delivery` id of an event body: the first 128 bits of its SHA-256, in hex.
/// Derived from the bytes, it is the same on every retry and redelivery of the same message.
pub fn delivery_id(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    format!("wh_{}", hex::encode(&digest[..16]))
}

/// The tier a delivery waits in after its `failed`-th failed attempt (from 1).
pub fn retry_tier(failed: u32) -> (&'static str, Duration) {
    let i = (failed.max(1) as usize - 1).min(RETRY_TIERS.len() - 1);
    RETRY_TIERS[i]
}

/// The queue the deliverer consumes, bound to `<prefix>.events` with `session.#`.
pub fn queue(prefix: &str) -> String {
    format!("{prefix}.webhooks")
}

/// A retry tier's queue: its TTL dead-letters back to [`queue`].
pub fn retry_queue(prefix: &str, tier: &str) -> String {
    format!("{prefix}.webhooks.retry.{tier}")
}

fn signed_payload(secret: &[u8], timestamp: &str, body: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    let mut mac = HmacSha256::new_from_slice(secret).unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec_test";
    const BODY: &[u8] = br#"{"type":"session.created","session_id":"s_1"}"#;
    const NOW: u64 = 1_760_000_000;
    const TOLERANCE: Duration = DEFAULT_TOLERANCE;

    #[test]
    fn a_signed_body_verifies() {
        let sig = sign(SECRET, NOW, BODY);
        assert_eq!(verify(SECRET, &NOW.to_string(), BODY, &sig, NOW + 10, TOLERANCE), Ok(()));
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // `printf '42.hello' | openssl dgst -sha256 -hmac Jefe`
        let expected = "v1=082c9ff76dd1126c52fcebfedf5eb67a8f7c7564850cc6da6c0de51983ea7156";
        assert_eq!(sign(b"Jefe", 42, b"hello"), expected);
    }

    #[test]
    fn a_tampered_body_or_timestamp_is_refused() {
        let sig = sign(SECRET, NOW, BODY);
        let tampered = br#"{"type":"session.created","session_id":"s_2"}"#;
        assert_eq!(verify(SECRET, &NOW.to_string(), tampered, &sig, NOW, TOLERANCE), Err(VerifyError::Mismatch));
        let later = (NOW + 1).to_string();
        assert_eq!(verify(SECRET, &later, BODY, &sig, NOW, TOLERANCE), Err(VerifyError::Mismatch));
        let mut flipped = sig.clone();
        flipped.replace_range(5..6, if &sig[5..6] == "0" { "1" } else { "0" });
        assert_eq!(verify(SECRET, &NOW.to_string(), BODY, &flipped, NOW, TOLERANCE), Err(VerifyError::Mismatch));
    }

    #[test]
    fn a_wrong_secret_is_refused() {
        let sig = sign(b"another secret", NOW, BODY);
        assert_eq!(verify(SECRET, &NOW.to_string(), BODY, &sig, NOW, TOLERANCE), Err(VerifyError::Mismatch));
    }

    #[test]
    fn stale_and_future_timestamps_are_refused() {
        let sig = sign(SECRET, NOW, BODY);
        let ts = NOW.to_string();
        assert_eq!(verify(SECRET, &ts, BODY, &sig, NOW + 301, TOLERANCE), Err(VerifyError::Stale { age_s: 301 }));
        assert_eq!(verify(SECRET, &ts, BODY, &sig, NOW - 301, TOLERANCE), Err(VerifyError::Stale { age_s: 301 }));
        assert_eq!(verify(SECRET, &ts, BODY, &sig, NOW + 300, TOLERANCE), Ok(()));
    }

    #[test]
    fn malformed_headers_are_refused() {
        let sig = sign(SECRET, NOW, BODY);
        let ts = NOW.to_string();
        assert_eq!(verify(SECRET, "yesterday", BODY, &sig, NOW, TOLERANCE), Err(VerifyError::BadTimestamp));
        assert_eq!(verify(SECRET, &ts, BODY, "", NOW, TOLERANCE), Err(VerifyError::Malformed));
        assert_eq!(verify(SECRET, &ts, BODY, "v0=abcd", NOW, TOLERANCE), Err(VerifyError::Malformed));
        assert_eq!(verify(SECRET, &ts, BODY, "v1=not-hex", NOW, TOLERANCE), Err(VerifyError::Malformed));
        assert_eq!(verify(SECRET, &ts, BODY, &sig[..sig.len() - 2], NOW, TOLERANCE), Err(VerifyError::Mismatch));
    }

    #[test]
    fn any_of_several_signatures_may_match_during_a_rotation() {
        let both = format!("{}, {}", sign(b"old", NOW, BODY), sign(SECRET, NOW, BODY));
        assert_eq!(verify(SECRET, &NOW.to_string(), BODY, &both, NOW, TOLERANCE), Ok(()));
        assert_eq!(verify(b"old", &NOW.to_string(), BODY, &both, NOW, TOLERANCE), Ok(()));
        assert_eq!(verify(b"third", &NOW.to_string(), BODY, &both, NOW, TOLERANCE), Err(VerifyError::Mismatch));
    }

    #[test]
    fn the_signer_signs_what_verify_accepts_and_hides_its_secret() {
        let signer = Signer::new(SecretString::from("whsec_test"));
        let (ts, sig) = signer.headers(NOW, BODY);
        assert_eq!(ts, NOW.to_string());
        assert_eq!(verify(SECRET, &ts, BODY, &sig, NOW, TOLERANCE), Ok(()));
        assert!(!format!("{signer:?}").contains("whsec"));
    }

    #[test]
    fn delivery_ids_are_stable_per_body() {
        assert_eq!(delivery_id(BODY), delivery_id(BODY));
        assert_ne!(delivery_id(BODY), delivery_id(b"{}"));
        assert_eq!(delivery_id(BODY).len(), 3 + 32);
    }

    #[test]
    fn failed_attempts_climb_the_tiers_and_stay_on_the_last() {
        let waits: Vec<u64> = (1..=7).map(|n| retry_tier(n).1.as_secs()).collect();
        assert_eq!(waits, [1, 5, 30, 120, 600, 600, 600]);
        assert_eq!(retry_tier(2).0, "5s");
        assert_eq!(retry_queue("agentfleet", "5s"), "agentfleet.webhooks.retry.5s");
        assert_eq!(queue("agentfleet"), "agentfleet.webhooks");
    }

    #[test]
    fn the_config_section_has_defaults_and_reads_the_secret_from_the_named_variable() {
        use crate::config::Config;
        use secrecy::ExposeSecret;
        let text = r#"
            [agents.a]
            model = "claude-sonnet-4-5"
            system_prompt = "x"

            [tenant_defaults]
            daily_cap_usd = 10.0
        "#;
        let path = std::path::Path::new("t.toml");
        let cfg = Config::parse(text, path, &|_| None).expect("valid");
        assert_eq!(cfg.webhooks.secret_env, "AGENTFLEET_WEBHOOK_SECRET");
        assert_eq!((cfg.webhooks.timeout_ms, cfg.webhooks.max_attempts), (5_000, 12));
        assert!(cfg.webhooks.secret.is_none());

        let text = format!("{text}\n[webhooks]\nsecret_env = \"MY_SECRET\"\nmax_attempts = 3\n");
        let env = |k: &str| (k == "MY_SECRET").then(|| "hush".to_owned());
        let cfg = Config::parse(&text, path, &env).expect("valid");
        assert_eq!(cfg.webhooks.max_attempts, 3);
        assert_eq!(cfg.webhooks.secret.as_ref().map(|s| s.expose_secret().to_owned()).as_deref(), Some("hush"));
        assert!(!format!("{:?}", cfg.webhooks).contains("hush"));
    }
}
