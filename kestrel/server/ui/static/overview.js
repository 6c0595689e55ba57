// Overview: jobs (live over SSE, cancellable), SAEs with their metrics, recent analyses, capture
// runs, models and their layer tables.

import { api, awaited, base, watchJob } from "./api.js";
import { $, fill, h, num, percent, table, when } from "./dom.js";
import { notify, start, status } from "./shell.js";
import { recordPoints, streamSaeIds, streamSaesTable } from "./stream.js";

const TERMINAL = new Set(["finished", "failed", "canceled"]);
const JOB_REFRESH_MS = 3000;
const rows = new Map(); // job id -> {row, detail, stop}: detail lists a stream training's SAEs
const published = new Map(); // sae id -> its record in GET /v1/saes (a stream job's SAEs link to it)
// A browser opens at most six HTTP/1.1 connections to a host: streams beyond a few would stall the
// page's other requests, so later active jobs follow the list's refresh instead.
const MAX_STREAMS = 3;
let streams = 0;
const ANALYSES_SHOWN = 10;
const LINKED = { sae_id: "saes", analysis_id: "analyses" }; // a finished job's artifacts with a page

// ---------------------------------------------------------------------------------------------
// Jobs

function jobArtifacts(job) {
  return Object.entries(job.artifacts ?? {}).map(([name, id]) => {
    if (Array.isArray(id)) return h("span", {}, `${id.length} ${name === "sae_ids" ? "SAEs (below)" : name}`);
    return LINKED[name] && job.status === "finished" ? h("a", { href: `${base}/ui/${LINKED[name]}/${id}` }, id) : h("span", { class: "mono" }, id);
  });
}

function jobCells(job) {
  const pct = Math.round((job.progress ?? 0) * 100);
  const cancel = TERMINAL.has(job.status) ? null
    : h("button", { class: "btn small danger", type: "button", "aria-label": `Cancel job ${job.id}`, onclick: () => cancelJob(job.id) }, "Cancel");
  return [
    h("td", {}, h("strong", {}, job.kind), h("div", { class: "mono muted" }, job.id)),
    h("td", {}, h("span", { class: `badge ${job.status}`, dataset: { status: job.status } }, job.status)),
    h("td", {}, h("div", { class: "progress-cell" },
      h("progress", { max: "1", value: String(job.progress ?? 0), "aria-label": `Progress of job ${job.id}` }),
      h("span", { class: "mono" }, `${pct}%`)),
      h("div", { class: "job-msg" }, job.error?.message ?? job.message ?? "")),
    h("td", {}, h("div", { class: "artifacts" }, jobArtifacts(job))),
    h("td", {}, when(job.created_at)),
    h("td", {}, cancel),
  ];
}

/** The row under a stream training job's row that lists its SAEs (null for other jobs). */
function renderDetail(entry, job) {
  if (!streamSaeIds(job).length) return;
  entry.detail ??= h("tr", { class: "job-detail", dataset: { detailOf: job.id } });
  fill(entry.detail, h("td", { colspan: "6" }, streamSaesTable(job, published)));
}

function renderJob(job) {
  let entry = rows.get(job.id);
  if (!entry) {
    entry = { row: h("tr", { dataset: { jobId: job.id } }), detail: null, stop: null };
    rows.set(job.id, entry);
  }
  recordPoints(job);
  const snapshot = JSON.stringify(job);
  if (snapshot !== entry.snapshot) { // redraw on change only, so keyboard focus in a row survives
    const ended = entry.job && !TERMINAL.has(entry.job.status) && job.status === "finished";
    entry.snapshot = snapshot;
    entry.job = job;
    entry.row.dataset.status = job.status;
    fill(entry.row, jobCells(job));
    renderDetail(entry, job);
    placeDetail(entry);
    // A stream job followed by the list (not its stream) has just published its SAEs: list them.
    if (ended && !entry.stop && streamSaeIds(job).length) loadArtifacts().catch(() => {});
  }
  if (!TERMINAL.has(job.status) && !entry.stop && streams < MAX_STREAMS) {
    streams += 1;
    entry.stop = watchJob(job.id, (update) => {
      renderJob(update);
      if (TERMINAL.has(update.status)) streams -= 1;
      if (update.status === "finished") loadArtifacts();
    });
  }
  return entry.row;
}

