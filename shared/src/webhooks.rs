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
//! | `X-Agentfleet-Tenant` | the session's tenant (absent, and signed as empty, without one) |
//! | `X-Agentfleet-Signature` | `v1=<hex HMAC-SHA256(secret, "<timestamp>.<tenant>.<url>.<body>")>` |
//!
//! The secret is the tenant's own (`tenants.<name>.webhook_secret_env`), or the fleet's
//! (`webhooks.secret_env`) for a session whose tenant has none. The signature binds the receiver:
//! `<url>` is the URL the event was POSTed to, as normalized (lowercase scheme and host, no default
//! port, e.g. `https://hooks.acme.example/agentfleet`), so an event captured at one receiver does not
//! verify at another, nor as another tenant's. A receiver verifies with the URL it is reached at and
//! the tenant it expects — not with the values of the headers.
//!
//! Each attempt is signed afresh, so a receiver can refuse old timestamps (replays) without
//! refusing late retries. A signature header may carry several comma-separated `v1=` values (one
//! per secret while a secret is rotated); [`verify`] accepts the request when any of them matches.
//! Delivery is at least once: a receiver sees an event again when its answer was lost, so it should
//! deduplicate on `X-Agentfleet-Delivery`.
//!
//! ```
//! use std::time::Duration;
//! use agentfleet::webhooks::{Destination, sign, verify};
//!
//! let body = br#"{"type":"session.completed"}"#;
//! let here = Destination { url: "https://hooks.acme.example/agentfleet", tenant: "acme" };
//! let signature = sign(b"s3cret", 1_700_000_000, &here, body);
//! assert!(signature.starts_with("v1="));
//! let tolerance = Duration::from_secs(300);
//! assert!(verify(b"s3cret", &here, "1700000000", body, &signature, 1_700_000_060, tolerance).is_ok());
//! assert!(verify(b"other", &here, "1700000000", body, &signature, 1_700_000_060, tolerance).is_err());
//! let elsewhere = Destination { url: "https://evil.example/", tenant: "acme" };
//! assert!(verify(b"s3cret", &elsewhere, "1700000000", body, &signature, 1_700_000_060, tolerance).is_err());
//! ```

pub mod address;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::config::Config;

/// The event type header.
pub const EVENT_HEADER: &str = "x-agentfleet-event";
/// The delivery id header: one id per event, stable across retries.
pub const DELIVERY_HEADER: &str = "x-agentfleet-delivery";
/// The timestamp header: Unix seconds of the signature.
pub const TIMESTAMP_HEADER: &str = "x-agentfleet-timestamp";
/// The signature header: `v1=<hex>`.
pub const SIGNATURE_HEADER: &str = "x-agentfleet-signature";
/// The tenant header: the session's tenant, absent without one.
pub const TENANT_HEADER: &str = "x-agentfleet-tenant";

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

/// Who an event is signed for: the URL it is POSTed to (normalized) and the session's tenant
/// (empty without one). Both are part of the signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Destination<'a> {
    /// The receiver's URL, normalized as `url::Url` prints it.
    pub url: &'a str,
    /// The tenant, or `""`.
    pub tenant: &'a str,
}

/// The `X-Agentfleet-Signature` value of `body` for `to`, signed at `timestamp` (Unix seconds).
pub fn sign(secret: &[u8], timestamp: u64, to: &Destination<'_>, body: &[u8]) -> String {
    let mac = signed_payload(secret, &timestamp.to_string(), to, body);
    format!("{SCHEME}{}", hex::encode(mac.finalize().into_bytes()))
}

/// No secret to sign a tenant's events with: the named variable is unset or empty.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("no webhook signing secret (env {0}); not sent unsigned")]
pub struct NoSecret(pub String);

/// Signs bodies with the fleet's and the tenants' secrets, which it never prints.
#[derive(Clone)]
pub struct Signer {
    fleet: Result<SecretString, NoSecret>,
    tenants: BTreeMap<String, Result<SecretString, NoSecret>>,
}

impl Signer {
    /// A signer with the secrets read by `cfg`: `webhooks.secret` and each tenant's
    /// `webhook_secret` (tenants without `webhook_secret_env` use the fleet's).
    pub fn from_config(cfg: &Config) -> Self {
        let fleet = cfg.webhooks.secret.clone().ok_or_else(|| NoSecret(cfg.webhooks.secret_env.clone()));
        let tenants = cfg
            .tenants
            .iter()
            .filter_map(|(name, t)| {
                let var = t.webhook_secret_env.clone()?;
                Some((name.to_string(), t.webhook_secret.clone().ok_or(NoSecret(var))))
            })
            .collect();
        Self { fleet, tenants }
    }

    /// The secret for `tenant`'s events: its own when it names one, else the fleet's.
    pub fn secret(&self, tenant: &str) -> Result<&SecretString, &NoSecret> {
        self.tenants.get(tenant).unwrap_or(&self.fleet).as_ref()
    }

