// The imagegen console: plain JavaScript over the public API, no build step.
// The key lives in sessionStorage and travels only in the Authorization header.
"use strict";

const main = document.getElementById("main");
const signInForm = document.getElementById("sign-in");
const KEY = "imagegen.key";
const FINISHED = ["succeeded", "failed", "canceled"];
const BATCH_DONE = ["completed", "failed", "expired", "cancelled"];
let leaving = new AbortController(); // aborts the live streams of the page we leave

const key = () => sessionStorage.getItem(KEY);

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${key()}`, ...(options.headers || {}) };
  const resp = await fetch(path, { ...options, headers });
  const type = resp.headers.get("content-type") || "";
  const body = type.includes("json") ? await resp.json() : null;
  if (!resp.ok) {
    const error = new Error((body && body.error && body.error.message) || `HTTP ${resp.status}`);
    error.status = resp.status;
    throw error;
  }
  return body;
}

// Server-sent events read with fetch: EventSource cannot send an Authorization header.
async function follow(path, onEvent) {
  const signal = leaving.signal;
  try {
    const resp = await fetch(path, { headers: { Authorization: `Bearer ${key()}` }, signal });
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const chunk = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let event = "message";
        let data = "";
        for (const line of chunk.split("\n")) {
          if (line.startsWith("event: ")) event = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (data) onEvent(event, JSON.parse(data));
      }
    }
  } catch (error) {
    if (error.name !== "AbortError") console.warn("stream ended", error);
  }
}

// Elements built with textContent only: nothing from the API is parsed as HTML.
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

const when = (ts) => (ts ? new Date(ts * 1000).toLocaleString() : "");
const imageSrc = (item) => item.url || (item.b64_json ? `data:image/png;base64,${item.b64_json}` : "");
const statusCell = (status) => el("span", { class: `status ${status}`, text: status });

function show(...nodes) {
  main.replaceChildren(...nodes);
}

function fail(error) {
  if (error.status === 401) return signOut();
  show(el("p", { class: "error", text: `Error: ${error.message}` }));
}

// --- jobs -------------------------------------------------------------------------

function jobRow(job) {
  const thumb = el("img", { class: "thumb", alt: "" });
  const status = el("td", {}, statusCell(job.status));
  const row = el(
    "tr",
    { "data-job-id": job.id },
    el("td", {}, thumb),
    el("td", {}, el("a", { href: `#/jobs/${job.id}`, text: job.id })),
    status,
    el("td", { text: job.model }),
    el("td", { text: job.request.prompt || "" }),
    el("td", { text: when(job.created_at) }),
  );
  const fill = (latest) => {
    status.replaceChildren(statusCell(latest.status));
    const first = latest.result && latest.result.data[0];
    if (first) thumb.src = imageSrc(first);
  };
  if (job.status === "succeeded") {
    api(`/v1/images/jobs/${job.id}`).then(fill, () => {});
  } else if (!FINISHED.includes(job.status)) {
    watch(job.id, fill);
  }
  return row;
}

// A browser keeps at most six HTTP/1.1 connections to a host, and an event stream
// holds one for the job's whole run: a page of thirty running jobs, each following
// its own stream, left no connection for anything else (the Older button waited
// for jobs to end). So two rows follow their stream, and the others are polled
// one request at a time: at most three connections are ever the rows'.
const FOLLOW_LIMIT = 2;
const POLL_MS = 2000;
let following = 0;
const polled = new Map(); // job id -> fill, of the rows waiting for their job's end
let polling = null;

function watch(id, fill) {
  if (following < FOLLOW_LIMIT) {
    following += 1;
    follow(`/v1/images/jobs/${id}/events`, (_event, latest) => fill(latest)).finally(() => {
      following -= 1;
    });
    return;
  }
  polled.set(id, fill);
  if (!polling) polling = setTimeout(pollRows, POLL_MS);
}

