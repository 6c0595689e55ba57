// An attribution graph drawn as SVG (issue #15): position across, layer up (token embeddings at
// the bottom, the target logit on top), features as circles, error nodes as squares, edges
// coloured by sign and weighted by |weight| (the strongest thousand by default: a real model's
// pruned graph keeps tens of thousands). Hovering a node lights all its edges; clicking (or Enter)
// selects it and shows its details; pins are kept per analysis in localStorage and feed the
// "Test pinned features" panel (graph_test.js).

import { base } from "./api.js";
import { fill, h, num, showToken } from "./dom.js";
import { interventionPanel } from "./graph_test.js";

const SVG = "http://www.w3.org/2000/svg";
const MARGIN = { top: 14, right: 14, bottom: 50, left: 58 };
const MIN_CELL = 64; // narrower cells scroll sideways rather than stack their nodes unreadably
const HIT_GAP = 12; // centre-to-centre at least the hit circles' diameter: a click lands on its node
const MAX_LINES = 3;
const EDGES_LISTED = 8;
const EDGES_SHOWN = 1000; // links drawn by default, strongest first; a focused node shows all of its own
const EDGE_CHOICES = [250, 1000, 4000];

function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) if (value !== null && value !== undefined) el.setAttribute(name, value);
  if (text !== undefined) el.textContent = text;
  return el;
}

/** A node's short name, for lists, tooltips and screen readers. */
export function nodeLabel(node, tokens) {
  const at = `@${node.position} ${JSON.stringify(showToken(tokens[node.position] ?? ""))}`;
  if (node.kind === "feature") return `L${node.layer} #${node.latent} ${at}`;
  if (node.kind === "error") return `error L${node.layer} ${at}`;
  if (node.kind === "token") return `token ${at}`;
  return `logit ${JSON.stringify(showToken(node.token ?? ""))}`;
}

/**
 * The transcoder (SAE id) of each block, for the feature-page links: the node's own sae_id, else
 * the graph's `transcoders` map, else the analysis's transcoders matched to blocks by their
 * target layer (asked of the API: the config's order is not the blocks' order). Unknown: null.
 */
export async function transcoderOf(graph, manifest, getSae) {
  const byBlock = new Map(Object.entries(graph.transcoders ?? {}).map(([block, id]) => [Number(block), id]));
  const ids = manifest.config?.transcoders ?? manifest.source?.transcoders ?? [];
  const missing = graph.nodes.some((n) => n.kind === "feature" && !n.sae_id && !byBlock.has(n.layer));
  if (missing && ids.length) {
    const summaries = await Promise.all(ids.map((id) => getSae(id).catch(() => null)));
    for (const summary of summaries) {
      const block = /^model\.layers\.(\d+)\.mlp$/.exec(summary?.target_layer ?? "")?.[1];
      if (block !== undefined && !byBlock.has(Number(block))) byBlock.set(Number(block), summary.id);
    }
  }
  return (node) => (node.kind === "feature" ? node.sae_id ?? byBlock.get(node.layer) ?? null : null);
}

// ---------------------------------------------------------------------------------------------
// Layout

/** Screen places of every node: cells of (layer row, position); the nodes of a cell side by side
 * (most influential first, the error node last), wrapped onto up to three lines when crowded. */
