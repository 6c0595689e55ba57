// What every page shares: the API-key form, the notice line, and the "ready" mark the browser
// tests (and anyone timing a page) wait for.

import { ApiError, apiKey, forgetApiKey, setApiKey } from "./api.js";
import { $, fill } from "./dom.js";

/** Show a message above the page (kind: error, auth or info); null hides it. */
export function notify(message, kind = "error") {
  const box = $("#notice");
  if (!message) {
    box.hidden = true;
    return;
  }
  box.className = `notice ${kind}`;
  fill(box, message);
  box.hidden = false;
}

function askForKey(reason) {
  const form = $("#key-form");
  form.hidden = false;
  $("#key-forget").hidden = true;
  notify(reason, "auth");
  $("#api-key").focus();
}

function wireKeyForm() {
  const form = $("#key-form");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setApiKey($("#api-key").value.trim());
    location.reload();
  });
  $("#key-forget").addEventListener("click", () => {
    forgetApiKey();
    location.reload();
  });
  $("#key-forget").hidden = !apiKey();
  document.addEventListener("kestrel:unauthorized", () => {
    for (const placeholder of document.querySelectorAll("p.empty")) {
      if (placeholder.textContent === "Loading…") placeholder.textContent = "Waiting for the API key.";
    }
    askForKey(apiKey()
      ? "The API key was refused. Enter the service's API key to load this page."
      : "API key required: this service needs an API key. Enter it above to load this page.");
  });
}

/** Run a page's loader; mark the body ready when it resolves, show what failed when it throws. */
export async function start(load) {
  wireKeyForm();
  try {
    await load();
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) {
      notify(`Could not load this page: ${error.message}`);
      console.error(error);
    }
  } finally {
    // Milliseconds from navigation start to content on screen: what the browser tests report.
    document.body.dataset.readyMs = String(Math.round(performance.now()));
    document.body.dataset.ready = "true";
  }
}

/** A status line's text and tone (ok, err or plain). */
export function status(el, message, tone = "") {
  el.className = `status ${tone}`;
  el.textContent = message;
}