    /// The `X-Agentfleet-Timestamp` and `X-Agentfleet-Signature` values of `body` for `to`, signed
    /// at `now` (Unix seconds) with the tenant's secret.
    pub fn headers(&self, now: u64, to: &Destination<'_>, body: &[u8]) -> Result<(String, String), NoSecret> {
        let secret = self.secret(to.tenant).map_err(Clone::clone)?;
        Ok((now.to_string(), sign(secret.expose_secret().as_bytes(), now, to, body)))
    }

    /// The variables that are named but hold no secret (the fleet's first), for a warning.
    pub fn missing(&self) -> impl Iterator<Item = &NoSecret> {
        std::iter::once(&self.fleet).chain(self.tenants.values()).filter_map(|s| s.as_ref().err())
    }
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Signer([redacted])")
    }
}

/// Checks a webhook request that reached `at` (the receiver's own URL, and the tenant it serves):
/// `timestamp` and `signature` are the header values as received, `now` is the receiver's Unix
/// time in seconds. The comparison takes constant time.
pub fn verify(
    secret: &[u8],
    at: &Destination<'_>,
    timestamp: &str,
    body: &[u8],
    signature: &str,
    now: u64,
    tolerance: Duration,
) -> Result<(), VerifyError> {
    let signed_at: u64 = timestamp.trim().parse().map_err(|_| VerifyError::BadTimestamp)?;
    let age_s = now.abs_diff(signed_at);
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
    let expected = signed_payload(secret, timestamp.trim(), at, body);
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

/// The HMAC of `<timestamp>.<tenant>.<url>.<body>`. A tenant name cannot contain `.` and a
/// timestamp is digits, so the fields cannot be shifted into one another.
fn signed_payload(secret: &[u8], timestamp: &str, to: &Destination<'_>, body: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    let mut mac = HmacSha256::new_from_slice(secret).unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    for part in [timestamp.as_bytes(), to.tenant.as_bytes(), to.url.as_bytes()] {
        mac.update(part);
        mac.update(b".");
    }
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
    const AT: Destination<'static> = Destination { url: "https://hooks.acme.example/agentfleet", tenant: "acme" };

    fn check(secret: &[u8], ts: &str, body: &[u8], sig: &str, now: u64) -> Result<(), VerifyError> {
        verify(secret, &AT, ts, body, sig, now, TOLERANCE)
    }

    #[test]
    fn a_signed_body_verifies() {
        let sig = sign(SECRET, NOW, &AT, BODY);
        assert_eq!(check(SECRET, &NOW.to_string(), BODY, &sig, NOW + 10), Ok(()));
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_tenant_url_and_body() {
        // `printf '42.acme.https://h.example/.hello' | openssl dgst -sha256 -hmac Jefe`
        let to = Destination { url: "https://h.example/", tenant: "acme" };
        let expected = "v1=6cd402d14ad34298812e724064ef1a3a49cd6d57157a4d943d9785937573d7a1";
        assert_eq!(sign(b"Jefe", 42, &to, b"hello"), expected);
        // Without a tenant the field is empty: `42..https://h.example/.hello`.
        let mut mac = HmacSha256::new_from_slice(b"Jefe").expect("key");
        mac.update(b"42..https://h.example/.hello");
        let untenanted = Destination { tenant: "", ..to };
        assert_eq!(
            sign(b"Jefe", 42, &untenanted, b"hello"),
            format!("v1={}", hex::encode(mac.finalize().into_bytes()))
        );
    }

    #[test]
    fn a_signature_for_one_receiver_fails_at_another_and_for_another_tenant() {
        let sig = sign(SECRET, NOW, &AT, BODY);
        let ts = NOW.to_string();
        let other_url = Destination { url: "https://hooks.other.example/agentfleet", ..AT };
        let other_path = Destination { url: "https://hooks.acme.example/agentfleet/x", ..AT };
        let other_tenant = Destination { tenant: "globex", ..AT };
        let no_tenant = Destination { tenant: "", ..AT };
        for at in [other_url, other_path, other_tenant, no_tenant] {
            assert_eq!(verify(SECRET, &at, &ts, BODY, &sig, NOW, TOLERANCE), Err(VerifyError::Mismatch), "{at:?}");
        }
    }

    #[test]
    fn a_tampered_body_or_timestamp_is_refused() {
        let sig = sign(SECRET, NOW, &AT, BODY);
        let tampered = br#"{"type":"session.created","session_id":"s_2"}"#;
        assert_eq!(check(SECRET, &NOW.to_string(), tampered, &sig, NOW), Err(VerifyError::Mismatch));
        let later = (NOW + 1).to_string();
        assert_eq!(check(SECRET, &later, BODY, &sig, NOW), Err(VerifyError::Mismatch));
        let mut flipped = sig.clone();
        flipped.replace_range(5..6, if &sig[5..6] == "0" { "1" } else { "0" });
        assert_eq!(check(SECRET, &NOW.to_string(), BODY, &flipped, NOW), Err(VerifyError::Mismatch));
    }

    #[test]
    fn a_wrong_secret_is_refused() {
        let sig = sign(b"another secret", NOW, &AT, BODY);
        assert_eq!(check(SECRET, &NOW.to_string(), BODY, &sig, NOW), Err(VerifyError::Mismatch));
    }

    #[test]
    fn stale_and_future_timestamps_are_refused() {
        let sig = sign(SECRET, NOW, &AT, BODY);
        let ts = NOW.to_string();
        assert_eq!(check(SECRET, &ts, BODY, &sig, NOW + 301), Err(VerifyError::Stale { age_s: 301 }));
        assert_eq!(check(SECRET, &ts, BODY, &sig, NOW - 301), Err(VerifyError::Stale { age_s: 301 }));
        assert_eq!(check(SECRET, &ts, BODY, &sig, NOW + 300), Ok(()));
    }

    #[test]
    fn malformed_headers_are_refused() {
        let sig = sign(SECRET, NOW, &AT, BODY);
        let ts = NOW.to_string();
        assert_eq!(check(SECRET, "yesterday", BODY, &sig, NOW), Err(VerifyError::BadTimestamp));
        assert_eq!(check(SECRET, &ts, BODY, "", NOW), Err(VerifyError::Malformed));
        assert_eq!(check(SECRET, &ts, BODY, "v0=abcd", NOW), Err(VerifyError::Malformed));
        assert_eq!(check(SECRET, &ts, BODY, "v1=not-hex", NOW), Err(VerifyError::Malformed));
        assert_eq!(check(SECRET, &ts, BODY, &sig[..sig.len() - 2], NOW), Err(VerifyError::Mismatch));
    }

    #[test]
    fn any_of_several_signatures_may_match_during_a_rotation() {
        let both = format!("{}, {}", sign(b"old", NOW, &AT, BODY), sign(SECRET, NOW, &AT, BODY));
        assert_eq!(check(SECRET, &NOW.to_string(), BODY, &both, NOW), Ok(()));
        assert_eq!(check(b"old", &NOW.to_string(), BODY, &both, NOW), Ok(()));
        assert_eq!(check(b"third", &NOW.to_string(), BODY, &both, NOW), Err(VerifyError::Mismatch));
    }

    fn config(tenants: &str, env: &[(&str, &str)]) -> Config {
        let text = format!(
            "[tenant_defaults]\ndaily_cap_usd = 10.0\n[agents.a]\nmodel = \"claude-sonnet-4-5\"\nsystem_prompt = \"x\"\n{tenants}"
        );
        let env = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned());
        Config::parse(&text, std::path::Path::new("t.toml"), &env).expect("valid")
    }

    #[test]
    fn each_tenant_signs_with_its_own_secret_or_the_fleets() {
        let tenants = "[tenants.acme]\nwebhook_secret_env = \"ACME_SECRET\"\n[tenants.globex]\ndaily_cap_usd = 5.0\n\
                       [tenants.initech]\nwebhook_secret_env = \"INITECH_SECRET\"\n";
        let cfg = config(tenants, &[("AGENTFLEET_WEBHOOK_SECRET", "fleet"), ("ACME_SECRET", "acme-secret")]);
        let signer = Signer::from_config(&cfg);
        let ts = NOW.to_string();
        let (_, sig) = signer.headers(NOW, &AT, BODY).expect("acme has a secret");
        assert_eq!(verify(b"acme-secret", &AT, &ts, BODY, &sig, NOW, TOLERANCE), Ok(()));
        assert_eq!(verify(b"fleet", &AT, &ts, BODY, &sig, NOW, TOLERANCE), Err(VerifyError::Mismatch));
        let globex = Destination { tenant: "globex", ..AT };
        let (_, sig) = signer.headers(NOW, &globex, BODY).expect("the fleet's secret");
        assert_eq!(verify(b"fleet", &globex, &ts, BODY, &sig, NOW, TOLERANCE), Ok(()));
        let untenanted = Destination { tenant: "", ..AT };
        assert!(signer.headers(NOW, &untenanted, BODY).is_ok());
        // A tenant that names a variable that is not set is never signed with another secret.
        let initech = Destination { tenant: "initech", ..AT };
        assert_eq!(signer.headers(NOW, &initech, BODY), Err(NoSecret("INITECH_SECRET".into())));
        assert_eq!(signer.missing().map(|m| m.0.as_str()).collect::<Vec<_>>(), ["INITECH_SECRET"]);
        assert!(!format!("{signer:?}").contains("secret\""));
        assert!(!format!("{:?}", cfg.tenants).contains("acme-secret"));
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
        assert!(!cfg.webhooks.allow_private_addresses);

        let text = format!("{text}\n[webhooks]\nsecret_env = \"MY_SECRET\"\nmax_attempts = 3\n");
        let env = |k: &str| (k == "MY_SECRET").then(|| "hush".to_owned());
        let cfg = Config::parse(&text, path, &env).expect("valid");
        assert_eq!(cfg.webhooks.max_attempts, 3);
        assert_eq!(cfg.webhooks.secret.as_ref().map(|s| s.expose_secret().to_owned()).as_deref(), Some("hush"));
        assert!(!format!("{:?}", cfg.webhooks).contains("hush"));
    }
}