async function cancelJob(id) {
  try {
    renderJob(await api(`/jobs/${id}/cancel`, { method: "POST" }));
    status($("#jobs-status"), `Cancel requested for ${id}.`, "ok");
  } catch (error) {
    status($("#jobs-status"), `Could not cancel ${id}: ${error.message}`, "err");
  }
}

async function loadJobs() {
  const page = await api("/jobs", { query: { limit: 15, queue: "batch" } });
  const box = $("#jobs");
  if (!page.items.length) {
    fill(box, h("p", { class: "empty" }, "No jobs yet."));
    return;
  }
  let body = $("#jobs tbody");
  if (!body) {
    body = h("tbody");
    const head = ["Job", "Status", "Progress", "Makes", "Created"].map((label) => h("th", { scope: "col" }, label));
    head.push(h("th", { scope: "col" }, h("span", { class: "sr-only" }, "Actions")));
    fill(box, h("div", { class: "table-scroll" }, h("table", { id: "jobs-table" }, h("thead", {}, h("tr", {}, head)), body)));
  }
  // A streamed job is updated by its stream; the list only adds jobs and refreshes the rest.
  for (const job of page.items) if (!rows.get(job.id)?.stop || TERMINAL.has(job.status)) renderJob(job);
  const order = page.items.flatMap((job) => [rows.get(job.id).row, rows.get(job.id).detail].filter(Boolean));
  if (order.length !== body.children.length || order.some((row, i) => body.children[i] !== row)) {
    body.replaceChildren(...order);
  }
}

/** A detail row made after its job's row was placed goes right under it. */
function placeDetail(entry) {
  if (entry.detail && entry.row.parentNode && entry.row.nextSibling !== entry.detail) entry.row.after(entry.detail);
}

/** Redraw the stream jobs' SAE tables once the SAE list changed (their links and layers). */
function refreshDetails() {
  for (const entry of rows.values()) if (entry.detail && entry.job) renderDetail(entry, entry.job);
}

// ---------------------------------------------------------------------------------------------
// SAEs, runs, models

function metric(sae, name) {
  const m = sae.metrics ?? {};
  return m[name] ?? m.heldout?.[name] ?? null;
}

function renderSaes(saes) {
  fill($("#saes"), table([
    { label: "SAE", value: (s) => h("a", { href: `${base}/ui/saes/${s.id}`, class: "mono" }, s.id) },
    { label: "Model · layer", value: (s) => [s.model ?? "–", h("div", { class: "mono muted" }, s.layer ?? s.config?.layer ?? "")] },
    { label: "Architecture", value: (s) => `${s.config?.architecture ?? "–"}${s.config?.k ? ` (k=${s.config.k})` : ""}` },
    { label: "Latents", num: true, value: (s) => num(s.config?.n_latents) },
    { label: "FVU", num: true, value: (s) => num(metric(s, "fvu")) },
    { label: "L0", num: true, value: (s) => num(metric(s, "l0")) },
    { label: "Dead", num: true, value: (s) => percent(metric(s, "dead_fraction")) },
    { label: "Tokens", num: true, value: (s) => num(s.tokens) },
    { label: "Created", value: (s) => when(s.created) },
    { label: "", value: (s) => h("div", { class: "row" },
      h("a", { href: `${base}/ui/saes/${s.id}/features`, "aria-label": `Features of ${s.id}` }, "Features"),
      h("a", { href: `${base}/ui/steering?sae=${s.id}`, "aria-label": `Steer with ${s.id}` }, "Steer")) },
  ], saes, { empty: "No SAE yet: train one with POST /v1/saes or `kestrel train`." }));
}

