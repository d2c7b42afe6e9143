//! The chaos suite's checks: each counts what it checked and what broke, with a few examples.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use agentfleet::domain::SessionId;
use anyhow::Context as _;
use serde_json::Value;

use super::run::{Outcome, Rig};
use super::workload::{CAPPED_MAX_STEPS, Kind, Planned};
use crate::fleet::{check_step_conversation, prometheus_counter, queue_depth};
use crate::model_server::{GoalBill, check_conversation};

/// How many examples a row keeps.
const EXAMPLES: usize = 5;

/// One line of the report.
#[derive(Debug, Clone, Default)]
pub struct Row {
    /// What is checked.
    pub check: String,
    /// How many things were checked.
    pub checked: u64,
    /// How many broke it.
    pub violations: u64,
    /// What else is worth knowing (not a violation).
    pub note: String,
    /// The first few violations.
    pub examples: Vec<String>,
}

impl Row {
    fn new(check: &str) -> Self {
        Self { check: check.to_owned(), ..Self::default() }
    }

    fn ok(&mut self) {
        self.checked += 1;
    }

    fn violation(&mut self, what: String) {
        self.checked += 1;
        self.violations += 1;
        if self.examples.len() < EXAMPLES {
            self.examples.push(what);
        }
    }

    fn judge(&mut self, result: Result<(), String>, who: &str) {
        match result {
            Ok(()) => self.ok(),
            Err(why) => self.violation(format!("{who}: {why}")),
        }
    }
}

/// A session's trace records.
async fn trace(rig: &Rig, id: &SessionId) -> anyhow::Result<Vec<Value>> {
    let key = format!("{}:{{{id}}}:trace", rig.fleet.config.redis.key_prefix);
    let reply: redis::streams::StreamRangeReply =
        redis::cmd("XRANGE").arg(&key).arg("-").arg("+").query_async(&mut rig.fleet.redis().await?).await?;
    reply.ids.iter().map(|e| Ok(serde_json::from_str(&e.get::<String>("r").context("trace field r")?)?)).collect()
}

/// When a session's trace ends (Unix ms), and its longest pause between two records, said with
/// the records around it.
pub async fn trace_summary(rig: &Rig, id: &SessionId) -> anyhow::Result<(u64, String)> {
    let records = trace(rig, id).await?;
    let ts = |r: &Value| r["ts_ms"].as_u64().unwrap_or(0);
    let describe = |r: &Value| {
        let error = r["error"].as_str().map(|e| format!(" ({})", e.chars().take(100).collect::<String>()));
        format!("step {} {}{}", r["step"], r["action"].as_str().unwrap_or("?"), error.unwrap_or_default())
    };
    let last = records.iter().map(ts).max().unwrap_or(0);
    let gap = records.windows(2).max_by_key(|w| ts(&w[1]).saturating_sub(ts(&w[0])));
    let pause = match gap {
        Some(w) => format!(
            "longest pause {:.1} s, between {} and {}",
            ts(&w[1]).saturating_sub(ts(&w[0])) as f64 / 1000.0,
            describe(&w[0]),
            describe(&w[1])
        ),
        None => format!("{} trace records", records.len()),
    };
    Ok((last, pause))
}

/// The model calls a session's trace counts.
#[derive(Debug, Default)]
struct TracedCalls {
    /// Reconciled at their actual usage, by step.
    reconciled_by_step: BTreeMap<u64, u64>,
    /// Counted at their reserved worst case (the worker died, or the call failed in a way that may
    /// have been billed).
    worst_case: u64,
}

impl TracedCalls {
    fn of(records: &[Value]) -> Self {
        let mut calls = Self::default();
        // A worst-case record a late reconcile replaced (the paused worker's call, counted once).
        let superseded: BTreeSet<&str> = records.iter().filter_map(|r| r["supersedes"].as_str()).collect();
        let replaced = |r: &Value| r["reservation"].as_str().is_some_and(|id| superseded.contains(id));
        let model = |r: &&Value| matches!(r["action"].as_str(), Some("model_call" | "summary_call"));
        for r in records.iter().filter(model).filter(|r| !replaced(r)) {
            if r["success"] == true {
                *calls.reconciled_by_step.entry(r["step"].as_u64().unwrap_or(0)).or_default() += 1;
            } else if r["input_tokens"].as_u64().unwrap_or(0) + r["output_tokens"].as_u64().unwrap_or(0) > 0 {
                calls.worst_case += 1;
            }
        }
        calls
    }

    fn reconciled(&self) -> u64 {
        self.reconciled_by_step.values().sum()
    }
}

fn usage(s: &Value, field: &str) -> u64 {
    s["usage"][field].as_u64().unwrap_or(0)
}

