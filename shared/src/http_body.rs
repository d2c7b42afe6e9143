//! Reading an HTTP response body with a byte cap.
//!
//! `Response::bytes()` and `text()` read a body whole, however long it is: a tool or a model API
//! that answers with a gigabyte (or never stops) would take a worker's memory with it. Here the body
//! is read chunk by chunk and reading stops at the cap, so a body never holds more than the cap
//! (plus the one chunk in hand). A declared `Content-Length` is looked at first: a caller that
//! refuses long bodies can refuse before reading any of it.

/// A body read up to a cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CappedBody {
    /// The whole body, or its first `cap` bytes when it was cut.
    pub bytes: Vec<u8>,
    /// `None` when `bytes` is the whole body; else what is known of its whole length.
    pub cut: Option<Cut>,
}

/// What is known of a body that was cut at the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// The server declared this `Content-Length`, over the cap.
    Declared(u64),
    /// The body went on past the cap (no `Content-Length`, or a wrong one); its length is unknown.
    PastCap,
}

impl Cut {
    /// "of 1234567 bytes", or "of more than 32768 bytes", for a message.
    pub fn describe(&self, cap: usize) -> String {
        match self {
            Self::Declared(n) => format!("of {n} bytes"),
            Self::PastCap => format!("of more than {cap} bytes"),
        }
    }
}

/// The declared length of `response`'s body when it is over `cap`: a body the caller can refuse
/// before reading it.
pub fn declared_over(response: &reqwest::Response, cap: usize) -> Option<u64> {
    response.content_length().filter(|n| *n > cap as u64)
}

/// Reads at most `cap` bytes of `response`'s body, then stops (dropping the response closes the
/// connection, so the rest is never read).
pub async fn read_capped(mut response: reqwest::Response, cap: usize) -> reqwest::Result<CappedBody> {
    let declared = declared_over(&response, cap);
    let expected = response.content_length().unwrap_or(0).min(cap as u64) as usize;
    let mut bytes = Vec::with_capacity(expected);
    while let Some(chunk) = response.chunk().await? {
        let room = cap - bytes.len();
        if chunk.len() > room {
            bytes.extend_from_slice(&chunk[..room]);
            let cut = declared.map_or(Cut::PastCap, Cut::Declared);
            return Ok(CappedBody { bytes, cut: Some(cut) });
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(CappedBody { bytes, cut: None })
}

/// `bytes` as text: UTF-8, with invalid sequences replaced, and a character that the cap split at
/// the end left out.
pub fn lossy_text(bytes: &[u8]) -> String {
    let end = match std::str::from_utf8(bytes) {
        Ok(_) => bytes.len(),
        // Cut inside the last character: drop its first bytes.
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => bytes.len(),
    };
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_character_split_by_the_cap_is_left_out() {
        let text = "aé".as_bytes();
        assert_eq!(lossy_text(&text[..2]), "a");
        assert_eq!(lossy_text(text), "aé");
        assert_eq!(lossy_text(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(lossy_text(b""), "");
    }

    #[test]
    fn a_cut_says_what_is_known() {
        assert_eq!(Cut::Declared(1_000_000).describe(10), "of 1000000 bytes");
        assert_eq!(Cut::PastCap.describe(10), "of more than 10 bytes");
    }
}