/** What an analysis ran on, in a line: model, layer(s), run, SAE (whichever its kind records). */
function analysisSource(source = {}) {
  const layers = source.layers ?? [];
  return [
    source.model,
    source.layer ?? (layers.length > 2 ? `${layers.length} layers` : layers.join(", ")),
    source.run_id && `run ${source.run_id}`,
    source.sae_id && `SAE ${source.sae_id}`,
  ].filter(Boolean).join(" · ") || "–";
}

function renderAnalyses(page) {
  fill($("#analyses-count"), page.total > page.items.length ? `latest ${page.items.length} of ${num(page.total)}` : "");
  fill($("#analyses"), table([
    { label: "Kind", value: (a) => h("span", { class: "badge" }, a.kind) },
    { label: "Title", value: (a) => [h("a", { href: `${base}/ui/analyses/${a.id}` }, a.title), h("div", { class: "mono muted" }, a.id)] },
    { label: "Source", value: (a) => analysisSource(a.source) },
    { label: "Created", value: (a) => when(a.created) },
  ], page.items, { empty: "No analysis yet: start one with POST /v1/analyses or `kestrel analyze`." }));
}

function renderRuns(runs) {
  fill($("#runs"), table([
    { label: "Run", value: (r) => h("span", { class: "mono" }, r.id) },
    { label: "Model", value: (r) => r.model },
    { label: "Layers", value: (r) => h("span", { class: "mono" }, r.layers.join(", ")) },
    { label: "Tokens", num: true, value: (r) => num(r.n_tokens) },
    { label: "Docs", num: true, value: (r) => num(r.n_docs) },
    { label: "Created", value: (r) => when(r.created) },
  ], runs, { empty: "No capture run yet." }));
}

function layerDisclosure(model) {
  const target = h("div", {}, h("p", { class: "empty" }, "Loading the layer table (the model may have to load)…"));
  const details = h("details", {}, h("summary", {}, "Layers"), target);
  details.addEventListener("toggle", async () => {
    if (!details.open || details.dataset.loaded) return;
    details.dataset.loaded = "true";
    try {
      const layerTable = await awaited(`/models/${encodeURIComponent(model.name)}/layers`);
      fill(target, table([
        { label: "Layer", value: (l) => h("span", { class: "mono" }, l.name) },
        { label: "Kind", value: (l) => l.kind },
        { label: "Width", num: true, value: (l) => num(l.width) },
      ], layerTable.layers));
    } catch (error) {
      delete details.dataset.loaded;
      fill(target, h("p", { class: "status err" }, `Could not read the layers: ${error.message}`));
    }
  });
  return details;
}

function renderModels(models) {
  fill($("#models"), table([
    { label: "Model", value: (m) => [h("strong", {}, m.name), h("div", { class: "muted" }, m.description)] },
    { label: "Source", value: (m) => m.source },
    { label: "Loaded by", value: (m) => m.loaded_by.length ? m.loaded_by.map((w) => `${w.queue} (${w.device})`).join(", ") : "–" },
    { label: "", value: layerDisclosure },
  ], models));
}

async function loadArtifacts() {
  const [saes, runs, analyses] = await Promise.all([
    api("/saes", { query: { limit: 100 } }),
    api("/activations", { query: { limit: 100 } }),
    api("/analyses", { query: { limit: ANALYSES_SHOWN } }),
  ]);
  published.clear();
  for (const sae of saes.items) published.set(sae.id, sae);
  refreshDetails();
  renderSaes(saes.items);
  renderRuns(runs.items);
  renderAnalyses(analyses);
}

start(async () => {
  const [models] = await Promise.all([api("/models"), loadArtifacts(), loadJobs()]);
  renderModels(models.items);
  setInterval(() => loadJobs().catch((error) => notify(`Could not refresh the jobs: ${error.message}`)), JOB_REFRESH_MS);
});
