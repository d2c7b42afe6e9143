//! `agentfleet dlq`: the dead letters — messages the fleet could not process — listed, shown,
//! re-driven or discarded, through `/v1/dlq`.
//!
//! A dead letter's body may be anything (it died for a reason): the API shows it escaped, and this
//! view also escapes control characters, so a hostile body cannot drive the terminal.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::Exit;
use crate::api::Api;
use crate::format::{ago, first_line, table, thousands, truncate};
use crate::model::read;
use crate::output::Output;

/// The kinds of dead letters, as the API names them.
const KINDS: [&str; 4] = ["step", "request", "webhook", "unknown"];

/// How many characters of a header's value `show` prints.
const HEADER_CHARS: usize = 200;
/// How many characters of a detail a table shows.
const DETAIL_CHARS: usize = 50;

/// What to do with the dead letters.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Dlq {
    /// List dead letters, newest first.
    List(ListArgs),
    /// Show one dead letter: why it died, its headers and its body.
    Show {
        /// The dead letter's id (`d_…`).
        id: String,
    },
    /// Publish a dead letter again (one by id, or --all that match), then remove it.
    Redrive(RedriveArgs),
    /// Remove a dead letter for good.
    Discard {
        /// The dead letter's id (`d_…`).
        id: String,
    },
}

/// Which dead letters.
#[derive(Debug, Default, clap::Args)]
pub(crate) struct Filter {
    /// Only dead letters of this kind.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(KINDS))]
    pub(crate) kind: Option<String>,
    /// Only dead letters with this reason code (e.g. `delivery_limit`, `unknown_session`).
    #[arg(long)]
    pub(crate) reason: Option<String>,
    /// Only dead letters taken from this queue.
    #[arg(long)]
    pub(crate) queue: Option<String>,
    /// Only dead letters of this session.
    #[arg(long)]
    pub(crate) session: Option<String>,
    /// Only this tenant's dead letters (an admin token).
    #[arg(long)]
    pub(crate) tenant: Option<String>,
}

impl Filter {
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let given = [
            ("kind", &self.kind),
            ("reason", &self.reason),
            ("queue", &self.queue),
            ("session_id", &self.session),
            ("tenant", &self.tenant),
        ];
        given.into_iter().filter_map(|(k, v)| Some((k, v.clone()?))).collect()
    }
}

/// `agentfleet dlq list`.
#[derive(Debug, clap::Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    pub(crate) filter: Filter,
    /// The longest stored first.
    #[arg(long)]
    pub(crate) oldest: bool,
    /// Dead letters per page (the API's default is 50).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=500))]
    pub(crate) limit: Option<u16>,
    /// Follow `next_cursor` through every page.
    #[arg(long)]
    pub(crate) all: bool,
}

/// `agentfleet dlq redrive`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["id", "all"])))]
pub(crate) struct RedriveArgs {
    /// The dead letter's id (`d_…`).
    #[arg(conflicts_with = "all")]
    pub(crate) id: Option<String>,
    /// Every dead letter that matches the filters, oldest first, up to --limit.
    #[arg(long)]
    pub(crate) all: bool,
    #[command(flatten)]
    pub(crate) filter: Filter,
    /// With --all: the most to re-drive (the API's default is 100).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub(crate) limit: Option<u16>,
}

/// A dead letter, as `GET /v1/dlq` and `GET /v1/dlq/{id}` show it.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct DeadLetter {
    id: String,
    kind: String,
    reason: String,
    detail: Option<String>,
    queue: Option<String>,
    session_id: Option<String>,
    step: Option<u64>,
    tenant: Option<String>,
    dead_at_ms: u64,
    stored_at_ms: u64,
    delivery_count: Option<u64>,
    redriven: u64,
    body_bytes: u64,
    redrivable: bool,
    routing_key: Option<String>,
    not_redrivable: Option<String>,
    headers: Map<String, Value>,
    body: Body,
}

/// The body, as the API shows it.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Body {
    encoding: String,
    text: String,
    json: Option<Value>,
    cut: bool,
}

/// Runs `agentfleet dlq …`.
pub(crate) async fn run(api: &Api, out: Output, command: Dlq) -> anyhow::Result<Exit> {
    match command {
        Dlq::List(l) => list(api, out, &l).await,
        Dlq::Show { id } => show(api, out, &id).await,
        Dlq::Redrive(r) => match r.id.as_deref() {
            Some(id) if !r.all => {
                anyhow::ensure!(
                    r.filter.pairs().is_empty() && r.limit.is_none(),
                    "the filters (--kind, --reason, …) and --limit go with --all, not with an id"
                );
                redrive_one(api, out, id).await
            }
            _ => redrive_many(api, out, &r).await,
        },
        Dlq::Discard { id } => discard(api, out, &id).await,
    }
}

