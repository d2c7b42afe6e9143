//! Text for people: numbers, ages, tables, progress lines and one-line views of conversation messages.
//!
//! Everything here is a pure function of its inputs (the current time is a parameter), so it is
//! unit-tested without a fleet.

use std::collections::HashMap;

use serde_json::Value;

/// How many characters of a message line to show.
const LINE_CHARS: usize = 100;

/// `1234567` → `1,234,567`.
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `0.00421` → `$0.0042`: model calls cost fractions of a cent.
pub(crate) fn usd(x: f64) -> String {
    format!("${x:.4}")
}

/// The first `max` characters of `text`, with `…` when cut.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(max).collect();
    if chars.next().is_some() { format!("{head}…") } else { head }
}

/// The first non-blank line of `text`, cut to `max` characters, with `…` when anything was left out.
pub(crate) fn first_line(text: &str, max: usize) -> String {
    let mut lines = text.lines().map(str::trim).skip_while(|l| l.is_empty());
    let first = lines.next().unwrap_or_default();
    let more = lines.any(|l| !l.is_empty());
    let line = truncate(first, max);
    if more && !line.ends_with('…') { format!("{line} …") } else { line }
}

/// A duration in milliseconds, coarsely: `12s`, `5m`, `3h`, `2d`.
pub(crate) fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// How long ago `then_ms` was at `now_ms`.
pub(crate) fn ago(now_ms: u64, then_ms: u64) -> String {
    format!("{} ago", age(now_ms.saturating_sub(then_ms)))
}

/// How long until `deadline_ms` at `now_ms`; `overdue` once passed.
pub(crate) fn until(now_ms: u64, deadline_ms: u64) -> String {
    if deadline_ms <= now_ms { "overdue".to_owned() } else { format!("in {}", age(deadline_ms - now_ms)) }
}

/// The line `--wait` and `watch` print when a session moves: `step 3  running  1,234 tokens  $0.0042`.
pub(crate) fn progress(step: u64, status: &str, tokens: u64, cost_usd: f64) -> String {
    format!("step {step}  {status}  {} tokens  {}", thousands(tokens), usd(cost_usd))
}

/// Rows under a header, in columns two spaces apart; the last column is not padded.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    std::iter::once(&header).chain(rows).map(|row| table_row(&widths, row)).collect::<Vec<_>>().join("\n")
}

fn table_row(widths: &[usize], row: &[String]) -> String {
    let cells: Vec<String> = row.iter().zip(widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
    cells.join("  ").trim_end().to_owned()
}

/// The tool name of every `tool_use` in a conversation, by id, so results can name their tool.
pub(crate) fn tool_names(messages: &[Value]) -> HashMap<String, String> {
    blocks_of(messages)
        .filter(|b| b["type"] == "tool_use" || b["type"] == "server_tool_use")
        .filter_map(|b| Some((b["id"].as_str()?.to_owned(), b["name"].as_str()?.to_owned())))
        .collect()
}

fn blocks_of(messages: &[Value]) -> impl Iterator<Item = &Value> {
    messages.iter().filter_map(|m| m["content"].as_array()).flatten()
}

/// A message in a few lines: its text's first line, each tool call, each tool result.
///
/// Thinking and other blocks people do not need to follow the session are left out.
pub(crate) fn message_lines(message: &Value, tools: &HashMap<String, String>) -> Vec<String> {
    let role = message["role"].as_str().unwrap_or("?");
    match &message["content"] {
        Value::String(text) => vec![labelled(role, &first_line(text, LINE_CHARS))],
        Value::Array(blocks) => blocks.iter().filter_map(|b| block_line(role, b, tools)).collect(),
        _ => Vec::new(),
    }
}

fn block_line(role: &str, block: &Value, tools: &HashMap<String, String>) -> Option<String> {
    match block["type"].as_str()? {
        "text" => Some(labelled(role, &first_line(block["text"].as_str()?, LINE_CHARS))),
        "tool_use" | "server_tool_use" => {
            let input = truncate(&block["input"].to_string(), LINE_CHARS);
            Some(labelled(role, &format!("→ {} {input}", block["name"].as_str()?)))
        }
        "tool_result" => Some(result_line(block, tools)),
        _ => None,
    }
}

fn result_line(block: &Value, tools: &HashMap<String, String>) -> String {
    let id = block["tool_use_id"].as_str().unwrap_or_default();
    let tool = tools.get(id).map_or(id, String::as_str);
    let error = if block["is_error"] == true { " (error)" } else { "" };
    labelled("tool", &format!("← {tool}{error}: {}", first_line(&result_text(&block["content"]), LINE_CHARS)))
}

/// A `tool_result`'s content: a string, or text blocks.
fn result_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks.iter().filter_map(|b| b["text"].as_str()).collect::<Vec<_>>().join("\n"),
        _ => String::new(),
    }
}

