// genqueue dashboard: one page, hash-routed views, live from /events (server-sent events).
// Every value from the server is put in the page as text (textContent), never as HTML.
"use strict";

const TERMINAL = new Set(["succeeded", "failed", "timed_out", "cancelled", "submit_unknown", "rejected"]);
const STATES = ["parked", "pending", "submitting", "submitted", "running", "downloading",
  "succeeded", "failed", "timed_out", "cancelled", "submit_unknown", "rejected"];
const KINDS = ["image", "upscale", "video", "workflow"];
const PAGE = 50;

const app = {
  csrf: null,
  counts: { states: {}, listed: 0, last_event: "0-0" },
  view: null,        // the current view: { name, onEvents(batch), ... }
  source: null,
  eventsSeen: 0,
};

// ------------------------------------------------------------------ helpers

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function fmtTime(t) {
  if (t === null || t === undefined) return "";
  const d = new Date(t * 1000);
  return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

function fmtDate(t) {
  if (!t) return "";
  const d = new Date(t * 1000);
  return d.toLocaleDateString() + " " + d.toLocaleTimeString([], { hour12: false });
}

function fmtDur(s) {
  if (s === null || s === undefined) return "";
  if (s < 1) return (s * 1000).toFixed(0) + " ms";
  if (s < 120) return s.toFixed(s < 10 ? 2 : 1) + " s";
  if (s < 7200) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function stateBadge(state) {
  return el("span", { class: "state s-" + state, text: state });
}

async function api(path, options) {
  const answer = await fetch(path, Object.assign({ credentials: "same-origin" }, options || {}));
  if (!answer.ok) {
    let message = answer.status + " " + answer.statusText;
    try { message = (await answer.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return answer.json();
}

async function post(path) {
  return api(path, { method: "POST", headers: { "X-CSRF-Token": app.csrf } });
}

function main() { return document.getElementById("main"); }

function show(...nodes) {
  main().replaceChildren(...nodes.filter((n) => n !== null && n !== undefined));
}

// ------------------------------------------------------------------ counts (live)

function drawCounts() {
  const box = document.getElementById("counts");
  const chips = STATES.filter((s) => app.counts.states[s]).map((s) =>
    el("a", { class: "chip", href: "#/jobs?state=" + s, "data-state": s },
      stateBadge(s), el("b", { class: "n", text: app.counts.states[s] || 0 })));
  box.replaceChildren(el("span", { class: "muted", text: "jobs by state:" }), ...chips,
    el("span", { class: "muted small", text: "events seen live: " + app.eventsSeen }));
}

function applyCounts(batch) {
  for (const e of batch) {
    if (e.resync) continue;
    if (e.from) app.counts.states[e.from] = Math.max(0, (app.counts.states[e.from] || 0) - 1);
    app.counts.states[e.to] = (app.counts.states[e.to] || 0) + 1;
  }
}

async function refreshCounts() {
  try {
    const c = await api("/api/counts");
    app.counts = c;
    drawCounts();
  } catch (e) { /* shown by the live indicator */ }
}

// ------------------------------------------------------------------ the live stream

function connect() {
  const live = document.getElementById("live");
  const source = new EventSource("/events?after=" + encodeURIComponent(app.counts.last_event || "0-0"));
  app.source = source;
  source.onopen = () => { live.textContent = "live"; live.className = "live on"; };
  source.onerror = () => { live.textContent = "reconnecting"; live.className = "live off"; };
  source.addEventListener("jobs", (msg) => {
    const batch = JSON.parse(msg.data);
    if (batch.some((e) => e.resync)) {
      refreshCounts();
      route();
      return;
    }
    app.eventsSeen += batch.length;
    applyCounts(batch);
    scheduleCounts();
    if (app.view && app.view.onEvents) app.view.onEvents(batch);
  });
}

let countsTimer = null;
function scheduleCounts() {
  if (countsTimer) return;
  countsTimer = setTimeout(() => { countsTimer = null; drawCounts(); }, 250);
}

// ------------------------------------------------------------------ Jobs

function parseQuery(hash) {
  const i = hash.indexOf("?");
  return new URLSearchParams(i < 0 ? "" : hash.slice(i + 1));
}

function jobRow(j) {
  const tr = el("tr", { "data-job": j.id },
    el("td", {}, el("a", { href: "#/job/" + j.id, class: "mono", text: j.id.slice(0, 12) })),
    el("td", { text: j.lane === "batch" ? j.kind + " · batch" : j.kind }),
    el("td", { class: "st" }, stateBadge(j.state)),
    el("td", { text: fmtDate(j.created_at) }),
    el("td", { class: "upd", text: fmtTime(j.updated_at) }),
    el("td", { text: j.upstream_status || "" }),
    el("td", { class: "num", text: j.polls || 0 }),
    el("td", { class: "num", text: (j.outputs || 0) + "/" + (j.expected_outputs || 0) }),
    el("td", { text: j.model_id || "" }),
    el("td", { class: "err", text: j.error || "" }),
  );
  return tr;
}

function viewJobs(params) {
  const filt = {
    state: params.getAll("state"), kind: params.getAll("kind"),
    model: params.get("model") || "", id: params.get("id") || "", idem: params.get("idem") || "",
  };
  const offset = parseInt(params.get("offset") || "0", 10) || 0;
  const filtered = filt.state.length || filt.kind.length || filt.model || filt.id || filt.idem;

  const stateSel = el("select", { name: "state" }, el("option", { value: "", text: "any state" }),
    STATES.map((s) => el("option", { value: s, text: s, selected: filt.state.includes(s) })));
  const kindSel = el("select", { name: "kind" }, el("option", { value: "", text: "any kind" }),
    KINDS.map((k) => el("option", { value: k, text: k, selected: filt.kind.includes(k) })));
  const model = el("input", { name: "model", placeholder: "model id", value: filt.model });
  const idem = el("input", { name: "idem", placeholder: "idempotency key", value: filt.idem });
  const id = el("input", { name: "id", placeholder: "job id", value: filt.id, class: "mono" });
  const form = el("form", {
    class: "filters", onsubmit: (ev) => {
      ev.preventDefault();
      const q = new URLSearchParams();
      if (stateSel.value) q.append("state", stateSel.value);
      if (kindSel.value) q.append("kind", kindSel.value);
      for (const [k, input] of [["model", model], ["idem", idem], ["id", id]]) {
        if (input.value.trim()) q.set(k, input.value.trim());
      }
      location.hash = "#/jobs" + (q.toString() ? "?" + q.toString() : "");
    },
  }, stateSel, kindSel, model, idem, id, el("button", { type: "submit", text: "Filter" }),
    el("a", { href: "#/jobs", class: "button", text: "Clear" }));

  const body = el("tbody", { id: "jobs-body" });
  const table = el("table", { class: "jobs", id: "jobs" },
    el("thead", {}, el("tr", {}, ["job", "kind", "state", "created", "updated", "upstream", "polls",
      "files", "model", "error"].map((h) => el("th", { text: h })))), body);
  const info = el("p", { class: "muted small", id: "jobs-info" });
  const pager = el("div", { class: "pager" });
  show(form, info, table, pager);

  const rows = new Map();
  let note = "";
  const showInfo = () => { info.textContent = rows.size + " jobs shown, newest first" + note; };
  const q = new URLSearchParams();
  for (const s of filt.state) q.append("state", s);
  for (const k of filt.kind) q.append("kind", k);
  for (const k of ["model", "id", "idem"]) if (filt[k]) q.set(k, filt[k]);
  q.set("offset", offset);
  q.set("limit", PAGE);
  const started = performance.now();
  api("/api/jobs?" + q.toString()).then((page) => {
    for (const j of page.jobs) {
      const tr = jobRow(j);
      rows.set(j.id, tr);
      body.append(tr);
    }
    const took = Math.round(performance.now() - started);
    note = (filtered ? " (" + page.scanned + " scanned)" : "") + "; answered in " + took + " ms" +
      (offset ? "" : "; new jobs appear at the top");
    showInfo();
    if (!page.jobs.length) body.append(el("tr", {}, el("td", { colspan: 10, class: "muted", text: "no jobs" })));
    const base = new URLSearchParams(q);
    base.delete("limit");
    if (offset > 0) {
      base.set("offset", filtered ? 0 : Math.max(0, offset - PAGE));
      pager.append(el("a", { class: "button", href: "#/jobs?" + base.toString(), text: filtered ? "Newest" : "Newer" }));
    }
    if (page.next !== null) {
      base.set("offset", page.next);
      pager.append(el("a", { class: "button", href: "#/jobs?" + base.toString(), text: "Older" }));
    }
  }).catch((e) => info.replaceChildren(el("span", { class: "err", text: "could not load jobs: " + e.message })));

  const matches = (e) => (!filt.state.length || filt.state.includes(e.to)) &&
    (!filt.kind.length || filt.kind.includes(e.kind)) && !filt.model && !filt.id && !filt.idem;

  // Rows the stream says moved are read again (upstream status, polls, files), at most once a second.
  const dirty = new Set();
  let refreshTimer = null;
  function refreshRows() {
    refreshTimer = null;
    const ids = [...dirty].filter((id) => rows.has(id)).slice(0, 200);
    dirty.clear();
    if (!ids.length) return;
    api("/api/jobs?ids=" + ids.join(",")).then((page) => {
      for (const j of page.jobs) {
        const old = rows.get(j.id);
        if (!old) continue;
        const row = jobRow(j);
        row.className = old.className.replace("flash", "").trim();
        const seenAt = Number(old.getAttribute("data-at") || 0);
        if (j.updated_at < seenAt) {
          // Read before a change the stream has already shown: keep that, and read again.
          row.querySelector(".st").replaceWith(old.querySelector(".st"));
          row.setAttribute("data-at", seenAt);
          dirty.add(j.id);
        }
        old.replaceWith(row);
        rows.set(j.id, row);
      }
      if (dirty.size && !refreshTimer) refreshTimer = setTimeout(refreshRows, 1000);
    }).catch(() => {});
  }

  return {
    name: "jobs",
    onEvents(batch) {
      for (const e of batch) {
        const tr = rows.get(e.job);
        if (tr) {
          tr.querySelector(".st").replaceChildren(stateBadge(e.to));
          tr.querySelector(".upd").textContent = fmtTime(e.at);
          tr.setAttribute("data-at", e.at);
          tr.classList.remove("flash");
          void tr.offsetWidth;
          tr.classList.add("flash");
          if (filt.state.length && !filt.state.includes(e.to)) tr.classList.add("gone");
          dirty.add(e.job);
        } else if (offset === 0 && e.from === "" && matches(e)) {
          const empty = body.querySelector("td.muted");
          if (empty) empty.parentElement.remove();
          const row = jobRow({ id: e.job, kind: e.kind, state: e.to, created_at: e.at, updated_at: e.at });
          row.classList.add("flash");
          rows.set(e.job, row);
          body.prepend(row);
          dirty.add(e.job);
          while (body.children.length > PAGE) {
            const last = body.lastElementChild;
            rows.delete(last.getAttribute("data-job"));
            last.remove();
          }
          showInfo();
        }
      }
      if (dirty.size && !refreshTimer) refreshTimer = setTimeout(refreshRows, 1000);
    },
    close() { if (refreshTimer) clearTimeout(refreshTimer); },
  };
}

// ------------------------------------------------------------------ One job

function media(jobId, o) {
  const src = "/files/" + encodeURIComponent(jobId) + "/" + o.index;
  if (o.media === "video") {
    return el("video", { src, controls: true, preload: "metadata", class: "thumb", "data-index": o.index });
  }
  if (o.media === "image") {
    return el("img", { src, loading: "lazy", class: "thumb", alt: "output " + o.index, "data-index": o.index,
      "data-sha256": o.sha256 });
  }
  return el("a", { href: src, text: "output " + o.index + " (download)" });
}

function viewJob(jobId) {
  show(el("p", { class: "muted", text: "Loading job " + jobId + "…" }));
  let detail = null;
  let timer = null;
  const load = () => api("/api/jobs/" + encodeURIComponent(jobId)).then((d) => { detail = d; draw(d); })
    .catch((e) => show(el("p", { class: "err", text: "job " + jobId + ": " + e.message })));

  function actionButton(verb, label, question) {
    return el("button", {
      class: "action " + verb, id: "action-" + verb, text: label,
      onclick: async () => {
        if (!window.confirm(question)) return;
        try {
          const r = await post("/api/jobs/" + encodeURIComponent(jobId) + "/" + verb);
          window.alert(r.done ? label + ": done (now " + r.state + ")" : label + ": not done (job is " + r.state + ")");
        } catch (e) { window.alert(label + " failed: " + e.message); }
        load();
      },
    });
  }

  function draw(d) {
    const j = d.job;
    const actions = el("div", { class: "actions" });
    if (!TERMINAL.has(j.state)) {
      actions.append(actionButton("cancel", "Cancel", "Cancel job " + j.id + "? No upstream call is made for it afterwards" +
        (j.parent_id ? " (this cancels its whole workflow)." : ".")));
    }
    if (j.state === "submit_unknown") {
      actions.append(actionButton("resubmit", "Resubmit", "Resubmit job " + j.id + "? Check upstream first: " +
        "if the first POST went through, this pays twice."));
    }
    const facts = el("dl", { class: "facts" });
    const fact = (k, v) => { if (v !== null && v !== undefined && v !== "") facts.append(el("dt", { text: k }), el("dd", {}, v)); };
    fact("kind", j.kind);
    fact("producer", j.producer ? j.producer + " · " + j.lane + " lane" : "");
    fact("state", stateBadge(j.state));
    fact("created", fmtDate(j.created_at));
    fact("finished", fmtDate(j.finished_at));
    fact("took", j.finished_at ? fmtDur(j.finished_at - j.created_at) : "");
    fact("upstream job", j.upstream_id);
    fact("upstream status", j.upstream_status);
    fact("polls", j.polls);
    fact("submit attempts", j.submit_attempts);
    fact("model", j.model_id);
    if (j.parent_id) fact("workflow", el("a", { href: "#/job/" + j.parent_id, class: "mono", text: j.parent_id }));
    if (j.callback) fact("callback", j.callback.target + ": " + (j.callback.state || "waiting") +
      ", " + j.callback.attempts + " attempt(s)" + (j.callback.error ? "; last error: " + j.callback.error : ""));

    const parts = [
      el("h2", {}, el("span", { class: "mono", text: j.id }), " ", stateBadge(j.state)),
      actions,
    ];
    if (j.error) parts.push(el("div", { class: "error-box", id: "job-error" }, el("b", { text: "Reason: " }), j.error));
    parts.push(facts);

    const tl = el("tbody");
    for (const s of d.timeline) {
      tl.append(el("tr", {},
        el("td", { class: "mono", text: fmtTime(s.at) }),
        el("td", { class: "num", text: s.since_prev === undefined || s.since_prev === null ? "" : "+" + fmtDur(s.since_prev) }),
        el("td", { class: "num", text: s.since_created === undefined ? "" : fmtDur(s.since_created) }),
        el("td", {}, s.job ? el("a", { href: "#/job/" + s.job, text: s.step }) : s.step),
        el("td", { text: s.detail || "" })));
    }
    parts.push(el("h3", { text: "Timeline" }),
      d.events_complete ? null : el("p", { class: "muted small", text: "The event stream no longer reaches back to this job's start: older steps come from its record only." }),
      el("table", { class: "timeline", id: "timeline" },
        el("thead", {}, el("tr", {}, ["at", "since previous", "since created", "step", "detail"].map((h) => el("th", { text: h })))), tl));

    if (d.steps.length) {
      parts.push(el("h3", { text: "Workflow steps" }), el("table", { class: "jobs" },
        el("tbody", {}, d.steps.map(jobRow))));
    }
    if (j.outputs.length) {
      parts.push(el("h3", { text: "Outputs" }), el("div", { class: "gallery" }, j.outputs.map((o) =>
        el("figure", {}, media(j.id, o), el("figcaption", { class: "small mono",
          text: "#" + o.index + " " + o.bytes + " bytes sha256 " + o.sha256.slice(0, 16) + "…" })))));
    }
    parts.push(el("h3", { text: "Request" }), el("pre", { class: "request", text: JSON.stringify(j.request, null, 2) }));
    show(...parts);
  }

  load();
  return {
    name: "job",
    onEvents(batch) {
      if (!batch.some((e) => e.job === jobId || e.parent === jobId)) return;
      if (timer) return;
      timer = setTimeout(() => { timer = null; load(); }, 300);
    },
  };
}

// ------------------------------------------------------------------ Gallery

function viewGallery(params) {
  const grid = el("div", { class: "gallery", id: "gallery" });
  const more = el("div", { class: "pager" });
  show(el("h2", { text: "Gallery: finished jobs, newest first" }), grid, more);
  let seen = new Set();
  const load = (offset) => api("/api/gallery?offset=" + offset).then((page) => {
    for (const item of page.items) {
      if (seen.has(item.id)) continue;
      seen.add(item.id);
      for (const o of item.outputs) {
        grid.append(el("figure", { "data-job": item.id },
          el("a", { href: "#/job/" + item.id }, media(item.id, o)),
          el("figcaption", { class: "small" }, el("span", { class: "mono", text: item.id.slice(0, 8) + " #" + o.index }),
            " " + item.kind + " · " + fmtDate(item.finished_at), el("br"), el("span", { class: "muted", text: item.prompt }))));
      }
    }
    if (!grid.children.length) grid.append(el("p", { class: "muted", text: "no finished outputs yet" }));
    more.replaceChildren();
    if (page.next !== null) more.append(el("button", { text: "Older", onclick: () => load(page.next) }));
  });
  load(parseInt(params.get("offset") || "0", 10) || 0);
  let timer = null;
  return {
    name: "gallery",
    onEvents(batch) {
      if (!batch.some((e) => e.to === "succeeded") || timer) return;
      timer = setTimeout(() => {
        timer = null;
        api("/api/gallery?offset=0&limit=12").then((page) => {
          const fresh = page.items.filter((i) => !seen.has(i.id));
          for (const item of fresh.reverse()) {
            seen.add(item.id);
            for (const o of item.outputs.slice().reverse()) {
              const placeholder = grid.querySelector("p.muted");
              if (placeholder) placeholder.remove();
              grid.prepend(el("figure", { "data-job": item.id, class: "flash" },
                el("a", { href: "#/job/" + item.id }, media(item.id, o)),
                el("figcaption", { class: "small" }, el("span", { class: "mono", text: item.id.slice(0, 8) + " #" + o.index }),
                  " " + item.kind + " · " + fmtDate(item.finished_at))));
            }
          }
        });
      }, 1000);
    },
  };
}

// ------------------------------------------------------------------ Models

function trainingBar(m) {
  const [lo, hi] = m.expected_seconds;
  const scale = Math.max(hi * 1.2, m.training_seconds || 0);
  const pct = (s) => (100 * s / scale).toFixed(1) + "%";
  const bar = el("div", { class: "tbar", title: "expected " + lo / 60 + "-" + hi / 60 + " minutes" },
    el("div", { class: "tbar-expect" }), el("div", { class: "tbar-fill" }));
  bar.children[0].style.left = pct(lo);
  bar.children[0].style.width = pct(hi - lo);
  bar.children[1].style.width = pct(m.training_seconds || 0);
  return bar;
}

function viewModels() {
  const box = el("div", { id: "models" });
  show(el("h2", { text: "Models" }), box);
  const load = () => api("/api/models").then((d) => {
    box.replaceChildren();
    if (!d.models.length) box.append(el("p", { class: "muted", text: "no model trained through genqueue yet" }));
    for (const m of d.models) {
      const hist = el("ol", { class: "history small" }, m.history.map((h) =>
        el("li", {}, el("span", { class: "mono", text: fmtTime(h.at) }), " " + h.event + (h.detail ? ": " + h.detail : "") +
          (h.status ? " (" + h.status + ")" : ""))));
      box.append(el("section", { class: "model" },
        el("h3", {}, m.id + " ", stateBadge(m.state)),
        el("p", {}, "time in training: " + (m.training_seconds === null ? "not started" : fmtDur(m.training_seconds)) +
          " (expected 20-25 min) · checks " + m.checks + (m.upstream_status ? " · upstream " + m.upstream_status : "")),
        trainingBar(m),
        m.error ? el("div", { class: "error-box", text: m.error }) : null,
        el("p", {}, "jobs parked on it: " + m.parked + " ", m.parked_ids.map((id) => el("a", { href: "#/job/" + id, class: "mono small", text: id.slice(0, 8) + " " }))),
        el("details", {}, el("summary", { text: "history (" + m.history.length + ")" }), hist)));
    }
  });
  load();
  const timer = setInterval(load, 10000);
  return { name: "models", close() { clearInterval(timer); } };
}

// ------------------------------------------------------------------ Health

function budgetTable(b) {
  // Spend against each cap this hour and today; a producer's jobs in flight against its quota.
  const of = (used, cap) => cap === null ? String(used) : used + " / " + cap;
  const rows = [];
  const add = (name, lane, flight, windows) => windows.forEach((w, i) => rows.push(el("tr", {},
    el("td", { text: i ? "" : name }), el("td", { text: i ? "" : lane }), el("td", { text: i ? "" : flight }),
    el("td", { text: w.period }), el("td", { text: of(w.triggers, w.triggers_cap) }),
    el("td", { text: of(w.cost, w.cost_cap) }), el("td", { text: fmtDate(w.window_end) }))));
  add("total", "", "", b.total);
  for (const p of b.producers) add(p.producer, p.lane, of(p.in_flight, p.max_in_flight), p.windows);
  return el("table", { class: "jobs" },
    el("thead", {}, el("tr", {}, ["producer", "lane", "in flight", "window", "triggers", "cost", "resets"].map((t) => el("th", { text: t })))),
    el("tbody", {}, rows));
}

function viewHealth() {
  const names = ["throughput", "latency", "errors", "queues", "queue_age", "sweeper"];
  const imgs = names.map((n) => el("img", { class: "plot", id: "plot-" + n, alt: n, src: "/plots/" + n + ".svg" }));
  const facts = el("p", { class: "muted" });
  const budgets = el("div", { class: "budgets" });
  show(el("h2", { text: "Health" }), facts, el("div", { class: "plots" }, imgs), el("h3", { text: "Budgets" }), budgets);
  const load = () => api("/api/health").then((h) => {
    facts.textContent = "sweeper last ran " + (h.sweep_age === null ? "never" : fmtDur(h.sweep_age) + " ago") +
      (h.broker_error ? " · " + h.broker_error : "");
    if (h.budgets) budgets.replaceChildren(budgetTable(h.budgets));
  }).catch(() => {});
  load();
  const timer = setInterval(() => {
    const t = Date.now();
    imgs.forEach((img, i) => { img.src = "/plots/" + names[i] + ".svg?t=" + t; });
    load();
  }, 10000);
  return { name: "health", close() { clearInterval(timer); } };
}

// ------------------------------------------------------------------ routing

function route() {
  if (app.view && app.view.close) app.view.close();
  const hash = location.hash || "#/jobs";
  const path = hash.split("?")[0];
  const params = parseQuery(hash);
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("active", path.startsWith("#/" + a.getAttribute("data-view")));
  }
  if (path.startsWith("#/job/")) app.view = viewJob(decodeURIComponent(path.slice(6)));
  else if (path === "#/gallery") app.view = viewGallery(params);
  else if (path === "#/models") app.view = viewModels();
  else if (path === "#/health") app.view = viewHealth();
  else app.view = viewJobs(params);
}

async function start() {
  try {
    app.csrf = (await api("/api/session")).csrf;
  } catch (e) {
    show(el("p", { class: "err", text: "cannot reach the dashboard API: " + e.message }));
    return;
  }
  await refreshCounts();
  window.addEventListener("hashchange", route);
  route();
  connect();
  setInterval(refreshCounts, 15000);
}

document.addEventListener("DOMContentLoaded", start);