async fn list(api: &Api, out: Output, l: &ListArgs) -> anyhow::Result<Exit> {
    let mut query = l.filter.pairs();
    query.extend(l.limit.map(|n| ("limit", n.to_string())));
    if l.oldest {
        query.push(("order", "oldest".into()));
    }
    let mut page = api.get(&["v1", "dlq"], &query).await?;
    let mut rows: Vec<Value> = read(&page["dead_letters"])?;
    while l.all
        && let Some(cursor) = page["next_cursor"].as_str().map(str::to_owned)
    {
        let mut q = query.clone();
        q.push(("cursor", cursor));
        page = api.get(&["v1", "dlq"], &q).await?;
        rows.extend(read::<Vec<Value>>(&page["dead_letters"])?);
    }
    let next = if l.all { Value::Null } else { page["next_cursor"].clone() };
    let (stored, in_queue) = (page["stored"].clone(), page["in_queue"].clone());
    out.document(&json!({ "dead_letters": rows, "next_cursor": next, "stored": stored, "in_queue": in_queue }))?;
    let letters = rows.iter().map(read::<DeadLetter>).collect::<anyhow::Result<Vec<_>>>()?;
    out.line(&if letters.is_empty() { "no dead letters".to_owned() } else { rows_view(&letters, now_ms()) })?;
    out.line(&counts(stored.as_u64().unwrap_or(0), in_queue.as_u64()))?;
    if !next.is_null() {
        out.line("(more dead letters: add --all, or a higher --limit)")?;
    }
    Ok(Exit::Success)
}

/// One row per dead letter.
fn rows_view(rows: &[DeadLetter], now_ms: u64) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|d| {
            vec![
                d.id.clone(),
                d.kind.clone(),
                printable(&d.reason),
                d.session_id.clone().unwrap_or_else(|| "-".into()),
                d.step.map_or_else(|| "-".into(), |s| s.to_string()),
                d.tenant.clone().unwrap_or_else(|| "-".into()),
                ago(now_ms, d.dead_at_ms),
                if d.redrivable { "yes".into() } else { "no".into() },
                first_line(&printable(d.detail.as_deref().unwrap_or("")), DETAIL_CHARS),
            ]
        })
        .collect();
    table(&["ID", "KIND", "REASON", "SESSION", "STEP", "TENANT", "DIED", "REDRIVE", "DETAIL"], &rows)
}

fn counts(stored: u64, in_queue: Option<u64>) -> String {
    let waiting = match in_queue {
        Some(n) if n > 0 => {
            format!("; {} more wait in the dead-letter queue (the store is full, or off)", thousands(n))
        }
        _ => String::new(),
    };
    format!("{} stored{waiting}", thousands(stored))
}

async fn show(api: &Api, out: Output, id: &str) -> anyhow::Result<Exit> {
    let v = api.get(&["v1", "dlq", id], &[]).await?;
    out.document(&v)?;
    out.lines(&detail_view(&read(&v)?, now_ms()))?;
    Ok(Exit::Success)
}

/// `agentfleet dlq show`: why it died, where from, whose, what a redrive would do, headers, body.
fn detail_view(d: &DeadLetter, now_ms: u64) -> Vec<String> {
    let why = d.detail.as_deref().map_or_else(|| printable(&d.reason), |x| format!("{}: {}", d.reason, printable(x)));
    let mut lines = vec![format!("{}  {}  {why}", d.id, d.kind)];
    if let Some(s) = &d.session_id {
        let step = d.step.map(|n| format!("  step {n}")).unwrap_or_default();
        lines.push(field("session", &format!("{s}{step}")));
    }
    lines.push(field("tenant", d.tenant.as_deref().unwrap_or("- (unknown: admins only)")));
    let from = d.queue.as_deref().map_or_else(|| "-".to_owned(), printable);
    let key = d.routing_key.as_deref().map(|k| format!("  (routing key {})", printable(k))).unwrap_or_default();
    lines.push(field("queue", &format!("{from}{key}")));
    let deliveries = d.delivery_count.map(|n| format!(", {n} deliveries")).unwrap_or_default();
    let again = if d.redriven > 0 { format!(", re-driven {} times before", d.redriven) } else { String::new() };
    lines.push(field(
        "died",
        &format!("{} (stored {}){deliveries}{again}", ago(now_ms, d.dead_at_ms), ago(now_ms, d.stored_at_ms)),
    ));
    match &d.not_redrivable {
        None => lines.push(field("redrive", &format!("agentfleet dlq redrive {}", d.id))),
        Some(why) => lines.push(field("redrive", &format!("not possible: {}", printable(why)))),
    }
    lines.push("headers".into());
    for (name, value) in &d.headers {
        lines.push(format!("  {}: {}", printable(name), truncate(&printable(&value.to_string()), HEADER_CHARS)));
    }
    let cut = if d.body.cut { ", first 64 KiB shown" } else { "" };
    lines.push(format!("body ({}, {} bytes{cut})", d.body.encoding, thousands(d.body_bytes)));
    let text = match &d.body.json {
        Some(v) => serde_json::to_string_pretty(v).unwrap_or_default(),
        None => d.body.text.clone(),
    };
    lines.extend(printable_lines(&text).into_iter().map(|l| format!("  {l}")));
    lines
}

