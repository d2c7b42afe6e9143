//! The dispatcher's HTTP API, as JSON values in and out.
//!
//! Answers stay `serde_json::Value` so `--json` can print exactly what the API said; the typed views in
//! `model` read them for people. An error answer becomes [`ApiError::Answered`] with the API's own
//! message, which is what the user sees.

use std::fmt;
use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

/// How long to wait for a connection, and for a whole request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How much of a body that is not the API's error shape to quote.
const QUOTE_BYTES: usize = 200;

/// Why a request got no usable answer.
#[derive(Debug)]
pub(crate) enum ApiError {
    /// The API answered an error: `{"error": {"type", "message"}}`.
    Answered { status: StatusCode, kind: String, message: String },
    /// No answer: the dispatcher is unreachable, or the connection broke.
    Transport(reqwest::Error),
    /// An answer that is not JSON.
    Malformed { status: StatusCode, detail: String },
}

impl ApiError {
    /// True when retrying later may succeed: no answer, or a 5xx / 429.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            Self::Answered { status, .. } | Self::Malformed { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            Self::Transport(_) => true,
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Answered { status, kind, message } => write!(f, "{message} ({} {kind})", status.as_u16()),
            Self::Transport(_) => f.write_str("no answer from the dispatcher"),
            Self::Malformed { status, detail } => write!(f, "the dispatcher answered {status}: {detail}"),
        }
    }
}

impl std::error::Error for ApiError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Transport(e) => Some(e),
            _ => None,
        }
    }
}

/// A client of one dispatcher.
pub(crate) struct Api {
    base: Url,
    http: reqwest::Client,
}

impl Api {
    /// A client of the API at `base` (e.g. `http://127.0.0.1:8080`, or with a path prefix).
    pub(crate) fn new(base: &str) -> anyhow::Result<Self> {
        let base = Url::parse(base).map_err(|e| anyhow::anyhow!("--url {base:?}: {e}"))?;
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
            anyhow::bail!("--url {base}: must be an http(s) URL");
        }
        let mut headers = reqwest::header::HeaderMap::new();
        // The API wants a bearer token; until a flag exists, it comes from `AGENTFLEET_TOKEN`.
        if let Some(token) = std::env::var("AGENTFLEET_TOKEN").ok().filter(|t| !t.is_empty()) {
            let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| anyhow::anyhow!("AGENTFLEET_TOKEN: not a valid header value"))?;
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .default_headers(headers)
            .build()?;
        Ok(Self { base, http })
    }

    /// `GET` the path made of `segments` (each percent-encoded), with `query`.
    pub(crate) async fn get(&self, segments: &[&str], query: &[(&str, String)]) -> Result<Value, ApiError> {
        let request = self.http.request(Method::GET, self.url(segments)).query(query);
        answer(request.send().await.map_err(ApiError::Transport)?).await
    }

    /// `POST` `body` (or nothing) to the path made of `segments`.
    pub(crate) async fn post(&self, segments: &[&str], body: Option<&Value>) -> Result<Value, ApiError> {
        let mut request = self.http.request(Method::POST, self.url(segments));
        if let Some(body) = body {
            request = request.json(body);
        }
        answer(request.send().await.map_err(ApiError::Transport)?).await
    }

    /// `GET /v1/sessions/{id}`.
    pub(crate) async fn session(&self, id: &str) -> Result<Value, ApiError> {
        self.get(&["v1", "sessions", id], &[]).await
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        // `new` checked that the base can have path segments, so this always runs.
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }
}

/// The JSON of a success, or the API's error.
async fn answer(response: reqwest::Response) -> Result<Value, ApiError> {
    let status = response.status();
    let bytes = response.bytes().await.map_err(ApiError::Transport)?;
    let body = serde_json::from_slice::<Value>(&bytes);
    match body {
        Ok(v) if status.is_success() => Ok(v),
        Ok(v) => Err(error_of(status, &v).unwrap_or_else(|| malformed(status, &bytes))),
        Err(_) => Err(malformed(status, &bytes)),
    }
}

/// The API's `{"error": {"type", "message"}}`, when the body has that shape.
fn error_of(status: StatusCode, body: &Value) -> Option<ApiError> {
    let error = body.get("error")?;
    let message = error.get("message")?.as_str()?.to_owned();
    let kind = error.get("type").and_then(Value::as_str).unwrap_or("error").to_owned();
    Some(ApiError::Answered { status, kind, message })
}

fn malformed(status: StatusCode, bytes: &[u8]) -> ApiError {
    let text = String::from_utf8_lossy(bytes);
    let detail = crate::format::truncate(text.trim(), QUOTE_BYTES);
    let detail = if detail.is_empty() { "an empty body".to_owned() } else { detail };
    ApiError::Malformed { status, detail }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_api_error_shape_gives_the_message() {
        let body = json!({"error": {"type": "not_found", "message": "no session `s_1`"}});
        let e = error_of(StatusCode::NOT_FOUND, &body).map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("no session `s_1` (404 not_found)"));
        assert!(error_of(StatusCode::BAD_GATEWAY, &json!({"oops": 1})).is_none());
    }

    #[test]
    fn other_bodies_are_quoted_briefly() {
        let e = malformed(StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>");
        assert_eq!(e.to_string(), "the dispatcher answered 502 Bad Gateway: <html>bad gateway</html>");
        assert!(e.is_transient());
        assert!(malformed(StatusCode::OK, b"").to_string().ends_with("an empty body"));
    }

    #[test]
    fn client_errors_are_not_transient() {
        let e = ApiError::Answered { status: StatusCode::CONFLICT, kind: "conflict".into(), message: "no".into() };
        assert!(!e.is_transient());
    }

    #[test]
    fn paths_are_encoded_under_the_base() -> anyhow::Result<()> {
        let api = Api::new("http://127.0.0.1:8080/fleet/")?;
        assert_eq!(api.url(&["v1", "sessions", "a/b c"]).as_str(), "http://127.0.0.1:8080/fleet/v1/sessions/a%2Fb%20c");
        let api = Api::new("http://127.0.0.1:8080")?;
        assert_eq!(api.url(&["v1", "escalations"]).as_str(), "http://127.0.0.1:8080/v1/escalations");
        assert!(Api::new("ftp://x").is_err());
        assert!(Api::new("not a url").is_err());
        Ok(())
    }
}
