//! The dispatcher's HTTP API, as JSON values in and out.
//!
//! Answers stay `serde_json::Value` so `--json` can print exactly what the API said; the typed views in
//! `model` read them for people. An error answer becomes [`ApiError::Answered`] with the API's own
//! message, which is what the user sees.

use std::fmt;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

/// How long to wait for a connection, and for a whole request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one event stream may stay open before it is opened again (from its last event).
const STREAM_TIMEOUT: Duration = Duration::from_secs(3600);

/// How much of a body that is not the API's error shape to quote.
const QUOTE_BYTES: usize = 200;

/// The environment variable `--token` reads.
const TOKEN_ENV: &str = "AGENTFLEET_TOKEN";

/// The roles a token may have, as the API names them in a 403's message.
const ROLES: [&str; 5] = ["submit", "read", "operate", "approve", "admin"];

/// Why a request got no usable answer.
#[derive(Debug)]
pub(crate) enum ApiError {
    /// The API answered an error: `{"error": {"type", "message"}}`.
    Answered { status: StatusCode, kind: String, message: String },
    /// 401: no token was sent, or the one sent was not accepted.
    Unauthenticated { token_sent: bool, message: String },
    /// 403: the token lacks the role this needs (`role` when the API's message names one).
    Forbidden { role: Option<String>, message: String },
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
            Self::Unauthenticated { .. } | Self::Forbidden { .. } => false,
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Answered { status, kind, message } => write!(f, "{message} ({} {kind})", status.as_u16()),
            Self::Unauthenticated { token_sent: false, .. } => {
                write!(f, "no token: pass --token or set {TOKEN_ENV} (401 unauthorized)")
            }
            Self::Unauthenticated { token_sent: true, message } => {
                write!(f, "the token was not accepted: {message} (401 unauthorized)")
            }
            Self::Forbidden { role: Some(role), message } => {
                write!(f, "the token lacks the `{role}` role this needs: {message} (403 forbidden)")
            }
            Self::Forbidden { role: None, message } => {
                write!(f, "the token may not do this: {message} (403 forbidden)")
            }
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
    token_sent: bool,
}

