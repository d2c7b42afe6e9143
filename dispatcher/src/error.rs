//! The API's one error type and its JSON shape: `{"error": {"type": "...", "message": "..."}}`.
//!
//! Client errors say exactly what is wrong and name the field. Server errors say nothing internal:
//! the detail goes to the log.

use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

/// An error answered to an API client.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    /// Seconds for a `Retry-After` header (429).
    retry_after_s: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: String) -> Self {
        Self { status, kind, message, retry_after_s: None }
    }

    /// 401 (with `WWW-Authenticate: Bearer`): no credential, or not one this dispatcher knows.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message.into())
    }

    /// 403: the credential is known but does not allow this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message.into())
    }

    /// 429: a limit is reached; `retry_after_s`, when known, goes in `Retry-After`.
    pub fn too_many(message: impl Into<String>, retry_after_s: Option<u64>) -> Self {
        Self { retry_after_s, ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message.into()) }
    }

    /// 503: the request took longer than `dispatcher.request_timeout_ms`.
    pub fn timed_out(limit_ms: u64) -> Self {
        let message = format!("the request took longer than the limit of {limit_ms} ms; retry later");
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", message)
    }

    /// 400: the request is malformed or a field is invalid.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message.into())
    }

    /// 404: no such resource.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message.into())
    }

    /// 409: the request conflicts with an earlier one.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message.into())
    }

    /// 413: a field or the body is too large.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message.into())
    }

    /// 503: a dependency is down; the client may retry. The detail is logged, not sent.
    pub fn unavailable(detail: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "dependency unavailable");
        let message = "a dependency is unavailable; retry later (with the same idempotency_key)";
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message.into())
    }

    /// The HTTP status it answers with.
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// The `type` of the error body.
    pub(crate) fn kind(&self) -> &'static str {
        self.kind
    }

    /// The `message` of the error body.
    pub(crate) fn message(&self) -> &str {
        &self.message
    }
}

/// The body of every error answer.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody {
    error: ErrorDetail,
}

/// What went wrong.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorDetail {
    /// `invalid_request`, `unauthorized`, `forbidden`, `not_found`, `conflict`, `too_large`,
    /// `unsupported_media_type`, `rate_limited`, `timeout` or `unavailable`.
    #[serde(rename = "type")]
    #[schema(value_type = String, example = "invalid_request")]
    kind: &'static str,
    /// For a client error, what is wrong, naming the field; for a server error, nothing internal.
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: ErrorDetail { kind: self.kind, message: self.message } };
        let mut response = (self.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(s) = self.retry_after_s {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        Self::rejected(r.status(), r.body_text())
    }
}

impl From<BytesRejection> for ApiError {
    /// A body that could not be read (over the body limit, cut off).
    fn from(r: BytesRejection) -> Self {
        Self::rejected(r.status(), r.body_text())
    }
}

impl ApiError {
    /// An extractor's rejection in our shape.
    fn rejected(status: StatusCode, message: String) -> Self {
        let kind = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            _ => "invalid_request",
        };
        // 422 (a wrong type or a missing field) is still a malformed request: answer 400.
        let status = if status == StatusCode::UNPROCESSABLE_ENTITY { StatusCode::BAD_REQUEST } else { status };
        Self::new(status, kind, message)
    }
}

/// `axum::Json`, with rejections in our error shape, for a body that must be a JSON object.
///
/// serde's derived structs also accept a list of their fields in order, so without the check
/// `["support", "hi"]` would create a session (and `["ok"]` answer an escalation).
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let axum::Json(raw) = axum::Json::<Box<RawValue>>::from_request(req, state).await?;
        if !raw.get().trim_start().starts_with('{') {
            return Err(ApiError::invalid("body: must be a JSON object"));
        }
        let axum::Json(value) = axum::Json::<T>::from_bytes(raw.get().as_bytes())?;
        Ok(Self(value))
    }
}
