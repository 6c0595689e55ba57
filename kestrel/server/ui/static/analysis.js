// Analysis page: the manifest's key numbers, the raw JSON and the Markdown to download, and the
// report (report.md) rendered by markdown.js as DOM nodes, its plots fetched with the API key.
// A `graph` analysis is drawn above its report by graph_view.js (select, pin, test by ablation).

import { ApiError, api, apiBlob, apiKey, apiOrNull, apiText } from "./api.js";
import { $, fill, h, num, when } from "./dom.js";
import { renderMarkdown } from "./markdown.js";
import { start, status } from "./shell.js";

const analysisId = document.body.dataset.analysisId;
const path = `/analyses/${encodeURIComponent(analysisId)}`;
// The only images a report may show: its own plots, linked as plots/<name>.png.
const PLOT = /^plots\/([a-z0-9][a-z0-9_-]{0,63})\.png$/;
const LIST_SHOWN = 8;

function shown(value) {
  if (Array.isArray(value)) {
    if (!value.length) return "none";
    const head = value.slice(0, LIST_SHOWN).map((v) => num(v, 4)).join(", ");
    return value.length > LIST_SHOWN ? `${head} … (${num(value.length)})` : head;
  }
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (value !== null && typeof value === "object") return JSON.stringify(value);
  return num(value, 4);
}

function renderHeader(manifest) {
  fill($("#analysis-title"), manifest.title);
  document.title = `${manifest.title} · Kestrel`;
  const source = manifest.source ?? {};
  const layers = source.layers ?? [];
  const on = [source.model, source.layer ?? (layers.length > 2 ? `${layers.length} layers` : layers.join(", ")),
    source.run_id && `run ${source.run_id}`, source.sae_id && `SAE ${source.sae_id}`].filter(Boolean).join(" · ");
  fill($("#analysis-subtitle"), h("span", { class: "badge" }, manifest.kind), ` ${on ? `${on} · ` : ""}created ${when(manifest.created)}`,
    manifest.seconds === undefined ? "" : ` in ${num(manifest.seconds)} s`, " · ", h("span", { class: "mono" }, manifest.id));
  fill($("#analysis-stats"), Object.entries(manifest.key_numbers ?? {}).map(([name, value]) =>
    h("li", {}, h("span", { class: "label" }, name.replace(/_/g, " ")),
      h("span", { class: Array.isArray(value) || typeof value === "string" ? "value small" : "value", title: Array.isArray(value) ? value.join(", ") : null }, shown(value)))));
}

/** The raw JSON and the Markdown: plain links without a key, a fetch with the key otherwise. */
function wireDownloads() {
  for (const link of document.querySelectorAll("a[data-download]")) {
    link.addEventListener("click", async (event) => {
      if (!apiKey()) return; // the link itself works: the API asks for no key
      event.preventDefault();
      const name = link.dataset.download;
      try {
        const url = URL.createObjectURL(await apiBlob(link.dataset.apiPath));
        const save = h("a", { href: url, download: name, hidden: true });
        document.body.append(save);
        save.click();
        save.remove();
        setTimeout(() => URL.revokeObjectURL(url), 60_000);
        status($("#download-status"), `Downloaded ${name}.`, "ok");
      } catch (error) {
        status($("#download-status"), `Could not download ${name}: ${error.message}`, "err");
      }
    });
  }
}

/** A plot as an <img>: an <img> cannot send X-API-Key, so the PNG is fetched and shown as a blob. */
function plotImage(loads) {
  return (src, alt) => {
    const plot = PLOT.exec(src);
    if (!plot) return h("p", { class: "empty" }, `Image not shown (only the analysis's own plots are): ${alt || src}`);
    const img = h("img", { alt, dataset: { plot: plot[1] } });
    loads.push((async () => {
      try {
        const url = URL.createObjectURL(await apiBlob(`${path}/plots/${plot[1]}.png`));
        await new Promise((resolve, reject) => {
          img.onload = resolve;
          img.onerror = () => reject(new Error("not a readable image"));
          img.src = url;
        });
      } catch (error) {
        img.replaceWith(h("p", { class: "status err" }, `Could not load the plot ${plot[1]}: ${error.message}`));
      }
    })());
    return img;
  };
}

const isKeyValueTable = (node) => node.classList?.contains("table-scroll") && node.querySelectorAll("thead th").length === 2;

/** The report's nodes as panels, one per `##` section; short two-column tables side by side. */
function sections(nodes) {
  const groups = [];
  for (const node of nodes) {
    if (node.tagName === "H2" || !groups.length) groups.push({ heading: node.tagName === "H2" ? node : null, body: [] });
    if (node.tagName !== "H2") groups.at(-1).body.push(node);
  }
  const panels = groups.map(({ heading, body }, index) => {
    if (heading) heading.id = `report-section-${index}`;
    const figures = body.length > 0 && body.every((node) => node.tagName === "FIGURE");
    const panel = h("section", { class: "panel report", "aria-labelledby": heading ? heading.id : null, "aria-label": heading ? null : "Report" },
      heading, figures ? h("div", { class: "figures" }, body) : body);
    panel.dataset.compact = String(body.length === 1 && isKeyValueTable(body[0]));
    return panel;
  });
  const out = [];
  for (const panel of panels) {
    const previous = out.at(-1);
    if (panel.dataset.compact === "true" && previous?.dataset?.compact === "true") {
      out[out.length - 1] = h("div", { class: "grid2" }, previous, panel);
    } else if (panel.dataset.compact === "true" && previous?.classList.contains("grid2")) {
      previous.append(panel);
    } else {
      out.push(panel);
    }
  }
  return out;
}

/** A graph analysis's interactive drawing; a failure here is said in its place, the report still shows. */
async function showGraph(manifest) {
  const root = $("#graph-view");
  root.hidden = false;
  try {
    // Loaded only for a graph: the other analyses' pages do not fetch it.
    const { graphOf, graphView, transcoderOf } = await import("./graph_view.js");
    const graph = graphOf(manifest.results);
    if (!graph) {
      fill(root, h("p", { class: "status err" }, "This graph analysis's results hold no graph (nodes, links, tokens) to draw."));
      return;
    }
    const saeOf = await transcoderOf(graph, manifest, (id) => apiOrNull(`/saes/${encodeURIComponent(id)}`));
    graphView(root, { analysisId, graph, saeOf });
  } catch (error) {
    fill(root, h("p", { class: "status err" }, `Could not draw the graph: ${error.message}`));
    console.error(error);
  }
}

start(async () => {
  wireDownloads();
  let manifest;
  try {
    manifest = await api(path);
  } catch (error) {
    // A refused key is the shell's to ask for; anything else is said above the page.
    if (!(error instanceof ApiError && error.status === 401)) fill($("#report"), h("p", { class: "empty" }, "No report to show."));
    throw error;
  }
  renderHeader(manifest);
  if (manifest.kind === "graph") await showGraph(manifest);
  let markdown;
  try {
    markdown = await apiText(`${path}/report`);
  } catch (error) {
    fill($("#report"), h("p", { class: "status err" }, `Could not load the report: ${error.message}`));
    return;
  }
  // The page's heading is the report's title already: its first line is not repeated.
  const lines = markdown.split("\n");
  if (lines[0].replace(/^#\s+/, "") === manifest.title && lines[0].startsWith("# ")) lines.shift();
  const loads = [];
  fill($("#report"), sections(renderMarkdown(lines.join("\n"), { image: plotImage(loads) })));
  await Promise.all(loads);
});
