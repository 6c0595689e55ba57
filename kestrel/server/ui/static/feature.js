// Feature page: one latent's statistics, top contexts with tokens shaded by activation, the
// binned samples, the activation histogram, logit effects, and its name, editable in place.

import { api, apiOrNull } from "./api.js";
import { $, fill, h, num, percent, showToken } from "./dom.js";
import { barPlot, occupied } from "./plot.js";
import { start, status } from "./shell.js";
import { wireMeasuredLogits } from "./feature_logits.js";

const saeId = document.body.dataset.saeId;
const latent = Number(document.body.dataset.latent);
let concept = null;

/**
 * Activations the page knows, by (document, position): the firing token of every sample shown
 * (top contexts and bins). A context's other tokens are shaded when another sample is theirs;
 * the API stores no per-token activations for the rest of a window.
 */
function knownActivations(feature) {
  const known = new Map();
  const contexts = [...feature.top_contexts, ...feature.bins.flatMap((b) => b.contexts)];
  for (const c of contexts) known.set(`${c.doc_index}:${c.position}`, c.activation);
  return known;
}

function tokenSpan(token, activation, max, isTarget) {
  const alpha = activation > 0 && max > 0 ? Math.min(1, 0.15 + 0.85 * (activation / max)) : 0;
  return h("span", {
    class: isTarget ? "tok target" : "tok",
    style: alpha ? `background-color: rgba(var(--act), ${alpha.toFixed(3)})` : null,
    title: activation > 0 ? `activation ${num(activation)}` : null,
    dataset: { activation: activation > 0 ? activation.toFixed(4) : "0" },
  }, showToken(token));
}

function contextLine(c, known, max) {
  const spans = c.tokens.map((token, i) => {
    const position = c.position - c.target + i;
    const activation = i === c.target ? c.activation : (known.get(`${c.doc_index}:${position}`) ?? 0);
    return tokenSpan(token, activation, max, i === c.target);
  });
  return h("li", {}, h("span", { class: "act" }, num(c.activation)),
    h("span", { class: "ctx", "aria-label": `activation ${num(c.activation)}: ${c.tokens.join("")}` }, spans));
}

function contextList(contexts, known, max) {
  if (!contexts.length) return h("p", { class: "empty" }, "No samples.");
  return h("ul", { class: "contexts" }, contexts.map((c) => contextLine(c, known, max)));
}

function renderStats(f) {
  const stats = [
    ["Fires on", `${num(f.fire_count)} tokens`],
    ["Density", percent(f.density)],
    ["Max activation", num(f.max_activation)],
    ["Mean activation", num(f.mean_activation)],
  ];
  fill($("#feature-stats"), stats.map(([label, value]) => h("li", {}, h("span", { class: "label" }, label), h("span", { class: "value" }, value))));
}

function renderHistogram(histogram) {
  const [from, to] = occupied(histogram.counts);
  const labels = histogram.edges.slice(from, to).map((e) => num(e, 2));
  fill($("#histogram"), barPlot("Activation histogram", histogram.counts.slice(from, to), labels,
    { xLabel: "activation (lower edge of log-spaced bins)", yLabel: "tokens" }));
}

function logitList(effects, kind) {
  const max = Math.max(1e-9, ...effects.map((e) => Math.abs(e.value)));
  return h("ul", { class: `logit-list ${kind}` }, effects.map((e) => h("li", {},
    h("span", { class: "mono" }, showToken(e.token)),
    h("span", { class: "bar", style: `width: ${((Math.abs(e.value) / max) * 100).toFixed(1)}%` }),
    h("span", { class: "val" }, num(e.value)))));
}

function renderLogits(logits) {
  const note = logits.note || "";
  if (note.startsWith("none")) {  // no direct path: say why instead of two empty lists
    $("#logits-note").textContent = `No direct path to the logits: ${note.replace(/^none:\s*/, "")}.`;
    fill($("#logits"));
    return;
  }
  fill($("#logits"),
    h("div", {}, h("h3", {}, "Promotes"), logitList(logits.positive, "pos")),
    h("div", {}, h("h3", {}, "Suppresses"), logitList(logits.negative, "neg")));
}

function renderBins(bins, known, max) {
  const withSamples = [...bins].reverse().filter((b) => b.contexts.length);
  if (!withSamples.length) {
    fill($("#bins"), h("p", { class: "empty" }, "No samples below the top contexts."));
    return;
  }
  fill($("#bins"), withSamples.map((b, i) => h("details", { class: "bin", open: i === 0 },
    h("summary", {}, `${num(b.lower)} – ${num(b.upper)}`, h("span", { class: "muted" }, ` · ${b.contexts.length} samples`)),
    contextList(b.contexts, known, max))));
}

// ---------------------------------------------------------------------------------------------
// Label scores: detection, fuzzing (balanced accuracy) and embedding (AUROC), and the examples

