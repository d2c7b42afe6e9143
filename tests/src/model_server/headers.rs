//! Header checks, validation rules 1 and 2: the API key and `anthropic-version`.
//!
//! The key may come as `x-api-key: K` or as `Authorization: Bearer K`, the two styles clients use.

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;

use super::error::ApiError;

/// The `anthropic-version` values the server accepts.
pub const SUPPORTED_VERSIONS: [&str; 2] = ["2023-06-01", "2026-10-21"];

/// Rule 1 then rule 2; `expected_key` of `None` accepts any non-empty key.
pub(crate) fn check(headers: &HeaderMap, expected_key: Option<&str>) -> Result<(), ApiError> {
    check_key(headers, expected_key)?;
    check_version(headers)
}

/// Rule 1: a non-empty key, equal to the configured one when there is one.
fn check_key(headers: &HeaderMap, expected_key: Option<&str>) -> Result<(), ApiError> {
    let key = presented_key(headers).ok_or_else(|| ApiError::auth("x-api-key header is required"))?;
    match expected_key {
        Some(expected) if expected != key => Err(ApiError::auth("invalid x-api-key")),
        _ => Ok(()),
    }
}

/// The first non-empty key among `x-api-key` and `Authorization: Bearer`.
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let x_api_key = header_str(headers, "x-api-key");
    let bearer = header_str(headers, AUTHORIZATION.as_str()).and_then(|v| v.strip_prefix("Bearer "));
    [x_api_key, bearer].into_iter().flatten().map(str::trim).find(|key| !key.is_empty())
}

/// Rule 2: `anthropic-version` is present and one the server knows.
fn check_version(headers: &HeaderMap) -> Result<(), ApiError> {
    match header_str(headers, "anthropic-version") {
        None => Err(ApiError::invalid("anthropic-version: header is required")),
        Some(version) if SUPPORTED_VERSIONS.contains(&version) => Ok(()),
        Some(version) => Err(ApiError::invalid(format!(
            "anthropic-version: invalid version '{version}'; supported: {}",
            SUPPORTED_VERSIONS.join(", ")
        ))),
    }
}

/// A header's value when it is present and valid text.
fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model_server::error::ErrorKind;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().expect("header value"));
        }
        map
    }

    fn error_of(pairs: &[(&'static str, &'static str)], key: Option<&str>) -> ApiError {
        check(&headers(pairs), key).expect_err("should be rejected")
    }

    #[test]
    fn accepts_x_api_key_and_bearer() {
        let version = ("anthropic-version", "2023-06-01");
        assert!(check(&headers(&[("x-api-key", "k"), version]), Some("k")).is_ok());
        assert!(check(&headers(&[("authorization", "Bearer k"), version]), Some("k")).is_ok());
        assert!(check(&headers(&[("x-api-key", "any"), version]), None).is_ok());
    }

    #[test]
    fn missing_or_empty_key_is_401() {
        let missing = error_of(&[("anthropic-version", "2023-06-01")], None);
        assert_eq!(missing.kind, ErrorKind::Authentication);
        assert_eq!(missing.message, "x-api-key header is required");
        let empty = error_of(&[("x-api-key", ""), ("anthropic-version", "2023-06-01")], None);
        assert_eq!(empty.message, "x-api-key header is required");
        let basic = error_of(&[("authorization", "Basic abc"), ("anthropic-version", "2023-06-01")], None);
        assert_eq!(basic.kind, ErrorKind::Authentication);
    }

    #[test]
    fn wrong_key_is_401() {
        let wrong = error_of(&[("x-api-key", "nope"), ("anthropic-version", "2023-06-01")], Some("k"));
        assert_eq!(wrong.kind, ErrorKind::Authentication);
        assert_eq!(wrong.message, "invalid x-api-key");
    }

    #[test]
    fn auth_is_checked_before_version() {
        assert_eq!(error_of(&[], None).kind, ErrorKind::Authentication);
    }

    #[test]
    fn version_is_required_and_known() {
        let missing = error_of(&[("x-api-key", "k")], None);
        assert_eq!(missing.kind, ErrorKind::InvalidRequest);
        let unknown = error_of(&[("x-api-key", "k"), ("anthropic-version", "2024-01-01")], None);
        assert!(unknown.message.contains("2024-01-01"));
        assert!(check(&headers(&[("x-api-key", "k"), ("anthropic-version", "2026-10-21")]), None).is_ok());
    }
}
