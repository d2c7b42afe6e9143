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

use utoipa::OpenApi;

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
        crate::actions::reply,
        crate::actions::approve,
        crate::actions::reject,
        crate::actions::escalations,
        crate::trace::trace,
        crate::healthz,
        crate::readyz,
        crate::metrics,
        serve,
    ),
    tags(
        (name = "sessions", description = "Create, list, show and cancel sessions"),
        (name = "escalations", description = "Sessions that wait for a human reply or an approval"),
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
pub(crate) async fn serve() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}
