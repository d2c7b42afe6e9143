//! URLs cut down before they reach an error text.
//!
//! reqwest's errors print the whole URL of the request, and a URL can carry a password
//! (`https://user:pass@host/`) or a token in its query (`?api_key=…`, or a tool input sent as
//! query pairs). Error texts end up in logs, in the session's trace and `error` field, in the tool
//! results the model reads and in dead-letter headers, so every URL in them keeps its scheme, host,
//! port and path, and loses its userinfo, query and fragment. Secret *values* known from the config
//! are replaced separately, by `telemetry::redact`.
//!
//! A leaf module: `config`, `llm` and `tools` use it.

/// What stands where a removed part of a URL was.
const REDACTED: &str = "[redacted]";

/// Bytes that end a URL inside free text (and inside JSON text: `"` and `\`).
const URL_END: &[char] = &['"', '\'', '<', '>', '`', '\\'];

/// `url` as text, without its userinfo, query or fragment.
///
/// ```
/// let url = url::Url::parse("https://bot:hunter22@api.example/v1/search?key=abc#top").unwrap();
/// assert_eq!(agentfleet::scrub::url(&url), "https://[redacted]@api.example/v1/search?[redacted]");
/// ```
pub fn url(url: &url::Url) -> String {
    urls_in(url.as_str())
}

/// `text` with every URL in it (`scheme://…`, up to a space, a quote or a bracket) cut down to
/// scheme, host, port and path. The text around them is unchanged.
///
/// ```
/// let text = "error sending request for url (http://u:p@h:8080/tool?token=t0k)";
/// assert_eq!(agentfleet::scrub::urls_in(text), "error sending request for url (http://[redacted]@h:8080/tool?[redacted])");
/// ```
pub fn urls_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(sep) = rest.find("://") {
        let start = scheme_start(&rest[..sep]);
        let after = sep + 3;
        if start == sep {
            // `://` without a scheme before it: not a URL.
            out.push_str(&rest[..after]);
            rest = &rest[after..];
            continue;
        }
        let end =
            rest[after..].find(|c: char| c.is_whitespace() || URL_END.contains(&c)).map_or(rest.len(), |i| after + i);
        // Sentence punctuation and a closing parenthesis after a URL belong to the text.
        let candidate = rest[start..end].trim_end_matches([')', ',', '.', ';']);
        out.push_str(&rest[..start]);
        out.push_str(&bare(candidate));
        rest = &rest[start + candidate.len()..];
    }
    out.push_str(rest);
    out
}

/// The text of an error and of each of its causes, joined with `: `, with [`urls_in`] applied.
/// reqwest hides the interesting part ("connection closed before message completed") in a cause.
pub fn error(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    urls_in(&text)
}

/// Where the scheme ending just before `://` starts: after the last byte that cannot be in one.
fn scheme_start(before: &str) -> usize {
    let start = before
        .char_indices()
        .rev()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
        .map_or(0, |(i, c)| i + c.len_utf8());
    // A scheme starts with a letter: skip digits and signs before the first one.
    match before[start..].find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => start + i,
        None => before.len(),
    }
}

/// `scheme://authority/path?query#fragment` → `scheme://host/path`, marking what was removed.
fn bare(url: &str) -> String {
    let Some((scheme, after)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = after.find(['/', '?', '#']).unwrap_or(after.len());
    let (authority, tail) = after.split_at(authority_end);
    let host = match authority.rfind('@') {
        Some(at) => format!("{REDACTED}@{}", &authority[at + 1..]),
        None => authority.to_owned(),
    };
    let (path, cut) = match tail.find(['?', '#']) {
        Some(i) => (&tail[..i], format!("{}{REDACTED}", &tail[i..=i])),
        None => (tail, String::new()),
    };
    format!("{scheme}://{host}{path}{cut}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_query_and_fragment_are_cut() {
        let text = urls_in("GET http://user:pass@host/p?token=x failed");
        assert_eq!(text, "GET http://[redacted]@host/p?[redacted] failed");
        assert!(!text.contains("pass") && !text.contains("token=x"), "{text}");
        assert_eq!(urls_in("at https://h/a#frag."), "at https://h/a#[redacted].");
        assert_eq!(urls_in("redis://:s3cret@cache:6379/0"), "redis://[redacted]@cache:6379/0");
    }

    #[test]
    fn plain_urls_and_text_are_unchanged() {
        for text in [
            "no url here",
            "http://h:8080/v1/messages",
            "amqp://127.0.0.1:5672/%2f and http://[::1]:9/x",
            "a ://b without scheme",
            "ünïcode → http://h/ü",
            "",
        ] {
            assert_eq!(urls_in(text), text);
        }
    }

    #[test]
    fn urls_end_at_quotes_brackets_and_punctuation() {
        let json = r#"{"error":"for url (http://u:pw@h/p?k=v)","next":"https://x/y?z=1"}"#;
        assert_eq!(
            urls_in(json),
            r#"{"error":"for url (http://[redacted]@h/p?[redacted])","next":"https://x/y?[redacted]"}"#
        );
        assert_eq!(urls_in("see <http://h/?q=1>, then"), "see <http://h/?[redacted]>, then");
        assert_eq!(urls_in("1http://h/?q"), "1http://h/?[redacted]");
    }

    #[test]
    fn a_parsed_url_loses_its_secrets() {
        let parsed = url::Url::parse("http://user:pass@host/p?token=x").expect("a URL");
        let text = url(&parsed);
        assert!(!text.contains("pass") && !text.contains("token") && !text.contains("=x"), "{text}");
        assert!(text.starts_with("http://[redacted]@host/p"), "{text}");
    }

    /// A real reqwest error: a server that answers garbage, at a URL with a password and a token.
    #[tokio::test]
    async fn a_reqwest_error_shows_neither_password_nor_token() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("test setup");
        let port = listener.local_addr().expect("test setup").port();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            if let Ok((mut sock, _)) = listener.accept().await {
                let _ = sock.write_all(b"garbage\r\n\r\n").await;
            }
        });
        let e = reqwest::get(format!("http://user:pass@127.0.0.1:{port}/p?token=x"))
            .await
            .expect_err("garbage was accepted as HTTP");
        let text = error(&e);
        assert!(!text.contains("pass") && !text.contains("token=x"), "{text}");
        assert!(text.contains(&format!("127.0.0.1:{port}/p")), "{text}");
    }
}