async fn redrive_one(api: &Api, out: Output, id: &str) -> anyhow::Result<Exit> {
    let v = api.post(&["v1", "dlq", id, "redrive"], None).await?;
    out.document(&v)?;
    out.line(&redriven_line(&v))?;
    Ok(Exit::Success)
}

/// `re-drove d_… (step of s_…) to <exchange>/<key>`, and how to follow the session.
fn redriven_line(v: &Value) -> String {
    let text = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    let exchange = if text("exchange").is_empty() { "(default exchange)".to_owned() } else { text("exchange") };
    let to = format!("{exchange}/{}", text("routing_key"));
    match v["session_id"].as_str() {
        Some(s) => {
            format!("re-drove {} ({} of {s}) to {to}; follow it: agentfleet watch {s}", text("id"), text("kind"))
        }
        None => format!("re-drove {} ({}) to {to}", text("id"), text("kind")),
    }
}

async fn redrive_many(api: &Api, out: Output, r: &RedriveArgs) -> anyhow::Result<Exit> {
    let mut body = Map::new();
    for (k, v) in r.filter.pairs() {
        body.insert(k.to_owned(), v.into());
    }
    if let Some(n) = r.limit {
        body.insert("limit".into(), n.into());
    }
    let v = api.post(&["v1", "dlq", "redrive"], Some(&Value::Object(body))).await?;
    out.document(&v)?;
    let done: Vec<Value> = read(&v["redriven"])?;
    let refused: Vec<Value> = read(&v["refused"])?;
    for d in &done {
        out.line(&redriven_line(d))?;
    }
    out.line(&format!("re-drove {} dead letter{}", done.len(), if done.len() == 1 { "" } else { "s" }))?;
    for r in &refused {
        let id = r["id"].as_str().unwrap_or_default();
        out.line(&format!("refused {id}: {}", printable(r["error"].as_str().unwrap_or_default())))?;
    }
    if v["more"] == true {
        out.line("(more dead letters match: run it again, or with a higher --limit)")?;
    }
    Ok(if refused.is_empty() { Exit::Success } else { Exit::NotCompleted })
}

async fn discard(api: &Api, out: Output, id: &str) -> anyhow::Result<Exit> {
    let v = api.delete(&["v1", "dlq", id]).await?;
    out.document(&v)?;
    out.line(&format!("discarded {id}"))?;
    Ok(Exit::Success)
}

fn field(label: &str, value: &str) -> String {
    format!("{label:<8} {value}").trim_end().to_owned()
}

/// `text` with every control character but a tab as `\u{…}`: nothing reaches the terminal that
/// could move its cursor or change its colours.
fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escape = c.is_control() && c != '\t';
            let shown = if escape { c.escape_unicode().to_string() } else { c.to_string() };
            shown.chars().collect::<Vec<_>>()
        })
        .collect()
}

/// `text` as printable lines (line breaks kept as lines).
fn printable_lines(text: &str) -> Vec<String> {
    text.lines().map(printable).collect()
}

fn now_ms() -> u64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_never_reach_the_terminal() {
        assert_eq!(printable("ok\u{1b}[31mred\u{7}"), "ok\\u{1b}[31mred\\u{7}");
        assert_eq!(printable_lines("a\nb\r"), ["a", "b\\u{d}"], "a lone carriage return would overwrite the line");
    }

    #[test]
    fn a_dead_letter_shows_why_whose_and_its_body() -> anyhow::Result<()> {
        let v = json!({
            "id": "d_01", "kind": "step", "reason": "delivery_limit", "session_id": "s_1", "step": 2,
            "tenant": "acme", "dead_at_ms": 0, "stored_at_ms": 0, "delivery_count": 3, "redriven": 0,
            "body_bytes": 12, "redrivable": true, "queue": "af.steps.default", "routing_key": "default",
            "headers": {"x-death": [{"reason": "delivery_limit"}]},
            "body": {"encoding": "escaped", "text": "\\xff\u{1b}x", "cut": false}
        });
        let lines = detail_view(&read(&v)?, 60_000);
        let text = lines.join("\n");
        assert!(text.starts_with("d_01  step  delivery_limit"), "{text}");
        assert!(text.contains("session  s_1  step 2") && text.contains("tenant   acme"), "{text}");
        assert!(text.contains("redrive  agentfleet dlq redrive d_01"), "{text}");
        assert!(text.contains("  \\xff\\u{1b}x") && !text.contains('\u{1b}'), "{text}");
        Ok(())
    }

    #[test]
    fn the_store_and_the_queue_are_counted() {
        assert_eq!(counts(3, Some(0)), "3 stored");
        assert_eq!(
            counts(10_000, Some(1200)),
            "10,000 stored; 1,200 more wait in the dead-letter queue (the store is full, or off)"
        );
    }
}