async function pollRows() {
  const signal = leaving.signal;
  for (const [id, fill] of [...polled]) {
    if (signal.aborted) break;
    try {
      const latest = await api(`/v1/images/jobs/${id}`);
      fill(latest);
      if (FINISHED.includes(latest.status)) polled.delete(id);
    } catch {
      polled.delete(id);
    }
  }
  if (signal.aborted) polled.clear();
  polling = polled.size ? setTimeout(pollRows, POLL_MS) : null;
}

// A list that grows a page at a time: `next(after)` answers OpenAI's list page.
function pager(body, next, cursor, render) {
  const more = el("button", { type: "button", class: "more", text: "Older" });
  const load = async (after) => {
    const page = await next(after);
    body.append(...page.data.map(render));
    more.hidden = !page.has_more;
    more.onclick = () => load(cursor(page)).catch(fail);
    return page;
  };
  return { more, load };
}

async function jobsView() {
  const body = el("tbody");
  const { more, load } = pager(
    body,
    (after) => api(`/v1/images/jobs?limit=30${after ? `&after=${encodeURIComponent(after)}` : ""}`),
    (page) => page.last_id,
    jobRow,
  );
  const first = await load(null);
  show(
    el("h1", { text: "Jobs" }),
    el(
      "table",
      { id: "jobs-table" },
      el("thead", {}, el("tr", {}, ["", "job", "status", "model", "prompt", "created"].map((h) => el("th", { text: h })))),
      body,
    ),
    more,
    first.data.length ? null : el("p", { text: "No jobs yet: generate one." }),
  );
}

