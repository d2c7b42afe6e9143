//! One case through the fleet: submit its input, act as the person when it waits, collect what
//! happened.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::suite::{Case, Decision};
use crate::api::{Api, ApiError};

/// How often a running session is read.
const POLL: Duration = Duration::from_millis(150);

/// What a case did.
#[derive(Debug, Default)]
pub(crate) struct CaseRun {
    /// The API refused the input: its status and message.
    pub(crate) rejected: Option<(u16, String)>,
    /// The session, as `GET /v1/sessions/{id}` answered last.
    pub(crate) session: Value,
    /// `GET /v1/sessions/{id}/trace`'s records.
    pub(crate) records: Vec<Value>,
    /// What the eval did as the person: `approve TOOL INPUT`, `reject …`, `reply`.
    pub(crate) interventions: Vec<Intervention>,
    /// It did not settle within the case's timeout.
    pub(crate) timed_out: bool,
    /// Something went wrong outside the agent: the API failed or could not be reached.
    pub(crate) harness_error: Option<String>,
    pub(crate) duration: Duration,
}

/// A decision the eval took as the person.
#[derive(Debug, Clone)]
pub(crate) enum Intervention {
    Approval { tool: String, input: Value, decision: Decision },
    Reply,
}

impl Intervention {
    /// For reports: `approved issue_refund {"amount":…}`, `replied`.
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Approval { tool, input, decision: Decision::Approve } => format!("approved {tool} {input}"),
            Self::Approval { tool, input, decision: Decision::Reject } => format!("rejected {tool} {input}"),
            Self::Reply => "replied to the escalation".to_owned(),
        }
    }
}

/// Runs `case` on the fleet behind `api`.
pub(crate) async fn run_case(api: &Api, case: &Case) -> CaseRun {
    let started = Instant::now();
    let mut run = CaseRun::default();
    if let Err(e) = drive(api, case, &mut run).await {
        run.harness_error = Some(e);
    }
    run.duration = started.elapsed();
    run
}

async fn drive(api: &Api, case: &Case, run: &mut CaseRun) -> Result<(), String> {
    let mut body = json!({ "agent": case.agent, "input": case.input.to_json() });
    if let Some(metadata) = &case.metadata {
        body["metadata"] = metadata.clone();
    }
    let created = match api.post(&["v1", "sessions"], Some(&body)).await {
        Ok(created) => created,
        Err(ApiError::Answered { status, message, .. }) if status.is_client_error() => {
            run.rejected = Some((status.as_u16(), message));
            return Ok(());
        }
        Err(e) => return Err(format!("POST /v1/sessions: {e}")),
    };
    let id = created["id"].as_str().ok_or("the API answered no session id")?.to_owned();
    let deadline = Instant::now() + Duration::from_secs(case.timeout_s);
    loop {
        let session = call(api, Method::Get, &["v1", "sessions", &id], None).await?;
        let status = session["status"].as_str().unwrap_or("").to_owned();
        run.session = session;
        match status.as_str() {
            "completed" | "failed" | "budget_exhausted" | "cancelled" => break,
            "awaiting_approval" if case.expect.status != "awaiting_approval" => approve(api, case, run, &id).await?,
            "awaiting_human" if case.expect.status != "awaiting_human" => {
                let body = json!({ "text": case.human_reply });
                call(api, Method::Post, &["v1", "sessions", &id, "reply"], Some(&body)).await?;
                run.interventions.push(Intervention::Reply);
            }
            "awaiting_approval" | "awaiting_human" => break,
            _ => {}
        }
        if Instant::now() > deadline {
            run.timed_out = true;
            let _ = api.post(&["v1", "sessions", &id, "cancel"], None).await;
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let trace = call(api, Method::Get, &["v1", "sessions", &id, "trace"], None).await?;
    run.records = trace["records"].as_array().cloned().unwrap_or_default();
    Ok(())
}

/// Approves or rejects the call the session waits on, as the case says.
async fn approve(api: &Api, case: &Case, run: &mut CaseRun, id: &str) -> Result<(), String> {
    let waiting = &run.session["escalation"];
    let tool = waiting["tool"].as_str().unwrap_or("").to_owned();
    let input = waiting["input"].clone();
    let (path, body) = match case.approval {
        Decision::Approve => ("approve", json!({ "note": "approved by the eval" })),
        Decision::Reject => ("reject", json!({ "reason": "Not approved: this needs the billing team's review." })),
    };
    call(api, Method::Post, &["v1", "sessions", id, path], Some(&body)).await?;
    run.interventions.push(Intervention::Approval { tool, input, decision: case.approval });
    Ok(())
}

#[derive(Clone, Copy)]
enum Method {
    Get,
    Post,
}

/// One API call, tried again (up to 5 times) while the failure is transient.
async fn call(api: &Api, method: Method, segments: &[&str], body: Option<&Value>) -> Result<Value, String> {
    let mut tries = 0;
    loop {
        let answer = match method {
            Method::Get => api.get(segments, &[]).await,
            Method::Post => api.post(segments, body).await,
        };
        match answer {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && tries < 5 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(200 * tries)).await;
            }
            Err(e) => return Err(format!("{}: {e}", segments.join("/"))),
        }
    }
}
