//! `POST /v1/sessions/{id}/fork`: a new session that runs again from a step of another.
//!
//! The fork's conversation is the original's as the step began: every message before the step's
//! model answer (the step-th assistant message; each step stores exactly one). Its last user
//! message may be replaced. Everything else starts fresh: a new id, an empty tool ledger, zero
//! usage, the agent's budget (lowered as asked), step 1. It records where it came from.

use agentfleet::budget::{Limits, Overrides};
use agentfleet::config::Role;
use agentfleet::domain::{Name, SessionId};
use agentfleet::store::{NewSession, Origin};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::Value;
use tracing::Instrument as _;
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiJson, ErrorBody};
use crate::limits;
use crate::session_ref::{load_for, path_id, session_span};
use crate::sessions::{SessionCreated, store_and_queue};

/// The body of `POST /v1/sessions/{id}/fork`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Fork {
    /// The step to run again, from 1: the fork starts with the conversation as that step began.
    /// One past the last answered step forks a session whose last turn is the user's (a failed
    /// or waiting step).
    #[schema(minimum = 1, maximum = 100000)]
    #[serde(deserialize_with = "whole_step")]
    from_step: u32,
    /// A new text for the last user message before that step. Tool results in that message are
    /// kept (the model asked for them); its text and images are replaced.
    #[serde(default)]
    replace_last_user_message: Option<String>,
    /// The agent that runs the fork: a name from the config (default: the original's).
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    agent: Option<String>,
    /// Lower budget limits for the fork; its usage starts at zero either way.
    #[serde(default)]
    budget: Option<Overrides>,
}

/// A step number: a whole number, as JSON Schema's `integer` allows it (`2.0` too).
fn whole_step<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    use serde::de::Error as _;
    agentfleet::budget::whole(d)?.ok_or_else(|| D::Error::custom("invalid value: null, expected a whole number"))
}

/// Forks a session from a step into a new session, which runs at once.
#[utoipa::path(
    post,
    path = "/v1/sessions/{id}/fork",
    tag = "sessions",
    params(("id" = String, Path, description = "The session to fork", pattern = "^s_[0-9A-HJKMNP-TV-Z]{26}$")),
    request_body = Fork,
    responses(
        (status = 202, description = "The fork exists and its first step is queued", body = SessionCreated),
        (status = 400, description = "The body is malformed, or a field is invalid (the message names it)", body = ErrorBody),
        (status = 403, description = "The token lacks the `submit` role", body = ErrorBody),
        (status = 404, description = "No such session", body = ErrorBody),
        (status = 409, description = "The session has no such step to fork from (the message says which it has)", body = ErrorBody),
        (status = 413, description = "`replace_last_user_message` is too large", body = ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = ErrorBody),
        (status = 429, description = "The tenant has `max_live_sessions` live sessions, or the token created `sessions_per_minute` this minute", body = ErrorBody),
        (status = 503, description = "Redis or RabbitMQ is down", body = ErrorBody),
    )
)]
pub(crate) async fn fork(
    caller: Caller,
    State(s): State<AppState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<Fork>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Role::Submit)?;
    let id = path_id(&id)?;
    if req.from_step == 0 {
        return Err(ApiError::invalid("from_step: steps count from 1"));
    }
    let original = load_for(&s, &caller, &id).await?;
    let agent = Name::parse(req.agent.as_deref().unwrap_or(original.meta.agent.as_str()))
        .map_err(|e| ApiError::invalid(format!("agent: {e}")))?;
    let agent_cfg =
        s.cfg.agent(agent.as_str()).ok_or_else(|| ApiError::invalid(format!("agent: no agent named `{agent}`")))?;
    let limits = Limits::of(&agent_cfg.budget).lowered(&req.budget.unwrap_or_default()).map_err(ApiError::invalid)?;
    let mut messages = conversation_before(&original.messages, req.from_step)?;
    if let Some(text) = &req.replace_last_user_message {
        crate::actions::text("replace_last_user_message", text, s.cfg.dispatcher.max_input_bytes)?;
        if let Some(last) = messages.last_mut() {
            *last = replaced(last, text)?;
        }
    }
    limits::check_rate(&s, &caller).await?;
    let fresh = SessionId::generate();
    if let Some(tenant) = &original.meta.tenant {
        limits::admit_live(&s, tenant, &fresh).await?;
    }
    let summary = format!("forked from {id} at step {}", req.from_step);
    let new = NewSession {
        id: fresh.clone(),
        agent,
        tenant: original.meta.tenant.clone(),
        messages,
        origin: Some(Origin { session: id, step: req.from_step }),
        metadata: serde_json::from_str(&original.meta.metadata).unwrap_or_else(|_| Value::Object(Default::default())),
        limits,
        callback_url: original.meta.callback_url.clone(),
        first_call: None,
    };
    let created =
        store_and_queue(&s, new, &agent_cfg.pool, &summary).instrument(session_span("session.fork", &fresh)).await?;
    let body = SessionCreated { id: created.id, status: created.status };
    Ok((StatusCode::ACCEPTED, axum::Json(body)))
}

