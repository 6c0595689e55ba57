// Steering playground: a prompt, latents picked by search, a slider per latent, the default and
// steered generations side by side (one generate call, same seed), configs saved and loaded by id.

import { api, apiOrNull, awaited, base } from "./api.js";
import { $, debounce, fill, h, num, percent, showToken, table } from "./dom.js";
import { start, status } from "./shell.js";

const OPS = {
  add: { label: "add", identity: 0 },
  clamp: { label: "clamp to", identity: null },
  scale: { label: "scale by", identity: 1 },
};
const picked = new Map(); // latent -> {latent, name, max, op, value}
let saes = [];
let generation = 0; // answers to older requests are dropped

const currentSae = () => saes.find((s) => s.id === $("#sae").value);

/** A list item for one latent (the API's search has no index lookup: offset into the index order). */
async function latentByIndex(saeId, latent) {
  const page = await apiOrNull(`/saes/${saeId}/features`, { query: { sort: "latent", offset: latent, limit: 1 } });
  const item = page?.items?.[0];
  return item?.latent === latent ? item : null;
}

const describe = (item) => item.concept?.name ?? (item.top_tokens.length ? `fires on ${item.top_tokens.slice(0, 3).map(showToken).join(" ")}` : "unnamed");

/** The slider's span for an op: generous multiples of the latent's largest activation. */
function range(entry) {
  if (entry.op === "scale") return { min: -4, max: 8, step: 0.25 };
  const reach = Math.max(10, Math.ceil(entry.max * 10));
  return { min: entry.op === "clamp" ? 0 : -reach, max: reach, step: reach / 20 };
}

function sliderRow(entry) {
  const id = `slider-${entry.latent}`;
  const r = range(entry);
  const output = h("output", { for: id, id: `${id}-value` }, num(entry.value));
  const slider = h("input", {
    id, type: "range", min: String(r.min), max: String(r.max), step: String(r.step), value: String(entry.value),
    "aria-describedby": `${id}-value`,
    oninput: (event) => {
      entry.value = Number(event.target.value);
      output.textContent = num(entry.value);
    },
    onchange: () => regenerate(),
  });
  const op = h("select", { id: `${id}-op`, "aria-label": `Operation on latent ${entry.latent}`, onchange: (event) => {
    entry.op = event.target.value;
    entry.value = OPS[entry.op].identity ?? entry.max;
    renderSliders();
    regenerate();
  } }, Object.entries(OPS).map(([value, o]) => h("option", { value, selected: value === entry.op }, o.label)));
  const remove = h("button", { class: "btn small", type: "button", "aria-label": `Remove latent ${entry.latent}`, onclick: () => {
    picked.delete(entry.latent);
    renderSliders();
    regenerate();
  } }, "Remove");
  return h("li", { class: "slider-row", dataset: { latent: entry.latent } },
    h("label", { for: id }, h("a", { href: `${base}/ui/saes/${$("#sae").value}/features/${entry.latent}`, class: "mono" }, `#${entry.latent}`), ` ${entry.name}`),
    op, slider, output, remove);
}

function renderSliders() {
  fill($("#sliders"), [...picked.values()].map(sliderRow));
  $("#no-sliders").hidden = picked.size > 0;
}

function pick(item, op = "add", value = 0) {
  picked.set(item.latent, { latent: item.latent, name: describe(item), max: item.max_activation, op, value });
  renderSliders();
  $(`#slider-${item.latent}`)?.focus();
}

// ---------------------------------------------------------------------------------------------
// Finding latents

async function findLatents(q) {
  const saeId = $("#sae").value;
  if (!saeId) throw new Error("no SAE to search: train or import one first");
  const [exact, page] = await Promise.all([
    /^\d{1,9}$/.test(q) ? latentByIndex(saeId, Number(q)) : null,
    api(`/saes/${saeId}/features`, { query: { search: q, limit: 20, sort: "density", include_dead: false } }),
  ]);
  const items = exact ? [exact, ...page.items.filter((f) => f.latent !== exact.latent)] : page.items;
  const list = $("#latent-results");
  list.hidden = false;
  fill(list, items.length ? items.map((item) => h("li", {},
    h("span", {}, h("span", { class: "mono" }, `#${item.latent}`), ` ${describe(item)} `, h("span", { class: "muted" }, `· max ${num(item.max_activation)}`)),
    h("button", { class: "btn small", type: "button", "aria-label": `Add latent ${item.latent}`, disabled: picked.has(item.latent), onclick: (event) => {
      event.target.disabled = true;
      pick(item);
    } }, "Add"))) : h("li", { class: "muted" }, `No latent matches “${q}”.`));
}

// ---------------------------------------------------------------------------------------------
// Generating

const edits = () => [...picked.values()].map((e) => ({ latent: e.latent, op: e.op, value: e.value }));

