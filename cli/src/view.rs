//! Sessions and escalations as text: the `status` summary, the outcome a follower prints, and the
//! rows of `list` and `escalations`.
//!
//! Each view also says what to do next when a session waits for people, with the exact command.

use crate::format::{age, ago, first_line, table, thousands, truncate, until, usd};
use crate::model::{Escalation, Session, Summary};

/// How many characters of a reason a table shows.
const REASON_CHARS: usize = 60;

/// How many characters of a tool call's input a waiting session shows.
const INPUT_CHARS: usize = 100;

/// `agentfleet status`: what a session is doing, has used, and produced or waits for.
pub(crate) fn status(s: &Session, now_ms: u64) -> Vec<String> {
    let mut lines = vec![format!("{}  {}  {}", s.id, agent(&s.agent, s.tenant.as_deref()), s.status)];
    lines.push(field("step", &step(s)));
    lines.push(field("usage", &usage(s)));
    if let Some(r) = &s.remaining {
        let left = format!("{} steps, {} tokens, {}", r.steps, thousands(r.tokens), usd(r.cost_usd));
        lines.push(field("left", &left));
    }
    lines.push(field("updated", &ago(now_ms, s.updated_at_ms)));
    if let Some(origin) = &s.forked_from {
        lines.push(field("fork of", &format!("{} at step {}", origin.session, origin.step)));
    }
    let mut outcome = outcome(s).into_iter();
    lines.extend(outcome.next());
    lines.extend(outcome.map(|l| field("", &l)));
    lines
}

fn step(s: &Session) -> String {
    let phase = s.phase.as_deref().map(|p| format!(" ({p})")).unwrap_or_default();
    let cancelling = if s.cancel_requested { ", cancel requested" } else { "" };
    format!("{}{phase}{cancelling}", s.step)
}

fn usage(s: &Session) -> String {
    let u = &s.usage;
    let cached = match (u.cache_read_input_tokens, u.cache_creation_input_tokens) {
        (0, 0) => String::new(),
        (read, written) => format!(", {} cache read, {} cache written", thousands(read), thousands(written)),
    };
    format!(
        "{} tokens ({} in{cached}, {} out), {} model call{}, {}",
        thousands(u.total_tokens),
        thousands(u.input_tokens),
        thousands(u.output_tokens),
        u.model_calls,
        if u.model_calls == 1 { "" } else { "s" },
        usd(u.cost_usd)
    )
}

fn agent(agent: &str, tenant: Option<&str>) -> String {
    tenant.map_or_else(|| agent.to_owned(), |t| format!("{agent} (tenant {t})"))
}

fn field(label: &str, value: &str) -> String {
    format!("{label:<8} {value}").trim_end().to_owned()
}

/// How a session stopped, for a follower: the result, the error, or what it waits for and how to
/// answer.
pub(crate) fn outcome(s: &Session) -> Vec<String> {
    if let Some(e) = s.escalation.as_ref().filter(|_| s.status.starts_with("awaiting")) {
        return waiting(&s.id, e);
    }
    let text = |v: &Option<String>| v.as_deref().filter(|t| !t.is_empty()).map(str::to_owned);
    match s.status.as_str() {
        "completed" => vec![text(&s.result).unwrap_or_else(|| "(no result text)".to_owned())],
        "paused" => vec![format!("paused by a fleet-wide cap; it resumes by itself: agentfleet watch {}", s.id)],
        "queued" | "running" => Vec::new(),
        other => vec![format!("{other}: {}", text(&s.error).unwrap_or_else(|| "no details".to_owned()))],
    }
}

/// What a waiting session waits for, and the commands that answer it.
fn waiting(id: &str, e: &Escalation) -> Vec<String> {
    let kind = e.kind.as_deref().unwrap_or("human");
    let tool = e.tool.as_deref().map(|t| format!(" on {t} {}", truncate(&e.input.to_string(), INPUT_CHARS)));
    let tool = tool.unwrap_or_default();
    let mut lines = vec![format!("waits for {kind}{tool}: {}", e.why())];
    if e.wants_approval() {
        lines.push(format!("answer with: agentfleet approve {id}   or: agentfleet reject {id} --reason \"...\""));
    } else {
        lines.push(format!("answer with: agentfleet reply {id} \"...\""));
    }
    lines
}

