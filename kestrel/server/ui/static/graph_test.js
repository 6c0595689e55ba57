// "Test pinned features" (issue #15): each pinned feature node of an attribution graph gets a
// scale (0 = ablate) or an absolute value; Run asks POST /v1/analyses/{id}/graph/interventions,
// which runs the real model with those edits, and shows the target token's logit and probability
// before and after, the top tokens both ways, the continuations when asked, and each edit's
// activation before and after.

import { awaited } from "./api.js";
import { fill, h, num, percent, showToken, table } from "./dom.js";
import { status } from "./shell.js";

const LIMIT = 1e4; // the API's bound on |scale| and |value|
const MAX_EDITS = 64;

const quoted = (token) => JSON.stringify(showToken(token ?? ""));
const signed = (x, digits = 3) => `${x >= 0 ? "+" : "−"}${num(Math.abs(x), digits)}`;
/** A number shown rounded, its exact value kept in data-value (what the tests compare). */
const exact = (x, field, text = num(x, 4)) => h("span", { dataset: { field, value: String(x) } }, text);

function integerIn(input, lo, hi, name) {
  const value = Number(input.value);
  if (input.value.trim() === "" || !Number.isInteger(value) || value < lo || value > hi) {
    throw new Error(`${name} must be a whole number from ${lo} to ${hi}`);
  }
  return value;
}

/**
 * The panel. `pins` is the live set of pinned node ids (graph_view.js owns it and calls
 * refresh() when it changes); `select(id)` shows a node in the graph.
 */
