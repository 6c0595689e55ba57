// A small Markdown renderer for Kestrel's analysis reports (kestrel/core/analysis/report.py), and
// for exactly what they use: headings, paragraphs, pipe tables, bullet lists, `code`, **bold**,
// *italic*, backslash escapes, and images `![alt](src)` with an italic caption line after them.
// It builds DOM nodes with h(), never an HTML string: anything else in a report (HTML, links,
// other Markdown) is shown as the text it is.

import { h } from "./dom.js";

const HEADING = /^(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$/;
const BULLET = /^ {0,3}[-*+][ \t]+(.*)$/;
const IMAGE = /^!\[(.*)\]\(([^()\s]+)\)[ \t]*$/;
const CAPTION = /^\*(?![\s*])(.*[^\s\\*])\*[ \t]*$/;
const RULE_CELL = /^[ \t]*:?-{3,}:?[ \t]*$/;
const NUMBER = /^[-+−]?(\d{1,3}(,\d{3})+|\d+)?(\.\d+)?(e[-+]?\d+)?%?$/i;
const NO_NUMBER = /^(nan|[-+]?inf|none|–)$/i; // a missing value in a numeric column
const PUNCTUATION = /[!-/:-@[-`{-~]/;
const STRONG = /^\*\*(?!\s)([\s\S]*?[^\s\\])\*\*/;
const EMPHASIS = /^\*(?![\s*])([\s\S]*?[^\s\\*])\*(?!\*)/;

/**
 * The nodes of a Markdown text, in order (headings, p, ul, div.table-scroll > table, figure).
 * `image(src, alt)` makes the node an image stands for (by default its alt text): the caller
 * decides what may be loaded and how.
 */
export function renderMarkdown(text, { image = (src, alt) => h("span", {}, alt) } = {}) {
  const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
  const nodes = [];
  let i = 0;
  const blank = (line) => line === undefined || !line.trim();
  while (i < lines.length) {
    const line = lines[i];
    if (blank(line)) {
      i += 1;
      continue;
    }
    const heading = HEADING.exec(line);
    if (heading) {
      nodes.push(h(`h${heading[1].length}`, {}, inline(heading[2])));
      i += 1;
      continue;
    }
    if (isTableStart(lines, i)) {
      const header = cells(line);
      const align = cells(lines[i + 1]).map((cell) => (cell.endsWith(":") ? "right" : null));
      const rows = [];
      for (i += 2; i < lines.length && lines[i].trim().startsWith("|"); i += 1) rows.push(cells(lines[i]));
      nodes.push(tableNode(header, rows, align));
      continue;
    }
    const picture = IMAGE.exec(line.trim());
    if (picture) {
      // The report writes each plot as an image line, a blank line, then its caption in italics.
      let next = i + 1;
      while (next < lines.length && blank(lines[next])) next += 1;
      const caption = CAPTION.exec(lines[next]?.trim() ?? "");
      const captionOnly = caption && blank(lines[next + 1]);
      nodes.push(h("figure", {}, image(unescape(picture[2]), unescape(picture[1])),
        captionOnly ? h("figcaption", {}, inline(caption[1])) : null));
      i = captionOnly ? next + 1 : i + 1;
      continue;
    }
    if (BULLET.test(line)) {
      const items = [];
      while (i < lines.length && !blank(lines[i])) {
        const bullet = BULLET.exec(lines[i]);
        if (bullet) items.push(bullet[1]);
        else if (/^[ \t]/.test(lines[i])) items[items.length - 1] += ` ${lines[i].trim()}`; // continued
        else break;
        i += 1;
      }
      nodes.push(h("ul", {}, items.map((item) => h("li", {}, inline(item)))));
      continue;
    }
    const paragraph = [];
    while (i < lines.length && !blank(lines[i]) && (!paragraph.length || !startsBlock(lines, i))) {
      paragraph.push(lines[i].trim());
      i += 1;
    }
    nodes.push(h("p", {}, inline(paragraph.join(" "))));
  }
  return nodes;
}

function startsBlock(lines, i) {
  const line = lines[i];
  return HEADING.test(line) || BULLET.test(line) || IMAGE.test(line.trim()) || isTableStart(lines, i);
}

function isTableStart(lines, i) {
  if (!lines[i].trim().startsWith("|") || lines[i + 1] === undefined) return false;
  const rule = cells(lines[i + 1]);
  return rule.length > 0 && rule.every((cell) => RULE_CELL.test(cell));
}

/** A table row's cells: split at pipes that are not escaped (`\|` is a pipe inside a cell). */
function cells(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  const out = [];
  let cell = "";
  for (let i = 0; i < row.length; i += 1) {
    if (row[i] === "\\" && i + 1 < row.length) {
      cell += row[i] + row[i + 1];
      i += 1;
    } else if (row[i] === "|") {
      out.push(cell.trim());
      cell = "";
    } else {
      cell += row[i];
    }
  }
  if (cell.trim()) out.push(cell.trim()); // no closing pipe
  return out;
}

function tableNode(header, rows, align) {
  const width = header.length;
  const body = rows.map((row) => Array.from({ length: width }, (_, c) => row[c] ?? ""));
  // A column whose every filled cell is a number reads right-aligned, like the dashboard's tables.
  const filled = (cell) => cell && !NO_NUMBER.test(cell);
  const numeric = header.map((_, c) => align[c] === "right" || (body.some((row) => filled(row[c]))
    && body.every((row) => !filled(row[c]) || NUMBER.test(unescape(row[c])))));
  const cls = (c) => (numeric[c] ? "num" : null);
  return h("div", { class: "table-scroll" }, h("table", {},
    h("thead", {}, h("tr", {}, header.map((cell, c) => h("th", { scope: "col", class: cls(c) }, inline(cell))))),
    h("tbody", {}, body.map((row) => h("tr", {}, row.map((cell, c) => h("td", { class: cls(c) }, inline(cell))))))));
}

/** Backslash escapes of ASCII punctuation removed (for alt text and sources, parsed no further). */
const unescape = (text) => text.replace(/\\([!-/:-@[-`{-~])/g, "$1");

/** Inline Markdown as nodes and strings: escapes, `code`, **bold**, *italic*; the rest is text. */
export function inline(text) {
  const out = [];
  let plain = "";
  const flush = () => {
    if (plain) out.push(plain);
    plain = "";
  };
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    if (c === "\\" && PUNCTUATION.test(text[i + 1] ?? "")) {
      plain += text[i + 1];
      i += 2;
      continue;
    }
    if (c === "`") {
      const fence = /^`+/.exec(text.slice(i))[0];
      const end = closingFence(text, i + fence.length, fence.length);
      if (end < 0) {
        plain += fence;
        i += fence.length;
        continue;
      }
      let code = text.slice(i + fence.length, end);
      if (code.length > 2 && code.startsWith(" ") && code.endsWith(" ") && code.trim()) code = code.slice(1, -1);
      flush();
      out.push(h("code", {}, code));
      i = end + fence.length;
      continue;
    }
    if (c === "*") {
      const rest = text.slice(i);
      const strong = STRONG.exec(rest);
      const em = strong ? null : EMPHASIS.exec(rest);
      if (strong || em) {
        flush();
        out.push(strong ? h("strong", {}, inline(strong[1])) : h("em", {}, inline(em[1])));
        i += (strong ?? em)[0].length;
        continue;
      }
    }
    plain += c;
    i += 1;
  }
  flush();
  return out;
}

/** Where a run of exactly `length` backticks starts at or after `from` (-1 when there is none). */
function closingFence(text, from, length) {
  const runs = /`+/g;
  runs.lastIndex = from;
  for (let match = runs.exec(text); match; match = runs.exec(text)) {
    if (match[0].length === length) return match.index;
  }
  return -1;
}
