//! The OpenAI error shape: `{"error":{"message","type","param","code"}}` with the matching status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// One error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    pub(crate) code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error`.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), code: None }
    }

    /// A 400 whose message is `path: what`.
    pub(crate) fn at(path: &str, what: impl std::fmt::Display) -> Self {
        Self::invalid(format!("{path}: {what}"))
    }

    /// A 401 for a missing or wrong key.
    pub(crate) fn unauthorized() -> Self {
        let message = "Incorrect API key provided.".to_owned();
        Self { status: StatusCode::UNAUTHORIZED, message, code: Some("invalid_api_key") }
    }

    /// A 404 for an unknown route.
    pub(crate) fn not_found() -> Self {
        Self { status: StatusCode::NOT_FOUND, message: "Not found".to_owned(), code: Some("not_found") }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<()>,
    code: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let detail =
            ErrorDetail { message: &self.message, kind: "invalid_request_error", param: None, code: self.code };
        (self.status, axum::Json(ErrorBody { error: detail })).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn body_has_the_openai_shape() {
        let response = ApiError::at("messages", "required").into_response();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16).await.expect("body");
        let expected =
            r#"{"error":{"message":"messages: required","type":"invalid_request_error","param":null,"code":null}}"#;
        assert_eq!(std::str::from_utf8(&bytes).expect("utf8"), expected);
    }
}