function showGeneration(el, prompt, generated) {
  if (!generated) {
    fill(el, h("span", { class: "muted" }, "No steering: pick a latent and move its slider."));
    return;
  }
  fill(el, h("span", { class: "prompt" }, prompt), h("span", { class: "cont" }, generated.text));
}

/** The server's warnings about the edits (e.g. a latent driven far beyond its observed maximum). */
function showWarnings(warnings) {
  const list = $("#gen-warnings");
  fill(list, warnings.map((w) => h("li", {}, `Warning: ${w}`)));
  list.hidden = warnings.length === 0;
}

const keywords = () => $("#keywords").value.split(",").map((w) => w.trim()).filter(Boolean);

/** Fluency (perplexity under the unsteered model) and keyword effect of the steered text. */
function showEffect(effect) {
  if (!effect) {
    fill($("#gen-effect"));
    return;
  }
  const parts = [`Perplexity under the unsteered model: default ${num(effect.default_perplexity)}, steered ${num(effect.steered_perplexity)} (${num(effect.perplexity_ratio, 2)}× ${effect.perplexity_ratio > 2 ? "— no longer fluent" : "— fluent"})`];
  if (effect.steered_keyword_hits !== null) parts.push(`keywords: ${effect.default_keyword_hits} → ${effect.steered_keyword_hits} hits, log-prob ${effect.keyword_logprob_delta >= 0 ? "+" : ""}${num(effect.keyword_logprob_delta, 2)} nats`);
  status($("#gen-effect"), `${parts.join("; ")}.`, effect.perplexity_ratio > 2 ? "err" : "ok");
}

async function generate() {
  const sae = currentSae();
  const prompt = $("#prompt").value;
  if (!sae || !prompt.trim()) return;
  const mine = ++generation;
  const body = { prompts: [prompt], max_new_tokens: Number($("#max-tokens").value) || 20 };
  if (picked.size) {
    body.steering = { sae_id: sae.id, edits: edits() };
    if (keywords().length) body.keywords = keywords();
  }
  status($("#gen-status"), "Generating…");
  document.querySelectorAll(".gen").forEach((el) => el.classList.add("busy"));
  try {
    // A generation that outlives the server's wait answers 202 with its job: follow it to its result.
    const answer = await awaited(`/models/${encodeURIComponent(sae.model ?? sae.config.model)}/generate`, { method: "POST", body }, (job) => {
      if (mine !== generation) throw new Error("superseded by a newer generation");
      status($("#gen-status"), `Still generating (job ${job.id}: ${job.message || job.status})…`);
    });
    if (mine !== generation) return;
    const item = answer.items[0];
    showGeneration($("#default-output"), prompt, item.default);
    showGeneration($("#steered-output"), prompt, item.steered);
    const seconds = Object.entries(answer.seconds).map(([k, v]) => `${k} ${num(v, 2)} s`).join(", ");
    status($("#gen-status"), `Generated with ${answer.model} (${seconds}).`, "ok");
    showWarnings(answer.warnings ?? []);
    showEffect(answer.effect);
  } catch (error) {
    if (mine === generation) {
      status($("#gen-status"), `Could not generate: ${error.message}`, "err");
      showWarnings([]);
      showEffect(null);
    }
  } finally {
    if (mine === generation) document.querySelectorAll(".gen").forEach((el) => el.classList.remove("busy"));
  }
}

const regenerate = debounce(generate, 250);

// ---------------------------------------------------------------------------------------------
// Sweep: one latent at several strengths, side by side

const SWEEP_COLUMNS = [
  { label: "Strength", value: (p) => p.strength === null ? "unsteered" : `${num(p.strength)}×`, num: true },
  { label: "Value", value: (p) => num(p.absolute_value), num: true },
  { label: "Perplexity", value: (p) => num(p.steered_perplexity), num: true },
  { label: "× unsteered", value: (p) => num(p.perplexity_ratio, 2), num: true },
  { label: "Fluent", value: (p) => (p.fluent ? "yes" : "no") },
  { label: "Keyword hits", value: (p) => num(p.steered_keyword_hits), num: true },
  { label: "Δ keyword log-p", value: (p) => num(p.keyword_logprob_delta, 2), num: true },
  { label: "Changed", value: (p) => percent(p.changed_fraction) },
  { label: "Continuation", value: (p) => h("span", { class: p.effect ? "cont effect" : "cont" }, p.items[0].text) },
];

function showSweep(answer) {
  const base = answer.baseline;
  const unsteered = {
    strength: null, absolute_value: null, steered_perplexity: base.perplexity, perplexity_ratio: 1, fluent: true,
    steered_keyword_hits: base.keyword_hits, keyword_logprob_delta: null, changed_fraction: 0, effect: false, items: base.items,
  };
  const verdict = $("#sweep-verdict");
  verdict.hidden = false;
  verdict.className = `verdict ${answer.steers ? "ok" : "err"}`;
  verdict.textContent = `Latent ${answer.latent}${answer.name ? ` (${answer.name})` : ""}: ${answer.verdict}.`;
  fill($("#sweep-table"), table(SWEEP_COLUMNS, [unsteered, ...answer.points], { caption: "Continuations by strength" }));
}

