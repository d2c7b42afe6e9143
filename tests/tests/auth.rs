//! Authentication, roles, tenants and per-tenant limits of the HTTP API, against a real fleet.

use agentfleet_tests::fleet::{FleetOptions, TestFleet, TestToken, client_with_token};
use anyhow::Context;
use serde_json::{Value, json};

/// Every API route: method, path (`{id}` is a session), the role it needs, and a body.
const ROUTES: &[(&str, &str, &str, Option<&str>)] = &[
    ("POST", "/v1/sessions", "submit", Some(r#"{"agent":"support","input":"hello"}"#)),
    ("GET", "/v1/sessions", "read", None),
    ("GET", "/v1/sessions/{id}", "read", None),
    ("GET", "/v1/sessions/{id}/trace", "read", None),
    ("POST", "/v1/sessions/{id}/reply", "operate", Some(r#"{"text":"hi"}"#)),
    ("POST", "/v1/sessions/{id}/approve", "approve", Some("{}")),
    ("POST", "/v1/sessions/{id}/reject", "approve", Some(r#"{"reason":"no"}"#)),
    ("GET", "/v1/escalations", "operate", None),
    ("POST", "/v1/sessions/{id}/cancel", "operate", None),
    ("GET", "/v1/dlq", "operate", None),
];

/// What a caller gets: no credential at all, a refused role, a hidden session, or through.
#[derive(Debug, PartialEq, Clone, Copy)]
enum Expect {
    Unauthorized,
    Forbidden,
    NotFound,
    Through,
}

fn tokens() -> Vec<TestToken> {
    vec![
        TestToken::new("acme-submit", "acme", &["submit"]),
        TestToken::new("acme-read", "acme", &["read"]),
        TestToken::new("acme-operate", "acme", &["operate"]),
        TestToken::new("acme-approve", "acme", &["approve"]),
        TestToken::new("acme-admin", "acme", &["admin"]),
        TestToken::new("beta-all", "beta", &["submit", "read", "operate", "approve"]),
    ]
}

async fn start(extra: &str, more: Vec<TestToken>) -> anyhow::Result<TestFleet> {
    let mut all = tokens();
    all.extend(more);
    let opts = FleetOptions { workers: 0, tokens: all, extra_config: extra.into(), ..Default::default() };
    TestFleet::start(opts).await
}

async fn create(fleet: &TestFleet, token: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
    let r = fleet.client(token).post(format!("{}/v1/sessions", fleet.api)).json(body).send().await?;
    Ok((r.status().as_u16(), r.json().await?))
}

async fn session_of(fleet: &TestFleet, token: &str) -> anyhow::Result<String> {
    let (status, v) = create(fleet, token, &json!({"agent": "support", "input": "hello"})).await?;
    anyhow::ensure!(status == 202, "create answered {status}: {v}");
    Ok(v["id"].as_str().context("id")?.to_owned())
}

/// The expected answer of `role` (a token's roles) on a route needing `needs`, for its own tenant's
/// session or another's.
fn expected(roles: &[&str], needs: &str, path: &str, own: bool) -> Expect {
    let admin = roles.contains(&"admin");
    if !admin && !roles.contains(&needs) {
        return Expect::Forbidden;
    }
    if !own && !admin && path.contains("{id}") {
        return Expect::NotFound;
    }
    if !own && !admin {
        return Expect::Forbidden; // naming another tenant in a create or a list
    }
    Expect::Through
}

fn classify(status: u16) -> Expect {
    match status {
        401 => Expect::Unauthorized,
        403 => Expect::Forbidden,
        404 => Expect::NotFound,
        _ => Expect::Through,
    }
}

async fn send(
    http: &reqwest::Client,
    fleet: &TestFleet,
    (method, path, _, body): (&str, &str, &str, Option<&str>),
    id: &str,
    other_tenant: Option<&str>,
) -> anyhow::Result<reqwest::Response> {
    let mut url = format!("{}{}", fleet.api, path.replace("{id}", id));
    let mut body: Option<Value> = body.map(serde_json::from_str).transpose()?;
    if let Some(t) = other_tenant {
        match (method, path) {
            ("POST", "/v1/sessions") => body.as_mut().map(|b| b["tenant"] = json!(t)).unwrap_or_default(),
            (_, p) if !p.contains("{id}") => url += &format!("?tenant={t}"),
            _ => {}
        }
    }
    let mut req = http.request(method.parse()?, url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    Ok(req.send().await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_by_token_role_and_tenant() -> anyhow::Result<()> {
    let fleet = start("", vec![]).await?;
    let mut failures = Vec::new();
    // No token, a malformed header, an unknown token: 401 with WWW-Authenticate everywhere.
    let id = session_of(&fleet, "acme-submit").await?;
    let anonymous = [
        ("no token", reqwest::Client::new()),
        ("wrong token", client_with_token("not-a-token")),
        ("basic auth", {
            let mut h = reqwest::header::HeaderMap::new();
            h.insert(reqwest::header::AUTHORIZATION, "Basic dXNlcjpwdw==".parse()?);
            reqwest::Client::builder().default_headers(h).build()?
        }),
    ];
    for (who, http) in &anonymous {
        for route in ROUTES {
            let r = send(http, &fleet, *route, &id, None).await?;
            let challenge = r.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).map(str::to_owned);
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or_default();
            if status != 401 || challenge.as_deref() != Some("Bearer") || body["error"]["type"] != "unauthorized" {
                failures.push(format!("{who} {} {}: {status} {challenge:?} {body}", route.0, route.1));
            }
        }
    }
    // Each role, on its own tenant's session and on another tenant's (fresh sessions per token,
    // since a cancel ends one).
    let roles: &[(&str, &[&str])] = &[
        ("acme-submit", &["submit"]),
        ("acme-read", &["read"]),
        ("acme-operate", &["operate"]),
        ("acme-approve", &["approve"]),
        ("acme-admin", &["admin"]),
    ];
    for (token, granted) in roles {
        let own = session_of(&fleet, "acme-submit").await?;
        let other = session_of(&fleet, "beta-all").await?;
        for route in ROUTES {
            for (is_own, id, tenant) in [(true, &own, None), (false, &other, Some("beta"))] {
                let r = send(&fleet.client(token), &fleet, *route, id, tenant).await?;
                let status = r.status().as_u16();
                let want = expected(granted, route.2, route.1, is_own);
                if classify(status) != want {
                    let body = r.text().await.unwrap_or_default();
                    failures
                        .push(format!("{token} own={is_own} {} {}: {status} (want {want:?}) {body}", route.0, route.1));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_only_token_cannot_approve_and_a_missing_role_is_named() -> anyhow::Result<()> {
    let fleet = start("", vec![]).await?;
    let id = session_of(&fleet, "acme-submit").await?;
    let r = fleet.client("acme-submit").post(format!("{}/v1/sessions/{id}/approve", fleet.api)).send().await?;
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await?;
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("`approve`")), "{body}");
    let r = fleet.client("acme-submit").get(format!("{}/v1/sessions/{id}", fleet.api)).send().await?;
    assert_eq!(r.status(), 403);
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_never_sees_another_tenants_sessions() -> anyhow::Result<()> {
    let fleet = start("", vec![]).await?;
    let acme = session_of(&fleet, "acme-submit").await?;
    let beta = session_of(&fleet, "beta-all").await?;
    let beta_client = fleet.client("beta-all");
    let page: Value = beta_client.get(format!("{}/v1/sessions", fleet.api)).send().await?.json().await?;
    let ids: Vec<&str> =
        page["sessions"].as_array().context("sessions")?.iter().filter_map(|s| s["id"].as_str()).collect();
    assert_eq!(ids, [beta.as_str()], "{page}");
    for path in [format!("/v1/sessions/{acme}"), format!("/v1/sessions/{acme}/trace")] {
        let hidden = beta_client.get(format!("{}{path}", fleet.api)).send().await?;
        let hidden_status = hidden.status();
        let hidden_body: Value = hidden.json().await?;
        let missing = beta_client.get(format!("{}/v1/sessions/s_01JD3ZK8Q8YB3Y3C2K9Q2W7X4M", fleet.api)).send().await?;
        assert_eq!((hidden_status.as_u16(), missing.status().as_u16()), (404, 404), "{path}");
        assert_eq!(hidden_body["error"]["type"], "not_found");
    }
    let queue: Value = beta_client.get(format!("{}/v1/escalations", fleet.api)).send().await?.json().await?;
    assert!(queue["escalations"].as_array().is_some_and(|e| e.iter().all(|e| e["tenant"] == "beta")), "{queue}");
    // A session's tenant is its token's; an admin sees every tenant and may filter.
    assert_eq!(fleet.session(&agentfleet::domain::SessionId::parse(&acme)?).await?["tenant"], "acme");
    let all: Value = fleet.http.get(format!("{}/v1/sessions?tenant=acme", fleet.api)).send().await?.json().await?;
    assert_eq!(all["sessions"][0]["id"], acme.as_str());
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_are_per_tenant_and_bound_to_the_body() -> anyhow::Result<()> {
    let fleet = start("", vec![]).await?;
    let body = json!({"agent": "support", "input": "hello", "idempotency_key": "order-1"});
    let (s1, a) = create(&fleet, "acme-submit", &body).await?;
    let (s2, b) = create(&fleet, "beta-all", &body).await?;
    assert_eq!((s1, s2), (202, 202));
    assert_ne!(a["id"], b["id"], "two tenants, one key: two sessions");
    let (s3, again) = create(&fleet, "acme-submit", &body).await?;
    assert_eq!((s3, &again["id"]), (202, &a["id"]), "a replay returns the first session");
    let changed = json!({"agent": "support", "input": "something else", "idempotency_key": "order-1"});
    let (s4, conflict) = create(&fleet, "acme-submit", &changed).await?;
    assert_eq!(s4, 409, "{conflict}");
    assert!(conflict["error"]["message"].as_str().is_some_and(|m| m.contains("different request")), "{conflict}");
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_sessions_per_tenant_and_sessions_per_minute_per_token_are_limited() -> anyhow::Result<()> {
    let mut slow = TestToken::new("slow", "slowco", &["submit"]);
    slow.per_minute = Some(2);
    let tiny = TestToken::new("tiny", "tiny", &["submit", "operate"]);
    let fleet = start("[tenants.tiny]\nmax_live_sessions = 2\n", vec![slow, tiny]).await?;
    let body = json!({"agent": "support", "input": "hello"});
    let first = session_of(&fleet, "tiny").await?;
    session_of(&fleet, "tiny").await?;
    let (status, refused) = create(&fleet, "tiny", &body).await?;
    assert_eq!(status, 429, "{refused}");
    assert!(refused["error"]["message"].as_str().is_some_and(|m| m.contains("max_live_sessions")), "{refused}");
    // A session that ends leaves the count.
    let r = fleet.client("tiny").post(format!("{}/v1/sessions/{first}/cancel", fleet.api)).send().await?;
    assert_eq!(r.status(), 202);
    session_of(&fleet, "tiny").await?;

    // Five requests at 2 per minute: some are refused, with Retry-After, whatever the minute.
    let mut limited = None;
    for _ in 0..5 {
        let r = fleet.client("slow").post(format!("{}/v1/sessions", fleet.api)).json(&body).send().await?;
        if r.status() == 429 {
            let retry = r.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            limited = Some((retry, r.json::<Value>().await?));
        }
    }
    let (retry, refused) = limited.context("no request was rate limited")?;
    assert!(retry.is_some_and(|s| (1..=60).contains(&s)), "Retry-After: {retry:?}");
    assert!(refused["error"]["message"].as_str().is_some_and(|m| m.contains("sessions_per_minute")), "{refused}");
    fleet.cleanup().await
}
