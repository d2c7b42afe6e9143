//! Signatures for `thinking` and `redacted_thinking` blocks.
//!
//! The real API signs the thinking it returns and rejects a request whose thinking blocks were
//! changed on the way back. This server does the same with a keyed SHA-256: a `thinking` block's
//! `signature` is the MAC of its text, and a `redacted_thinking` block's opaque `data` is a nonce
//! followed by the nonce's MAC. The key is fixed, so a restarted server still accepts the blocks an
//! earlier run handed out, as the real API does across its replicas.

use sha2::{Digest, Sha256};

/// The key every signature is made with.
const SECRET: &[u8] = b"agentfleet-model-server/signing-key/v1";

/// Separates the nonce from its MAC inside `redacted_thinking.data`.
const REDACTED_SEPARATOR: char = '.';

/// Hex SHA-256 over the key, a domain label and the payload.
fn mac(domain: &str, payload: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(SECRET);
    hasher.update(domain.as_bytes());
    hasher.update([0u8]);
    hasher.update(payload.as_bytes());
    hex::encode(hasher.finalize())
}

/// The `signature` for a `thinking` block holding `thinking`.
pub(crate) fn sign_thinking(thinking: &str) -> String {
    mac("thinking", thinking)
}

/// Whether `signature` is the one this server made for `thinking`.
pub(crate) fn verify_thinking(thinking: &str, signature: &str) -> bool {
    sign_thinking(thinking) == signature
}

/// Fresh opaque `data` for a `redacted_thinking` block.
pub(crate) fn redacted_data() -> String {
    let nonce = ulid::Ulid::new().to_string();
    let tag = mac("redacted_thinking", &nonce);
    format!("{nonce}{REDACTED_SEPARATOR}{tag}")
}

/// Whether `data` is a `redacted_thinking` payload this server made.
pub(crate) fn verify_redacted(data: &str) -> bool {
    data.split_once(REDACTED_SEPARATOR).is_some_and(|(nonce, tag)| mac("redacted_thinking", nonce) == tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thinking_signature_round_trips() {
        let signature = sign_thinking("I should search first.");
        assert!(verify_thinking("I should search first.", &signature));
    }

    #[test]
    fn changed_thinking_text_is_rejected() {
        let signature = sign_thinking("I should search first.");
        assert!(!verify_thinking("I should search first", &signature));
        assert!(!verify_thinking("I should search first.", "deadbeef"));
        assert!(!verify_thinking("I should search first.", ""));
    }

    #[test]
    fn redacted_data_round_trips() {
        let data = redacted_data();
        assert!(verify_redacted(&data));
    }

    #[test]
    fn changed_redacted_data_is_rejected() {
        let data = redacted_data();
        assert!(!verify_redacted(&format!("x{data}")));
        assert!(!verify_redacted(&data.replace(REDACTED_SEPARATOR, "")));
        assert!(!verify_redacted(""));
    }

    #[test]
    fn thinking_signature_does_not_verify_redacted_data() {
        let nonce = "01HZZZZZZZZZZZZZZZZZZZZZZZ";
        let forged = format!("{nonce}.{}", sign_thinking(nonce));
        assert!(!verify_redacted(&forged));
    }
}