/// `agentfleet list`: one row per session.
pub(crate) fn sessions(rows: &[Summary], now_ms: u64) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                s.agent.clone(),
                s.tenant.clone().unwrap_or_else(|| "-".to_owned()),
                s.status.clone(),
                s.step.to_string(),
                ago(now_ms, s.created_at_ms),
                ago(now_ms, s.updated_at_ms),
            ]
        })
        .collect();
    table(&["ID", "AGENT", "TENANT", "STATUS", "STEP", "CREATED", "UPDATED"], &rows)
}

/// `agentfleet escalations`: one row per session that waits for people.
pub(crate) fn escalations(rows: &[Escalation], now_ms: u64) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|e| {
            vec![
                e.session_id.clone(),
                e.agent.clone(),
                e.kind.clone().unwrap_or_else(|| "human".to_owned()),
                e.tool.clone().unwrap_or_else(|| "-".to_owned()),
                age(now_ms.saturating_sub(e.since_ms)),
                e.deadline_ms.map_or_else(|| "-".to_owned(), |d| until(now_ms, d)),
                first_line(e.why(), REASON_CHARS),
            ]
        })
        .collect();
    table(&["SESSION", "AGENT", "KIND", "TOOL", "WAITING", "DEADLINE", "REASON"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::read;
    use serde_json::json;

    fn waiting_session() -> anyhow::Result<Session> {
        read(&json!({
            "id": "s_1", "agent": "support", "tenant": "acme", "status": "awaiting_human", "step": 3,
            "phase": "tools", "updated_at_ms": 1_000,
            "usage": {"input_tokens": 1000, "output_tokens": 234, "total_tokens": 1234, "cost_usd": 0.0042, "model_calls": 3},
            "remaining": {"steps": 47, "tokens": 98766, "cost_usd": 0.9958},
            "escalation": {"kind": "human", "tool_use_id": "toolu_1", "input": {"reason": "wants a refund"}},
        }))
    }

    #[test]
    fn status_shows_usage_and_how_to_answer() -> anyhow::Result<()> {
        let lines = status(&waiting_session()?, 6_000);
        assert_eq!(
            lines,
            [
                "s_1  support (tenant acme)  awaiting_human",
                "step     3 (tools)",
                "usage    1,234 tokens (1,000 in, 234 out), 3 model calls, $0.0042",
                "left     47 steps, 98,766 tokens, $0.9958",
                "updated  5s ago",
                "waits for human: wants a refund",
                "         answer with: agentfleet reply s_1 \"...\"",
            ]
        );
        Ok(())
    }

    #[test]
    fn outcomes_say_result_error_or_what_to_approve() -> anyhow::Result<()> {
        let done: Session = read(&json!({"id": "s_1", "status": "completed", "result": "All done."}))?;
        assert_eq!(outcome(&done), ["All done."]);
        let failed: Session = read(&json!({"id": "s_1", "status": "failed", "error": "model refused"}))?;
        assert_eq!(outcome(&failed), ["failed: model refused"]);
        let approval: Session = read(&json!({"id": "s_2", "status": "awaiting_approval", "escalation": {
            "kind": "approval", "tool": "issue_refund", "input": {"amount": 150}, "reason": "amount > 100"}}))?;
        let lines = outcome(&approval);
        assert_eq!(lines[0], r#"waits for approval on issue_refund {"amount":150}: amount > 100"#);
        assert!(lines[1].contains("agentfleet approve s_2") && lines[1].contains("agentfleet reject s_2"));
        Ok(())
    }

    #[test]
    fn tables_list_sessions_and_escalations() -> anyhow::Result<()> {
        let row: Summary = read(&json!({"id": "s_1", "agent": "support", "status": "completed", "step": 3,
                                         "created_at_ms": 0, "updated_at_ms": 60_000}))?;
        assert_eq!(
            sessions(&[row], 120_000),
            "ID   AGENT    TENANT  STATUS     STEP  CREATED  UPDATED\ns_1  support  -       completed  3     2m ago   1m ago"
        );
        let e: Escalation = read(&json!({"session_id": "s_1", "agent": "support", "kind": "approval",
            "tool": "issue_refund", "reason": "amount > 100", "since_ms": 0, "deadline_ms": 3_600_000}))?;
        let t = escalations(&[e], 60_000);
        assert!(t.ends_with("s_1      support  approval  issue_refund  1m       in 59m    amount > 100"), "{t}");
        Ok(())
    }
}

/// A trace as a timeline: one line per record (time since the first, step, action, what and how
/// it went), then the totals.
pub(crate) fn timeline(trace: &serde_json::Value) -> String {
    let empty = Vec::new();
    let records = trace["records"].as_array().unwrap_or(&empty);
    let start = records.iter().filter_map(|r| r["ts_ms"].as_u64()).min().unwrap_or(0);
    let mut lines: Vec<String> = records.iter().map(|r| timeline_line(r, start)).collect();
    let s = &trace["summary"];
    lines.push(format!(
        "total: {} steps, {} model calls, {} tool calls, {} in / {} out tokens{}, ${:.4}, {} ms, {} errors",
        s["steps"],
        s["model_calls"],
        s["tool_calls"],
        s["input_tokens"],
        s["output_tokens"],
        cached(s),
        s["cost_usd"].as_f64().unwrap_or(0.0),
        s["duration_ms"],
        s["errors"]
    ));
    if let Some(tools) = s["tools_used"].as_object().filter(|t| !t.is_empty()) {
        let used: Vec<String> = tools.iter().map(|(name, n)| format!("{name} ×{n}")).collect();
        lines.push(format!("tools: {}", used.join(", ")));
    }
    lines.join("\n")
}

/// The prompt-cache tokens of a record or summary, `" (cache R read, W written)"`, or nothing.
fn cached(r: &serde_json::Value) -> String {
    let n = |field: &str| r[field].as_u64().unwrap_or(0);
    match (n("cache_read_input_tokens"), n("cache_creation_input_tokens")) {
        (0, 0) => String::new(),
        (read, written) => format!(" (cache {read} read, {written} written)"),
    }
}

fn timeline_line(r: &serde_json::Value, start: u64) -> String {
    let at = r["ts_ms"].as_u64().unwrap_or(start).saturating_sub(start);
    let mark = if r["success"] == true { "✓" } else { "✗" };
    let what = match r["tool_name"].as_str() {
        Some(tool) => format!("{} {tool}", r["action"].as_str().unwrap_or("?")),
        None => r["action"].as_str().unwrap_or("?").to_owned(),
    };
    let tokens = match (r["input_tokens"].as_u64(), r["output_tokens"].as_u64()) {
        (Some(i), Some(o)) if i + o > 0 => {
            format!("  {i}/{o} tok{} ${:.4}", cached(r), r["cost_usd"].as_f64().unwrap_or(0.0))
        }
        _ => String::new(),
    };
    let detail = r["error"].as_str().or(r["output_summary"].as_str()).unwrap_or("");
    let detail: String = detail.chars().take(90).collect();
    let step = r["step"].as_u64().unwrap_or(0);
    let took = r["duration_ms"].as_u64().unwrap_or(0);
    format!("+{at:>6} ms  step {step:>3}  {mark} {what:<28}{tokens}  {took:>5} ms  {detail}")
}

#[cfg(test)]
mod timeline_tests {
    use super::timeline;

    #[test]
    fn a_trace_reads_as_a_timeline_with_totals() {
        let trace = serde_json::json!({
            "records": [
                {"ts_ms": 1000, "step": 1, "action": "model_call", "success": true, "input_tokens": 10, "output_tokens": 5,
                 "cost_usd": 0.0001, "duration_ms": 20, "output_summary": "stop_reason=tool_use"},
                {"ts_ms": 1010, "step": 2, "action": "model_call", "success": true, "input_tokens": 3, "output_tokens": 5,
                 "cache_read_input_tokens": 1200, "cache_creation_input_tokens": 40, "cost_usd": 0.0001,
                 "duration_ms": 20, "output_summary": "stop_reason=end_turn"},
                {"ts_ms": 1030, "step": 1, "action": "tool_call", "tool_name": "lookup", "success": false, "duration_ms": 3,
                 "error": "Invalid input"}
            ],
            "summary": {"steps": 1, "model_calls": 1, "tool_calls": 1, "input_tokens": 10, "output_tokens": 5,
                        "cost_usd": 0.0001, "duration_ms": 33, "errors": 1, "tools_used": {"lookup": 1}}
        });
        let text = timeline(&trace);
        assert!(text.contains("+     0 ms  step   1  ✓ model_call"), "{text}");
        assert!(text.contains("+    30 ms  step   1  ✗ tool_call lookup"), "{text}");
        assert!(text.contains("3/5 tok (cache 1200 read, 40 written) $0.0001"), "{text}");
        assert!(text.contains("Invalid input"));
        assert!(text.contains("total: 1 steps, 1 model calls, 1 tool calls, 10 in / 5 out tokens"), "{text}");
        assert!(text.contains("tools: lookup ×1"));
    }
}
