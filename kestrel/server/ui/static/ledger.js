// The evaluation ledger's views, shared by the SAE page and the comparison page: each metric
// against its baseline (a dot for the SAE, a tick for chance, a tick for the ceiling), the ledger
// table, and an L0-vs-FVU scatter with the Pareto front drawn through its undominated SAEs.

import { h, num, when } from "./dom.js";
import { ticks } from "./plot.js";

const SVG = "http://www.w3.org/2000/svg";

function s(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

/** What an entry's numbers mean, in words (for titles and the table). */
const KIND = { chance: "chance", control: "control", reference: "reference", ideal: "ideal" };

/**
 * One row per metric: a scale from the smallest to the largest of value, baseline and ceiling
 * (0..1 where they all fit), the baseline as a grey tick, the ceiling as a dashed one, the value
 * as a dot coloured by whether it beats the baseline in the metric's direction.
 */
export function ledgerPlot(entries) {
  const names = Object.keys(entries);
  const row = 26;
  const width = 560;
  const left = 190;
  const right = 70;
  const height = names.length * row + 24;
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", class: "ledger-plot" });
  const described = [];
  names.forEach((name, i) => {
    const e = entries[name];
    const y = 14 + i * row;
    const points = [e.value, e.baseline, e.ceiling].filter((v) => typeof v === "number" && Number.isFinite(v));
    const lo = Math.min(0, ...points);
    const hi = Math.max(points.every((v) => v >= 0 && v <= 1) ? 1 : 0, ...points) || 1;
    const x = (v) => left + ((v - lo) / (hi - lo || 1)) * (width - left - right);
    svg.append(s("text", { class: "tick", x: left - 8, y: y + 4, "text-anchor": "end" }, name));
    svg.append(s("line", { class: "axis", x1: x(lo), x2: x(hi), y1: y, y2: y }));
    if (typeof e.baseline === "number") {
      const tick = s("line", { class: "baseline", x1: x(e.baseline), x2: x(e.baseline), y1: y - 8, y2: y + 8 });
      tick.append(s("title", {}, `${KIND[e.baseline_kind] ?? e.baseline_kind} baseline ${num(e.baseline, 4)}`));
      svg.append(tick);
    }
    if (typeof e.ceiling === "number") {
      svg.append(s("line", { class: "ceiling", x1: x(e.ceiling), x2: x(e.ceiling), y1: y - 8, y2: y + 8 }));
    }
    if (typeof e.value === "number") {
      const beats = typeof e.baseline !== "number" || (e.better === "higher" ? e.value > e.baseline : e.value < e.baseline);
      const dot = s("circle", { class: beats ? "value beats" : "value", cx: x(e.value), cy: y, r: 5 });
      dot.append(s("title", {}, `${name}: ${num(e.value, 4)} (${e.better} is better)`));
      svg.append(dot);
      svg.append(s("text", { class: "tick", x: width - right + 8, y: y + 4 }, num(e.value, 3)));
      described.push(`${name} ${num(e.value, 3)} vs ${num(e.baseline, 3)}`);
    } else {
      svg.append(s("text", { class: "tick", x: width - right + 8, y: y + 4 }, "n/a"));
      described.push(`${name} not measured`);
    }
  });
  svg.setAttribute("aria-label", `Ledger: each metric against its baseline. ${described.join("; ")}`);
  const fig = h("figure", { class: "plot", style: "margin:0" }, h("h3", {}, "Each metric against its baseline"));
  fig.append(svg);
  fig.append(h("p", { class: "muted legend" },
    h("span", { class: "key value-key" }, "●"), " this SAE (filled when it beats the baseline) ",
    h("span", { class: "key baseline-key" }, "|"), " baseline ",
    h("span", { class: "key ceiling-key" }, "¦"), " best attainable"));
  return fig;
}

/** The ledger as a table: value, baseline and its kind, which way is better, the settings. */
export function ledgerTable(entries) {
  return h("div", { class: "table-scroll" }, h("table", { id: "ledger-table" },
    h("thead", {}, h("tr", {}, ["Metric", "Value", "Baseline", "Kind", "Better", "Computed"].map((label, i) =>
      h("th", { scope: "col", class: i && i < 3 ? "num" : null }, label)))),
    h("tbody", {}, Object.entries(entries).map(([name, e]) => h("tr", { dataset: { metric: name } },
      h("th", { scope: "row", class: "mono", title: e.note ?? e.reason ?? "" }, name),
      h("td", { class: "num" }, e.value === null ? h("span", { title: e.reason ?? "" }, "n/a") : num(e.value, 4)),
      h("td", { class: "num" }, num(e.baseline, 4)),
      h("td", {}, e.baseline_kind),
      h("td", {}, e.better),
      h("td", { title: JSON.stringify(e.settings) }, when(e.computed_at)))))));
}

/**
 * L0 (x) against FVU (y) for rows {id, l0, fvu, pareto}; the Pareto front (lower is better in
 * both) joined by a line, its points marked. Rows without both figures are left out (and said).
 */
export function paretoScatter(rows) {
  const size = { width: 520, height: 300, left: 56, right: 16, top: 14, bottom: 40 };
  const { width, height, left, right, top, bottom } = size;
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", class: "pareto-plot" });
  const shown = rows.filter((r) => typeof r.l0 === "number" && typeof r.fvu === "number");
  const fig = h("figure", { class: "plot", style: "margin:0" }, h("h3", {}, "L0 against FVU (lower-left is better)"));
  if (!shown.length) {
    svg.setAttribute("aria-label", "no SAE has both L0 and FVU");
    fig.append(svg);
    return fig;
  }
  const xs = shown.map((r) => r.l0);
  const ys = shown.map((r) => r.fvu);
  const pad = (lo, hi) => [lo - (hi - lo || Math.abs(lo) || 1) * 0.1, hi + (hi - lo || Math.abs(hi) || 1) * 0.1];
  const [x0, x1] = pad(Math.min(...xs), Math.max(...xs));
  const y0 = Math.min(0, ...ys);
  const y1 = pad(y0, Math.max(...ys))[1];
  const x = (v) => left + ((v - x0) / (x1 - x0)) * (width - left - right);
  const y = (v) => height - bottom - ((v - y0) / (y1 - y0)) * (height - top - bottom);
  svg.append(s("line", { class: "axis", x1: left, x2: width - right, y1: height - bottom, y2: height - bottom }));
  svg.append(s("line", { class: "axis", x1: left, x2: left, y1: top, y2: height - bottom }));
  for (const v of ticks(x0, x1, 5).filter((t) => t >= x0 && t <= x1)) {
    svg.append(s("text", { class: "tick", x: x(v), y: height - bottom + 14, "text-anchor": "middle" }, num(v)));
  }
  for (const v of ticks(y0, y1, 4)) {
    svg.append(s("line", { class: "grid", x1: left, x2: width - right, y1: y(v), y2: y(v) }));
    svg.append(s("text", { class: "tick", x: left - 6, y: y(v) + 3, "text-anchor": "end" }, num(v)));
  }
  svg.append(s("text", { class: "tick", x: (left + width - right) / 2, y: height - 6, "text-anchor": "middle" }, "L0 (latents per token)"));
  svg.append(s("text", { class: "tick", x: 12, y: (top + height - bottom) / 2, transform: `rotate(-90 12 ${(top + height - bottom) / 2})`, "text-anchor": "middle" }, "FVU"));
  const front = shown.filter((r) => r.pareto).sort((a, b) => a.l0 - b.l0);
  if (front.length > 1) {
    svg.append(s("path", { class: "front", d: front.map((r, i) => `${i ? "L" : "M"}${x(r.l0).toFixed(1)},${y(r.fvu).toFixed(1)}`).join("") }));
  }
  for (const r of shown) {
    const dot = s("circle", { class: r.pareto ? "point pareto" : "point", cx: x(r.l0), cy: y(r.fvu), r: r.pareto ? 6 : 4, "data-id": r.id });
    dot.append(s("title", {}, `${r.id}: L0 ${num(r.l0)}, FVU ${num(r.fvu, 4)}${r.pareto ? " (Pareto front)" : ""}`));
    svg.append(dot);
    svg.append(s("text", { class: "tick", x: x(r.l0) + 8, y: y(r.fvu) - 6 }, r.id));
  }
  svg.setAttribute("aria-label", `${shown.length} SAEs by L0 and FVU; on the Pareto front: ${front.map((r) => r.id).join(", ") || "none"}`);
  fig.append(svg);
  const missing = rows.length - shown.length;
  if (missing) fig.append(h("p", { class: "muted" }, `${missing} SAE(s) without both L0 and FVU are not plotted.`));
  return fig;
}
