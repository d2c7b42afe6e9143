//! The OpenAPI document at `GET /openapi.json`: it lists exactly the routes the router serves, a
//! real validator (`openapi-spec-validator`, from PyPI) accepts it, and real answers match the
//! schemas it gives for their status codes.

use std::collections::BTreeSet;
use std::time::Duration;

use agentfleet_tests::fleet::{FleetOptions, TestFleet};
use anyhow::{Context, anyhow, ensure};
use serde_json::{Value, json};

/// A well-formed session id that names no session.
const UNKNOWN_ID: &str = "s_01JD3ZK8Q8YB3Y3C2K9Q2W7X4M";
const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

async fn document(fleet: &TestFleet) -> anyhow::Result<Value> {
    let r = fleet.http.get(format!("{}/openapi.json", fleet.ops)).send().await?;
    ensure!(r.status() == 200, "GET /openapi.json answered {}", r.status());
    Ok(r.json().await?)
}

/// Sends `method url_path` (a JSON body when given) and returns the status and the body (null if
/// it is not JSON).
async fn call(fleet: &TestFleet, method: &str, url_path: &str, body: Option<&Value>) -> anyhow::Result<(u16, Value)> {
    let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes())?;
    // The operations endpoints have their own listener.
    let ops = agentfleet_dispatcher::ops_routes().iter().any(|(_, p)| url_path.split('?').next() == Some(*p));
    let base = if ops { &fleet.ops } else { &fleet.api };
    let mut req = fleet.http.request(method, format!("{base}{url_path}"));
    if let Some(body) = body {
        req = req.json(body);
    }
    let r = req.send().await?;
    let status = r.status().as_u16();
    // An event stream (`GET /v1/events`) never ends: its answer is all there is to check.
    let stream = r.headers().get("content-type").is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if stream {
        return Ok((status, Value::Null));
    }
    let text = r.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

/// True when the router has no route for the request: a 405, or the fallback's 404.
fn unrouted(status: u16, body: &Value) -> bool {
    status == 405 || (status == 404 && body["error"]["message"] == "no such route")
}

fn documented_routes(doc: &Value) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for method in item.as_object().into_iter().flatten().map(|(m, _)| m).filter(|m| METHODS.contains(&m.as_str())) {
            routes.insert((method.clone(), path.clone()));
        }
    }
    routes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_lists_exactly_the_routes_the_router_serves() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions { workers: 0, ..Default::default() }).await?;
    let doc = document(&fleet).await?;
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "openapi: {}", doc["openapi"]);

    let all = agentfleet_dispatcher::routes().into_iter().chain(agentfleet_dispatcher::ops_routes());
    let routes: BTreeSet<(String, String)> = all.map(|(m, p)| (m.to_owned(), p.to_owned())).collect();
    assert_eq!(documented_routes(&doc), routes, "the document and agentfleet_dispatcher::routes() differ");
    for (method, path) in &routes {
        let (status, body) = call(&fleet, method, &path.replace("{id}", UNKNOWN_ID), None).await?;
        assert!(!unrouted(status, &body), "{method} {path} is in routes() but the router does not serve it");
    }
    for (method, path) in [("get", "/v1/nothing"), ("delete", "/v1/sessions")] {
        let (status, body) = call(&fleet, method, path, None).await?;
        assert!(unrouted(status, &body), "{method} {path}: the probe must tell an unserved route: {status} {body}");
    }

    // Every error of the /v1 API is documented with the error body.
    for (method, path) in routes.iter().filter(|(_, p)| p.starts_with("/v1/")) {
        let responses = doc["paths"][path][method]["responses"].as_object().context("responses")?;
        assert!(responses.keys().any(|s| s.starts_with('2')), "{method} {path}: no success answer");
        for (status, r) in responses.iter().filter(|(s, _)| !s.starts_with('2')) {
            let schema = &r["content"]["application/json"]["schema"]["$ref"];
            assert_eq!(schema, "#/components/schemas/ErrorBody", "{method} {path} {status}");
        }
    }
    let schemas = doc["components"]["schemas"].as_object().context("components.schemas")?;
    for name in [
        "CreateSession",
        "Overrides",
        "SessionCreated",
        "SessionSummary",
        "SessionDetail",
        "SessionList",
        "SessionStatus",
        "Accepted",
        "Escalation",
        "EscalationList",
        "ErrorBody",
    ] {
        assert!(schemas.contains_key(name), "no schema {name}: {:?}", schemas.keys().collect::<Vec<_>>());
    }
    fleet.cleanup().await
}

