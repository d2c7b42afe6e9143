//! The OpenAPI 3 document of the HTTP API, served at `GET /openapi.json`.
//!
//! It is generated, not written: each handler's `#[utoipa::path(...)]` gives its method, path,
//! parameters, body and answers, and the bodies' `ToSchema` derives give the schemas (collected
//! from the annotations by themselves), so the document follows the code.
//!
//! To document a new route (say `GET /v1/sessions/{id}/trace`): annotate its handler with
//! `#[utoipa::path(...)]` and add the handler to `paths(...)` below: one line. Also add its
//! `(method, path)` to [`crate::routes`] next to the `.route(...)` in [`crate::router`]; the
//! `openapi` integration test fails until the router, `routes()` and this document agree.
//!
//! What only the config knows is filled in when the document is served: `POST /v1/sessions` takes
//! one body schema per agent (`oneOf`), each naming the agent and the ranges its `budget` may lower
//! its limits to, and `input`'s length limit. So a request the document allows is one the server
//! takes, and `tests/tests/schemathesis.rs` holds the document to that.

use agentfleet::budget::Limits;
use agentfleet::config::{AgentConfig, Config};
use agentfleet::domain::Name;
use axum::extract::State;
use serde_json::{Value, json};
use utoipa::OpenApi;

use crate::AppState;

/// The document; `ApiDoc::openapi()` builds it.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "agentfleet",
        description = "Create LLM agent sessions, follow them, and answer the ones that wait for people. \
                       Every error answers `{\"error\": {\"type\", \"message\"}}`."
    ),
    paths(
        crate::sessions::create,
        crate::sessions::list,
        crate::sessions::get,
        crate::actions::cancel,
        crate::fork::fork,
        crate::actions::reply,
        crate::actions::approve,
        crate::actions::reject,
        crate::actions::escalations,
        crate::trace::trace,
        crate::events::events,
        crate::live::tenant_events,
        crate::fleet::fleet,
        crate::dlq::list,
        crate::dlq::show,
        crate::dlq::redrive_one,
        crate::dlq::redrive_many,
        crate::dlq::discard,
        crate::healthz,
        crate::readyz,
        crate::metrics,
        serve,
    ),
    // Named in a query parameter only, which utoipa does not collect by itself.
    components(schemas(crate::dlq::Order)),
    tags(
        (name = "sessions", description = "Create, list, show and cancel sessions"),
        (name = "escalations", description = "Sessions that wait for a human reply or an approval"),
        (name = "fleet", description = "How the fleet is doing: steps per second, queues, breakers, spend today"),
        (name = "dead letters", description = "Messages that could not be processed: read, re-drive or discard them"),
        (name = "operations", description = "Health, readiness, metrics and this document"),
    )
)]
pub(crate) struct ApiDoc;

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3 document of this API", body = Object))
)]
pub(crate) async fn serve(State(s): State<AppState>) -> axum::Json<Value> {
    axum::Json(document(&s.cfg))
}

/// The document for the fleet `cfg` configures.
pub(crate) fn document(cfg: &Config) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    let schemas = &mut doc["components"]["schemas"];
    let generic = schemas["CreateSession"].take();
    let variants: Vec<Value> = cfg.agents.iter().map(|(name, agent)| for_agent(&generic, cfg, name, agent)).collect();
    schemas["CreateSession"] = json!({ "description": generic["description"], "oneOf": variants });
    fork(&mut schemas["Fork"], cfg);
    // An approval's body is optional (absent or empty), but never `null`, which utoipa's
    // `Option<Approve>` would allow.
    let approve = &mut doc["paths"]["/v1/sessions/{id}/approve"]["post"]["requestBody"];
    approve["content"]["application/json"]["schema"] = json!({ "$ref": "#/components/schemas/Approve" });
    bearer_auth(&mut doc);
    doc
}

/// Every API operation (all but the `operations` tag, served on the ops listener) takes a bearer
/// token, and answers 401 without a valid one and 403 without the role it needs.
fn bearer_auth(doc: &mut Value) {
    doc["components"]["securitySchemes"]["bearer"] =
        json!({ "type": "http", "scheme": "bearer", "description": "An API token from `[[auth.tokens]]`" });
    let error = json!({ "application/json": { "schema": { "$ref": "#/components/schemas/ErrorBody" } } });
    let Some(paths) = doc["paths"].as_object_mut() else { return };
    for operation in paths.values_mut().filter_map(Value::as_object_mut).flat_map(|p| p.values_mut()) {
        let ops_endpoint = operation["tags"].as_array().is_some_and(|t| t.iter().any(|t| t == "operations"));
        if ops_endpoint || !operation.is_object() {
            continue;
        }
        operation["security"] = json!([{ "bearer": [] }]);
        let responses = &mut operation["responses"];
        responses["401"] = json!({ "description": "No token, or a token that is not accepted", "content": error });
        responses["403"] =
            json!({ "description": "The token lacks the role this needs, or may not name a tenant", "content": error });
    }
}

