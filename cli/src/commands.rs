//! One function per subcommand: build the request, call the API, print the answer.
//!
//! Each prints the API's document with `--json` and a view for people otherwise, and returns the
//! [`Exit`] that the process's exit code reports.

use anyhow::Context as _;
use futures::{Stream, TryStreamExt as _};
use serde_json::{Map, Value, json};
use tokio::io::AsyncReadExt as _;

use crate::Exit;
use crate::api::Api;
use crate::args::{Args, Command, Fork, List, Submit};
use crate::follow::follow;
use crate::model::{Escalation, Page, Session, Summary, read};
use crate::output::Output;
use crate::view;

/// Runs the command line's command.
pub(crate) async fn run(args: Args) -> anyhow::Result<Exit> {
    let Args { url, token, json, command } = args;
    let api = Api::new(&url, token.as_ref().map(|t| t.0.as_str()))?;
    let out = Output { json };
    match command {
        Command::Submit(s) => submit(&api, out, s).await,
        Command::Status { id } => status(&api, out, &id).await,
        Command::List(l) => list(&api, out, &l).await,
        Command::Watch { id } => finish(&api, out, &id, true).await,
        Command::Fork(f) => fork(&api, out, &f).await,
        Command::Cancel { id } => cancel(&api, out, &id).await,
        Command::Escalations => escalations(&api, out).await,
        Command::Trace { id } => trace(&api, out, &id).await,
        Command::Reply { id, text } => reply(&api, out, &id, text.as_deref()).await,
        Command::Approve { id, note } => approve(&api, out, &id, note).await,
        Command::Reject { id, reason } => reject(&api, out, &id, &reason).await,
        Command::Probe { url, timeout_ms } => probe(&url, timeout_ms).await,
        Command::Dlq(command) => crate::dlq::run(&api, out, command).await,
        Command::Eval(e) => crate::eval::run(api, &url, out, &e).await,
    }
}

/// `probe`: one GET, no token, a short deadline; the status line goes to stdout.
async fn probe(url: &str, timeout_ms: u64) -> anyhow::Result<Exit> {
    let client = reqwest::Client::builder().timeout(std::time::Duration::from_millis(timeout_ms)).build()?;
    let answer = client.get(url).send().await.with_context(|| format!("GET {url}"))?;
    let status = answer.status();
    println!("{url}: {status}");
    Ok(if status.is_success() { Exit::Success } else { Exit::NotCompleted })
}

async fn submit(api: &Api, out: Output, s: Submit) -> anyhow::Result<Exit> {
    let goal = text_or_stdin(s.goal.as_deref(), "goal").await?;
    let created = api.post(&["v1", "sessions"], Some(&submit_body(&s, goal))).await?;
    started(api, out, &created, s.wait).await
}

/// Prints the id of a session just created, or with `wait` follows it to the end.
async fn started(api: &Api, out: Output, created: &Value, wait: bool) -> anyhow::Result<Exit> {
    let id = created["id"].as_str().context("the API answered no session id")?;
    if !wait {
        out.document(created)?;
        out.line(id)?;
        return Ok(Exit::Success);
    }
    out.progress(id)?;
    finish(api, out, id, false).await
}

async fn fork(api: &Api, out: Output, f: &Fork) -> anyhow::Result<Exit> {
    let mut body = Map::new();
    body.insert("from_step".into(), f.from_step.into());
    insert(&mut body, "replace_last_user_message", f.message.clone());
    insert(&mut body, "agent", f.agent.clone());
    let mut budget = Map::new();
    insert(&mut budget, "max_steps", f.max_steps);
    insert(&mut budget, "max_cost_usd", f.max_cost_usd);
    if !budget.is_empty() {
        body.insert("budget".into(), budget.into());
    }
    let created = api.post(&["v1", "sessions", &f.id, "fork"], Some(&Value::Object(body))).await?;
    started(api, out, &created, f.wait).await
}

