// Compare page: pick SAEs (the URL's ?ids= keeps the choice), see their ledgers side by side and
// an L0-vs-FVU scatter with the Pareto front.

import { api } from "./api.js";
import { $, fill, h, num, percent } from "./dom.js";
import { paretoScatter } from "./ledger.js";
import { start, status } from "./shell.js";

const MAX_COMPARE = 32;

const chosenIds = () => (new URLSearchParams(location.search).get("ids") ?? "").split(",").map((s) => s.trim()).filter(Boolean);

function setIds(ids) {
  const url = new URL(location.href);
  if (ids.length) url.searchParams.set("ids", ids.join(","));
  else url.searchParams.delete("ids");
  history.replaceState(null, "", url);
}

function probing(row) {
  const entries = Object.entries(row.sparse_probing ?? {}).filter(([k]) => k.startsWith("top_"));
  return entries.length ? entries.map(([k, v]) => `${k.replace("top_", "k=")}: ${num(v)}`).join(", ") : "–";
}

function renderTable(rows) {
  const columns = [
    ["SAE", (r) => h("a", { href: `${document.body.dataset.base}/ui/saes/${r.id}`, class: "mono" }, r.id)],
    ["Architecture", (r) => `${r.architecture ?? "–"}${r.k ? ` k=${r.k}` : ""}`],
    ["Latents", (r) => num(r.n_latents)],
    ["L0", (r) => num(r.l0)],
    ["FVU", (r) => num(r.fvu, 4)],
    ["Dead", (r) => percent(r.dead_fraction)],
    ["CE recovered", (r) => num(r.ce_loss_recovered, 4)],
    ["KL", (r) => num(r.kl_divergence, 4)],
    ["Sparse probing", probing],
    ["Absorption", (r) => num(r.absorption_fraction, 3)],
    ["Synthetic recovery", (r) => num(r.synthetic_recovery, 3)],
    ["Ledger", (r) => (r.has_ledger ? "yes" : "no (held-out metrics)")],
    ["Pareto", (r) => (r.pareto ? "★ front" : "")],
  ];
  fill($("#comparison"), h("div", { class: "table-scroll" }, h("table", { id: "compare-table" },
    h("thead", {}, h("tr", {}, columns.map(([label]) => h("th", { scope: "col" }, label)))),
    h("tbody", {}, rows.map((r) => h("tr", { dataset: { id: r.id, pareto: String(r.pareto) } },
      columns.map(([, value]) => h("td", {}, value(r)))))))));
}

async function show(ids) {
  setIds(ids);
  if (!ids.length) {
    fill($("#scatter"), h("p", { class: "empty" }, "Pick SAEs above."));
    fill($("#comparison"), h("p", { class: "empty" }, "Pick SAEs above."));
    return;
  }
  const { rows } = await api("/saes/compare", { query: { ids: ids.join(",") } });
  fill($("#scatter"), paretoScatter(rows));
  renderTable(rows);
}

function renderPicker(saes, chosen) {
  fill($("#sae-picker"), h("legend", { class: "sr-only" }, "SAEs to compare"),
    saes.length ? saes.map((sae) => h("label", {},
      h("input", { type: "checkbox", value: sae.id, checked: chosen.includes(sae.id), onchange: onPick }),
      h("span", { class: "mono" }, sae.id), h("span", { class: "muted" }, ` ${sae.config?.architecture ?? ""} ${num(sae.config?.n_latents)}`)))
      : h("p", { class: "empty" }, "No SAEs yet."));
}

async function onPick() {
  const ids = [...document.querySelectorAll("#sae-picker input:checked")].map((box) => box.value);
  if (ids.length > MAX_COMPARE) {
    status($("#compare-status"), `At most ${MAX_COMPARE} SAEs at once.`, "err");
    return;
  }
  try {
    status($("#compare-status"), "");
    await show(ids);
    document.body.dataset.shown = ids.join(",");
  } catch (error) {
    status($("#compare-status"), `Could not compare: ${error.message}`, "err");
  }
}

start(async () => {
  const listing = await api("/saes", { query: { limit: 500 } });
  const known = new Set(listing.items.map((s) => s.id));
  const chosen = chosenIds().filter((id) => known.has(id));
  renderPicker(listing.items, chosen);
  await show(chosen);
  document.body.dataset.shown = chosen.join(",");
});
