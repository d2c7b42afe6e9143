//! The operator console in real headless Chromium (Debian's `chromium` driven through
//! `chromedriver`), against a real fleet: sign in, watch a running session's step count change
//! without a reload, approve a refund from the inbox and see the session complete, fork a finished
//! session from step 2 and see the fork run, and sign in as another tenant and find none of the
//! first tenant's sessions. Screenshots go to `target/console/`.
//!
//! Also, without a browser: the cookie's flags, and that a request with the cookie but without
//! the CSRF token is refused.

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use agentfleet::domain::SessionId;
use agentfleet_tests::fleet::{FleetOptions, TestFleet, TestToken, client_with_token, token_secret};
use agentfleet_tests::model_server::Faults;
use anyhow::{Context as _, Result, bail, ensure};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// How long any one thing may take to show in the browser.
const SHOWS: Duration = Duration::from_secs(30);

/// `chromedriver` on a free port, killed on drop.
struct Driver {
    url: String,
    _child: Child,
}

impl Driver {
    async fn start() -> Result<Self> {
        let port = StdListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context(
                "starting chromedriver (Debian: apt-get install chromium chromium-driver; scripts/test.sh does)",
            )?;
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = reqwest::get(format!("{url}/status")).await
                && r.status().is_success()
            {
                return Ok(Self { url, _child: child });
            }
            ensure!(Instant::now() < deadline, "chromedriver did not answer on {url} within 20 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A fresh headless browser (its own profile: no cookies).
    async fn browser(&self) -> Result<Client> {
        let mut caps = serde_json::Map::new();
        let args =
            ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"];
        caps.insert("goog:chromeOptions".into(), json!({ "args": args }));
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        Ok(ClientBuilder::new(connector).capabilities(caps).connect(&self.url).await?)
    }
}

fn shots() -> Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

async fn screenshot(b: &Client, name: &str) -> Result<()> {
    let png = b.screenshot().await?;
    std::fs::write(shots()?.join(format!("{name}.png")), png)?;
    Ok(())
}

/// Polls `f` until it gives `Some`, up to [`SHOWS`].
async fn until<T, F, Fut>(what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + SHOWS;
    let mut last = String::new();
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            bail!("{what}: not within {SHOWS:?} {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The text of the element `css`, if there is one.
async fn text(b: &Client, css: &str) -> Result<Option<String>> {
    match b.find(Locator::Css(css)).await {
        Ok(e) => Ok(Some(e.text().await?)),
        Err(e) if e.is_no_such_element() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn sign_in(b: &Client, api: &str, token: &str) -> Result<()> {
    b.goto(&format!("{api}/console/sessions")).await?;
    // Signed out: the console sends people to its sign-in page.
    until("the sign-in page", || async { Ok(b.current_url().await?.path().ends_with("/console/login").then_some(())) })
        .await?;
    b.find(Locator::Css("#token")).await?.send_keys(token).await?;
    b.find(Locator::Css("#login button[type=submit]")).await?.click().await?;
    until("the sessions page after sign-in", || async {
        Ok(b.current_url().await?.path().ends_with("/console/sessions").then_some(()))
    })
    .await
}

async fn submit(fleet: &TestFleet, client: &reqwest::Client, input: &str) -> Result<SessionId> {
    let body = json!({ "agent": "support", "input": input });
    let r = client.post(format!("{}/v1/sessions", fleet.api)).json(&body).send().await?;
    ensure!(r.status() == 202, "POST /v1/sessions: {}", r.status());
    let v: Value = r.json().await?;
    Ok(SessionId::parse(v["id"].as_str().context("id")?)?)
}

fn tokens() -> Vec<TestToken> {
    vec![
        TestToken::new("acme-ops", "acme", &["submit", "read", "operate", "approve"]),
        TestToken::new("globex-ops", "globex", &["submit", "read", "operate", "approve"]),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_works_the_fleet_from_the_console() -> Result<()> {
    let fleet = TestFleet::start(FleetOptions { workers: 2, tokens: tokens(), ..FleetOptions::default() }).await?;
    // Slow enough to watch a session's steps go by.
    fleet.model.set_faults(Faults { latency_ms: 400, ..Faults::default() });
    let acme = client_with_token(&token_secret("acme-ops"));
    let driver = Driver::start().await?;
    let b = driver.browser().await?;
    let run = async {
        sign_in(&b, &fleet.api, &token_secret("acme-ops")).await?;
        ensure!(text(&b, "#tenant").await?.as_deref() == Some("acme"), "signed in as acme");

        // A running session's step count changes on its page, live: the page is never reloaded
        // (a marker set in the window survives).
        let running = submit(&fleet, &acme, "[steps=8] watch me run").await?;
        b.goto(&format!("{}/console/sessions/{running}", fleet.api)).await?;
        let first: u64 =
            until("the step count", || async { Ok(text(&b, "#step").await?.and_then(|t| t.parse().ok())) }).await?;
        b.execute("window.stillHere = true;", vec![]).await?;
        let later: u64 = until("a later step without a reload", || async {
            Ok(text(&b, "#step").await?.and_then(|t| t.parse::<u64>().ok()).filter(|s| *s > first))
        })
        .await?;
        ensure!(b.execute("return window.stillHere === true;", vec![]).await? == json!(true), "the page reloaded");
        let shown = text(&b, "#app").await?.unwrap_or_default();
        ensure!(
            !shown.lines().any(|l| matches!(l.trim(), "null" | "undefined")),
            "a missing part is shown as text: {shown}"
        );
        screenshot(&b, "session-live").await?;
        println!("step {first} then {later} on the live page");

        // A refund over the limit waits in the inbox; it is approved there, and the session completes.
        let refund = submit(&fleet, &acme, "[refund=150] refund me").await?;
        fleet.wait_status(&refund, "awaiting_approval").await?;
        b.goto(&format!("{}/console/inbox", fleet.api)).await?;
        let item = format!("li.item[data-id='{refund}']");
        until("the refund in the inbox", || async { text(&b, &item).await }).await?;
        screenshot(&b, "inbox").await?;
        b.find(Locator::Css(&format!("{item} button.approve"))).await?.click().await?;
        fleet.wait_status(&refund, "completed").await?;
        b.goto(&format!("{}/console/sessions/{refund}", fleet.api)).await?;
        until("the approved session completed", || async {
            Ok((b.find(Locator::Css("#app")).await?.attr("data-status").await?.as_deref() == Some("completed"))
                .then_some(()))
        })
        .await?;

        // Fork a finished session from step 2: the console goes to the fork, which runs.
        fleet.wait_settled(std::slice::from_ref(&running), Duration::from_secs(60)).await?;
        b.goto(&format!("{}/console/sessions/{running}", fleet.api)).await?;
        let button = "li.step[data-step='2'] button.fork";
        until("the fork button of step 2", || async { text(&b, button).await }).await?;
        b.find(Locator::Css(button)).await?.click().await?;
        let fork = until("the fork's page", || async {
            let path = b.current_url().await?.path().to_owned();
            Ok(path.strip_prefix("/console/sessions/").filter(|id| *id != running.as_str()).map(str::to_owned))
        })
        .await?;
        let origin = until("the fork's origin", || async { text(&b, "#origin").await }).await?;
        ensure!(origin.contains(running.as_str()) && origin.contains("step 2"), "{origin}");
        until("the fork completed", || async {
            Ok((b.find(Locator::Css("#app")).await?.attr("data-status").await?.as_deref() == Some("completed"))
                .then_some(()))
        })
        .await?;
        screenshot(&b, "fork").await?;
        let forked = fleet.session(&SessionId::parse(&fork)?).await?;
        ensure!(forked["forked_from"]["step"] == 2 && forked["status"] == "completed", "{forked}");

        b.goto(&format!("{}/console/sessions", fleet.api)).await?;
        until("the sessions list", || async { text(&b, &format!("tr[data-id='{running}']")).await }).await?;
        screenshot(&b, "sessions").await?;
        b.goto(&format!("{}/console/fleet", fleet.api)).await?;
        until("the fleet page", || async { text(&b, "#workers").await }).await?;
        screenshot(&b, "fleet").await?;

        // Signed out, then in as another tenant: none of acme's sessions, in the list or by id.
        b.find(Locator::Css("#sign-out")).await?.click().await?;
        until("the sign-in page after sign-out", || async {
            Ok(b.current_url().await?.path().ends_with("/console/login").then_some(()))
        })
        .await?;
        sign_in(&b, &fleet.api, &token_secret("globex-ops")).await?;
        ensure!(text(&b, "#tenant").await?.as_deref() == Some("globex"), "signed in as globex");
        until("globex's empty list", || async {
            Ok(text(&b, "#sessions").await?.filter(|t| t.contains("No sessions")))
        })
        .await?;
        let page = b.source().await?;
        for id in [&running, &refund] {
            ensure!(!page.contains(id.as_str()), "globex sees acme's {id}");
        }
        b.goto(&format!("{}/console/sessions/{running}", fleet.api)).await?;
        let refused = until("the refusal", || async { text(&b, "#flash").await }).await?;
        ensure!(refused.contains("no session"), "{refused}");
        screenshot(&b, "other-tenant").await?;
        anyhow::Ok(())
    };
    let result = run.await;
    if result.is_err() {
        let _ = screenshot(&b, "failure").await;
    }
    b.close().await?;
    result?;
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_cookie_is_strict_and_its_actions_need_the_csrf_token() -> Result<()> {
    let fleet = TestFleet::start(FleetOptions { workers: 0, tokens: tokens(), ..FleetOptions::default() }).await?;
    let id = submit(&fleet, &client_with_token(&token_secret("acme-ops")), "[steps=1] cancel me").await?;
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build()?;
    let login = format!("{}/console/login", fleet.api);

    let wrong = http.post(&login).form(&[("token", "not-a-token")]).send().await?;
    ensure!(wrong.status() == 401, "{}", wrong.status());
    let cross = http.post(&login).header("sec-fetch-site", "cross-site").form(&[("token", token_secret("acme-ops"))]);
    ensure!(cross.send().await?.status() == 403, "a sign-in from another site is refused");
    let ok = http.post(&login).form(&[("token", token_secret("acme-ops"))]).send().await?;
    ensure!(ok.status() == 303, "{}", ok.status());
    let set = ok.headers().get("set-cookie").and_then(|v| v.to_str().ok()).context("no cookie")?.to_owned();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        ensure!(set.contains(flag), "{flag} missing: {set}");
    }
    let cookie = set.split(';').next().context("cookie")?.to_owned();

    // The page carries the CSRF token; the cookie alone reads, and acts only with it.
    let page =
        http.get(format!("{}/console/sessions", fleet.api)).header("cookie", &cookie).send().await?.text().await?;
    let csrf = page
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .context("no CSRF token in the page")?
        .to_owned();
    let read = http.get(format!("{}/v1/sessions/{id}", fleet.api)).header("cookie", &cookie).send().await?;
    ensure!(read.status() == 200, "{}", read.status());
    let cancel = format!("{}/v1/sessions/{id}/cancel", fleet.api);
    let bare = http.post(&cancel).header("cookie", &cookie).send().await?;
    ensure!(bare.status() == 403, "an action without the CSRF token: {}", bare.status());
    let wrong = http.post(&cancel).header("cookie", &cookie).header("x-csrf-token", "0".repeat(64)).send().await?;
    ensure!(wrong.status() == 403, "{}", wrong.status());
    let with = http.post(&cancel).header("cookie", &cookie).header("x-csrf-token", &csrf).send().await?;
    ensure!(with.status().is_success(), "{}", with.status());

    // Signed out, the cookie is worth nothing; a made-up one neither.
    let out = http.post(format!("{}/console/logout", fleet.api)).header("cookie", &cookie).form(&[("csrf", &csrf)]);
    ensure!(out.send().await?.status() == 303);
    let after = http.get(format!("{}/v1/sessions/{id}", fleet.api)).header("cookie", &cookie).send().await?;
    ensure!(after.status() == 401, "{}", after.status());
    let made_up = format!("agentfleet_console={}", "ab".repeat(32));
    let forged = http.get(format!("{}/v1/sessions", fleet.api)).header("cookie", made_up).send().await?;
    ensure!(forged.status() == 401, "{}", forged.status());
    let page = http.get(format!("{}/console/sessions", fleet.api)).send().await?;
    ensure!(page.status() == 303, "signed out, a page sends to the sign-in: {}", page.status());
    fleet.cleanup().await
}