async function jobView(id) {
  const holder = el("div");
  const render = async (job) => {
    const parts = [
      el("h1", { text: `Job ${job.id}` }),
      el(
        "p",
        {},
        "Status: ",
        el("span", { id: "job-status", class: `status ${job.status}`, text: job.status }),
        job.progress ? ` (step ${job.progress.step} of ${job.progress.steps})` : "",
        job.status_detail ? ` (${job.status_detail})` : "",
        FINISHED.includes(job.status)
          ? null
          : el("button", {
              type: "button",
              id: "cancel-job",
              text: "Cancel",
              onclick: () => api(`/v1/images/jobs/${job.id}/cancel`, { method: "POST" }).then(render, fail),
            }),
        " ",
        // Deleting a job removes its images and inputs for good (a running one is
        // canceled first): asked once more, then back to the list, where it is gone.
        el("button", {
          type: "button",
          id: "delete-job",
          text: "Delete",
          onclick: () => {
            if (!confirm(`Delete job ${job.id} and its images? This cannot be undone.`)) return;
            api(`/v1/images/jobs/${job.id}`, { method: "DELETE" }).then(() => {
              location.hash = "#/jobs";
            }, fail);
          },
        }),
      ),
      el(
        "table",
        { class: "card" },
        el("tbody", {}, [
          ["model", job.model],
          ["created", when(job.created_at)],
          ["started", when(job.started_at)],
          ["finished", when(job.finished_at)],
          ["attempts", String(job.attempts)],
          ["trace call", job.call_id || ""],
          ["request id", job.request_id || ""],
        ].map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", { text: v })))),
      ),
    ];
    if (job.error) parts.push(el("p", { class: "error", text: `${job.error.code}: ${job.error.message}` }));
    if (job.result) {
      parts.push(el("div", { class: "images" }, job.result.data.map((item) => el("img", { src: imageSrc(item), alt: job.request.prompt || "" }))));
    }
    parts.push(el("h2", { text: "Parameters" }), el("pre", { text: JSON.stringify(job.request, null, 2) }));
    try {
      const deliveries = await api(`/v1/webhooks/deliveries?job_id=${encodeURIComponent(job.id)}`);
      parts.push(
        el("h2", { text: "Webhook deliveries" }),
        deliveries.data.length
          ? el("ul", {}, deliveries.data.map((d) => el("li", { text: `${d.event_type} to ${d.url}: ${d.status} (${d.attempts} attempts)` })))
          : el("p", { text: "None." }),
      );
    } catch (_error) {
      // deliveries are a detail; the job itself is shown either way
    }
    holder.replaceChildren(...parts);
  };
  const job = await api(`/v1/images/jobs/${id}`);
  show(holder);
  await render(job);
  if (!FINISHED.includes(job.status)) {
    follow(`/v1/images/jobs/${id}/events`, async (_event, latest) => {
      if (FINISHED.includes(latest.status)) await render(await api(`/v1/images/jobs/${id}`));
      else await render(latest);
    });
  }
}

// --- generate ---------------------------------------------------------------------

async function generateView() {
  const models = await api("/v1/models");
  const model = el("select", { id: "gen-model" }, models.data.map((m) => el("option", { value: m.id, text: m.id })));
  const prompt = el("textarea", { id: "gen-prompt", required: true, placeholder: "a lighthouse at dusk" });
  const size = el("input", { id: "gen-size", placeholder: "size, e.g. 512x512 (default: the model's)" });
  const n = el("input", { id: "gen-n", type: "number", min: "1", max: "10", value: "1" });
  const error = el("p", { class: "error", hidden: true });
  const form = el(
    "form",
    {
      class: "card",
      id: "generate",
      onsubmit: async (event) => {
        event.preventDefault();
        const body = { model: model.value, prompt: prompt.value, n: Number(n.value) };
        if (size.value.trim()) body.size = size.value.trim();
        try {
          const job = await api("/v1/images/generations", {
            method: "POST",
            headers: { "Content-Type": "application/json", Prefer: "respond-async" },
            body: JSON.stringify(body),
          });
          location.hash = `#/jobs/${job.id}`;
        } catch (e) {
          error.textContent = e.message;
          error.hidden = false;
        }
      },
    },
    el("h1", { text: "Generate" }),
    el("label", {}, "Model ", model),
    el("label", {}, "Prompt", prompt),
    el("label", {}, "Size ", size),
    el("label", {}, " Images ", n),
    el("div", {}, el("button", { type: "submit", text: "Generate" })),
    error,
  );
  show(form);
}

// --- batches ----------------------------------------------------------------------

function progressOf(batch) {
  const bar = el("progress", { "data-batch-id": batch.id });
  const label = el("span", { class: "counts" });
  const status = el("span");
  const update = (b) => {
    const c = b.request_counts;
    bar.max = Math.max(1, c.total);
    bar.value = c.completed + c.failed;
    label.textContent = ` ${c.completed} done, ${c.failed} failed of ${c.total}`;
    status.replaceChildren(statusCell(b.status));
  };
  update(batch);
  if (!BATCH_DONE.includes(batch.status)) {
    follow(`/v1/batches/${batch.id}/events`, (_event, latest) => update(latest));
  }
  return { bar, label, status };
}

async function batchesView() {
  const page = await api("/v1/batches?limit=30");
  const rows = page.data.map((batch) => {
    const { bar, label, status } = progressOf(batch);
    return el(
      "tr",
      { "data-batch-id": batch.id },
      el("td", {}, el("a", { href: `#/batches/${batch.id}`, text: batch.id })),
      el("td", {}, status),
      el("td", {}, bar, label),
      el("td", { text: when(batch.created_at) }),
    );
  });
  show(
    el("h1", { text: "Batches" }),
    el("table", { id: "batches-table" }, el("thead", {}, el("tr", {}, ["batch", "status", "progress", "created"].map((h) => el("th", { text: h })))), el("tbody", {}, rows)),
    page.data.length ? null : el("p", { text: "No batches yet (imagegen batch submit prompts.txt)." }),
  );
}

function lineRow(item) {
  const body = item.response && item.response.body;
  const first = body && body.data && body.data[0];
  const why = (body && body.error) || item.error;
  return el(
    "tr",
    { "data-line": String(item.line) },
    el("td", {}, first ? el("img", { class: "thumb", alt: "", src: imageSrc(first) }) : null),
    el("td", { text: String(item.line) }),
    el("td", { text: item.custom_id }),
    el("td", { text: item.prompt || "" }),
    el("td", {}, statusCell(item.status)),
    el("td", {}, item.job_id ? el("a", { href: `#/jobs/${item.job_id}`, text: "job" }) : null, why ? ` ${why.message || ""}` : ""),
  );
}

async function batchView(id) {
  const batch = await api(`/v1/batches/${id}`);
  const { bar, label, status } = progressOf(batch);
  const body = el("tbody");
  const { more, load } = pager(
    body,
    (after) => api(`/v1/images/batches/${id}/items?limit=100${after ? `&after=${after}` : ""}`),
    (page) => page.last_line,
    lineRow,
  );
  await load(null);
  const cancel = BATCH_DONE.includes(batch.status)
    ? null
    : el("button", {
        type: "button",
        id: "cancel-batch",
        text: "Cancel batch",
        onclick: () => api(`/v1/batches/${id}/cancel`, { method: "POST" }).then(() => route(), fail),
      });
  show(
    el("h1", { text: `Batch ${batch.id}` }),
    el("div", { class: "card" }, el("p", {}, "Status: ", status, " ", cancel), bar, label),
    el("h2", { text: "Lines" }),
    el("table", { id: "lines-table" }, el("thead", {}, el("tr", {}, ["", "line", "custom_id", "prompt", "status", ""].map((h) => el("th", { text: h })))), body),
    more,
  );
}

// --- usage ------------------------------------------------------------------------

const PALETTE = ["#4f6bed", "#e8833a", "#2f9e74", "#c2417a", "#8a6be0", "#c9a227", "#3aa7c9", "#7a7f8c"];

function svgNode(tag, attrs, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// Images per day, one stacked segment per model, with a legend.
function usageChart(rows) {
  const days = [...new Set(rows.map((r) => r.date))].sort();
  // A model whose jobs made no image (all canceled, say) has no bar: no legend entry.
  const models = [...new Set(rows.filter((r) => r.images > 0).map((r) => r.model))].sort();
  const color = new Map(models.map((m, i) => [m, PALETTE[i % PALETTE.length]]));
  const perDay = new Map(days.map((d) => [d, 0]));
  for (const r of rows) perDay.set(r.date, perDay.get(r.date) + r.images);
  const most = Math.max(1, ...perDay.values());
  const svg = svgNode("svg", { id: "usage-chart", width: Math.max(300, days.length * 40), height: 200 });
  days.forEach((day, i) => {
    let top = 170;
    for (const r of rows.filter((row) => row.date === day && row.images > 0)) {
      const h = Math.max(1, Math.round((r.images / most) * 160));
      top -= h;
      const bar = svgNode("rect", { class: "bar", "data-model": r.model, fill: color.get(r.model), x: i * 40 + 8, y: top, width: 28, height: h });
      bar.append(svgNode("title", {}, `${day} ${r.model}: ${r.images} images`));
      svg.append(bar);
    }
    svg.append(svgNode("text", { class: "axis", x: i * 40 + 8, y: 190 }, day.slice(5)));
  });
  // The swatch's colour set through the style object: a style attribute is inline
  // style, which the page's Content-Security-Policy refuses.
  const swatch = (m) => {
    const node = el("span", { class: "swatch" });
    node.style.background = color.get(m);
    return node;
  };
  const legend = el("ul", { class: "legend", id: "usage-legend" }, models.map((m) => el("li", {}, swatch(m), m)));
  return el("div", { class: "card" }, svg, legend);
}

const usd = (value) => (value === null || value === undefined ? "none" : `$${value.toFixed(4)}`);

// The project's day and month (and the key's own budgets): budget, spent, in flight, left.
function budgetsTable(rows) {
  const head = ["budget", "period", "budget (USD)", "spent", "reserved", "remaining"];
  return el("table", { id: "budgets-table" }, el("thead", {}, el("tr", {}, head.map((h) => el("th", { text: h })))),
    el("tbody", {}, rows.map((b) => el("tr", { "data-scope": b.scope, "data-period": b.period },
      el("td", { text: b.scope }), el("td", { text: `${b.period} from ${b.period_start}` }), el("td", { text: usd(b.budget_usd) }),
      el("td", { text: usd(b.spent_usd) }), el("td", { text: usd(b.reserved_usd) }),
      el("td", { text: b.remaining_usd === null ? "-" : usd(b.remaining_usd) })))));
}

// Bytes in binary units: 1536 -> "1.5 KiB".
function bytes(n) {
  const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return i === 0 ? `${n} bytes` : `${n.toFixed(1)} ${units[i]}`;
}

// What the project keeps stored now (images, edit inputs, files), against its quota.
function storageLine(report) {
  const s = report.storage || { images_bytes: 0, inputs_bytes: 0, files_bytes: 0 };
  const quota = report.storage_quota_bytes;
  const of = quota === null || quota === undefined ? "no quota" : `of a ${bytes(quota)} quota`;
  return el("p", { id: "storage", "data-bytes": String(report.storage_bytes), text:
    `Stored: ${bytes(report.storage_bytes)} (${of}): images ${bytes(s.images_bytes)}, edit inputs ${bytes(s.inputs_bytes)}, files ${bytes(s.files_bytes)}.` });
}

// How long the project keeps its data (null: forever), in the largest whole unit.
function lifetime(seconds) {
  if (seconds === null || seconds === undefined) return "forever";
  for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60]]) {
    if (seconds >= size && seconds % size === 0) return `${seconds / size}${unit}`;
  }
  return `${seconds}s`;
}