const SCORES = [
  ["detection", "Detection", "balanced accuracy picking contexts where it fires among random ones (chance 0.5)"],
  ["fuzz", "Fuzzing", "balanced accuracy telling the tokens it fires on from random ones (chance 0.5)"],
  ["embedding", "Embedding", "AUROC of cos(name, context), no generation (chance 0.5)"],
];

function scoredExample(e) {
  const max = Math.max(1e-9, ...e.activations);
  const verdict = e.predicted === e.activating ? "right" : "wrong";
  return h("li", { dataset: { activating: String(e.activating), verdict } },
    h("span", { class: "act" }, e.activating ? "fires" : "silent"),
    h("span", { class: "muted" }, ` scorer: ${e.predicted ? "yes" : "no"} (${verdict}, ${num(e.score)}) `),
    h("span", { class: "ctx" }, e.tokens.map((t, i) => tokenSpan(t, e.activations[i], max, false))));
}

function renderScores(c) {
  const scores = c?.scores;
  $("#scores-panel").hidden = !scores;
  if (!scores) return;
  fill($("#label-scores"), SCORES.map(([key, label, help]) => h("li", { title: help, dataset: { score: key } },
    h("span", { class: "label" }, label),
    h("span", { class: "value" }, scores[key] == null ? "—" : scores[key].toFixed(2)))));
  const stale = scores.label !== c.name ? ` for the earlier name “${scores.label}”` : "";
  fill($("#scores-note"), scores.note || `scored by ${scores.scorer} on ${scores.n_activating} + ${scores.n_non_activating} held-out examples${stale}`);
  fill($("#scored-examples"), scores.examples.length
    ? h("ul", { class: "contexts" }, scores.examples.map(scoredExample))
    : h("p", { class: "empty" }, "No examples stored."));
}

// ---------------------------------------------------------------------------------------------
// Name and description, edited in place (PUT /v1/saes/{id}/concepts/{latent})

function renderName() {
  fill($("#feature-name"), concept?.name ?? `Latent ${latent}`);
  fill($("#feature-description"), concept?.description || (concept ? "" : "Unnamed: give it a name with Edit name."));
  $("#edit").textContent = concept ? "Edit name" : "Name it";
}

function openEditor(open) {
  $("#edit-form").hidden = !open;
  $("#edit").setAttribute("aria-expanded", String(open));
  if (open) {
    $("#name-input").value = concept?.name ?? "";
    $("#description-input").value = concept?.description ?? "";
    $("#name-input").focus();
  } else {
    $("#edit").focus();
  }
}

function wireEditor() {
  $("#edit").addEventListener("click", () => openEditor($("#edit-form").hidden));
  $("#edit-cancel").addEventListener("click", () => openEditor(false));
  $("#edit-form").addEventListener("keydown", (event) => {
    if (event.key === "Escape") openEditor(false);
  });
  $("#edit-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { name: $("#name-input").value.trim(), description: $("#description-input").value.trim(), tags: concept?.tags ?? [] };
    try {
      concept = await api(`/saes/${saeId}/concepts/${latent}`, { method: "PUT", body });
      renderName();
      renderScores(concept);
      openEditor(false);
      status($("#status-line"), `Saved “${concept.name}”.`, "ok");
    } catch (error) {
      status($("#edit-status"), `Not saved: ${error.message}`, "err");
    }
  });
}

/** A transcoder's latents read one layer and write another: steering that layer or measuring the
 * decoder row added there is undefined (the API refuses both), so the page offers neither and says
 * where such a latent is tested instead. */
function adaptToKind(sae) {
  if (!sae || sae.kind === "sae") return;
  $("#steer-link")?.remove();
  $("#measure-row")?.remove();
  $("#feature-description").after(h("p", { class: "muted", id: "transcoder-note" },
    `A ${sae.kind.replace("_", "-")} latent: it reads ${sae.layer ?? sae.config?.layer ?? "its input layer"} and writes ${sae.target_layer ?? sae.config?.target_layer ?? "another layer"}. `,
    "Test it by ablating or scaling it from an attribution graph's page (pin the node, then Run)."));
}

start(async () => {
  wireEditor();
  const [feature, sae] = await Promise.all([apiOrNull(`/saes/${saeId}/features/${latent}`), apiOrNull(`/saes/${saeId}`)]);
  adaptToKind(sae);
  if (!feature) {
    fill($("#contexts"), h("p", { class: "empty" }, "No such latent, or no features discovered for this SAE yet."));
    return;
  }
  concept = feature.concept;
  renderName();
  renderScores(concept);
  const known = knownActivations(feature);
  renderStats(feature);
  fill($("#contexts"), contextList(feature.top_contexts, known, feature.max_activation));
  renderHistogram(feature.histogram);
  renderLogits(feature.logits);
  wireMeasuredLogits(saeId, latent);
  fill($("#top-tokens"), h("ul", { class: "chips" }, feature.top_tokens.map((t) => h("li", { class: "chip" }, showToken(t.token), h("span", { class: "count" }, `×${t.count}`)))));
  renderBins(feature.bins, known, feature.max_activation);
});
