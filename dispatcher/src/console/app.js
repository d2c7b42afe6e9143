// The operator console: renders each page from the /v1 API (with the console's session cookie)
// and keeps it live with the event streams. No framework, no build step.
"use strict";

const app = document.getElementById("app");
const csrf = document.querySelector('meta[name="csrf-token"]').content;
const KINDS = ["session.created", "session.completed", "session.failed", "session.escalated",
  "session.awaiting_approval", "session.cancelled", "session.budget_exhausted", "session.budget_alert",
  "session.approved", "session.rejected", "session.replied", "session.resumed"];
const STATUSES = ["queued", "running", "awaiting_human", "awaiting_approval", "paused", "completed", "failed",
  "budget_exhausted", "cancelled"];

// --- helpers -------------------------------------------------------------------------------

/** An element: el("a", {href: "/x", class: "c"}, "text", child, …). Text is never parsed as HTML. */
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(e.dataset, v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

/** Calls the API; throws an Error with the API's message when the answer is not 2xx. */
async function api(path, options = {}) {
  const init = { credentials: "same-origin", headers: { Accept: "application/json" }, ...options };
  if (init.body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(init.body);
  }
  if (init.method && init.method !== "GET") init.headers["X-CSRF-Token"] = csrf;
  const r = await fetch(path, init);
  if (r.status === 401) {
    location.href = "/console/login";
    throw new Error("signed out");
  }
  const text = await r.text();
  const body = text ? JSON.parse(text) : null;
  if (!r.ok) throw new Error((body && body.error && body.error.message) || `${r.status} ${r.statusText}`);
  return body;
}

const usd = (x) => (x === null || x === undefined) ? "–" : "$" + Number(x).toFixed(x >= 1 ? 2 : x < 0.01 && x > 0 ? 6 : 4);
const num = (x) => Number(x || 0).toLocaleString("en-US");
function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.round(s / 60)}m ago`;
  if (s < 86400) return `${Math.round(s / 3600)}h ago`;
  return new Date(ms).toISOString().slice(0, 16).replace("T", " ");
}
function until(ms) {
  const s = Math.round((ms - Date.now()) / 1000);
  if (s < 0) return "overdue";
  if (s < 3600) return `in ${Math.max(1, Math.round(s / 60))}m`;
  return `in ${Math.round(s / 3600)}h`;
}
const badge = (status) => el("span", { class: `badge ${status}` }, status.replace(/_/g, " "));
const sessionLink = (id) => el("a", { href: `/console/sessions/${id}`, class: "mono" }, id);

/** Calls f at most every `ms`, the last call always made. */
function debounce(f, ms) {
  let timer = null;
  return () => {
    clearTimeout(timer);
    timer = setTimeout(f, ms);
  };
}

/** Follows an event stream; `on` is called for every named event. Reconnects as EventSource does. */
function follow(url, kinds, on) {
  const source = new EventSource(url, { withCredentials: true });
  for (const k of kinds) source.addEventListener(k, (e) => on(k, e));
  source.onmessage = (e) => on("message", e);
  return source;
}

function flash(message, kind = "error") {
  const old = document.getElementById("flash");
  if (old) old.remove();
  app.prepend(el("p", { id: "flash", class: kind }, message));
}

/** Runs an action; its errors are shown, not thrown. */
async function act(f) {
  try {
    await f();
  } catch (e) {
    flash(e.message);
  }
}

// --- sessions ------------------------------------------------------------------------------

async function sessionsPage() {
  const q = new URLSearchParams(location.search);
  const status = el("select", { id: "f-status", name: "status" }, el("option", { value: "" }, "any status"),
    STATUSES.map((s) => el("option", { value: s, selected: q.get("status") === s }, s.replace(/_/g, " "))));
  const agent = el("input", { id: "f-agent", name: "agent", placeholder: "agent", value: q.get("agent") || "" });
  const since = el("select", { id: "f-since", name: "since" },
    [["", "any time"], ["3600", "last hour"], ["86400", "last day"], ["604800", "last week"]]
      .map(([v, l]) => el("option", { value: v, selected: (q.get("since") || "") === v }, l)));
  const body = el("tbody", { id: "sessions" });
  const live = el("span", { class: "live", id: "live" }, "connecting…");
  const filters = el("form", { class: "filters", id: "filters" }, status, agent, since, live);
  app.replaceChildren(el("h1", {}, "Sessions"), filters,
    el("table", { class: "list" }, el("thead", {}, el("tr", {},
      ["Session", "Agent", "Status", "Steps", "Cost", "Updated"].map((h) => el("th", {}, h)))), body));

  async function load() {
    const p = new URLSearchParams({ limit: "100" });
    if (status.value) p.set("status", status.value);
    if (agent.value.trim()) p.set("agent", agent.value.trim());
    if (since.value) p.set("created_after_ms", String(Date.now() - Number(since.value) * 1000));
    const page = await api(`/v1/sessions?${p}`);
    body.replaceChildren(...page.sessions.map((s) => el("tr", { dataset: { id: s.id } },
      el("td", {}, sessionLink(s.id)), el("td", {}, s.agent), el("td", {}, badge(s.status)),
      el("td", { class: "steps num" }, s.step), el("td", { class: "num" }, usd(s.cost_usd)),
      el("td", { class: "muted" }, ago(s.updated_at_ms)))));
    if (!page.sessions.length) body.replaceChildren(el("tr", {}, el("td", { colspan: 6, class: "muted" }, "No sessions.")));
  }
  const reload = debounce(() => act(load), 250);
  filters.addEventListener("change", () => {
    const u = new URLSearchParams();
    if (status.value) u.set("status", status.value);
    if (agent.value.trim()) u.set("agent", agent.value.trim());
    if (since.value) u.set("since", since.value);
    history.replaceState(null, "", `${location.pathname}${u.toString() ? "?" + u : ""}`);
    reload();
  });
  filters.addEventListener("submit", (e) => { e.preventDefault(); reload(); });
  await act(load);
  const source = follow("/v1/events", KINDS, reload);
  source.onopen = () => { live.textContent = "live"; };
  source.onerror = () => { live.textContent = "reconnecting…"; };
  // Steps are not lifecycle events: running sessions' rows refresh every few seconds too.
  setInterval(() => {
    if ([...body.querySelectorAll(".badge")].some((b) => /running|queued/.test(b.className))) reload();
  }, 2000);
}

// --- one session ---------------------------------------------------------------------------

function recordLine(r) {
  const parts = [];
  if (r.action === "model_call" || r.action === "summary_call") {
    let tokens = `${num(r.input_tokens)} in, ${num(r.output_tokens)} out`;
    if (r.cache_read_input_tokens) tokens += `, ${num(r.cache_read_input_tokens)} cache read`;
    if (r.cache_creation_input_tokens) tokens += `, ${num(r.cache_creation_input_tokens)} cache written`;
    parts.push(el("span", {}, tokens), el("span", {}, usd(r.cost_usd)));
  }
  parts.push(el("span", { class: "muted" }, `${num(r.duration_ms)} ms`));
  const head = el("div", { class: "head" }, el("b", {}, r.tool_name ? `${r.action} · ${r.tool_name}` : r.action),
    r.success ? null : el("span", { class: "badge failed" }, "failed"), ...parts);
  const detail = [];
  if (r.input_summary) detail.push(el("div", { class: "io" }, el("span", { class: "label" }, "in"), el("code", {}, r.input_summary)));
  if (r.output_summary) detail.push(el("div", { class: "io" }, el("span", { class: "label" }, "out"), el("code", {}, r.output_summary)));
  if (r.error) detail.push(el("div", { class: "io error" }, el("span", { class: "label" }, "error"), el("code", {}, r.error)));
  return el("li", { class: `record ${r.action}` }, head, detail);
}

function budget(s) {
  const u = s.usage, l = s.limits;
  const steps = l.max_steps - (s.remaining ? s.remaining.steps : 0);
  const rows = [
    ["steps", steps, l.max_steps, String(steps), String(l.max_steps)],
    ["cost", u.cost_usd, l.max_cost_usd, usd(u.cost_usd), usd(l.max_cost_usd)],
    ["tokens", u.total_tokens, l.max_tokens, num(u.total_tokens), num(l.max_tokens)],
  ];
  return el("table", { class: "budget", id: "budget" }, rows.map(([name, used, max, a, b]) => el("tr", {},
    el("th", {}, name), el("td", {}, el("meter", { min: 0, max: max || 1, value: Math.min(used, max || 1) })),
    el("td", { class: "num" }, `${a} of ${b}`))));
}

function actions(s, reload) {
  const id = s.id;
  const box = el("div", { class: "actions", id: "actions" });
  const esc = s.escalation || {};
  if (s.status === "awaiting_approval") {
    const reason = el("input", { id: "reject-reason", placeholder: "why (the model reads it)" });
    box.append(el("p", {}, "Waits for an approval: ", el("b", {}, esc.tool || "a tool call"), " ",
      el("code", {}, JSON.stringify(esc.input || {}))),
      el("button", { id: "approve", class: "primary", onclick: () => act(async () => {
        await api(`/v1/sessions/${id}/approve`, { method: "POST", body: {} });
        reload();
      }) }, "Approve"),
      reason,
      el("button", { id: "reject", onclick: () => act(async () => {
        await api(`/v1/sessions/${id}/reject`, { method: "POST", body: { reason: reason.value || "rejected by an operator" } });
        reload();
      }) }, "Reject"));
  } else if (s.status === "awaiting_human") {
    const text = el("textarea", { id: "reply-text", rows: 3, placeholder: "Your answer" });
    box.append(el("p", {}, "Waits for a person: ", esc.reason || esc.kind || ""), text,
      el("button", { id: "reply", class: "primary", onclick: () => act(async () => {
        await api(`/v1/sessions/${id}/reply`, { method: "POST", body: { text: text.value } });
        reload();
      }) }, "Reply"));
  }
  if (!["completed", "failed", "budget_exhausted", "cancelled"].includes(s.status) && !s.cancel_requested) {
    box.append(el("button", { id: "cancel", class: "danger", onclick: () => act(async () => {
      if (!confirm("Cancel this session?")) return;
      await api(`/v1/sessions/${id}/cancel`, { method: "POST" });
      reload();
    }) }, "Cancel"));
  }
  return box;
}

async function forkFrom(id, step) {
  const created = await api(`/v1/sessions/${id}/fork`, { method: "POST", body: { from_step: step } });
  location.href = `/console/sessions/${created.id}`;
}

async function sessionPage(id) {
  async function render() {
    const [s, trace] = await Promise.all([api(`/v1/sessions/${id}`), api(`/v1/sessions/${id}/trace`)]);
    const steps = new Map();
    for (const r of trace.records) {
      if (!steps.has(r.step)) steps.set(r.step, []);
      steps.get(r.step).push(r);
    }
    const timeline = el("ol", { class: "timeline", id: "timeline" }, [...steps.entries()].map(([n, records]) =>
      el("li", { class: "step", dataset: { step: n } },
        el("h3", {}, `Step ${n}`, el("button", { class: "fork", dataset: { step: n },
          onclick: () => act(() => forkFrom(id, n)) }, "Fork from here")),
        el("ul", {}, records.map(recordLine)))));
    const origin = s.forked_from ? el("p", { class: "muted", id: "origin" }, "Forked from ",
      sessionLink(s.forked_from.session), ` at step ${s.forked_from.step}`) : null;
    const outcome = s.result ? el("div", { class: "result", id: "result" }, el("h2", {}, "Result"), el("p", {}, s.result))
      : s.error ? el("div", { class: "result error", id: "result" }, el("h2", {}, "Error"), el("p", {}, s.error)) : null;
    app.replaceChildren(...[
      el("h1", { class: "mono" }, s.id),
      el("p", { class: "facts" }, badge(s.status), el("span", {}, "agent ", el("b", {}, s.agent)),
        el("span", {}, "step ", el("b", { id: "step" }, s.step)), el("span", {}, "model calls ", el("b", {}, s.usage.model_calls)),
        el("span", { class: "muted" }, "updated ", ago(s.updated_at_ms)), el("span", { class: "live", id: "live" }, live)),
      origin, actions(s, reload), outcome, el("h2", {}, "Budget"), budget(s), el("h2", {}, "Timeline"), timeline,
    ].filter(Boolean));
    app.dataset.status = s.status;
    return s;
  }
  let live = "connecting…";
  const reload = debounce(() => act(render), 150);
  try {
    await render();
  } catch (e) {
    // Not there, or another tenant's: say so, and follow nothing.
    app.replaceChildren(el("p", { id: "flash", class: "error" }, e.message),
      el("p", {}, el("a", { href: "/console/sessions" }, "Back to the sessions")));
    return;
  }
  const source = follow(`/v1/sessions/${id}/events`, ["model_call", "summary_call", "tool_call", "escalation",
    "approval", "approval_requested", "approved", "rejected", "human_reply", "budget", "error", "cancelled", "trace",
    "session.ended"], (kind) => {
    if (kind === "session.ended") source.close();
    reload();
  });
  source.onopen = () => { live = "live"; const l = document.getElementById("live"); if (l) l.textContent = live; };
  // A session that waits: its stream ends; an approval or reply resumes it, so follow again.
  source.onerror = () => { if (source.readyState === EventSource.CLOSED) reload(); };
  setInterval(() => {
    if (source.readyState === EventSource.CLOSED && !/completed|failed|exhausted|cancelled/.test(app.dataset.status || "")) reload();
  }, 2000);
}

// --- inbox ---------------------------------------------------------------------------------

async function inboxPage() {
  const list = el("ul", { class: "inbox", id: "inbox" });
  app.replaceChildren(el("h1", {}, "Inbox"), el("p", { class: "muted" }, "Escalations and approvals, oldest first."), list);
  async function load() {
    const { escalations } = await api("/v1/escalations");
    escalations.sort((a, b) => a.since_ms - b.since_ms);
    list.replaceChildren(...escalations.map((e) => {
      const id = e.session_id;
      const item = el("li", { class: "item", dataset: { id, kind: e.kind || "" } },
        el("div", { class: "head" }, sessionLink(id), badge(e.status), el("span", {}, e.agent),
          el("span", { class: "muted" }, `waiting since ${ago(e.since_ms)}, deadline ${until(e.deadline_ms)}`)),
        e.tool ? el("p", {}, el("b", {}, e.tool), " ", el("code", {}, JSON.stringify(e.input))) : null,
        e.reason ? el("p", {}, e.reason) : null);
      if (e.status === "awaiting_approval") {
        const reason = el("input", { class: "reason", placeholder: "why (for a rejection)" });
        item.append(el("div", { class: "actions" },
          el("button", { class: "primary approve", onclick: () => act(async () => {
            await api(`/v1/sessions/${id}/approve`, { method: "POST", body: {} });
            flash(`Approved ${id}.`, "ok");
            await load();
          }) }, "Approve"), reason,
          el("button", { class: "reject", onclick: () => act(async () => {
            await api(`/v1/sessions/${id}/reject`, { method: "POST", body: { reason: reason.value || "rejected by an operator" } });
            flash(`Rejected ${id}.`, "ok");
            await load();
          }) }, "Reject")));
      } else {
        const text = el("textarea", { class: "reply-text", rows: 2, placeholder: "Your answer" });
        item.append(el("div", { class: "actions" }, text, el("button", { class: "primary reply", onclick: () => act(async () => {
          await api(`/v1/sessions/${id}/reply`, { method: "POST", body: { text: text.value } });
          flash(`Replied to ${id}.`, "ok");
          await load();
        }) }, "Reply")));
      }
      return item;
    }));
    if (!escalations.length) list.replaceChildren(el("li", { class: "muted" }, "Nothing waits for you."));
  }
  await act(load);
  follow("/v1/events?kind=session.escalated,session.awaiting_approval,session.created", KINDS, debounce(() => act(load), 250));
}

// --- fleet ---------------------------------------------------------------------------------

async function fleetPage() {
  const box = el("div", { id: "fleet" });
  app.replaceChildren(el("h1", {}, "Fleet"), box);
  async function load() {
    const f = await api("/v1/fleet");
    box.replaceChildren(
      el("div", { class: "cards" },
        el("div", { class: "card" }, el("span", { class: "big", id: "steps-per-second" }, f.steps_per_second), "steps/s"),
        el("div", { class: "card" }, el("span", { class: "big", id: "workers" }, f.workers), "workers"),
        el("div", { class: "card" }, el("span", { class: "big", id: "dead-letters" }, f.dead_letters), "dead letters"),
        el("div", { class: "card" }, el("span", { class: "big", id: "open-breakers" }, f.open_breakers.length), "open breakers")),
      el("h2", {}, "Spend today (UTC) against the daily caps"),
      el("p", { class: "muted" }, "Counted: spent, plus what calls in flight and the workers' allowances hold."),
      el("table", { class: "list", id: "spend" }, f.spend_today.map((x) => el("tr", {},
        el("td", {}, `${x.scope} `, el("b", {}, x.name)),
        el("td", {}, x.cap_usd ? el("meter", { min: 0, max: x.cap_usd, value: Math.min(x.counted_usd, x.cap_usd) }) : ""),
        el("td", { class: "num" }, `${usd(x.counted_usd)} of ${x.cap_usd ? usd(x.cap_usd) : "no cap"}`)))),
      el("h2", {}, "Breakers"),
      el("table", { class: "list", id: "breakers" }, f.breakers.map((b) => el("tr", {}, el("td", { class: "mono" }, b.name),
        el("td", {}, badge(b.status))))),
      el("h2", {}, "Queues"),
      el("table", { class: "list", id: "queues" }, el("tr", {}, ["Queue", "Messages", "Consumers"].map((h) => el("th", {}, h))),
        f.queues.map((q) => el("tr", {}, el("td", { class: "mono" }, q.queue), el("td", { class: "num" }, num(q.messages)),
          el("td", { class: "num" }, q.consumers)))),
      el("p", { class: "muted" }, f.read_at_ms ? `Queues and breakers read ${ago(f.read_at_ms)}.` : "Not read yet."));
  }
  await act(load);
  setInterval(() => act(load), 3000);
}

// --- start ---------------------------------------------------------------------------------

const pages = { sessions: sessionsPage, session: () => sessionPage(app.dataset.id), inbox: inboxPage, fleet: fleetPage };
(pages[app.dataset.page] || sessionsPage)();
