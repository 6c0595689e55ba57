// The dashboard's one door to the service: fetch /v1 with the API key the user gave (if any).
// The key lives in sessionStorage: it is gone when the tab closes and never reaches a URL.

const KEY_STORAGE = "kestrel.apiKey";
export const base = document.body.dataset.base || "";

/** An error answered by the API, in its one shape {error: {code, message, details}}. */
export class ApiError extends Error {
  constructor(status, code, message, details = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

export const apiKey = () => sessionStorage.getItem(KEY_STORAGE);
export const setApiKey = (key) => sessionStorage.setItem(KEY_STORAGE, key);
export const forgetApiKey = () => sessionStorage.removeItem(KEY_STORAGE);

/** The URL of /v1{path} (for a plain link when no key is set). */
export const apiUrl = (path, query) => `${base}/v1${path}${query ? `?${new URLSearchParams(query)}` : ""}`;

/** Fetch /v1{path} with the key; an answer that is not 2xx throws ApiError (401 also asks for a key). */
async function request(path, { method = "GET", body, query, signal, accept = "application/json" } = {}) {
  const headers = { Accept: accept };
  const key = apiKey();
  if (key) headers["X-API-Key"] = key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(apiUrl(path, query), {
    method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) {
    const error = (await response.json().catch(() => null))?.error ?? {};
    const failure = new ApiError(response.status, error.code ?? "error", error.message ?? response.statusText, error.details);
    if (response.status === 401) document.dispatchEvent(new CustomEvent("kestrel:unauthorized", { detail: failure }));
    throw failure;
  }
  return response;
}

/** Call /v1{path}; JSON in and out. A 401 also tells the page shell to ask for a key. */
export async function api(path, options = {}) {
  const response = await request(path, options);
  return response.json().catch(() => null);
}

const AWAITED_POLL_MS = 1000;
const FINAL = new Set(["finished", "failed", "canceled"]);

/**
 * Call an awaited route (generate, encode, a layer table, a model load) and return its answer.
 * One that outlives the server's wait comes back as 202 with its job instead: the job is then
 * polled until it ends, and its result is the answer (a failed job throws its error). The route's
 * job_id is added, as the 200 answer has it. onWaiting(job) sees the job at each poll; throwing
 * from it (a newer request replaced this one) stops following.
 */
export async function awaited(path, options = {}, onWaiting = () => {}) {
  const response = await request(path, options);
  let job = await response.json();
  if (response.status !== 202) return job;
  while (!FINAL.has(job.status)) {
    onWaiting(job);
    await new Promise((resolve) => setTimeout(resolve, AWAITED_POLL_MS));
    job = await api(`/jobs/${encodeURIComponent(job.id)}`, { signal: options.signal });
  }
  if (job.status !== "finished") {
    const error = job.error ?? {};
    throw new ApiError(0, error.code ?? job.status, error.message ?? `job ${job.id} ${job.status}`, error.details);
  }
  return { ...job.result, job_id: job.id };
}

/** A text answer of /v1{path} (a report's Markdown). */
export async function apiText(path, options = {}) {
  return (await request(path, { accept: "text/markdown, text/plain, */*", ...options })).text();
}

/** A binary answer of /v1{path} as a Blob (a plot, a download): what an <img> or <a> cannot fetch with a header. */
export async function apiBlob(path, options = {}) {
  return (await request(path, { accept: "*/*", ...options })).blob();
}

/** The same as api() but a 404 answers null (for resources that may not exist yet). */
export async function apiOrNull(path, options) {
  try {
    return await api(path, options);
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) return null;
    throw error;
  }
}

/**
 * Follow a job's Server-Sent Events. EventSource cannot send X-API-Key, so the page first asks
 * (with the key, by POST) for a short-lived URL signed for this job's stream; a dropped stream is
 * reopened with a fresh one. Calls onUpdate(job) on every change; returns a function that stops.
 */
export function watchJob(jobId, onUpdate) {
  let source = null;
  let stopped = false;
  const open = async () => {
    let stream;
    try {
      stream = await api(`/jobs/${encodeURIComponent(jobId)}/events/token`, { method: "POST" });
    } catch (error) {
      // A job that expired (404) or a refused key (401, the key form is already shown) will not
      // come back by retrying; anything else (the API restarting) may.
      const final = error instanceof ApiError && (error.status === 404 || error.status === 401);
      if (!stopped && !final) setTimeout(open, 3000);
      return;
    }
    if (stopped) return;
    source = new EventSource(stream.url);
    source.addEventListener("progress", (event) => onUpdate(JSON.parse(event.data)));
    source.addEventListener("end", (event) => {
      stopped = true;
      source.close();
      onUpdate(JSON.parse(event.data));
    });
    source.onerror = () => {
      source.close();
      if (!stopped) setTimeout(open, 1500);
    };
  };
  open();
  return () => {
    stopped = true;
    source?.close();
  };
}