/// The body of `POST /v1/sessions`, with only the options given.
fn submit_body(s: &Submit, goal: String) -> Value {
    let mut body = Map::new();
    body.insert("agent".into(), s.agent.clone().into());
    body.insert("input".into(), goal.into());
    insert(&mut body, "tenant", s.tenant.clone());
    insert(&mut body, "idempotency_key", s.idempotency_key.clone());
    insert(&mut body, "metadata", s.metadata.clone());
    let mut budget = Map::new();
    insert(&mut budget, "max_steps", s.max_steps);
    insert(&mut budget, "max_cost_usd", s.max_cost_usd);
    insert(&mut budget, "max_tokens", s.max_tokens);
    if !budget.is_empty() {
        body.insert("budget".into(), budget.into());
    }
    body.into()
}

fn insert(map: &mut Map<String, Value>, key: &str, value: Option<impl Into<Value>>) {
    if let Some(v) = value {
        map.insert(key.to_owned(), v.into());
    }
}

/// Follows a session until it is settled, then prints how it stopped.
async fn finish(api: &Api, out: Output, id: &str, messages: bool) -> anyhow::Result<Exit> {
    let v = follow(api, out, id, messages).await?;
    let s: Session = read(&v)?;
    out.document(&v)?;
    out.lines(&view::outcome(&s))?;
    Ok(Exit::of_status(&s.status))
}

async fn status(api: &Api, out: Output, id: &str) -> anyhow::Result<Exit> {
    let v = api.session(id).await?;
    out.document(&v)?;
    out.lines(&view::status(&read(&v)?, now_ms()))?;
    Ok(Exit::Success)
}

async fn list(api: &Api, out: Output, l: &List) -> anyhow::Result<Exit> {
    let query = list_query(l);
    let mut pages = std::pin::pin!(pages(api, &query));
    let first = pages.try_next().await?.unwrap_or_default();
    let mut sessions = first.sessions;
    let mut next = first.next_cursor;
    if l.all {
        while let Some(page) = pages.try_next().await? {
            sessions.extend(page.sessions);
        }
        next = None;
    }
    out.document(&json!({ "sessions": sessions, "next_cursor": next }))?;
    print_sessions(out, &sessions, next.is_some())?;
    Ok(Exit::Success)
}

fn list_query(l: &List) -> Vec<(&'static str, String)> {
    let given = [("status", l.status.clone()), ("agent", l.agent.clone()), ("tenant", l.tenant.clone())];
    let mut query: Vec<(&'static str, String)> = given.into_iter().filter_map(|(k, v)| Some((k, v?))).collect();
    query.extend(l.limit.map(|n| ("limit", n.to_string())));
    query
}

/// The pages of `GET /v1/sessions`, following `next_cursor` as they are read.
fn pages<'a>(api: &'a Api, query: &'a [(&'static str, String)]) -> impl Stream<Item = anyhow::Result<Page>> + 'a {
    // The state is the cursor of the next page to read; `None` once the last page was read.
    futures::stream::try_unfold(Some(None::<String>), move |cursor| async move {
        let Some(cursor) = cursor else { return Ok(None) };
        let mut query = query.to_vec();
        query.extend(cursor.map(|c| ("cursor", c)));
        let page: Page = read(&api.get(&["v1", "sessions"], &query).await?)?;
        let next = page.next_cursor.clone().map(Some);
        Ok(Some((page, next)))
    })
}

fn print_sessions(out: Output, sessions: &[Value], more: bool) -> anyhow::Result<()> {
    if sessions.is_empty() {
        return out.line("no sessions");
    }
    let rows = sessions.iter().map(read::<Summary>).collect::<anyhow::Result<Vec<_>>>()?;
    out.line(&view::sessions(&rows, now_ms()))?;
    if more { out.line("(more sessions: add --all, or a higher --limit)") } else { Ok(()) }
}

async fn cancel(api: &Api, out: Output, id: &str) -> anyhow::Result<Exit> {
    let v = api.post(&["v1", "sessions", id, "cancel"], None).await?;
    out.document(&v)?;
    if v["status"] == "cancelling" {
        out.line(&format!("cancelling {id}: it stops at its next step boundary"))?;
    } else {
        out.line(&format!("cancelled {id}"))?;
    }
    Ok(Exit::Success)
}

async fn escalations(api: &Api, out: Output) -> anyhow::Result<Exit> {
    let v = api.get(&["v1", "escalations"], &[]).await?;
    out.document(&v)?;
    let rows: Vec<Escalation> = read(&v["escalations"])?;
    if rows.is_empty() {
        out.line("nothing waits for people")?;
    } else {
        out.line(&view::escalations(&rows, now_ms()))?;
    }
    Ok(Exit::Success)
}