export function layout(graph, width) {
  const nPos = Math.max(1, graph.tokens.length);
  const layers = graph.nodes.filter((n) => n.layer !== null && n.layer !== undefined).map((n) => n.layer);
  const logitRow = layers.length ? Math.max(...layers) + 1 : 1;
  const rows = logitRow + 2; // tokens (-1), layers 0..logitRow-1, the logit
  const rowH = Math.max(24, Math.min(56, Math.round(420 / rows)));
  const rowOf = (n) => (n.kind === "token" ? -1 : n.kind === "logit" ? logitRow : n.layer);
  const yOf = (row) => MARGIN.top + (logitRow - row + 0.5) * rowH;

  const cells = new Map();
  for (const node of graph.nodes) {
    const key = `${rowOf(node)}:${node.position}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(node);
  }
  const widths = columnWidths(cells, nPos, width);
  const lefts = widths.map((_, p) => MARGIN.left + widths.slice(0, p).reduce((a, b) => a + b, 0));
  const size = { width: lefts[nPos - 1] + widths[nPos - 1] + MARGIN.right, height: MARGIN.top + rows * rowH + MARGIN.bottom };
  const xOf = (position) => lefts[position] + widths[position] / 2;
  const place = new Map();
  const radius = rowH >= 40 ? 5.5 : 4.5; // short graphs get room to draw their nodes larger
  const nodeGap = Math.max(2.5 * radius, HIT_GAP); // centre-to-centre spacing in a cell, at most
  const order = (a, b) => (a.kind === "error") - (b.kind === "error") || (b.influence ?? 0) - (a.influence ?? 0);
  for (const members of cells.values()) {
    members.sort(order);
    const room = widths[members[0].position] - 12;
    const perLineAtEase = Math.max(1, Math.floor(room / nodeGap) + 1);
    const lines = Math.min(MAX_LINES, Math.ceil(members.length / perLineAtEase));
    const perLine = Math.ceil(members.length / lines);
    const gap = perLine > 1 ? Math.min(nodeGap, room / (perLine - 1)) : 0;
    const lineGap = Math.min(8, (rowH - 8) / 3);
    members.forEach((node, i) => {
      const line = Math.floor(i / perLine);
      const inLine = Math.min(perLine, members.length - line * perLine);
      // adjacent lines sit half a gap apart sideways: rows of a short graph are only ~5 px apart
      const stagger = lines > 1 ? (line % 2 ? 0.25 : -0.25) * gap : 0;
      const x = xOf(node.position) + (i - line * perLine - (inLine - 1) / 2) * gap + stagger;
      const y = yOf(rowOf(node)) + (line - (lines - 1) / 2) * lineGap;
      place.set(node.id, { x, y, r: lines > 1 || gap < 2 * radius ? 3.5 : radius });
    });
  }
  return { place, size, rowH, widths, lefts, logitRow, yOf, xOf, nPos };
}

/** Each position's column width: an equal share of ``width``, at least MIN_CELL, and wide enough
 * that its most crowded cell fits on MAX_LINES lines with HIT_GAP between nodes (a prompt whose
 * first token holds a hundred features widens that column and scrolls, instead of stacking them
 * where no click can tell them apart). */
function columnWidths(cells, nPos, width) {
  const crowd = new Array(nPos).fill(1);
  for (const [key, members] of cells) {
    const position = Number(key.split(":")[1]);
    crowd[position] = Math.max(crowd[position], members.length);
  }
  const needed = crowd.map((n) => Math.max(MIN_CELL, 12 + (Math.ceil(n / MAX_LINES) - 1) * HIT_GAP));
  const spare = width - MARGIN.left - MARGIN.right - needed.reduce((a, b) => a + b, 0);
  return spare > 0 ? needed.map((w) => w + spare / nPos) : needed;
}

// ---------------------------------------------------------------------------------------------
// Drawing

function drawFrame(root, graph, geo) {
  const { size, logitRow, yOf, xOf, widths, lefts, nPos } = geo;
  const right = size.width - MARGIN.right;
  for (let row = -1; row <= logitRow; row += 1) {
    const y = yOf(row);
    root.append(svg("line", { class: "gv-grid", x1: MARGIN.left, x2: right, y1: y, y2: y }));
    const name = row === -1 ? "tokens" : row === logitRow ? "logit" : `L${row}`;
    root.append(svg("text", { class: "gv-axis", x: MARGIN.left - 8, y: y + 4, "text-anchor": "end" }, name));
  }
  for (let p = 0; p <= nPos; p += 1) {
    const x = p < nPos ? lefts[p] : lefts[nPos - 1] + widths[nPos - 1];
    root.append(svg("line", { class: "gv-sep", x1: x, x2: x, y1: MARGIN.top, y2: size.height - MARGIN.bottom }));
  }
  graph.tokens.forEach((token, p) => {
    const chars = Math.max(3, Math.floor((widths[p] - 6) / 7));
    const shown = showToken(token);
    const label = svg("text", { class: "gv-token", x: xOf(p), y: size.height - MARGIN.bottom + 18, "text-anchor": "middle" },
      shown.length > chars ? `${shown.slice(0, chars - 1)}…` : shown);
    label.append(svg("title", {}, `${p}: ${JSON.stringify(token)}`));
    root.append(label, svg("text", { class: "gv-axis", x: xOf(p), y: size.height - MARGIN.bottom + 34, "text-anchor": "middle" }, String(p)));
  });
}

function nodeShape(node, r) {
  if (node.kind === "error") return svg("rect", { class: "gv-shape", x: -r, y: -r, width: 2 * r, height: 2 * r });
  if (node.kind === "token") return svg("path", { class: "gv-shape", d: "M0,-7L7,5L-7,5Z" });
  if (node.kind === "logit") return svg("path", { class: "gv-shape", d: "M0,-8L8,0L0,8L-8,0Z" });
  return svg("circle", { class: "gv-shape", r });
}

/** A node's drawing: its shape, rings that mark it pinned and selected, a native tooltip. */
function drawNode(node, spot, graph, maxInfluence) {
  const g = svg("g", {
    class: `gv-node ${node.kind}`, transform: `translate(${spot.x.toFixed(1)},${spot.y.toFixed(1)})`,
    tabindex: "-1", role: "button", "data-node": node.id, "aria-label": nodeLabel(node, graph.tokens),
  });
  const ringR = node.kind === "token" || node.kind === "logit" ? 11 : spot.r + 2.5;
  g.append(svg("circle", { class: "gv-hit", r: Math.max(ringR, 6) }), svg("circle", { class: "gv-ring", r: ringR + 3 }),
    svg("circle", { class: "gv-pin", r: ringR }));
  const shape = nodeShape(node, spot.r);
  if (node.kind === "feature") shape.setAttribute("fill-opacity", (0.35 + 0.65 * Math.sqrt((node.influence ?? 0) / maxInfluence)).toFixed(2));
  g.append(shape);
  const extra = node.kind === "feature" ? `, activation ${num(node.activation)}` : "";
  g.append(svg("title", {}, `${nodeLabel(node, graph.tokens)}${extra}, influence ${num(node.influence)}`));
  return g;
}

/** One link as a line: blue or red by sign, width and opacity by its share of the largest |weight|. */
function edgeLine(link, place, biggest, hot = false) {
  const from = place.get(link.source);
  const to = place.get(link.target);
  if (!from || !to) return null;
  const share = Math.abs(link.weight) / biggest;
  return svg("line", {
    class: `gv-edge ${link.weight >= 0 ? "pos" : "neg"}${hot ? " hot" : ""}`,
    x1: from.x.toFixed(1), y1: from.y.toFixed(1), x2: to.x.toFixed(1), y2: to.y.toFixed(1),
    "stroke-width": (hot ? Math.max(1.2, 0.6 + 2.8 * share) : 0.4 + 2.8 * share).toFixed(2),
    "stroke-opacity": hot ? null : (0.08 + 0.6 * share).toFixed(2),
  });
}

/** The `shown` strongest links (a pruned graph of a real model keeps tens of thousands), the
 * strongest drawn last, on top. */
function drawEdges(root, links, place, biggest, shown) {
  const strongest = [...links].sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, shown).reverse();
  for (const link of strongest) {
    const line = edgeLine(link, place, biggest);
    if (line) root.append(line);
  }
}

// ---------------------------------------------------------------------------------------------
// The view: drawing, selection, details, pins

function loadPins(key, nodes) {
  try {
    const stored = JSON.parse(localStorage.getItem(key) ?? "[]");
    return new Set(Array.isArray(stored) ? stored.filter((id) => nodes.has(id)) : []);
  } catch {
    return new Set(); // unreadable or unavailable storage: start with no pins
  }
}

function savePins(key, pins) {
  try {
    if (pins.size) localStorage.setItem(key, JSON.stringify([...pins]));
    else localStorage.removeItem(key);
  } catch {
    // storage full or refused: the pins still hold for this visit
  }
}

function kv(pairs) {
  return h("dl", { class: "kv" }, pairs.filter(([, v]) => v !== null && v !== undefined)
    .map(([k, v]) => [h("dt", {}, k), h("dd", { dataset: { field: k } }, v)]));
}

/**
 * Mount the interactive graph in `root`: the legend, the SVG, the details and pinned panels and
 * the intervention panel. `saeOf(node)` is the SAE id of a feature node's transcoder (or null).
 */
export function graphView(root, { analysisId, graph, saeOf }) {
  const nodes = new Map(graph.nodes.map((n) => [n.id, n]));
  const pinKey = `kestrel.graph.pins.${analysisId}`;
  const pins = loadPins(pinKey, nodes);
  const incoming = new Map(graph.nodes.map((n) => [n.id, []]));
  const outgoing = new Map(graph.nodes.map((n) => [n.id, []]));
  for (const link of graph.links) {
    incoming.get(link.target)?.push(link);
    outgoing.get(link.source)?.push(link);
  }
  const biggest = graph.links.reduce((m, l) => Math.max(m, Math.abs(l.weight)), 1e-12);
  const maxInfluence = Math.max(1e-12, ...graph.nodes.filter((n) => n.kind === "feature").map((n) => n.influence ?? 0));
  const label = (node) => nodeLabel(node, graph.tokens);
  const featureHref = (node) => {
    const sae = saeOf(node);
    return sae ? `${base}/ui/saes/${encodeURIComponent(sae)}/features/${node.latent}` : null;
  };

  let selected = null;
  let hovered = null;
  let elements = new Map(); // node id -> <g>
  let placeOf = new Map();
  let hotLayer = null; // the focused node's links, all of them, drawn over the rest
  let edgesShown = Math.min(graph.links.length, EDGES_SHOWN);
  const holder = h("div", { class: "gv-canvas" });
  const details = h("section", { class: "gv-details", "aria-labelledby": "gv-details-title" });
  const pinnedList = h("section", { class: "gv-pinned", "aria-labelledby": "gv-pinned-title" });
  const tester = interventionPanel({ analysisId, graph, nodes, pins, label, featureHref, select: (id) => select(id, true, true) });

  function highlight() {
    const focus = hovered ?? selected;
    const svgEl = holder.querySelector("svg");
    if (!svgEl) return;
    for (const el of svgEl.querySelectorAll(".gv-node.hot, .gv-node.near")) el.classList.remove("hot", "near");
    hotLayer.replaceChildren();
    // A hovered node fades the rest hard; a selected one (no hover) only softly.
    svgEl.classList.toggle("focusing", hovered !== null);
    svgEl.classList.toggle("selecting", hovered === null && focus !== null);
    if (focus === null) return;
    elements.get(focus)?.classList.add("hot");
    for (const [links, end] of [[incoming.get(focus) ?? [], "source"], [outgoing.get(focus) ?? [], "target"]]) {
      for (const link of links) {
        const line = edgeLine(link, placeOf, biggest, true);
        if (line) hotLayer.append(line);
        elements.get(link[end])?.classList.add("near");
      }
    }
  }

  function draw() {
    const geo = layout(graph, holder.clientWidth || 900);
    placeOf = geo.place;
    const drawing = svg("svg", {
      class: "gv-svg", width: geo.size.width, height: geo.size.height, viewBox: `0 0 ${geo.size.width} ${geo.size.height}`,
      role: "group", "aria-label": `Attribution graph: ${graph.nodes.length} nodes, ${graph.links.length} links; arrow keys move between nodes, Enter selects, P pins`,
    });
    drawFrame(drawing, graph, geo);
    const edgeLayer = svg("g", { class: "gv-edges" });
    const nodeLayer = svg("g", { class: "gv-nodes" });
    hotLayer = svg("g", { class: "gv-hot-edges" });
    drawing.append(edgeLayer, hotLayer, nodeLayer);
    drawEdges(edgeLayer, graph.links, geo.place, biggest, edgesShown);
    elements = new Map();
    for (const node of graph.nodes) {
      const g = drawNode(node, geo.place.get(node.id), graph, maxInfluence);
      g.classList.toggle("pinned", pins.has(node.id));
      g.classList.toggle("selected", node.id === selected);
      elements.set(node.id, g);
      nodeLayer.append(g);
    }
    const first = selected ?? graph.nodes.find((n) => n.kind === "feature")?.id ?? graph.nodes[0]?.id;
    elements.get(first)?.setAttribute("tabindex", "0");
    drawing.addEventListener("pointerover", (event) => {
      const id = event.target.closest?.("[data-node]")?.dataset.node ?? null;
      if (id !== hovered) {
        hovered = id;
        highlight();
      }
    });
    drawing.addEventListener("pointerleave", () => {
      hovered = null;
      highlight();
    });
    drawing.addEventListener("click", (event) => {
      const id = event.target.closest?.("[data-node]")?.dataset.node;
      if (id) select(id, true);
    });
    drawing.addEventListener("keydown", onKey);
    drawing.addEventListener("focusout", (event) => {
      if (drawing.contains(event.relatedTarget)) return; // focus moved to another node
      hovered = null;
      highlight();
    });
    fill(holder, drawing);
    highlight();
  }

  /** Arrow keys move focus to the nearest node that way; Enter or Space selects; P pins; Escape clears. */
  function onKey(event) {
    const id = event.target.closest?.("[data-node]")?.dataset.node;
    if (!id) return;
    const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
    if (moves[event.key]) {
      event.preventDefault();
      const next = nearest(id, ...moves[event.key]);
      if (next) focusNode(next);
    } else if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      select(id, false);
    } else if (event.key === "p" || event.key === "P") {
      togglePin(id);
    } else if (event.key === "Escape") {
      select(null, false);
    }
  }

  function nearest(id, dx, dy) {
    const from = placeOf.get(id);
    let best = null;
    let bestCost = Infinity;
    for (const [other, spot] of placeOf) {
      const along = (spot.x - from.x) * dx + (spot.y - from.y) * dy;
      if (other === id || along <= 0.5) continue;
      const across = Math.abs((spot.x - from.x) * dy) + Math.abs((spot.y - from.y) * dx);
      const cost = along + 3 * across;
      if (cost < bestCost) [best, bestCost] = [other, cost];
    }
    return best;
  }

  function focusNode(id) {
    for (const el of holder.querySelectorAll('[data-node][tabindex="0"]')) el.setAttribute("tabindex", "-1");
    const el = elements.get(id);
    el.setAttribute("tabindex", "0");
    el.focus();
    hovered = id;
    highlight();
  }

  /** Show a node's details (null: none). From a click, it becomes the drawing's tab stop; from a
   * list (reveal), the drawing scrolls to it when it is out of sight. */
  function select(id, fromPointer, reveal = false) {
    elements.get(selected)?.classList.remove("selected");
    selected = id && nodes.has(id) ? id : null;
    if (selected) {
      const el = elements.get(selected);
      el.classList.add("selected");
      if (fromPointer) {
        for (const other of holder.querySelectorAll('[data-node][tabindex="0"]')) other.setAttribute("tabindex", "-1");
        el.setAttribute("tabindex", "0");
      }
      if (reveal) el.scrollIntoView?.({ block: "nearest", inline: "nearest" });
    }
    hovered = null;
    renderDetails();
    highlight();
  }

  function togglePin(id) {
    if (pins.has(id)) pins.delete(id);
    else pins.add(id);
    savePins(pinKey, pins);
    elements.get(id)?.classList.toggle("pinned", pins.has(id));
    renderDetails();
    renderPinned();
    tester.refresh();
  }

  function edgeList(title, links, end) {
    const strongest = [...links].sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, EDGES_LISTED);
    return [
      h("h3", {}, `${title} (${links.length})`),
      strongest.length ? h("ul", { class: "gv-edge-list" }, strongest.map((link) => {
        const other = nodes.get(link[end]);
        return h("li", {},
          h("button", { type: "button", class: "linkish", onclick: () => select(other.id, true, true) }, label(other)),
          h("span", { class: `gv-weight ${link.weight >= 0 ? "pos" : "neg"}` }, `${link.weight >= 0 ? "+" : ""}${num(link.weight)}`));
      })) : h("p", { class: "empty" }, "None kept."),
    ];
  }

  function renderDetails() {
    const node = nodes.get(selected);
    if (!node) {
      fill(details, h("h2", { id: "gv-details-title" }, "Node"),
        h("p", { class: "empty" }, "Click a node (or focus the graph and use the arrow keys and Enter) to see it here."));
      return;
    }
    const href = node.kind === "feature" ? featureHref(node) : null;
    const pinned = pins.has(node.id);
    fill(details,
      h("h2", { id: "gv-details-title" }, label(node)),
      kv([
        ["kind", node.kind], ["layer", node.layer ?? null], ["position", node.position],
        ["token", JSON.stringify(graph.tokens[node.position] ?? "")],
        ["latent", node.latent ?? null], ["activation", node.activation === null || node.activation === undefined ? null : num(node.activation, 4)],
        ["influence", num(node.influence, 4)],
        ...(node.kind === "logit" ? [["target", JSON.stringify(node.token)]] : []),
      ]),
      h("div", { class: "row gv-actions" },
        h("button", { type: "button", class: `btn small${pinned ? " primary" : ""}`, id: "gv-pin", "aria-pressed": String(pinned), onclick: () => togglePin(node.id) }, pinned ? "Unpin" : "Pin"),
        node.kind === "feature" ? (href
          ? h("a", { class: "btn small", id: "gv-feature-link", href }, "Feature page")
          : h("span", { class: "muted" }, "No feature page: this graph does not name its transcoders.")) : null),
      edgeList("Strongest incoming", incoming.get(node.id), "source"),
      edgeList("Strongest outgoing", outgoing.get(node.id), "target"));
  }

  function renderPinned() {
    const list = [...pins].map((id) => nodes.get(id));
    fill(pinnedList, h("div", { class: "panel-head" }, h("h2", { id: "gv-pinned-title" }, `Pinned (${list.length})`),
      list.length ? h("button", { type: "button", class: "btn small", onclick: () => [...pins].forEach(togglePin) }, "Unpin all") : null),
    list.length ? h("ul", { class: "gv-pin-list" }, list.map((node) => h("li", { dataset: { node: node.id } },
      h("button", { type: "button", class: "linkish", onclick: () => select(node.id, true, true) }, label(node)),
      h("button", { type: "button", class: "btn small", "aria-label": `Unpin ${label(node)}`, onclick: () => togglePin(node.id) }, "Unpin"))))
      : h("p", { class: "empty" }, "No pinned nodes: select a node and press Pin (or P)."));
  }

  const legend = h("ul", { class: "gv-legend", "aria-label": "Legend" },
    h("li", {}, h("span", { class: "gv-key feature" }), "feature (shade: influence)"),
    h("li", {}, h("span", { class: "gv-key error" }), "error"),
    h("li", {}, h("span", { class: "gv-key token" }), "token"),
    h("li", {}, h("span", { class: "gv-key logit" }), "target logit"),
    h("li", {}, h("span", { class: "gv-key edge pos" }), "positive edge"),
    h("li", {}, h("span", { class: "gv-key edge neg" }), "negative edge"),
    h("li", {}, h("span", { class: "gv-key pinned" }), "pinned"));
  const total = graph.links.length;
  const edgeChoice = total > EDGE_CHOICES[0] ? h("label", { class: "gv-edge-choice" }, "Links drawn ",
    h("select", { id: "gv-edges-shown", onchange: (event) => {
      edgesShown = Number(event.target.value);
      draw();
    } }, [...EDGE_CHOICES.filter((n) => n < total), total].map((n) => h("option", { value: String(n), selected: n === edgesShown },
      n === total ? `all ${num(total)}` : `strongest ${num(n)}`)))) : null;
  fill(root,
    h("section", { class: "panel gv", "aria-labelledby": "gv-title" },
      h("div", { class: "panel-head" }, h("h2", { id: "gv-title" }, "Attribution graph"),
        h("div", { class: "row" }, h("span", { class: "muted" }, `${graph.nodes.length} nodes · ${num(total)} links · target ${JSON.stringify(graph.target?.token ?? "")}`), edgeChoice)),
      legend,
      h("div", { class: "gv-layout" }, holder, h("div", { class: "gv-side" }, details, pinnedList))),
    tester.element);
  draw();
  renderDetails();
  renderPinned();
  tester.refresh();

  let width = holder.clientWidth;
  new ResizeObserver(() => {
    if (Math.abs(holder.clientWidth - width) < 24) return;
    width = holder.clientWidth;
    draw();
  }).observe(holder);
  return { select, togglePin, pins };
}

/** The graph of a `graph` analysis's results, or null when they hold none. */
export function graphOf(results) {
  const ok = results && Array.isArray(results.nodes) && Array.isArray(results.links) && Array.isArray(results.tokens);
  return ok ? results : null;
}