function retentionLine(report) {
  const r = report.retention || {};
  return el("p", { id: "retention", text:
    `Kept: images ${lifetime(r.image_retention_seconds)}, files ${lifetime(r.file_retention_seconds)}, finished jobs ${lifetime(r.job_retention_seconds)}.` });
}

async function usageView() {
  const report = await api("/v1/usage");
  show(
    el("h1", { text: "Usage" }),
    el("p", { text: `${report.totals.images} images, ${report.totals.jobs} jobs, ${usd(report.totals.cost_usd)} from ${report.start_date} to ${report.end_date}.` }),
    storageLine(report),
    retentionLine(report),
    el("h2", { text: "Budgets" }),
    budgetsTable(report.budgets || []),
    usageChart(report.data),
    el("table", { id: "usage-table" }, el("thead", {}, el("tr", {}, ["day", "model", "images", "succeeded", "failed", "cost (USD)"].map((h) => el("th", { text: h })))),
      el("tbody", {}, report.data.map((r) => el("tr", {}, el("td", { text: r.date }), el("td", { text: r.model }), el("td", { text: String(r.images) }), el("td", { text: String(r.jobs.succeeded || 0) }), el("td", { text: String(r.jobs.failed || 0) }), el("td", { text: usd(r.cost_usd) }))))),
  );
}

