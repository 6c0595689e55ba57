// A stream training job's SAEs (artifacts.sae_ids): one row each with its live figures from
// metrics.saes and a small FVU-by-step curve built from the points seen at each update. The job
// reports only each SAE's latest point, so the curve holds what this page saw; once the SAE is
// published its page draws the whole history (GET /v1/saes/{id}/history).

import { api, base } from "./api.js";
import { $, h, num, percent } from "./dom.js";
import { linePlot } from "./plot.js";
import { status } from "./shell.js";

const TINY = { width: 220, height: 110, left: 38, right: 8, top: 8, bottom: 22 };
const MAX_POINTS = 500; // per SAE: a long training thins its oldest points rather than grow without end
const curves = new Map(); // sae id -> Map(step -> fvu)
const lastLive = new Map(); // sae id -> its latest training point seen (a finished job reports its evaluation instead)
const stopping = new Set(); // sae ids this page asked to stop (the table is redrawn at each update)
const TERMINAL = new Set(["finished", "failed", "canceled"]);

/** The SAE ids a job makes, when it is a stream training (artifacts.sae_ids is a list). */
export function streamSaeIds(job) {
  const ids = job.artifacts?.sae_ids;
  return Array.isArray(ids) ? ids : [];
}

/** Add the job's latest point of each SAE to that SAE's curve. */
export function recordPoints(job) {
  for (const id of streamSaeIds(job)) {
    const point = job.metrics?.saes?.[id];
    if (!point || !Number.isInteger(point.step)) continue;
    lastLive.set(id, point);
    if (typeof point.fvu !== "number") continue; // a diverging step reports null figures
    let curve = curves.get(id);
    if (!curve) curves.set(id, (curve = new Map()));
    curve.set(point.step, point.fvu);
    if (curve.size > MAX_POINTS) curve.delete(curve.keys().next().value);
  }
}

function summary(sae) {
  if (!sae) return "–";
  const c = sae.config ?? {};
  const shape = [c.architecture, c.k ? `k=${c.k}` : null, c.n_latents ? `${num(c.n_latents)} latents` : null];
  return [h("span", { class: "mono" }, sae.layer ?? c.layer ?? "–"), h("div", { class: "muted" }, shape.filter(Boolean).join(" · "))];
}

/** step / total: the live point's, else (a finished job) the result's step over the last plan seen. */
function steps(job, id) {
  const live = Number.isInteger(job.metrics?.saes?.[id]?.step) ? job.metrics.saes[id] : lastLive.get(id);
  const step = job.result?.saes?.[id]?.step ?? live?.step;
  if (!Number.isInteger(step)) return "–";
  return live?.total_steps ? `${num(step)} / ${num(live.total_steps)}` : num(step);
}

function curve(id) {
  const points = [...(curves.get(id) ?? new Map()).entries()].sort((a, b) => a[0] - b[0]);
  if (points.length < 2) return h("span", { class: "muted" }, points.length ? "1 point so far" : "no point yet");
  return linePlot(`FVU of ${id}`, points, { xLabel: "step", size: TINY });
}

/** Stop one SAE of the job (POST /v1/saes/{id}/cancel): the others go on; its checkpoint is kept. */
async function stopSae(id, button) {
  button.disabled = true;
  try {
    await api(`/saes/${id}/cancel`, { method: "POST" });
    stopping.add(id);
    button.textContent = "Stopping…";
    status($("#jobs-status"), `Stop requested for ${id}; its checkpoint is kept (resume with resume_from=${id}).`, "ok");
  } catch (error) {
    button.disabled = false;
    status($("#jobs-status"), `Could not stop ${id}: ${error.message}`, "err");
  }
}

function stopButton(job, id, sae) {
  if (sae || TERMINAL.has(job.status) || job.result?.saes?.[id]) return null;
  const attrs = { class: "btn small danger", type: "button", "aria-label": `Stop SAE ${id}` };
  if (stopping.has(id)) return h("button", { ...attrs, disabled: true }, "Stopping…");
  const button = h("button", { ...attrs, onclick: () => stopSae(id, button) }, "Stop");
  return button;
}

/**
 * The table of a stream training job's SAEs. `published` maps the ids of listed SAEs (GET
 * /v1/saes) to their record: those get a link to their page and their layer and shape.
 */
export function streamSaesTable(job, published) {
  const ids = streamSaeIds(job);
  const head = ["SAE", "Layer · config", "Step", "FVU", "L0", "Dead", "FVU by step (this page)", ""];
  return h("table", { class: "stream-saes", "aria-label": `SAEs of job ${job.id}` },
    h("thead", {}, h("tr", {}, head.map((label, i) => h("th", { scope: "col", class: i >= 2 && i <= 5 ? "num" : null }, label)))),
    h("tbody", {}, ids.map((id) => {
      const point = job.metrics?.saes?.[id] ?? {};
      const sae = published.get(id);
      const name = sae ? h("a", { href: `${base}/ui/saes/${id}`, class: "mono" }, id) : h("span", { class: "mono" }, id);
      return h("tr", { dataset: { saeId: id, published: sae ? "true" : "false" } },
        h("td", {}, name),
        h("td", {}, summary(sae)),
        h("td", { class: "num", dataset: { figure: "step" } }, steps(job, id)),
        h("td", { class: "num", dataset: { figure: "fvu" } }, num(point.fvu)),
        h("td", { class: "num", dataset: { figure: "l0" } }, num(point.l0)),
        h("td", { class: "num" }, percent(point.dead_fraction)),
        h("td", {}, curve(id)),
        h("td", {}, stopButton(job, id, sae)));
    })));
}