fn tool_results(s: &Value) -> Vec<&Value> {
    let messages = s["messages"].as_array().into_iter().flatten();
    messages.filter_map(|m| m["content"].as_array()).flatten().filter(|b| b["type"] == "tool_result").collect()
}

/// The conversation as the Messages API reads it: consecutive turns of one role combined into one
/// turn (the API does so); and how many turns were combined.
fn combine_turns(messages: &Value) -> (Value, usize) {
    let blocks = |content: &Value| match content {
        Value::String(text) => vec![serde_json::json!({ "type": "text", "text": text })],
        Value::Array(blocks) => blocks.clone(),
        other => vec![other.clone()],
    };
    let mut out: Vec<Value> = Vec::new();
    let mut combined = 0;
    for m in messages.as_array().into_iter().flatten() {
        match out.last_mut() {
            Some(last) if last["role"] == m["role"] => {
                let mut content = blocks(&last["content"]);
                content.extend(blocks(&m["content"]));
                last["content"] = Value::Array(content);
                combined += 1;
            }
            _ => out.push(m.clone()),
        }
    }
    (Value::Array(out), combined)
}

/// Whether every call the model answered for a session is in its usage exactly once: `usage.model_calls`
/// is what its trace records (reconciled + worst case), at least what was answered, and no more
/// calls were reconciled than answered; its tokens are what was billed (at least that, when some
/// call was counted at its worst case).
fn calls_counted_once(s: &Value, bill: GoalBill, calls: &TracedCalls) -> Result<(), String> {
    let (answered, reconciled, worst, counted) =
        (bill.answered, calls.reconciled(), calls.worst_case, usage(s, "model_calls"));
    let (input, output) = (usage(s, "input_tokens"), usage(s, "output_tokens"));
    if counted != reconciled + worst {
        return Err(format!(
            "usage.model_calls {counted}, but the trace has {reconciled} reconciled + {worst} worst-case"
        ));
    }
    if answered > counted {
        return Err(format!("the model answered {answered} calls, usage counts {counted}: missed"));
    }
    if reconciled > answered {
        return Err(format!("{reconciled} calls reconciled, the model answered {answered}: counted twice"));
    }
    let exact = input == bill.input_tokens && output == bill.output_tokens;
    let covers = input >= bill.input_tokens && output >= bill.output_tokens;
    if (worst == 0 && !exact) || !covers {
        let billed = (bill.input_tokens, bill.output_tokens);
        return Err(format!("usage tokens {input}/{output}, billed {}/{} ({worst} worst-case)", billed.0, billed.1));
    }
    Ok(())
}

/// Whether a completed `[steps=n]` session holds each step's turn once, in order, and its trace a
/// reconciled model call for each of steps 1..=n and no other.
fn steps_once(s: &Value, n: usize, calls: &TracedCalls) -> Result<(), String> {
    check_step_conversation(s, n)?;
    let expected = 1..=n as u64;
    let unreconciled: Vec<u64> = expected.clone().filter(|k| !calls.reconciled_by_step.contains_key(k)).collect();
    if !unreconciled.is_empty() {
        // The conversation holds these steps, but no call of theirs was reconciled: the reply was
        // written by a worker whose reservation another had already counted, i.e. that had lost
        // its lease.
        return Err(format!(
            "steps {unreconciled:?} are in the conversation without a reconciled model call (written after a lost lease?)"
        ));
    }
    let beyond: Vec<u64> = calls.reconciled_by_step.keys().copied().filter(|k| !expected.contains(k)).collect();
    if !beyond.is_empty() {
        return Err(format!("model calls reconciled for steps {beyond:?}, beyond the script's {n}"));
    }
    Ok(())
}

/// No key executed more than `crashes` times beyond its first, and no call without a key, on
/// either tool server.
fn tool_repeats(rig: &Rig, crashes: u64) -> Row {
    let mut tools = Row::new(&format!("tool executions repeated under one key <= crashes ({crashes})"));
    let (support, flaky) = (rig.fleet.tools.stats(), rig.flaky.stats());
    for stats in [&support, &flaky] {
        for (key, n) in &stats.executed_by_key {
            if n.saturating_sub(1) > crashes {
                tools.violation(format!("key {key} executed {n} times"));
            } else {
                tools.ok();
            }
        }
        if stats.missing_key > 0 {
            tools.violation(format!("{} calls without an Idempotency-Key", stats.missing_key));
        }
    }
    tools.note = format!(
        "{} repeated executions in all; {} calls failed on purpose and were retried",
        support.repeated_executions() + flaky.repeated_executions(),
        support.failures_injected + flaky.failures_injected
    );
    tools
}