// --- signing in and routing -------------------------------------------------------

// A changed hash routes through its hashchange event; routing here as well drew the
// page twice, and the later draw wiped what the first had loaded since (an older
// page of jobs, under load).
function go(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

function signOut() {
  sessionStorage.removeItem(KEY);
  go("");
}

signInForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, document.getElementById("key").value.trim());
  try {
    await api("/v1/images/jobs?limit=1");
    go("#/jobs");
  } catch (error) {
    sessionStorage.removeItem(KEY);
    const message = document.getElementById("sign-in-error");
    message.textContent = error.status === 401 ? "That key was not accepted." : error.message;
    message.hidden = false;
  }
});
document.getElementById("sign-out").addEventListener("click", signOut);

async function route() {
  leaving.abort();
  leaving = new AbortController();
  polled.clear(); // the rows of the page we leave
  const nav = document.getElementById("nav");
  if (!key()) {
    nav.hidden = true;
    show(signInForm);
    return;
  }
  nav.hidden = false;
  const [, view, id] = (location.hash || "#/jobs").split("/");
  try {
    if (view === "jobs" && id) await jobView(id);
    else if (view === "generate") await generateView();
    else if (view === "batches" && id) await batchView(id);
    else if (view === "batches") await batchesView();
    else if (view === "usage") await usageView();
    else await jobsView();
  } catch (error) {
    fail(error);
  }
}

window.addEventListener("hashchange", route);
route();