fn labelled(role: &str, text: &str) -> String {
    format!("  {role:<9}  {text}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_read_like_numbers() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234), "1,234");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(usd(0.00421), "$0.0042");
        assert_eq!(usd(12.5), "$12.5000");
    }

    #[test]
    fn the_progress_line_has_step_status_tokens_and_cost() {
        assert_eq!(progress(3, "running", 1234, 0.0042), "step 3  running  1,234 tokens  $0.0042");
    }

    #[test]
    fn text_is_cut_on_characters_not_bytes() {
        assert_eq!(truncate("héllo", 10), "héllo");
        assert_eq!(truncate("héllo", 2), "hé…");
        assert_eq!(first_line("\n  first  \nsecond", 50), "first …");
        assert_eq!(first_line("only", 50), "only");
        assert_eq!(first_line("", 50), "");
        assert_eq!(first_line("abcdef\nmore", 3), "abc…");
    }

    #[test]
    fn ages_are_coarse() {
        assert_eq!(age(999), "0s");
        assert_eq!(age(59_000), "59s");
        assert_eq!(age(60_000), "1m");
        assert_eq!(age(7_200_000), "2h");
        assert_eq!(age(3 * 86_400_000), "3d");
        assert_eq!(ago(10_000, 4_000), "6s ago");
        assert_eq!(ago(1, 5), "0s ago");
        assert_eq!(until(1_000, 121_000), "in 2m");
        assert_eq!(until(5_000, 5_000), "overdue");
    }

    #[test]
    fn tables_align_columns() {
        let rows = vec![vec!["s_1".to_owned(), "completed".to_owned(), "3".to_owned()]];
        let t = table(&["ID", "STATUS", "STEP"], &rows);
        assert_eq!(t, "ID   STATUS     STEP\ns_1  completed  3");
        assert_eq!(table(&["A", "B"], &[]), "A  B");
    }

    #[test]
    fn messages_show_text_tool_calls_and_results() {
        let call = json!({"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "x"},
            {"type": "text", "text": "Let me look.\nMore."},
            {"type": "tool_use", "id": "toolu_1", "name": "lookup_customer", "input": {"email": "a@b.c"}},
        ]});
        let result = json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "found\nplan: pro", "is_error": false},
            {"type": "tool_result", "tool_use_id": "toolu_9", "content": [{"type": "text", "text": "boom"}], "is_error": true},
        ]});
        let goal = json!({"role": "user", "content": "I want a refund"});
        let messages = [goal.clone(), call.clone(), result.clone()];
        let tools = tool_names(&messages);
        assert_eq!(message_lines(&goal, &tools), ["  user       I want a refund"]);
        assert_eq!(
            message_lines(&call, &tools),
            ["  assistant  Let me look. …", r#"  assistant  → lookup_customer {"email":"a@b.c"}"#]
        );
        assert_eq!(
            message_lines(&result, &tools),
            ["  tool       ← lookup_customer: found …", "  tool       ← toolu_9 (error): boom"]
        );
        assert!(message_lines(&json!({"role": "user"}), &tools).is_empty());
    }
}