/// Whether a session ended as its kind must; why not otherwise.
fn expected_end(p: &Planned, s: &Value) -> Result<(), String> {
    let status = s["status"].as_str().unwrap_or("?");
    if status != p.kind.expected_status() {
        let error = s["error"].as_str().unwrap_or("");
        return Err(format!("ended {status}, expected {} {error}", p.kind.expected_status()));
    }
    let steps = usage(s, "steps");
    match p.kind {
        Kind::Short | Kind::Long | Kind::FailingTool => {
            let n = p.steps.unwrap_or(0) as u64;
            if steps != n {
                return Err(format!("took {steps} steps, its script has {n}"));
            }
        }
        Kind::Capped if steps != u64::from(CAPPED_MAX_STEPS) => {
            return Err(format!("took {steps} steps, its budget allows {CAPPED_MAX_STEPS}"));
        }
        Kind::Escalating => {
            let reply = p.human_reply();
            let result = s["result"].as_str().unwrap_or("");
            if !result.contains(&reply) {
                return Err(format!("its result {result:?} does not quote the human's reply"));
            }
        }
        Kind::Approval => {
            let results = tool_results(s);
            if results.len() != 1 || results[0]["is_error"] != false {
                return Err(format!("expected one successful refund result, got {results:?}"));
            }
        }
        Kind::Capped => {}
    }
    Ok(())
}

/// Runs every check on a finished run.
pub async fn check(rig: &Rig, out: &Outcome, bad_inputs: usize) -> anyhow::Result<Vec<Row>> {
    let crashes = out.faults.crashes() as u64;
    let bills = rig.fleet.model.bills_by_goal();
    let mut ended = Row::new("sessions reached their expected end");
    let mut valid = Row::new("stored conversations valid for the Messages API");
    let mut steps = Row::new("steps neither skipped nor repeated");
    let mut usage_row = Row::new("answered model calls counted once in their session");
    let mut budget = Row::new("budgets and caps not exceeded");
    let mut by_kind: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    let mut rerun_steps = 0;
    let mut combined_sessions = 0;
    let (mut answered_total, mut worst_total) = (0, 0);
    for (p, (id, s)) in out.planned.iter().zip(out.ids.iter().zip(&out.sessions)) {
        let who = format!("#{} {} {}", p.index, p.kind.name(), id.as_ref().map_or("(not created)", SessionId::as_str));
        let entry = by_kind.entry(p.kind.name()).or_default();
        entry.0 += 1;
        let (Some(id), Some(s)) = (id, s) else {
            ended.violation(format!("{who}: never created or never read"));
            continue;
        };
        let end = expected_end(p, s);
        entry.1 += u64::from(end.is_ok());
        ended.judge(end, &who);
        let (messages, combined) = combine_turns(&s["messages"]);
        combined_sessions += usize::from(combined > 0);
        valid.judge(check_conversation(&messages, p.tools), &who);

        let records = trace(rig, id).await?;
        let calls = TracedCalls::of(&records);
        rerun_steps += calls.reconciled_by_step.values().filter(|n| **n > 1).count();
        if let Some(n) = p.steps.filter(|_| s["status"] == "completed") {
            steps.judge(steps_once(s, n, &calls), &who);
        }

        let bill = bills.get(&p.goal).copied().unwrap_or_default();
        answered_total += bill.answered;
        worst_total += calls.worst_case;
        let call_check = calls_counted_once(s, bill, &calls);
        usage_row.judge(call_check, &who);

        let taken = usage(s, "steps");
        let within = if taken > u64::from(p.max_steps) {
            Err(format!("took {taken} steps, max_steps {}", p.max_steps))
        } else {
            Ok(())
        };
        budget.judge(within, &who);
    }
    ended.note = by_kind.iter().map(|(k, (n, ok))| format!("{k} {ok}/{n}")).collect::<Vec<_>>().join(", ");
    valid.note = format!("{combined_sessions} stored two turns of one role in a row, which the API combines into one");
    steps.note = format!("{rerun_steps} steps re-ran their model call after a crash (their effects kept once)");
    let stats = rig.fleet.model.stats();
    usage_row.note = format!(
        "model answered {} ({} for sessions), {} counted at worst case; 529/429/500 injected {}/{}/{}",
        stats.answered_total,
        answered_total,
        worst_total,
        stats.injected.r529,
        stats.injected.r429,
        stats.injected.r500
    );
    if stats.invalid_total > 0 {
        valid.violation(format!(
            "the model server rejected {} requests: {:?}",
            stats.invalid_total, stats.invalid_reasons
        ));
    }

    let tools = tool_repeats(rig, crashes);
    let mut rows = vec![ended, valid, steps, tools, usage_row, budget];
    rows.extend(check_queues(rig, bad_inputs).await?);
    Ok(rows)
}

