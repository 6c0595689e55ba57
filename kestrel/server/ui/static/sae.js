// SAE page: key figures, training curves (loss, FVU, L0, dead fraction against tokens), the
// evaluation table, the latent-density histogram and the evaluation ledger (each metric against
// its baseline; computed on request).

import { api, apiOrNull } from "./api.js";
import { $, fill, h, num, percent, when } from "./dom.js";
import { followJob } from "./jobs.js";
import { ledgerPlot, ledgerTable } from "./ledger.js";
import { barPlot, linePlot, occupied, SMALL } from "./plot.js";
import { start, status } from "./shell.js";

const saeId = document.body.dataset.saeId;
const CURVES = [
  ["loss", "Loss"],
  ["fvu", "FVU"],
  ["l0", "L0 (latents per token)"],
  ["dead_fraction", "Dead fraction"],
];
// Evaluation sections of the stored metrics, in reading order, with what each is measured over.
const SECTIONS = [
  ["heldout", "held-out rows", "rows of held-out documents the SAE never trained on"],
  ["training", "training", "the last steps of training"],
  ["all_rows", "all rows", "every row of the run, attention sinks included"],
  ["model_in_the_loop", "model in the loop", "the model's next-token loss with the SAE spliced in"],
];
const SKIP = new Set(["note", "dead_definition", "input_scale"]);

function renderStats(sae) {
  const c = sae.config ?? {};
  fill($("#sae-subtitle"), `${sae.model ?? "–"} · `, h("span", { class: "mono" }, sae.layer ?? c.layer ?? "–"),
    ` · trained ${when(sae.created)}`);
  const stats = [
    ["Architecture", `${c.architecture ?? "–"}${c.k ? ` · k=${c.k}` : ""}`],
    ["Latents", num(c.n_latents)],
    ["Input width", num(c.d_in)],
    ["Steps", num(sae.steps)],
    ["Tokens", num(sae.tokens)],
    ["Train time", sae.train_seconds ? `${num(sae.train_seconds)} s` : "–"],
  ];
  fill($("#sae-stats"), stats.map(([label, value]) => h("li", {}, h("span", { class: "label" }, label), h("span", { class: "value" }, value))));
}

function renderCurves(points) {
  if (!points.length) {
    fill($("#curves"), h("p", { class: "empty" }, "No training history (an imported SAE)."));
    return;
  }
  fill($("#curves"), CURVES.map(([key, title]) =>
    linePlot(title, points.filter((p) => p[key] !== null).map((p) => [p.tokens, p[key]]), { xLabel: "tokens", size: SMALL })));
}

const isScalar = (v) => typeof v === "number" || typeof v === "boolean";
const fmt = (value) => (typeof value === "number" ? num(value, 4) : String(value));

/** Scalars of one section of the stored metrics (the top level is the held-out evaluation). */
function scalars(section) {
  return Object.entries(section ?? {}).filter(([name, value]) => isScalar(value) && !SKIP.has(name));
}

/** One row per metric, one column per evaluation section that has it. */
function evaluationTable(metrics) {
  const sections = SECTIONS.filter(([key]) => key !== "training")
    .map(([key, label, about]) => [label, about, Object.fromEntries(scalars(key === "heldout" ? metrics : metrics?.[key]))])
    .filter(([, , values]) => Object.keys(values).length);
  const names = [...new Set(sections.flatMap(([, , values]) => Object.keys(values)))];
  if (!names.length) return h("p", { class: "empty" }, "No evaluation stored.");
  return h("div", { class: "table-scroll" }, h("table", { id: "eval-table" },
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Metric"),
      sections.map(([label, about]) => h("th", { scope: "col", class: "num", title: about }, label)))),
    h("tbody", {}, names.map((name) => h("tr", {}, h("th", { scope: "row", class: "mono" }, name),
      sections.map(([, , values]) => h("td", { class: "num" }, name in values ? fmt(values[name]) : "–")))))));
}

function renderEvaluation(metrics) {
  const training = scalars(metrics?.training);
  fill($("#evaluation"), evaluationTable(metrics),
    training.length ? [h("h3", {}, "At the end of training"),
      h("dl", { class: "kv-grid" }, training.map(([name, value]) => h("div", {}, h("dt", {}, name), h("dd", {}, fmt(value)))))] : null);
}

