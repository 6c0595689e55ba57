// Feature page: the latent's logit effect measured through the model (its decoder row, scaled to
// its max activation, added at its layer on its top contexts), next to the direct-path lists,
// with how well the two agree. One interactive call, on request: it runs two forwards per batch.

import { awaited } from "./api.js";
import { $, fill, h, num, percent, showToken } from "./dom.js";
import { status } from "./shell.js";

const tokens = (effects) => h("ul", { class: "chips" }, effects.map((e) => h("li", { class: "chip" }, showToken(e.token), h("span", { class: "count" }, num(e.value, 2)))));

function agreementLine(report) {
  const a = report.agreement;
  const poor = a.spearman < 0.3 || a.promoted_overlap < 0.3;
  return h("p", { class: `status ${poor ? "err" : "ok"}`, id: "logits-agreement" },
    `Agreement with the direct path: top-${report.measured.positive.length} promoted overlap ${percent(a.promoted_overlap)}, suppressed ${percent(a.suppressed_overlap)}, rank correlation ${num(a.spearman, 2)}`,
    poor ? " — the direct path is a poor guess here: later layers rewrite this direction; trust the measured lists." : ".");
}

export function wireMeasuredLogits(saeId, latent) {
  const button = $("#measure-logits");
  button?.addEventListener("click", async () => {
    button.disabled = true;
    status($("#measure-status"), "Measuring…");
    try {
      const report = await awaited(`/saes/${saeId}/features/${latent}/logits/measured`, { method: "POST", body: {} }, (job) => {
        status($("#measure-status"), `Still measuring (job ${job.id})…`);
      });
      fill($("#logits-measured"),
        agreementLine(report),
        h("h3", {}, `Measured (mean change in log-probability, ${report.n_contexts} contexts, ×${num(report.scale, 3)})`),
        h("div", { class: "grid2" },
          h("div", {}, h("h4", {}, "Promotes"), tokens(report.measured.positive)),
          h("div", {}, h("h4", {}, "Suppresses"), tokens(report.measured.negative))),
        h("h3", {}, "Said more (less) often: mean change in probability"),
        h("div", { class: "grid2" },
          h("div", {}, h("h4", {}, "More"), tokens(report.measured_probability.positive)),
          h("div", {}, h("h4", {}, "Less"), tokens(report.measured_probability.negative))));
      status($("#measure-status"), "", "ok");
    } catch (error) {
      status($("#measure-status"), `Could not measure: ${error.message}`, "err");
    } finally {
      button.disabled = false;
    }
  });
}