/// The work queues drain (waiting up to a minute for stale messages to be dropped), no session is
/// left active, and the dead-letter queue holds exactly the malformed requests.
async fn check_queues(rig: &Rig, bad_inputs: usize) -> anyhow::Result<Vec<Row>> {
    let (conn, ch) = rig.fleet.amqp().await?;
    let queues = rig.fleet.work_queues();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut left = BTreeMap::new();
    loop {
        left.clear();
        for q in &queues {
            let depth = queue_depth(&ch, q).await.unwrap_or(0);
            if depth > 0 {
                left.insert(q.clone(), depth);
            }
        }
        if left.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut drained = Row::new("step queues drained, no session left active");
    for q in &queues {
        match left.get(q) {
            Some(depth) => drained.violation(format!("{q} holds {depth} messages")),
            None => drained.ok(),
        }
    }
    let active = format!("{}:active", rig.fleet.config.redis.key_prefix);
    let live: u64 = redis::cmd("ZCARD").arg(&active).query_async(&mut rig.fleet.redis().await?).await?;
    if live > 0 {
        drained.violation(format!("{live} sessions still in {active}"));
    } else {
        drained.ok();
    }
    let metrics = rig.fleet.http.get(format!("{}/metrics", rig.fleet.ops)).send().await?.text().await?;
    let rescued = prometheus_counter(&metrics, "agentfleet_retries_total", "reason=\"janitor\"");
    drained.note = format!("the janitor published {rescued} stalled steps again");
    let mut dead = Row::new("dead-lettered only the bad input");
    let depth = u64::from(queue_depth(&ch, &rig.fleet.dead_letter_queue()).await?);
    dead.checked = depth.max(bad_inputs as u64);
    dead.violations = depth.abs_diff(bad_inputs as u64);
    dead.note = format!("{depth} dead letters, {bad_inputs} malformed requests published");
    if dead.violations > 0 {
        dead.examples.push(format!("{depth} dead letters for {bad_inputs} malformed requests"));
    }
    let _ = conn.close(200, "checked".into()).await;
    Ok(vec![drained, dead])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn consecutive_turns_of_one_role_are_combined() {
        let messages = json!([
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "a"}]},
            {"role": "user", "content": "b"},
        ]);
        let (out, combined) = combine_turns(&messages);
        assert_eq!(combined, 1);
        assert_eq!(out.as_array().map(Vec::len), Some(3));
        assert_eq!(out[2]["content"], json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]));
    }

    #[test]
    fn a_step_without_a_reconciled_call_is_reported() {
        let s = json!({"messages": [
            {"role": "user", "content": "[steps=1] x"},
            {"role": "assistant", "content": [{"type": "text", "text": "Done after 1 steps."}]},
        ]});
        let calls =
            |steps: &[u64]| TracedCalls { reconciled_by_step: steps.iter().map(|k| (*k, 1)).collect(), worst_case: 0 };
        assert_eq!(steps_once(&s, 1, &calls(&[1])), Ok(()));
        assert!(steps_once(&s, 1, &calls(&[])).expect_err("unreconciled").contains("steps [1]"));
        assert!(steps_once(&s, 1, &calls(&[1, 2])).expect_err("beyond").contains("[2]"));
        assert!(steps_once(&s, 2, &calls(&[1, 2])).is_err(), "the conversation has one step, not two");
    }

    #[test]
    fn traced_calls_split_reconciled_from_worst_case() {
        let records = [
            json!({"action": "model_call", "step": 1, "success": true}),
            json!({"action": "model_call", "step": 1, "success": true}),
            json!({"action": "summary_call", "step": 2, "success": true}),
            json!({"action": "model_call", "step": 2, "success": false, "input_tokens": 10, "output_tokens": 5}),
            json!({"action": "model_call", "step": 2, "success": false, "input_tokens": 0, "output_tokens": 0}),
            json!({"action": "tool_call", "step": 1, "success": true}),
            json!({"action": "model_call", "step": 3, "success": false, "input_tokens": 9, "reservation": "r1"}),
            json!({"action": "model_call", "step": 3, "success": true, "supersedes": "r1"}),
        ];
        let calls = TracedCalls::of(&records);
        assert_eq!(calls.reconciled_by_step, BTreeMap::from([(1, 2), (2, 1), (3, 1)]));
        assert_eq!((calls.reconciled(), calls.worst_case), (4, 1), "a replaced worst case is not counted");
    }
}