/// The body of `POST /v1/sessions` for one agent.
fn for_agent(generic: &Value, cfg: &Config, name: &Name, agent: &AgentConfig) -> Value {
    let mut schema = generic.clone();
    schema["title"] = json!(name.as_str());
    let props = &mut schema["properties"];
    props["agent"] = json!({ "type": "string", "enum": [name.as_str()], "description": "The agent to run" });
    props["input"]["maxLength"] = json!(cfg.dispatcher.max_input_bytes);
    props["budget"] = budget(&Limits::of(&agent.budget));
    callback_url(&mut schema, cfg);
    schema
}

/// The body of `POST /v1/sessions/{id}/fork`: the agents there are, and a `budget` every agent
/// takes (each limit at most the smallest agent's), since the fork's agent may be the original's.
fn fork(schema: &mut Value, cfg: &Config) {
    let tightest = cfg.agents.values().map(|a| Limits::of(&a.budget)).reduce(|a, b| Limits {
        max_steps: a.max_steps.min(b.max_steps),
        max_cost: a.max_cost.min(b.max_cost),
        max_cost_per_step: a.max_cost_per_step.min(b.max_cost_per_step),
        max_tokens: a.max_tokens.min(b.max_tokens),
        alert_permille: a.alert_permille.min(b.alert_permille),
        summary_max_tokens: a.summary_max_tokens.min(b.summary_max_tokens),
    });
    let props = &mut schema["properties"];
    if let Some(limits) = tightest {
        props["budget"] = budget(&limits);
        props["budget"]["description"] = json!("Lower budget limits for the fork; each at most its agent's own.");
    }
    let agents: Vec<&str> = cfg.agents.keys().map(Name::as_str).collect();
    props["agent"]["enum"] = json!(agents);
    let text = &mut props["replace_last_user_message"];
    text["maxLength"] = json!(cfg.dispatcher.max_input_bytes);
    text["pattern"] = json!("\\S");
}

/// `callback_url` as the config allows it: it must start with a tenant's `callback_prefixes`, so the
/// document names them; with none configured no session may have one, and the field is left out.
fn callback_url(schema: &mut Value, cfg: &Config) {
    let mut prefixes: Vec<&str> =
        cfg.tenants.values().flat_map(|t| t.callback_prefixes.iter().map(String::as_str)).collect();
    prefixes.sort_unstable();
    prefixes.dedup();
    if prefixes.is_empty() {
        if let Some(props) = schema["properties"].as_object_mut() {
            props.remove("callback_url");
        }
        return;
    }
    let alternatives: Vec<String> = prefixes.iter().map(|p| regex_escape(p)).collect();
    let field = &mut schema["properties"]["callback_url"];
    field["pattern"] = json!(format!("^(?:{})[!-~]*$", alternatives.join("|")));
}

/// `text` as a literal in an ECMA-262 regular expression.
fn regex_escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let special = "\\^$.|?*+()[]{}/".contains(c);
            special.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

/// The `budget` an agent with `limits` takes: each field may lower its limit, never raise it.
fn budget(limits: &Limits) -> Value {
    let field = |kind: &str, minimum: Value, maximum: Value, what: &str| json!({ "type": [kind, "null"], "minimum": minimum, "maximum": maximum, "description": what });
    json!({
        "type": ["object", "null"],
        "description": "Lower budget limits for this session; each at most the agent's own.",
        "additionalProperties": false,
        "properties": {
            "max_steps": field("integer", json!(1), json!(limits.max_steps), "Lower `max_steps`"),
            "max_cost_usd": field("number", json!(0), json!(limits.max_cost.as_usd()), "Lower `max_cost_usd`"),
            "max_cost_per_step_usd": field(
                "number", json!(0), json!(limits.max_cost_per_step.as_usd()), "Lower `max_cost_per_step_usd`"),
            "max_tokens": field("integer", json!(0), json!(limits.max_tokens), "Lower `max_tokens`"),
            "alert_threshold": field(
                "number", json!(0), json!(f64::from(limits.alert_permille) / 1000.0), "Lower `alert_threshold`"),
        },
    })
}