export function interventionPanel({ analysisId, graph, nodes, pins, label, featureHref, select }) {
  const settings = new Map(); // node id -> {mode: "scale" | "value", value: text}, kept across re-renders
  const rows = h("ul", { class: "gv-test-rows" });
  const others = h("p", { class: "muted", hidden: true });
  const topK = h("input", { id: "gv-top-k", type: "number", min: "1", max: "50", step: "1", value: "10", required: true });
  const newTokens = h("input", { id: "gv-new-tokens", type: "number", min: "0", max: "64", step: "1", value: "0", required: true });
  const run = h("button", { type: "submit", class: "btn primary", id: "gv-run" }, "Run");
  const fields = h("fieldset", { class: "gv-test-fields" },
    h("legend", { class: "sr-only" }, "Edits and options"),
    rows, others,
    h("div", { class: "row gv-test-options" },
      h("label", { class: "field", for: "gv-top-k" }, "Top tokens listed (1–50)", topK),
      h("label", { class: "field", for: "gv-new-tokens" }, "Tokens to continue (0–64, 0 = none)", newTokens),
      run));
  const line = h("p", { class: "status", id: "gv-test-status", role: "status", "aria-live": "polite" });
  const result = h("div", { id: "gv-result", class: "gv-result" });
  const form = h("form", { id: "gv-test-form", onsubmit: (event) => {
    event.preventDefault();
    runTest();
  } }, fields);
  const element = h("section", { class: "panel", id: "gv-test", "aria-labelledby": "gv-test-title" },
    h("h2", { id: "gv-test-title" }, "Test pinned features"),
    h("p", { class: "muted gv-test-intro" },
      "Runs the real model on this prompt with each pinned feature's activation changed at its position (scale 0 ablates it, ",
      "2 doubles it, −1 flips it; a value sets it outright); the transcoder's error is kept, so only the edit differs."),
    form, line, result);

  const pinnedFeatures = () => [...pins].filter((id) => nodes.get(id)?.kind === "feature");

  function editRow(id) {
    const node = nodes.get(id);
    const setting = settings.get(id) ?? { mode: "scale", value: "0" };
    settings.set(id, setting);
    const inputId = `gv-strength-${id}`;
    const href = featureHref(node);
    return h("li", { class: "gv-test-row", dataset: { node: id } },
      h("label", { for: inputId }, label(node)),
      href ? h("a", { href, class: "small-link" }, "feature page") : h("span"),
      h("select", { id: `gv-mode-${id}`, "aria-label": `Edit kind for ${label(node)}`, onchange: (event) => {
        setting.mode = event.target.value;
        if (setting.mode === "scale") setting.value = "0";
        else setting.value = String(+(node.activation ?? 0).toPrecision(4));
        event.target.closest("li").querySelector("input").value = setting.value;
      } },
      h("option", { value: "scale", selected: setting.mode === "scale" }, "scale by"),
      h("option", { value: "value", selected: setting.mode === "value" }, "set to")),
      h("input", { id: inputId, type: "number", step: "any", value: setting.value, "aria-describedby": `${inputId}-hint`, oninput: (event) => {
        setting.value = event.target.value;
      } }),
      h("span", { id: `${inputId}-hint`, class: "muted small" }, `activation ${num(node.activation)}`),
      h("button", { type: "button", class: "linkish", onclick: () => select(id) }, "show"));
  }

  function refresh() {
    const ids = pinnedFeatures();
    fill(rows, ids.length ? ids.map(editRow) : h("li", { class: "empty" }, "Pin feature nodes in the graph to test them here."));
    const skipped = pins.size - ids.length;
    others.hidden = skipped === 0;
    others.textContent = `${skipped} pinned node${skipped === 1 ? " is" : "s are"} not a feature (errors, tokens and the logit cannot be edited).`;
    run.disabled = ids.length === 0 || form.dataset.busy === "true";
  }

  function edits() {
    const ids = pinnedFeatures();
    if (ids.length > MAX_EDITS) throw new Error(`at most ${MAX_EDITS} features can be tested at once (${ids.length} are pinned)`);
    return ids.map((id) => {
      const { mode, value } = settings.get(id);
      const x = Number(value);
      if (value.trim() === "" || !Number.isFinite(x) || Math.abs(x) > LIMIT) {
        throw new Error(`the ${mode === "scale" ? "scale" : "value"} of ${label(nodes.get(id))} must be a number from −10,000 to 10,000`);
      }
      return { node: id, [mode]: x };
    });
  }

  function busy(on) {
    form.dataset.busy = String(on);
    fields.disabled = on;
    result.classList.toggle("busy", on);
    refresh();
  }

  async function runTest() {
    let body;
    try {
      body = { edits: edits(), top_k: integerIn(topK, 1, 50, "Top tokens"), max_new_tokens: integerIn(newTokens, 0, 64, "Tokens to continue") };
    } catch (error) {
      status(line, `Not run: ${error.message}.`, "err");
      return;
    }
    if (!body.edits.length) return;
    busy(true);
    status(line, `Running the model with ${body.edits.length} edit${body.edits.length === 1 ? "" : "s"}…`);
    try {
      const path = `/analyses/${encodeURIComponent(analysisId)}/graph/interventions`;
      const answer = await awaited(path, { method: "POST", body }, (job) => {
        status(line, `Still running (job ${job.id}: ${job.message || job.status})…`);
      });
      showResult(answer);
      status(line, `Ran ${body.edits.length} edit${body.edits.length === 1 ? "" : "s"} (job ${answer.job_id}).`, "ok");
    } catch (error) {
      const code = error.status ? ` (${error.status} ${error.code})` : error.code ? ` (${error.code})` : "";
      status(line, `Could not run the edits: ${error.message}${code}`, "err");
    } finally {
      busy(false);
    }
  }

  function targetTable(target) {
    const row = (name, field, before, after, fmt, change) => h("tr", {},
      h("th", { scope: "row" }, name),
      h("td", { class: "num" }, exact(before, `${field}_before`, fmt(before))),
      h("td", { class: "num" }, exact(after, `${field}_after`, fmt(after))),
      h("td", { class: `num ${after > before ? "up" : after < before ? "down" : ""}` }, change(after - before)));
    return h("div", { class: "table-scroll" }, h("table", { class: "gv-target" },
      h("caption", { class: "sr-only" }, "The target token before and after the edits"),
      h("thead", {}, h("tr", {}, h("th", { scope: "col", class: "gv-target-token" }, quoted(target.token)), h("th", { scope: "col", class: "num" }, "before"),
        h("th", { scope: "col", class: "num" }, "after"), h("th", { scope: "col", class: "num" }, "change"))),
      h("tbody", {},
        row("logit", "logit", target.logit_before, target.logit_after, (x) => num(x, 4), (d) => signed(d, 3)),
        row("probability", "prob", target.prob_before, target.prob_after, percent, (d) => `${signed(d * 100, 3)} pp`))));
  }

  function topTable(title, items, target, field) {
    return h("div", { class: "gv-top", dataset: { field } }, h("h3", {}, title), table([
      { label: "#", value: (t) => String(t.rank), num: true },
      { label: "Token", value: (t) => h("span", { class: t.token === target ? "mono gv-is-target" : "mono" }, quoted(t.token)) },
      { label: "Logit", value: (t) => exact(t.logit, "logit", num(t.logit, 4)), num: true },
      { label: "Prob", value: (t) => exact(t.prob, "prob", percent(t.prob)), num: true },
    ], items.map((t, i) => ({ ...t, rank: i + 1 })), { caption: title }));
  }

  function continuation(title, text, steered) {
    return h("div", { class: steered ? "gen steered" : "gen" }, h("h3", {}, title),
      h("div", { class: "text" }, h("span", { class: "prompt" }, graph.prompt), h("span", { class: "cont" }, text)));
  }

  function showResult(answer) {
    const edited = answer.edits.map((e) => ({ ...e, node: nodes.get(e.node) ?? { id: e.node, kind: "feature", ...e } }));
    fill(result,
      h("h3", {}, "Target token"),
      targetTable(answer.target),
      h("div", { class: "grid2 gv-tops" },
        topTable("Top tokens before", answer.top_before, answer.target.token, "top-before"),
        topTable("Top tokens after", answer.top_after, answer.target.token, "top-after")),
      answer.continuation_before === null || answer.continuation_before === undefined ? null
        : h("div", { class: "grid2 gv-conts" },
          continuation("Continuation before", answer.continuation_before, false),
          continuation("Continuation after", answer.continuation_after ?? "", true)),
      h("h3", {}, "Edits"),
      table([
        { label: "Node", value: (e) => h("button", { type: "button", class: "linkish", onclick: () => select(e.node.id) }, label(e.node)) },
        { label: "Layer", value: (e) => String(e.layer), num: true },
        { label: "Position", value: (e) => String(e.position), num: true },
        { label: "Latent", value: (e) => String(e.latent), num: true },
        { label: "Activation before", value: (e) => exact(e.activation_before, "activation_before"), num: true },
        { label: "Activation after", value: (e) => exact(e.activation_after, "activation_after"), num: true },
      ], edited, { caption: "Each edit's activation before and after" }));
  }

  return { element, refresh };
}