async function sweep() {
  const sae = currentSae();
  const prompt = $("#prompt").value;
  const latentText = $("#sweep-latent").value || String([...picked.keys()][0] ?? "");
  if (!sae || !prompt.trim() || latentText === "") {
    status($("#sweep-status"), "Give a prompt and a latent (or add a slider) to sweep.", "err");
    return;
  }
  const strengths = $("#sweep-strengths").value.split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const body = {
    sae_id: sae.id, latent: Number(latentText), op: $("#sweep-op").value, strengths, prompts: [prompt],
    keywords: keywords(), max_new_tokens: Math.min(Number($("#max-tokens").value) || 20, 64),
  };
  status($("#sweep-status"), "Sweeping…");
  try {
    const answer = await awaited("/steering/sweep", { method: "POST", body }, (job) => {
      status($("#sweep-status"), `Still sweeping (job ${job.id}: ${job.message || job.status})…`);
    });
    showSweep(answer);
    status($("#sweep-status"), `Swept ${answer.points.length} strengths with ${answer.model}.`, "ok");
  } catch (error) {
    status($("#sweep-status"), `Could not sweep: ${error.message}`, "err");
  }
}

// ---------------------------------------------------------------------------------------------
// Saved configs

async function listConfigs() {
  const page = await api("/steering", { query: { limit: 100 } });
  fill($("#config-ids"), page.items.map((r) => h("option", { value: r.id }, r.config.name ?? "")));
}

async function saveConfig() {
  const sae = currentSae();
  if (!sae) {
    status($("#config-status"), "Not saved: no SAE picked (train or import one first).", "err");
    return;
  }
  const config = { sae_id: sae.id, edits: edits() };
  const name = $("#config-name").value.trim();
  if (name) config.name = name;
  try {
    const record = await api("/steering", { method: "POST", body: config });
    $("#config-id").value = record.id;
    status($("#config-status"), `Saved as ${record.id}.`, "ok");
    history.replaceState(null, "", `?config=${record.id}`);
    await listConfigs();
  } catch (error) {
    status($("#config-status"), `Not saved: ${error.message}`, "err");
  }
}

async function loadConfig(id) {
  const record = await api(`/steering/${encodeURIComponent(id)}`);
  const config = record.config;
  $("#sae").value = config.sae_id;
  $("#config-name").value = config.name ?? "";
  picked.clear();
  const items = await Promise.all(config.edits.map((e) => latentByIndex(config.sae_id, e.latent)));
  config.edits.forEach((e, i) => {
    const item = items[i] ?? { latent: e.latent, concept: null, top_tokens: [], max_activation: 1 };
    picked.set(e.latent, { latent: e.latent, name: describe(item), max: item.max_activation, op: e.op, value: e.value });
  });
  renderSliders();
  status($("#config-status"), `Loaded ${record.id}${config.name ? ` (“${config.name}”)` : ""}.`, "ok");
  history.replaceState(null, "", `?config=${record.id}`);
  await generate();
}

// ---------------------------------------------------------------------------------------------

function wire() {
  $("#generate").addEventListener("click", generate);
  $("#sweep-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sweep();
  });
  $("#sae").addEventListener("change", () => {
    picked.clear();
    renderSliders();
    $("#latent-results").hidden = true;
  });
  $("#latent-search").addEventListener("submit", (event) => {
    event.preventDefault();
    const q = $("#latent-q").value.trim();
    if (q) findLatents(q).catch((error) => status($("#gen-status"), error.message, "err"));
  });
  $("#save-form").addEventListener("submit", (event) => {
    event.preventDefault();
    saveConfig();
  });
  $("#load-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = $("#config-id").value.trim();
    if (id) loadConfig(id).catch((error) => status($("#config-status"), `Could not load ${id}: ${error.message}`, "err"));
  });
}

start(async () => {
  wire();
  saes = (await api("/saes", { query: { limit: 100 } })).items;
  if (!saes.length) {
    fill($("#sae"), h("option", { value: "" }, "No SAE yet"));
    return;
  }
  fill($("#sae"), saes.map((s) => h("option", { value: s.id }, `${s.id} · ${s.model ?? ""} ${s.layer ?? ""}`)));
  const params = new URLSearchParams(location.search);
  await listConfigs();
  if (params.get("config")) {
    $("#config-id").value = params.get("config");
    await loadConfig(params.get("config"));
    return;
  }
  if (params.get("sae") && saes.some((s) => s.id === params.get("sae"))) $("#sae").value = params.get("sae");
  if (params.get("latent")) {
    const item = await latentByIndex($("#sae").value, Number(params.get("latent")));
    if (item) pick(item);
  }
  renderSliders();
});
