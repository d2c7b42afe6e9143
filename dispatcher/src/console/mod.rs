//! The operator console at `/console`: sessions, a session's timeline, the inbox of escalations
//! and approvals, and the fleet, for people.
//!
//! Each page is one small server-rendered shell (the caller's name and tenant, the navigation,
//! the CSRF token) and `app.js`, which reads the same `/v1` API that every client uses, with the
//! console's session cookie instead of a bearer token, and follows the event streams for live
//! updates. There is nothing to build: the script and the stylesheet are in this folder, served
//! as they are.
//!
//! Sign-in takes an API token and stores, in Redis, a console session: the token's hash (never
//! the token) and a CSRF token, under a random 256-bit id that goes to the browser in an
//! `HttpOnly`, `SameSite=Strict` cookie (and `Secure` behind TLS). It lasts [`SESSION_TTL_S`] or
//! until sign-out. A request with the cookie acts as that token: same roles, same tenant; any
//! request but a GET must repeat the CSRF token in `X-CSRF-Token` (the API) or a `csrf` form
//! field (sign-out). A token removed from the config ends its console sessions.

use axum::Form;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, LOCATION, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use redis::AsyncCommands as _;
use serde::Deserialize;
use subtle::ConstantTimeEq as _;

use crate::AppState;
use crate::auth::{COOKIE_NAME, caller_of, cookie, hash_of, session_key as key, signed_in};

/// How long a console session lasts.
const SESSION_TTL_S: u64 = 12 * 3600;

const APP_JS: &str = include_str!("app.js");
const APP_CSS: &str = include_str!("app.css");

/// The console's routes.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/console", get(|| async { see_other("/console/sessions") }))
        .route("/console/", get(|| async { see_other("/console/sessions") }))
        .route("/console/login", get(login_page).post(login))
        .route("/console/logout", post(logout))
        .route("/console/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/console/app.css", get(|| async { asset("text/css; charset=utf-8", APP_CSS) }))
        .route("/console/sessions", get(|s, h| page(s, h, "sessions", String::new())))
        .route("/console/sessions/{id}", get(session_page))
        .route("/console/inbox", get(|s, h| page(s, h, "inbox", String::new())))
        .route("/console/fleet", get(|s, h| page(s, h, "fleet", String::new())))
}

fn see_other(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(LOCATION, to.to_owned())]).into_response()
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(CONTENT_TYPE, content_type), (CACHE_CONTROL, "no-cache")], body).into_response()
}