/// The messages before the `step`-th assistant message (each step stores one model answer), or
/// the whole conversation for one step past the last when it ends with a user turn. 409 for any
/// other step: the message says which steps there are.
fn conversation_before(messages: &[String], step: u32) -> Result<Vec<String>, ApiError> {
    let mut answers = 0u32;
    let mut cut = None;
    for (i, m) in messages.iter().enumerate() {
        if role(m) == Some("assistant") {
            answers += 1;
            if answers == step {
                cut = Some(i);
                break;
            }
        }
    }
    let ends_with_user = messages.last().is_some_and(|m| role(m) == Some("user"));
    let cut = match cut {
        Some(i) => i,
        None if step == answers + 1 && ends_with_user => messages.len(),
        None => {
            let last = if ends_with_user { answers + 1 } else { answers };
            return Err(ApiError::conflict(format!(
                "from_step: this session can be forked from steps 1 to {last}, not {step}"
            )));
        }
    };
    let before = &messages[..cut];
    if before.last().is_none_or(|m| role(m) != Some("user")) {
        return Err(ApiError::conflict(format!("from_step: step {step} does not begin with a user turn")));
    }
    Ok(before.to_vec())
}

/// A stored message's role, if it parses.
fn role(message: &str) -> Option<&'static str> {
    #[derive(Deserialize)]
    struct Head {
        role: String,
    }
    match serde_json::from_str::<Head>(message).ok()?.role.as_str() {
        "user" => Some("user"),
        "assistant" => Some("assistant"),
        _ => None,
    }
}

/// The user message `stored` with its text and images replaced by `text`; its tool results stay,
/// first, as the Messages API wants them.
fn replaced(stored: &str, text: &str) -> Result<String, ApiError> {
    let message: Value =
        serde_json::from_str(stored).map_err(|e| ApiError::conflict(format!("the stored message is not JSON: {e}")))?;
    let results: Vec<Value> = match &message["content"] {
        Value::Array(blocks) => blocks.iter().filter(|b| b["type"] == "tool_result").cloned().collect(),
        _ => Vec::new(),
    };
    if results.is_empty() {
        return Ok(agentfleet::llm::user_message(text));
    }
    let mut blocks = results;
    blocks.push(serde_json::json!({ "type": "text", "text": text }));
    Ok(agentfleet::llm::user_blocks(&blocks))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(text: &str) -> String {
        agentfleet::llm::user_message(text)
    }

    fn assistant(text: &str) -> String {
        serde_json::json!({ "role": "assistant", "content": [{ "type": "text", "text": text }] }).to_string()
    }

    fn tool_results() -> String {
        let block = serde_json::json!({ "type": "tool_result", "tool_use_id": "toolu_1", "content": "ok" });
        agentfleet::llm::user_blocks(&[block])
    }

    #[test]
    fn a_step_begins_with_every_message_before_its_answer() -> Result<(), String> {
        let conversation = [user("goal"), assistant("a1"), tool_results(), assistant("a2")];
        let at = |step| conversation_before(&conversation, step).map_err(|e| e.message().to_owned());
        assert_eq!(at(1)?, [user("goal")]);
        assert_eq!(at(2)?, conversation[..3].to_vec());
        let err = at(3).err().unwrap_or_default();
        assert!(err.contains("steps 1 to 2, not 3"), "{err}");
        // A conversation that ends with the user's turn can run its next step again.
        assert_eq!(conversation_before(&conversation[..3], 2).map_err(|e| e.message().to_owned())?.len(), 3);
        assert!(conversation_before(&conversation, 0).is_err());
        Ok(())
    }

    #[test]
    fn a_replaced_message_keeps_its_tool_results() -> Result<(), String> {
        let text = replaced(&user("old"), "new").map_err(|e| e.message().to_owned())?;
        assert_eq!(text, user("new"));
        let with_results = replaced(&tool_results(), "and now this").map_err(|e| e.message().to_owned())?;
        let v: Value = serde_json::from_str(&with_results).map_err(|e| e.to_string())?;
        assert_eq!(v["content"][0]["type"], "tool_result");
        assert_eq!(v["content"][1]["text"], "and now this");
        Ok(())
    }
}
