//! Who is calling: `Authorization: Bearer <token>` checked against the configured tokens' SHA-256
//! hashes, and what that caller may do and see.
//!
//! Secure by default: no token, a malformed header or an unknown token is 401, and with no tokens
//! configured every API route answers 401. The token is hashed and compared with every configured
//! hash in constant time, with no early exit, so timing does not tell how close a guess was.
//!
//! A caller sees only its own tenant's sessions: another tenant's session answers 404 exactly like
//! a missing one. An `admin` token has every role and sees every tenant.
//!
//! A request without an `Authorization` header may instead carry the console's session cookie
//! (see the `console` module): the caller is then the token that signed in, and any request but a
//! GET must carry the session's CSRF token in `X-CSRF-Token`.

use agentfleet::config::{Role, TokenConfig};
use agentfleet::domain::{Name, TenantId};
use agentfleet::store::Meta;
use axum::extract::FromRequestParts;
use axum::http::header::{AUTHORIZATION, COOKIE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::error::ApiError;

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    /// The token's name.
    pub(crate) name: Name,
    /// The token's tenant.
    pub(crate) tenant: TenantId,
    roles: Vec<Role>,
    /// Sessions this token may create per minute.
    pub(crate) per_minute: u32,
}

impl Caller {
    fn of(token: &TokenConfig, per_minute: u32) -> Self {
        let tenant = TenantId::parse(token.tenant.as_str()).unwrap_or_else(|_| unreachable!("a Name is a tenant id"));
        Self { name: token.name.clone(), tenant, roles: token.roles.clone(), per_minute }
    }

    /// True for an `admin` token.
    pub(crate) fn is_admin(&self) -> bool {
        self.roles.contains(&Role::Admin)
    }

    /// 403 unless the token has `role` (or is an admin).
    pub(crate) fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.is_admin() || self.roles.contains(&role) {
            return Ok(());
        }
        Err(ApiError::forbidden(format!("this token (`{}`) lacks the `{}` role", self.name, role.as_str())))
    }

    /// True when the caller may see a session of `tenant`.
    pub(crate) fn sees(&self, meta: &Meta) -> bool {
        self.is_admin() || meta.tenant.as_ref() == Some(&self.tenant)
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, Self::Rejection> {
        if !parts.headers.contains_key(AUTHORIZATION)
            && let Some(sid) = cookie(&parts.headers)
        {
            return console_caller(parts, s, sid).await;
        }
        let presented = bearer(parts)?;
        if s.cfg.auth.tokens.is_empty() {
            return Err(ApiError::unauthorized(
                "no API tokens are configured on this dispatcher, so every request is refused (see [[auth.tokens]])",
            ));
        }
        caller_of(s, presented).ok_or_else(|| ApiError::unauthorized("unknown bearer token"))
    }
}

/// The name of the console's session cookie.
pub(crate) const COOKIE_NAME: &str = "agentfleet_console";

/// The console session id a request's cookie carries, if any.
pub(crate) fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value)
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A signed-in console session.
pub(crate) struct Signed {
    pub(crate) caller: Caller,
    pub(crate) csrf: String,
}

pub(crate) fn session_key(s: &AppState, sid: &str) -> String {
    format!("{}:console:{{{sid}}}", s.cfg.redis.key_prefix)
}

/// The console session `sid`, if it exists and its token is still configured.
pub(crate) async fn signed_in(s: &AppState, sid: &str) -> Result<Option<Signed>, ApiError> {
    let (token, csrf): (Option<String>, Option<String>) = redis::cmd("HMGET")
        .arg(session_key(s, sid))
        .arg("token")
        .arg("csrf")
        .query_async(&mut s.redis.clone())
        .await
        .map_err(|e| ApiError::unavailable(&e))?;
    let (Some(token), Some(csrf)) = (token, csrf) else { return Ok(None) };
    let hash = hex::decode(token).unwrap_or_default();
    Ok(caller_by_hash(s, &hash).map(|caller| Signed { caller, csrf }))
}

/// The caller of a request that carries the console's cookie (and no bearer token): 401 when the
/// session is gone, 403 for a request other than GET without the session's CSRF token.
async fn console_caller(parts: &Parts, s: &AppState, sid: &str) -> Result<Caller, ApiError> {
    let signed = signed_in(s, sid)
        .await?
        .ok_or_else(|| ApiError::unauthorized("the console session has ended: sign in again at /console/login"))?;
    if !matches!(parts.method, Method::GET | Method::HEAD) {
        let sent = parts.headers.get("x-csrf-token").and_then(|v| v.to_str().ok()).unwrap_or("");
        if !bool::from(sent.as_bytes().ct_eq(signed.csrf.as_bytes())) {
            return Err(ApiError::forbidden("missing or wrong X-CSRF-Token: the console's requests carry its token"));
        }
    }
    Ok(signed.caller)
}

/// The caller of the configured token `presented` is, if any.
pub(crate) fn caller_of(s: &AppState, presented: &str) -> Option<Caller> {
    let token = find(&s.cfg.auth.tokens, presented)?;
    Some(Caller::of(token, s.cfg.auth.rate_of(token)))
}

/// The caller of the configured token whose SHA-256 is `hash`, if it is still configured.
pub(crate) fn caller_by_hash(s: &AppState, hash: &[u8]) -> Option<Caller> {
    let token = s.cfg.auth.tokens.iter().find(|t| bool::from(t.hash.as_slice().ct_eq(hash)))?;
    Some(Caller::of(token, s.cfg.auth.rate_of(token)))
}

/// The SHA-256 of a presented token, as configured tokens are kept.
pub(crate) fn hash_of(presented: &str) -> [u8; 32] {
    Sha256::digest(presented.as_bytes()).into()
}

/// The token of `Authorization: Bearer <token>`.
fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let header = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
        ApiError::unauthorized("missing the `Authorization: Bearer <token>` header: every API route needs a token")
    })?;
    let malformed = || ApiError::unauthorized("malformed `Authorization` header: expected `Bearer <token>`");
    let value = header.to_str().map_err(|_| malformed())?;
    let (scheme, token) = value.split_once(' ').ok_or_else(malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(malformed());
    }
    Ok(token)
}

/// The configured token whose hash is the presented token's: every hash is compared, in constant
/// time, whatever matches first.
fn find<'a>(tokens: &'a [TokenConfig], presented: &str) -> Option<&'a TokenConfig> {
    let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    let mut found = None;
    for token in tokens {
        if bool::from(token.hash.ct_eq(&hash)) {
            found = found.or(Some(token));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(name: &str, secret: &str) -> TokenConfig {
        let text = format!(
            "name = \"{name}\"\ntenant = \"acme\"\nroles = [\"read\"]\nsha256 = \"{}\"",
            hex::encode(Sha256::digest(secret.as_bytes()))
        );
        let mut t: TokenConfig = toml::from_str(&text).expect("token");
        let hash = hex::decode(t.sha256.as_deref().unwrap_or_default()).expect("hex");
        t.hash.copy_from_slice(&hash);
        t
    }

    #[test]
    fn a_token_is_found_by_its_hash_only() {
        let tokens = [token("a", "secret-a"), token("b", "secret-b")];
        assert_eq!(find(&tokens, "secret-b").map(|t| t.name.as_str()), Some("b"));
        assert!(find(&tokens, "secret-c").is_none());
        assert!(find(&tokens, "").is_none());
    }
}