async fn trace(api: &Api, out: Output, id: &str) -> anyhow::Result<Exit> {
    let v = api.get(&["v1", "sessions", id, "trace"], &[]).await?;
    out.document(&v)?;
    out.line(&view::timeline(&v))?;
    Ok(Exit::Success)
}

async fn reply(api: &Api, out: Output, id: &str, text: Option<&str>) -> anyhow::Result<Exit> {
    let text = text_or_stdin(text, "reply").await?;
    let v = api.post(&["v1", "sessions", id, "reply"], Some(&json!({ "text": text }))).await?;
    resumed(out, &v, "replied to")
}

async fn approve(api: &Api, out: Output, id: &str, note: Option<String>) -> anyhow::Result<Exit> {
    let body = note.map(|n| json!({ "note": n }));
    let v = api.post(&["v1", "sessions", id, "approve"], body.as_ref()).await?;
    resumed(out, &v, "approved the tool call of")
}

async fn reject(api: &Api, out: Output, id: &str, reason: &str) -> anyhow::Result<Exit> {
    let v = api.post(&["v1", "sessions", id, "reject"], Some(&json!({ "reason": reason }))).await?;
    resumed(out, &v, "rejected the tool call of")
}

/// Prints the answer of reply, approve and reject.
fn resumed(out: Output, v: &Value, done: &str) -> anyhow::Result<Exit> {
    out.document(v)?;
    let id = v["id"].as_str().unwrap_or_default();
    out.line(&format!("{done} {id}; it is running again (agentfleet watch {id})"))?;
    Ok(Exit::Success)
}

/// `text`, or all of stdin when it is absent or `-`, without trailing whitespace.
async fn text_or_stdin(text: Option<&str>, what: &str) -> anyhow::Result<String> {
    if let Some(text) = text.filter(|t| *t != "-") {
        return Ok(text.to_owned());
    }
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        eprintln!("reading the {what} from stdin; end it with Ctrl-D");
    }
    let mut text = String::new();
    tokio::io::stdin().read_to_string(&mut text).await.with_context(|| format!("reading the {what} from stdin"))?;
    Ok(text.trim_end().to_owned())
}

fn now_ms() -> u64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn submit_args(extra: &[&str]) -> anyhow::Result<Submit> {
        let argv = ["agentfleet", "submit", "--agent", "support"].into_iter().chain(extra.iter().copied());
        match Args::try_parse_from(argv)?.command {
            Command::Submit(s) => Ok(s),
            other => anyhow::bail!("not submit: {other:?}"),
        }
    }

    #[test]
    fn a_plain_submission_sends_agent_and_input_only() -> anyhow::Result<()> {
        let body = submit_body(&submit_args(&["goal"])?, "goal".into());
        assert_eq!(body, json!({"agent": "support", "input": "goal"}));
        Ok(())
    }

    #[test]
    fn options_become_fields_and_a_budget() -> anyhow::Result<()> {
        let s = submit_args(&["--tenant", "acme", "--idempotency-key", "k1", "--metadata", r#"{"t": 1}"#])?;
        let body = submit_body(&s, "g".into());
        assert_eq!(body["tenant"], "acme");
        assert_eq!(body["idempotency_key"], "k1");
        assert_eq!(body["metadata"], json!({"t": 1}));
        assert!(body.get("budget").is_none());
        let body = submit_body(&submit_args(&["--max-steps", "3", "--max-cost-usd", "0.5"])?, "g".into());
        assert_eq!(body["budget"], json!({"max_steps": 3, "max_cost_usd": 0.5}));
        Ok(())
    }

    #[test]
    fn list_queries_only_the_filters_given() -> anyhow::Result<()> {
        let Command::List(l) =
            Args::try_parse_from(["agentfleet", "list", "--agent", "support", "--limit", "5"])?.command
        else {
            anyhow::bail!("not list")
        };
        let expected = [("agent", "support".to_owned()), ("limit", "5".to_owned())];
        assert_eq!(list_query(&l), expected);
        Ok(())
    }
}
