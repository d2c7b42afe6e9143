//! Stateless scripts: what the "model" answers, from the goal and the turn index alone (see [`super`]).

/// The tool `[steps=N]` and `[badargs]` call.
pub(crate) const STEP_TOOL: &str = "search_knowledge_base";

/// The broken `arguments` text `[badargs]` sends.
pub(crate) const BAD_ARGUMENTS: &str = "{not json";

/// How many characters of a tool result the scripts quote.
const QUOTE_CHARS: usize = 80;

/// What a script answers for one turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Turn {
    /// `None` is sent as `content: null`.
    pub(crate) content: Option<String>,
    pub(crate) tool_calls: Vec<ToolCall>,
    pub(crate) finish_reason: &'static str,
}

/// One function call, `arguments` as the text sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ToolCall {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) arguments: String,
}

/// Everything a script may look at.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Context<'a> {
    pub(crate) goal: &'a str,
    /// The number of assistant messages already in the request.
    pub(crate) turn: usize,
    pub(crate) tools: &'a [String],
    pub(crate) last_tool_result: Option<&'a str>,
}

/// Plays the script the goal asks for.
pub(crate) fn play(ctx: &Context<'_>) -> Turn {
    let tokens: Vec<&str> = bracketed(ctx.goal).flat_map(str::split_whitespace).collect();
    if tokens.contains(&"badargs") {
        return bad_arguments(ctx);
    }
    let steps = tokens.iter().find_map(|t| t.strip_prefix("steps=")?.parse::<usize>().ok());
    match steps {
        Some(n) => steps_turn(ctx, n.max(1)),
        None => stop("Done."),
    }
}

/// The insides of every `[...]` in `text`.
fn bracketed(text: &str) -> impl Iterator<Item = &str> {
    text.split('[').skip(1).filter_map(|part| part.split_once(']').map(|(inside, _)| inside))
}

/// `[steps=N]`: N-1 tool turns (alternating `tool_calls` and `stop`), then done.
fn steps_turn(ctx: &Context<'_>, n: usize) -> Turn {
    let k = ctx.turn;
    if k + 1 >= n {
        return stop(&format!("Done after {n} steps."));
    }
    if !has_step_tool(ctx) {
        return stop(&format!("I cannot continue: the tool `{STEP_TOOL}` is not available."));
    }
    let arguments = serde_json::json!({ "query": format!("step {} of {n}", k + 1) }).to_string();
    let finish_reason = if k.is_multiple_of(2) { "tool_calls" } else { "stop" };
    Turn { content: Some(format!("Step {} of {n}.", k + 1)), tool_calls: vec![call(arguments)], finish_reason }
}

/// `[badargs]`: a call with broken arguments and no text, then an answer quoting the tool result.
fn bad_arguments(ctx: &Context<'_>) -> Turn {
    if ctx.turn > 0 || !has_step_tool(ctx) {
        let result: String = ctx.last_tool_result.unwrap_or("none").chars().take(QUOTE_CHARS).collect();
        return stop(&format!("Done. Last tool result: {result}"));
    }
    Turn { content: None, tool_calls: vec![call(BAD_ARGUMENTS.to_owned())], finish_reason: "tool_calls" }
}

fn has_step_tool(ctx: &Context<'_>) -> bool {
    ctx.tools.iter().any(|t| t == STEP_TOOL)
}

fn call(arguments: String) -> ToolCall {
    ToolCall { id: format!("call_{}", ulid::Ulid::new()), name: STEP_TOOL.to_owned(), arguments }
}

fn stop(text: &str) -> Turn {
    Turn { content: Some(text.to_owned()), tool_calls: Vec::new(), finish_reason: "stop" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn play_at(goal: &str, turn: usize, last: Option<&str>) -> Turn {
        let tools = [STEP_TOOL.to_owned()];
        play(&Context { goal, turn, tools: &tools, last_tool_result: last })
    }

    #[test]
    fn steps_alternate_finish_reasons_then_finish() {
        let finishes: Vec<&str> = (0..4).map(|k| play_at("[steps=5]", k, None).finish_reason).collect();
        assert_eq!(finishes, ["tool_calls", "stop", "tool_calls", "stop"]);
        let turn = play_at("x [steps=5]", 2, None);
        assert_eq!(turn.content.as_deref(), Some("Step 3 of 5."));
        assert_eq!(
            (turn.tool_calls[0].name.as_str(), turn.tool_calls[0].arguments.as_str()),
            (STEP_TOOL, r#"{"query":"step 3 of 5"}"#)
        );
        let done = play_at("[steps=5]", 4, None);
        assert_eq!(
            (done.content.as_deref(), done.finish_reason, done.tool_calls.len()),
            (Some("Done after 5 steps."), "stop", 0)
        );
        assert_eq!(play_at("[steps=0]", 0, None).content.as_deref(), Some("Done after 1 steps."));
    }

    #[test]
    fn steps_without_the_tool_end() {
        let turn = play(&Context { goal: "[steps=3]", turn: 0, tools: &[], last_tool_result: None });
        assert!(turn.tool_calls.is_empty() && turn.finish_reason == "stop");
    }

    #[test]
    fn bad_arguments_then_end() {
        let first = play_at("[badargs] [steps=4]", 0, None);
        assert_eq!((first.content, first.tool_calls[0].arguments.as_str()), (None, BAD_ARGUMENTS));
        let later = play_at("[badargs]", 1, Some("Error: the arguments were not valid JSON"));
        assert_eq!(later.content.as_deref(), Some("Done. Last tool result: Error: the arguments were not valid JSON"));
    }

    #[test]
    fn no_directive_just_answers() {
        assert_eq!(play_at("hello [steps=many", 0, None), stop("Done."));
        assert_ne!(play_at("[steps=2]", 0, None).tool_calls[0].id, play_at("[steps=2]", 0, None).tool_calls[0].id);
    }
}
