// Inline SVG plots, hand-written (no library, no CDN): a line plot and a bar histogram.
// Each returns a <figure> whose SVG has role="img" and a text alternative.

const SVG = "http://www.w3.org/2000/svg";
const SIZE = { width: 420, height: 220, left: 52, right: 12, top: 10, bottom: 34 };
/** The compact size of plots laid out four abreast (their text stays legible when scaled). */
export const SMALL = { width: 300, height: 200, left: 44, right: 10, top: 10, bottom: 34 };

function s(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

/** Round tick values covering [lo, hi]. */
export function ticks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const step0 = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((m) => m >= step0);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

const short = (v) => {
  const a = Math.abs(v);
  if (a >= 1e6) return `${+(v / 1e6).toPrecision(3)}M`;
  if (a >= 1e3) return `${+(v / 1e3).toPrecision(3)}k`;
  if (a !== 0 && a < 1e-2) return v.toExponential(0);
  return `${+v.toPrecision(3)}`;
};

function frame(svg, size, xs, ys, xScale, yScale, { xLabel, yLabel, xFormat = short, yFormat = short }) {
  const { width, height, left, right, top, bottom } = size;
  for (const y of ys) {
    svg.append(s("line", { class: "grid", x1: left, x2: width - right, y1: yScale(y), y2: yScale(y) }));
    svg.append(s("text", { class: "tick", x: left - 6, y: yScale(y) + 3, "text-anchor": "end" }, yFormat(y)));
  }
  for (const x of xs) {
    svg.append(s("text", { class: "tick", x: xScale(x), y: height - bottom + 14, "text-anchor": "middle" }, xFormat(x)));
  }
  svg.append(s("line", { class: "axis", x1: left, x2: width - right, y1: height - bottom, y2: height - bottom }));
  svg.append(s("line", { class: "axis", x1: left, x2: left, y1: top, y2: height - bottom }));
  if (xLabel) svg.append(s("text", { class: "tick", x: (left + width - right) / 2, y: height - 4, "text-anchor": "middle" }, xLabel));
  if (yLabel) svg.append(s("text", { class: "tick", x: 12, y: (top + height - bottom) / 2, transform: `rotate(-90 12 ${(top + height - bottom) / 2})`, "text-anchor": "middle" }, yLabel));
}

function figure(title, svg, description) {
  const fig = document.createElement("figure");
  fig.className = "plot";
  fig.style.margin = "0";
  const caption = document.createElement("h3");
  caption.textContent = title;
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `${title}: ${description}`);
  fig.append(caption, svg);
  return fig;
}

/** A line of points [[x, y], ...] against a linear x; y from 0 (or its minimum if negative). */
export function linePlot(title, points, { xLabel = "", yLabel = "", size = SIZE } = {}) {
  const { width, height, left, right, top, bottom } = size;
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}` });
  if (!points.length) return figure(title, svg, "no data");
  const xMin = Math.min(...points.map((p) => p[0]));
  const xMax = Math.max(...points.map((p) => p[0]));
  const yMin = Math.min(0, ...points.map((p) => p[1]));
  const yMax = Math.max(...points.map((p) => p[1])) || 1;
  const xScale = (x) => left + ((x - xMin) / (xMax - xMin || 1)) * (width - left - right);
  const yScale = (y) => height - bottom - ((y - yMin) / (yMax - yMin || 1)) * (height - top - bottom);
  frame(svg, size, ticks(xMin, xMax, 4), ticks(yMin, yMax, 4), xScale, yScale, { xLabel, yLabel });
  const d = points.map((p, i) => `${i ? "L" : "M"}${xScale(p[0]).toFixed(1)},${yScale(p[1]).toFixed(1)}`).join("");
  svg.append(s("path", { class: "line", d }));
  const last = points[points.length - 1];
  return figure(title, svg, `${points.length} points, last ${short(last[1])} at ${short(last[0])}`);
}

/** Bars of counts over bins; labels[i] names bin i (shown sparsely). */
export function barPlot(title, counts, labels, { xLabel = "", yLabel = "count", highlight = () => false, size = SIZE } = {}) {
  const { width, height, left, right, top, bottom } = size;
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}` });
  if (!counts.length) return figure(title, svg, "no data");
  const yMax = Math.max(1, ...counts);
  const n = counts.length;
  const bw = (width - left - right) / n;
  const yScale = (y) => height - bottom - (y / yMax) * (height - top - bottom);
  const every = Math.max(1, Math.ceil(n / 6));
  const xs = [...Array(n).keys()].filter((i) => i % every === 0);
  const edgeAt = (i) => left + i * bw; // labels name the lower edge of their bin
  frame(svg, size, xs, ticks(0, yMax, 4), edgeAt, yScale, { xLabel, yLabel, xFormat: (i) => labels[i] ?? "" });
  counts.forEach((c, i) => {
    const bar = s("rect", { class: highlight(i) ? "bar alt" : "bar", x: left + i * bw + 0.5, width: Math.max(1, bw - 1), y: yScale(c), height: height - bottom - yScale(c) });
    bar.append(s("title", {}, `${labels[i] ?? i}: ${c}`));
    svg.append(bar);
  });
  const total = counts.reduce((a, b) => a + b, 0);
  return figure(title, svg, `${n} bins, ${total} in all`);
}

/** The span of bins holding data, one empty bin either side kept: [first, end). */
export function occupied(counts) {
  const first = counts.findIndex((c) => c > 0);
  if (first < 0) return [0, counts.length];
  const last = counts.length - 1 - [...counts].reverse().findIndex((c) => c > 0);
  return [Math.max(0, first - 1), Math.min(counts.length, last + 2)];
}
