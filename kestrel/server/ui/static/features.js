// Feature browser: search an SAE's latents by name, label, token (the API's search) or index.
// The query lives in the URL, so a search can be bookmarked and the back button works.

import { api, apiOrNull, base } from "./api.js";
import { $, fill, h, num, showToken } from "./dom.js";
import { start, status } from "./shell.js";

const saeId = document.body.dataset.saeId;
const PAGE = 50;
const form = $("#search-form");

function readForm() {
  return {
    q: $("#q").value.trim(),
    sort: $("#sort").value,
    source: $("#source").value,
    alive: $("#alive").checked,
    min_detection: $("#min-detection").value,
  };
}

function writeForm(params) {
  $("#q").value = params.get("q") ?? "";
  $("#sort").value = params.get("sort") ?? "latent";
  $("#source").value = params.get("source") ?? "";
  $("#alive").checked = params.get("alive") === "1";
  $("#min-detection").value = params.get("min_detection") ?? "";
}

/** A label score (balanced accuracy or AUROC, chance 0.5) as a cell; blank when unscored. */
const scoreCell = (concept, name) => {
  const value = concept?.scores?.[name];
  return h("td", { class: "num", dataset: { score: value ?? "" } }, value == null ? "" : value.toFixed(2));
};

const featureLink = (latent) => `${base}/ui/saes/${saeId}/features/${latent}`;
const tokens = (list) => h("ul", { class: "chips" }, list.slice(0, 6).map((t) => h("li", { class: "chip" }, showToken(t))));

function resultsTable(items) {
  return h("div", { class: "table-scroll" }, h("table", { id: "results-table" },
    h("thead", {}, h("tr", {}, ["Latent", "Name", "Density", "Max act.", "Detection", "Fuzzing", "Top tokens", "Promotes"].map((label, i) =>
      h("th", { scope: "col", class: i >= 2 && i <= 5 ? "num" : null }, label)))),
    h("tbody", {}, items.map((f) => h("tr", { dataset: { latent: f.latent } },
      h("td", {}, h("a", { href: featureLink(f.latent), class: "mono" }, `#${f.latent}`)),
      h("td", {}, f.concept ? [h("a", { href: featureLink(f.latent) }, f.concept.name), h("div", { class: "muted" }, f.concept.source)] : h("span", { class: "muted" }, "unnamed")),
      h("td", { class: "num" }, num(f.density)),
      h("td", { class: "num" }, num(f.max_activation)),
      scoreCell(f.concept, "detection"),
      scoreCell(f.concept, "fuzz"),
      h("td", {}, tokens(f.top_tokens)),
      h("td", {}, tokens(f.promoted_tokens)))))));
}

/** The latent a numeric query names, as a list item (the index page of a 'latent' sort). */
async function byIndex(q, query) {
  if (!/^\d{1,9}$/.test(q)) return null; // a longer number is no index (and past the API's offset bound)
  const page = await apiOrNull(`/saes/${saeId}/features`, { query: { ...query, sort: "latent", offset: q, limit: 1, include_dead: true } });
  return page?.items?.[0]?.latent === Number(q) ? page.items[0] : null;
}

async function search(params) {
  const { q, sort, source, alive, min_detection } = readForm();
  const offset = Number(params.get("offset") ?? 0);
  const query = { sort, limit: PAGE, offset, include_dead: !alive };
  if (source) query.source = source;
  if (min_detection !== "") query.min_detection = min_detection;
  const [exact, page] = await Promise.all([
    offset === 0 ? byIndex(q, source ? { source } : {}) : null,
    api(`/saes/${saeId}/features`, { query: q ? { ...query, search: q } : query }),
  ]);
  const alsoByIndex = exact && !page.items.some((f) => f.latent === exact.latent);
  const items = exact ? [exact, ...page.items.filter((f) => f.latent !== exact.latent)] : page.items; // index first
  fill($("#features-subtitle"), `${num(page.n_latents)} latents of `, h("span", { class: "mono" }, saeId), ` (discovery ${page.version}).`);
  const shown = page.total > PAGE ? `, showing ${offset + 1}–${Math.min(offset + PAGE, page.total)}` : "";
  status($("#results-count"), `${num(page.total + (alsoByIndex ? 1 : 0))} found${shown}`);
  fill($("#results"), items.length ? resultsTable(items) : h("p", { class: "empty" }, `No latent matches “${q}”.`));
  $("#prev").disabled = offset === 0;
  $("#next").disabled = offset + PAGE >= page.total;
}

function navigate(changes) {
  const params = new URLSearchParams(location.search);
  for (const [key, value] of Object.entries(changes)) {
    if (value === "" || value === null || value === false) params.delete(key);
    else params.set(key, value === true ? "1" : value);
  }
  history.pushState(null, "", `?${params}`);
  return search(params).catch(searchFailed);
}

const searchFailed = (error) => status($("#results-count"), `Search failed: ${error.message}`, "err");

start(async () => {
  const params = new URLSearchParams(location.search);
  writeForm(params);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const { q, sort, source, alive, min_detection } = readForm();
    navigate({ q, sort, source, alive, min_detection, offset: null });
  });
  $("#prev").addEventListener("click", () => navigate({ offset: Math.max(0, Number(new URLSearchParams(location.search).get("offset") ?? 0) - PAGE) }));
  $("#next").addEventListener("click", () => navigate({ offset: Number(new URLSearchParams(location.search).get("offset") ?? 0) + PAGE }));
  window.addEventListener("popstate", () => {
    const current = new URLSearchParams(location.search);
    writeForm(current);
    search(current).catch(searchFailed);
  });
  await search(params).catch((error) => {
    // e.g. an SAE whose features were never discovered: say so where the results would be
    fill($("#results"), h("p", { class: "empty" }, error.message));
    searchFailed(error);
  });
});