/// Runs `python3 ARGS`.
async fn python(args: &[&str]) -> anyhow::Result<std::process::Output> {
    tokio::process::Command::new("python3").args(args).output().await.context("running python3 (is it installed?)")
}

fn printed(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Fails, naming the fix, when `python3 -m openapi_spec_validator` cannot run (`bash scripts/test.sh`
/// installs it).
async fn ensure_validator() -> anyhow::Result<()> {
    let probe = python(&["-c", "import openapi_spec_validator"]).await?;
    ensure!(
        probe.status.success(),
        "openapi-spec-validator is missing: install it with `python3 -m pip install openapi-spec-validator`, \
         which `bash scripts/test.sh` does:\n{}",
        printed(&probe)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_spec_validator_accepts_the_document() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions { workers: 0, ..Default::default() }).await?;
    let doc = document(&fleet).await?;
    let file = std::env::temp_dir().join(format!("agentfleet-openapi-{}.json", fleet.prefix));
    std::fs::write(&file, serde_json::to_vec_pretty(&doc)?)?;
    ensure_validator().await?;
    let file_arg = file.to_string_lossy();
    let out = python(&["-m", "openapi_spec_validator", &file_arg]).await?;
    let verdict = printed(&out);
    assert!(out.status.success(), "openapi-spec-validator rejected {}:\n{verdict}", file.display());
    println!("openapi-spec-validator: {}", verdict.trim());
    std::fs::remove_file(&file)?;
    fleet.cleanup().await
}

/// Checks `body` against the schema the document gives for `method path` answering `status`.
fn conforms(doc: &Value, method: &str, path: &str, status: u16, body: &Value) -> anyhow::Result<()> {
    let response = &doc["paths"][path][method]["responses"][status.to_string()];
    ensure!(response.is_object(), "{method} {path} answered {status}, which the document does not list: {body}");
    let schema = &response["content"]["application/json"]["schema"];
    ensure!(schema.is_object(), "{method} {path} {status}: the document gives no JSON schema");
    // `$ref`s point into `#/components`: validate against a root that has them.
    let root = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "components": doc["components"],
        "allOf": [schema],
    });
    let validator = jsonschema::validator_for(&root).map_err(|e| anyhow!("{method} {path} {status}: {e}"))?;
    let problems: Vec<String> = validator.iter_errors(body).map(|e| format!("{}: {e}", e.instance_path())).collect();
    ensure!(problems.is_empty(), "{method} {path} {status} does not match the document: {problems:?}\n{body}");
    Ok(())
}

