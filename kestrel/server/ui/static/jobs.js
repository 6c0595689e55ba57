// A job started from a page (evaluate, discover): a status line that follows its stream.

import { watchJob } from "./api.js";
import { status } from "./shell.js";

/** Follow job `job` in status element `el`; resolves with the final job. */
export function followJob(job, el) {
  return new Promise((resolve) => {
    status(el, `${job.kind}: ${job.status}…`);
    watchJob(job.id, (update) => {
      const pct = Math.round((update.progress ?? 0) * 100);
      if (update.status === "finished") {
        status(el, `${update.kind} finished.`, "ok");
        resolve(update);
      } else if (update.status === "failed" || update.status === "canceled") {
        status(el, `${update.kind} ${update.status}: ${update.error?.message ?? ""}`, "err");
        resolve(update);
      } else {
        status(el, `${update.kind}: ${pct}% ${update.message ?? ""}`);
      }
    });
  });
}