impl Api {
    /// A client of the API at `base` (e.g. `http://127.0.0.1:8080`, or with a path prefix) that
    /// sends `token`, if any, as `Authorization: Bearer <token>` on every request.
    pub(crate) fn new(base: &str, token: Option<&str>) -> anyhow::Result<Self> {
        let base = Url::parse(base).map_err(|e| anyhow::anyhow!("--url {base:?}: {e}"))?;
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
            anyhow::bail!("--url {base}: must be an http(s) URL");
        }
        let mut headers = HeaderMap::new();
        if let Some(token) = token {
            let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| anyhow::anyhow!("--token: must be printable ASCII"))?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .default_headers(headers)
            .build()?;
        Ok(Self { base, http, token_sent: token.is_some() })
    }

    /// `GET` the path made of `segments` (each percent-encoded), with `query`.
    pub(crate) async fn get(&self, segments: &[&str], query: &[(&str, String)]) -> Result<Value, ApiError> {
        let request = self.http.request(Method::GET, self.url(segments)).query(query);
        answer(request.send().await.map_err(ApiError::Transport)?, self.token_sent).await
    }

    /// `POST` `body` (or nothing) to the path made of `segments`.
    pub(crate) async fn post(&self, segments: &[&str], body: Option<&Value>) -> Result<Value, ApiError> {
        let mut request = self.http.request(Method::POST, self.url(segments));
        if let Some(body) = body {
            request = request.json(body);
        }
        answer(request.send().await.map_err(ApiError::Transport)?, self.token_sent).await
    }

    /// `DELETE` the path made of `segments`.
    pub(crate) async fn delete(&self, segments: &[&str]) -> Result<Value, ApiError> {
        let request = self.http.request(Method::DELETE, self.url(segments));
        answer(request.send().await.map_err(ApiError::Transport)?, self.token_sent).await
    }

    /// Opens `GET /v1/sessions/{id}/events` (after `last_event_id`): the response, to read as a
    /// stream of Server-Sent Events, or the API's error. The stream may stay open for as long as the
    /// session runs, so only the connection and the first byte are bounded.
    pub(crate) async fn events(&self, id: &str, last_event_id: Option<&str>) -> Result<reqwest::Response, ApiError> {
        let mut request = self
            .http
            .request(Method::GET, self.url(&["v1", "sessions", id, "events"]))
            .header("accept", "text/event-stream")
            .timeout(STREAM_TIMEOUT);
        if let Some(last) = last_event_id {
            request = request.header("last-event-id", last);
        }
        let response = request.send().await.map_err(ApiError::Transport)?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(answer(response, self.token_sent).await.err().unwrap_or_else(|| ApiError::Malformed {
            status: StatusCode::BAD_GATEWAY,
            detail: "an error status with a success body".into(),
        }))
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

/// The JSON of a success, or the API's error (`token_sent` tells a 401 what was missing).
async fn answer(response: reqwest::Response, token_sent: bool) -> Result<Value, ApiError> {
    let status = response.status();
    let bytes = response.bytes().await.map_err(ApiError::Transport)?;
    let body = serde_json::from_slice::<Value>(&bytes);
    let error = match body {
        Ok(v) if status.is_success() => return Ok(v),
        Ok(v) => error_of(status, &v).unwrap_or_else(|| malformed(status, &bytes)),
        Err(_) => malformed(status, &bytes),
    };
    Err(access_error(error, token_sent))
}

/// A 401 or 403 as what the user must change: the token, or its role.
fn access_error(error: ApiError, token_sent: bool) -> ApiError {
    let (status, message) = match &error {
        ApiError::Answered { status, message, .. } => (*status, message.clone()),
        ApiError::Malformed { status, detail } => (*status, detail.clone()),
        _ => return error,
    };
    match status {
        StatusCode::UNAUTHORIZED => ApiError::Unauthenticated { token_sent, message },
        StatusCode::FORBIDDEN => ApiError::Forbidden { role: role_in(&message), message },
        _ => error,
    }
}

/// The role a 403's message names: the first of [`ROLES`] that appears in it as a word.
fn role_in(message: &str) -> Option<String> {
    let words = message.split(|c: char| !c.is_ascii_alphanumeric() && c != '_');
    words.map(str::to_ascii_lowercase).find(|w| ROLES.contains(&w.as_str()))
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
    fn a_401_says_what_is_missing_and_a_403_which_role() {
        let e = |status, message: &str| ApiError::Answered { status, kind: "x".into(), message: message.into() };
        let no_token = access_error(e(StatusCode::UNAUTHORIZED, "missing bearer token"), false);
        assert_eq!(no_token.to_string(), "no token: pass --token or set AGENTFLEET_TOKEN (401 unauthorized)");
        let rejected = access_error(e(StatusCode::UNAUTHORIZED, "unknown token"), true);
        assert_eq!(rejected.to_string(), "the token was not accepted: unknown token (401 unauthorized)");
        let forbidden = access_error(e(StatusCode::FORBIDDEN, "this needs the `operate` role"), true);
        assert_eq!(
            forbidden.to_string(),
            "the token lacks the `operate` role this needs: this needs the `operate` role (403 forbidden)"
        );
        assert!(!forbidden.is_transient());
        let vague = access_error(malformed(StatusCode::FORBIDDEN, b"nope"), true);
        assert_eq!(vague.to_string(), "the token may not do this: nope (403 forbidden)");
        let other = access_error(e(StatusCode::CONFLICT, "no"), true);
        assert_eq!(other.to_string(), "no (409 x)");
    }

    #[test]
    fn client_errors_are_not_transient() {
        let e = ApiError::Answered { status: StatusCode::CONFLICT, kind: "conflict".into(), message: "no".into() };
        assert!(!e.is_transient());
    }

    #[test]
    fn paths_are_encoded_under_the_base() -> anyhow::Result<()> {
        let api = Api::new("http://127.0.0.1:8080/fleet/", None)?;
        assert_eq!(api.url(&["v1", "sessions", "a/b c"]).as_str(), "http://127.0.0.1:8080/fleet/v1/sessions/a%2Fb%20c");
        let api = Api::new("http://127.0.0.1:8080", Some("t"))?;
        assert_eq!(api.url(&["v1", "escalations"]).as_str(), "http://127.0.0.1:8080/v1/escalations");
        assert!(Api::new("ftp://x", None).is_err());
        assert!(Api::new("not a url", None).is_err());
        Ok(())
    }
}