/// Sends a request and checks the answer against the document; `path` is the documented template,
/// `url_path` what is sent.
async fn checked(
    fleet: &TestFleet,
    doc: &Value,
    (method, path): (&str, &str),
    url_path: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let (status, answer) = call(fleet, method, url_path, body).await?;
    conforms(doc, method, path, status, &answer)?;
    Ok((status, answer))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_answers_match_the_documented_schemas() -> anyhow::Result<()> {
    let mut fleet = TestFleet::start(FleetOptions { workers: 0, ..Default::default() }).await?;
    let doc = document(&fleet).await?;
    let f = &fleet;
    let session = ("get", "/v1/sessions/{id}");
    assert_eq!(checked(f, &doc, ("get", "/healthz"), "/healthz", None).await?.0, 200);
    assert_eq!(checked(f, &doc, ("get", "/readyz"), "/readyz", None).await?.0, 200);
    let (status, _) = call(f, "get", "/metrics", None).await?; // Prometheus text, or 404 when disabled
    assert!(doc["paths"]["/metrics"]["get"]["responses"][status.to_string()].is_object(), "/metrics: {status}");

    let create = ("post", "/v1/sessions");
    let body = json!({"agent": "support", "input": "[steps=2] describe me", "metadata": {"k": "v"},
        "budget": {"max_steps": 5}, "idempotency_key": "openapi-1"});
    let (status, created) = checked(f, &doc, create, "/v1/sessions", Some(&body)).await?;
    assert_eq!(status, 202, "{created}");
    let id = created["id"].as_str().context("id")?.to_owned();
    assert_eq!(checked(f, &doc, create, "/v1/sessions", Some(&json!({"agent": "support"}))).await?.0, 400);
    assert_eq!(checked(f, &doc, session, &format!("/v1/sessions/{id}"), None).await?.0, 200);
    let wrong = json!({"id": id, "status": "bogus"});
    assert!(
        conforms(&doc, "get", "/v1/sessions/{id}", 200, &wrong).is_err(),
        "the schema check must catch a wrong body"
    );
    assert_eq!(checked(f, &doc, session, "/v1/sessions/not-an-id", None).await?.0, 400);
    assert_eq!(checked(f, &doc, session, &format!("/v1/sessions/{UNKNOWN_ID}"), None).await?.0, 404);
    let list = ("get", "/v1/sessions");
    let (status, page) = checked(f, &doc, list, "/v1/sessions?agent=support&limit=10", None).await?;
    assert_eq!((status, page["sessions"][0]["id"].as_str()), (200, Some(id.as_str())), "{page}");
    assert_eq!(checked(f, &doc, list, "/v1/sessions?limit=0", None).await?.0, 400);

    let cancel = ("post", "/v1/sessions/{id}/cancel");
    assert_eq!(checked(f, &doc, cancel, &format!("/v1/sessions/{id}/cancel"), None).await?.0, 202);
    assert_eq!(checked(f, &doc, cancel, &format!("/v1/sessions/{id}/cancel"), None).await?.0, 409);
    let approve = ("post", "/v1/sessions/{id}/approve");
    assert_eq!(checked(f, &doc, approve, &format!("/v1/sessions/{UNKNOWN_ID}/approve"), None).await?.0, 404);
    let reject = ("post", "/v1/sessions/{id}/reject");
    assert_eq!(checked(f, &doc, reject, &format!("/v1/sessions/{id}/reject"), Some(&json!({}))).await?.0, 400);

    // A finished session (with its conversation) and one that waits for a human.
    fleet.spawn_worker()?;
    let f = &fleet;
    let done = f.submit("support", "[steps=2] answer me").await?;
    let waits = f.submit("support", "I want a refund for last month, bob@example.com").await?;
    let settled = f.wait_settled(&[done.clone(), waits.clone()], Duration::from_secs(60)).await?;
    assert_eq!((&settled[0]["status"], &settled[1]["status"]), (&json!("completed"), &json!("awaiting_human")));
    for id in [&done, &waits] {
        assert_eq!(checked(f, &doc, session, &format!("/v1/sessions/{id}"), None).await?.0, 200);
    }
    let (status, queue) = checked(f, &doc, ("get", "/v1/escalations"), "/v1/escalations", None).await?;
    assert_eq!(status, 200);
    assert!(queue["escalations"].as_array().is_some_and(|a| a.iter().any(|e| e["session_id"] == waits.as_str())));
    let reply = ("post", "/v1/sessions/{id}/reply");
    let answer = json!({"text": "Yes, refund it."});
    assert_eq!(checked(f, &doc, reply, &format!("/v1/sessions/{waits}/reply"), Some(&answer)).await?.0, 202);
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_states_what_the_server_checks() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions { workers: 0, ..Default::default() }).await?;
    let doc = document(&fleet).await?;
    let id = &doc["paths"]["/v1/sessions/{id}"]["get"]["parameters"][0]["schema"];
    assert_eq!(id["pattern"], "^s_[0-9A-HJKMNP-TV-Z]{26}$", "{id}");
    let list = doc["paths"]["/v1/sessions"]["get"]["parameters"].as_array().context("list parameters")?;
    let param = |name: &str| list.iter().find(|p| p["name"] == name).map(|p| p["schema"].clone()).unwrap_or_default();
    assert_eq!((param("limit")["minimum"].clone(), param("limit")["maximum"].clone()), (json!(1), json!(500)));
    assert_eq!(param("status")["$ref"], "#/components/schemas/SessionStatus");
    let statuses = &doc["components"]["schemas"]["SessionStatus"];
    assert!(statuses.to_string().contains("awaiting_approval"), "{statuses}");

    let bodies = doc["components"]["schemas"]["CreateSession"]["oneOf"].as_array().context("oneOf per agent")?;
    let support = bodies.iter().find(|b| b["properties"]["agent"]["enum"] == json!(["support"])).context("support")?;
    let props = &support["properties"];
    assert_eq!(props["input"]["maxLength"], fleet.config.dispatcher.max_input_bytes, "{props}");
    assert_eq!(
        (props["idempotency_key"]["minLength"].clone(), props["idempotency_key"]["maxLength"].clone()),
        (json!(1), json!(255))
    );
    assert_eq!(props["budget"]["properties"]["max_steps"]["maximum"], 50, "{props}");
    assert_eq!(bodies.len(), fleet.config.agents.len());
    fleet.cleanup().await
}