/** The stored density histogram (over the held-out rows, from the evaluation after training). */
function renderDensity(metrics) {
  const histogram = metrics?.density_histogram;
  if (!histogram) {
    fill($("#density"), h("p", { class: "empty" }, "No density histogram stored with this SAE."));
    return;
  }
  const [from, to] = occupied(histogram.counts);
  const labels = histogram.log10_frequency_edges.slice(from, to).map((e) => `1e${e}`);
  const total = histogram.counts.reduce((a, b) => a + b, 0) + histogram.never_fired;
  fill($("#density"),
    barPlot("Latents by how often they fire", histogram.counts.slice(from, to), labels, { xLabel: "log10 fraction of tokens a latent fires on", yLabel: "latents" }),
    h("p", { class: "muted" }, `${num(total - histogram.never_fired)} of ${num(total)} latents fired on the ${num(metrics.n_rows)} held-out rows; `,
      `${num(histogram.never_fired)} never did (${percent(histogram.never_fired / total)}).`));
}

function wireEvaluate() {
  $("#evaluate").addEventListener("click", async () => {
    $("#evaluate").disabled = true;
    try {
      const done = await followJob(await api(`/saes/${saeId}/evaluate`, { method: "POST", body: {} }), $("#eval-status"));
      if (done.status === "finished") renderEvaluation((await api(`/saes/${saeId}`)).metrics);
    } catch (error) {
      status($("#eval-status"), `Could not evaluate: ${error.message}`, "err");
    } finally {
      $("#evaluate").disabled = false;
    }
  });
}

// ---- the evaluation ledger ----------------------------------------------------------------

function renderLedger(ledger) {
  if (!ledger) {
    fill($("#ledger"), h("p", { class: "empty" }, "No ledger yet: compute one below."));
    return;
  }
  fill($("#ledger"), h("p", { class: "muted" }, `Computed ${when(ledger.computed_at)} in ${num(ledger.seconds)} s.`),
    ledgerPlot(ledger.entries), ledgerTable(ledger.entries));
}

/** "label | text" or "label<TAB>text" lines as the API's inline labelled dataset (null if empty). */
function labelledLines(text) {
  const rows = text.split("\n").map((line) => line.trim()).filter(Boolean).map((line) => {
    const cut = line.includes("\t") ? line.indexOf("\t") : line.indexOf(" | ");
    if (cut < 0) throw new Error(`no label separator (a tab or " | ") in: ${line.slice(0, 60)}`);
    return [line.slice(0, cut).trim(), line.slice(cut + (line[cut] === "\t" ? 1 : 3)).trim()];
  });
  return rows.length ? { kind: "texts", labels: rows.map((r) => r[0]), texts: rows.map((r) => r[1]) } : null;
}

function wireLedger() {
  $("#ledger-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("#ledger-run").disabled = true;
    try {
      const options = {
        ks: $("#ledger-ks").value.split(",").map((k) => Number(k.trim())).filter((k) => k > 0),
        absorption_words: Number($("#ledger-words").value),
        synthetic_rows: Number($("#ledger-rows").value),
      };
      const body = { options, dataset: labelledLines($("#ledger-data").value) };
      const job = await api(`/saes/${saeId}/ledger`, { method: "POST", body });
      const done = await followJob(job, $("#ledger-status"));
      if (done.status === "finished") renderLedger(await api(`/saes/${saeId}/ledger`));
    } catch (error) {
      status($("#ledger-status"), `Could not compute the ledger: ${error.message}`, "err");
    } finally {
      $("#ledger-run").disabled = false;
    }
  });
}

start(async () => {
  wireEvaluate();
  wireLedger();
  const [sae, history, ledger] = await Promise.all([
    api(`/saes/${saeId}`), api(`/saes/${saeId}/history`), apiOrNull(`/saes/${saeId}/ledger`),
  ]);
  renderLedger(ledger);
  renderStats(sae);
  renderCurves(history.points);
  renderEvaluation(sae.metrics);
  renderDensity(sae.metrics);
});