/// Headers of every page: no framing, scripts and styles from this origin only.
fn page_headers() -> [(axum::http::HeaderName, HeaderValue); 4] {
    [
        (CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8")),
        (CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (
            axum::http::header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
            ),
        ),
        (axum::http::header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
    ]
}

/// Escapes text for HTML.
fn esc(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

async fn login_page() -> Response {
    login_form(StatusCode::OK, "")
}

fn login_form(status: StatusCode, error: &str) -> Response {
    let error = if error.is_empty() {
        String::new()
    } else {
        format!(r#"<p class="error" id="login-error">{}</p>"#, esc(error))
    };
    let body = format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sign in · agentfleet</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="stylesheet" href="/console/app.css"></head>
<body class="login"><main><h1>agentfleet</h1>
<form method="post" action="/console/login" id="login">
<label for="token">API token</label>
<input type="password" id="token" name="token" autocomplete="current-password" required autofocus>
<button type="submit">Sign in</button>{error}
<p class="hint">The console acts as the token: its roles, its tenant.</p>
</form></main></body></html>"#
    );
    (status, page_headers(), body).into_response()
}

#[derive(Deserialize)]
struct Login {
    token: String,
}

/// Whether a form POST came from another site: browsers say so in `Sec-Fetch-Site`, or in an
/// `Origin` that is not this host's.
fn cross_site(headers: &HeaderMap) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = header("sec-fetch-site") {
        return !matches!(site, "same-origin" | "none");
    }
    match (header("origin"), header("host")) {
        (Some(origin), Some(host)) => origin.split_once("://").is_none_or(|(_, h)| h != host),
        _ => false,
    }
}

/// Whether the request came over TLS (at a proxy that says so): the cookie is then `Secure`.
fn over_tls(headers: &HeaderMap) -> bool {
    headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).is_some_and(|p| p.eq_ignore_ascii_case("https"))
}

async fn login(State(s): State<AppState>, headers: HeaderMap, form: Form<Login>) -> Response {
    if cross_site(&headers) {
        return login_form(StatusCode::FORBIDDEN, "Sign in from the console's own page.");
    }
    let token = form.token.trim();
    let Some(caller) = caller_of(&s, token) else {
        return login_form(StatusCode::UNAUTHORIZED, "Unknown token.");
    };
    let sid = hex::encode(rand::random::<[u8; 32]>());
    let csrf = hex::encode(rand::random::<[u8; 32]>());
    let stored: redis::RedisResult<()> = redis::pipe()
        .hset_multiple(key(&s, &sid), &[("token", hex::encode(hash_of(token))), ("csrf", csrf)])
        .ignore()
        .expire(key(&s, &sid), SESSION_TTL_S as i64)
        .ignore()
        .query_async(&mut s.redis.clone())
        .await;
    if let Err(e) = stored {
        tracing::warn!(error = %e, "console sign-in: cannot store the session");
        return login_form(StatusCode::SERVICE_UNAVAILABLE, "The console cannot reach Redis; try again.");
    }
    tracing::info!(token = %caller.name, tenant = %caller.tenant, "console sign-in");
    let secure = if over_tls(&headers) { "; Secure" } else { "" };
    let cookie = format!("{COOKIE_NAME}={sid}; Path=/; HttpOnly; SameSite=Strict; Max-Age={SESSION_TTL_S}{secure}");
    (StatusCode::SEE_OTHER, [(LOCATION, "/console/sessions".to_owned()), (SET_COOKIE, cookie)]).into_response()
}

#[derive(Deserialize)]
struct Logout {
    csrf: String,
}

async fn logout(State(s): State<AppState>, headers: HeaderMap, form: Form<Logout>) -> Response {
    if let Some(sid) = cookie(&headers)
        && let Ok(Some(signed)) = signed_in(&s, sid).await
        && bool::from(form.csrf.as_bytes().ct_eq(signed.csrf.as_bytes()))
    {
        let _: redis::RedisResult<()> = s.redis.clone().del(key(&s, sid)).await;
    }
    let clear = format!("{COOKIE_NAME}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    (StatusCode::SEE_OTHER, [(LOCATION, "/console/login".to_owned()), (SET_COOKIE, clear)]).into_response()
}

async fn session_page(s: State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    match agentfleet::domain::SessionId::parse(&id) {
        Ok(id) => page(s, headers, "session", id.to_string()).await,
        Err(_) => see_other("/console/sessions"),
    }
}

/// A page's shell for the signed-in caller; the sign-in page for anyone else.
async fn page(State(s): State<AppState>, headers: HeaderMap, name: &'static str, id: String) -> Response {
    let signed = match cookie(&headers) {
        Some(sid) => signed_in(&s, sid).await,
        None => Ok(None),
    };
    let signed = match signed {
        Ok(Some(signed)) => signed,
        Ok(None) => return see_other("/console/login"),
        Err(e) => return e.into_response(),
    };
    let c = &signed.caller;
    let admin = if c.is_admin() { " (admin: every tenant)" } else { "" };
    let nav = [("sessions", "Sessions"), ("inbox", "Inbox"), ("fleet", "Fleet")]
        .iter()
        .map(|(p, label)| {
            let current =
                if *p == name || (*p == "sessions" && name == "session") { r#" aria-current="page""# } else { "" };
            format!(r#"<a href="/console/{p}"{current}>{label}</a>"#)
        })
        .collect::<String>();
    let body = format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>agentfleet console</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf-token" content="{csrf}"><link rel="stylesheet" href="/console/app.css"></head>
<body><header><a class="brand" href="/console/sessions">agentfleet</a><nav>{nav}</nav>
<span class="who" id="who">{name_} · tenant <b id="tenant">{tenant}</b>{admin}</span>
<form method="post" action="/console/logout"><input type="hidden" name="csrf" value="{csrf}"><button type="submit" id="sign-out">Sign out</button></form></header>
<main id="app" data-page="{page}" data-id="{id}"><p class="muted">Loading…</p></main>
<script src="/console/app.js"></script></body></html>"#,
        csrf = esc(&signed.csrf),
        name_ = esc(c.name.as_str()),
        tenant = esc(c.tenant.as_str()),
        page = name,
        id = esc(&id),
    );
    (StatusCode::OK, page_headers(), body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::header::COOKIE;

    #[test]
    fn the_cookie_is_found_among_others_and_must_look_like_an_id() {
        let id = "ab".repeat(32);
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_str(&format!("a=1; {COOKIE_NAME}={id}; b=2")).expect("header"));
        assert_eq!(cookie(&h), Some(id.as_str()));
        h.insert(COOKIE, HeaderValue::from_static("agentfleet_console=short"));
        assert_eq!(cookie(&h), None);
        assert_eq!(cookie(&HeaderMap::new()), None);
    }

    #[test]
    fn cross_site_posts_are_told_apart() {
        let with = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            cross_site(&h)
        };
        assert!(!with(&[("sec-fetch-site", "same-origin")]));
        assert!(with(&[("sec-fetch-site", "cross-site")]));
        assert!(!with(&[("origin", "http://fleet:8080"), ("host", "fleet:8080")]));
        assert!(with(&[("origin", "http://evil.example"), ("host", "fleet:8080")]));
        assert!(!with(&[]));
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(esc(r#"<a href="x">'&'</a>"#), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
    }
}
