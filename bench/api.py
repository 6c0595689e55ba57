"""What the service adds on top of the engine: encode latency over HTTP against a direct call, and
how fast the queue runs trivial jobs.

Starts the real service (`kestrel up`: embedded Redis, interactive, generate and batch workers, the API)
on free ports with a temporary store (its ``models/`` links to the warm cache in ``.kestrel``, so
nothing is converted again), captures a few documents with the bundled SmolLM2 and trains a tiny
SAE through the API. Then:

- ``encode``: a 16-token prompt, ``POST /v1/saes/{id}/encode`` (API → Redis → interactive worker
  with the model and SAE loaded → back) against ``encode_prompt`` called in this process with the
  same model, SAE, prompt and ``top_k``. The two alternate call by call, so a noisy neighbour slows
  both alike; ``overhead_p50_ms`` is the median of the paired differences (HTTP call minus the
  direct call made right after it).
- ``jobs``: 100 ``ping`` jobs (the job bookkeeping and nothing else) enqueued at once on the batch
  queue; the time until the worker has finished them all.

    python bench/api.py            # prints JSON; the latest figures are in bench/README.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import service_up
from corpus import docstring_corpus
from service_up import wait_job

from kestrel.core.models import BUNDLED, ensure_bundled_cache, load_model
from kestrel.core.sae.artifacts import encode_prompt, load_sae
from kestrel.core.store import LocalStore
from kestrel.workers import jobs, lifecycle

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"
LAYER = "model.layers.15"
PROMPT = (
    "The committee reviewed the budget on Tuesday and approved new funding for the city library, "
    "two parks and a bridge."
)
PROMPT_TOKENS = 16
TOP_K = 8


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def make_sae(http: httpx.Client, n_docs: int, n_latents: int) -> tuple[str, dict]:
    """Capture ``n_docs`` documents and train a small SAE on them, both through the API."""
    body = {
        "model": MODEL,
        "layers": [LAYER],
        "dataset": {"kind": "texts", "texts": docstring_corpus(max_docs=n_docs)},
        "options": {"max_length": 128},
    }
    capture = http.post("/v1/activations", json=body)
    capture.raise_for_status()
    run_id = wait_job(http, capture.json()["id"])["artifacts"]["run_id"]
    train = {
        "run_id": run_id,
        "layer": LAYER,
        "sae": {"architecture": "topk", "n_latents": n_latents, "k": 16},
        "train": {"batch_size": 256, "token_budget": 20_000},
    }
    started = http.post("/v1/saes", json=train)
    started.raise_for_status()
    sae_id = wait_job(http, started.json()["id"])["artifacts"]["sae_id"]
    return sae_id, http.get(f"/v1/activations/{run_id}").json()


def sixteen_token_prompt(tokenizer) -> str:
    ids = tokenizer(PROMPT)["input_ids"][:PROMPT_TOKENS]
    prompt = tokenizer.decode(ids)
    assert len(tokenizer(prompt)["input_ids"]) == PROMPT_TOKENS, prompt
    return prompt


def time_encodes(http: httpx.Client, store: Path, sae_id: str, n: int, warmup: int) -> dict:
    lm = load_model(MODEL, device="cpu", dtype="fp32", store_root=store)
    sae, _ = load_sae(LocalStore(store), sae_id)
    prompt = sixteen_token_prompt(lm.tokenizer)
    body = {"text": prompt, "top_k": TOP_K}
    url = f"/v1/saes/{sae_id}/encode"

    def over_http() -> float:
        started = time.perf_counter()
        response = http.post(url, json=body)
        elapsed = time.perf_counter() - started
        response.raise_for_status()
        assert len(response.json()["tokens"]) == PROMPT_TOKENS
        return elapsed

    def direct() -> float:
        started = time.perf_counter()
        tokens = encode_prompt(lm, sae, LAYER, prompt, top_k=TOP_K)
        elapsed = time.perf_counter() - started
        assert len(tokens) == PROMPT_TOKENS
        return elapsed

    for _ in range(warmup):  # the worker loads model and SAE on the first call; caches warm up
        over_http()
        direct()
    http_ms, direct_ms = [], []
    for _ in range(n):
        http_ms.append(over_http() * 1000)
        direct_ms.append(direct() * 1000)
    return {
        "encode_p50_ms_http": round(statistics.median(http_ms), 1),
        "encode_p95_ms_http": round(percentile(http_ms, 0.95), 1),
        "encode_p50_ms_direct": round(statistics.median(direct_ms), 1),
        "encode_p95_ms_direct": round(percentile(direct_ms, 0.95), 1),
        "overhead_p50_ms": round(
            statistics.median(h - d for h, d in zip(http_ms, direct_ms, strict=True)), 1
        ),
        "n_encodes": n,
        "prompt_tokens": PROMPT_TOKENS,
    }


def time_jobs(redis_url: str, n: int) -> dict:
    """``n`` ping jobs enqueued at once on the batch queue; seconds until all have finished."""
    from rq.job import Job, JobStatus

    redis = lifecycle.connect(redis_url)
    try:
        started = time.perf_counter()
        ids = [
            lifecycle.enqueue(
                redis,
                lifecycle.BATCH,
                jobs.ping_job,
                kind="ping",
                kwargs={"payload": str(i)},
                timeout_s=60,
                ttl_s=600,
            ).id
            for i in range(n)
        ]
        enqueued = time.perf_counter() - started
        pending = set(ids)
        while pending:
            for job in Job.fetch_many(sorted(pending), connection=redis):
                status = job.get_status(refresh=False) if job is not None else None
                if status == JobStatus.FINISHED:
                    pending.discard(job.id)
                elif status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED, None):
                    raise RuntimeError(f"a ping job ended {status}")
            if pending:
                time.sleep(0.01)
        total = time.perf_counter() - started
    finally:
        redis.close()
    return {
        "jobs_100_s" if n == 100 else f"jobs_{n}_s": round(total, 2),
        "jobs_enqueue_s": round(enqueued, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encodes", type=int, default=50, help="timed encodes per path")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=100, help="trivial jobs through the queue")
    parser.add_argument("--docs", type=int, default=64, help="documents captured for the SAE")
    parser.add_argument("--n-latents", type=int, default=1024)
    args = parser.parse_args()

    ensure_bundled_cache(BUNDLED[MODEL], REPO / ".kestrel")
    with tempfile.TemporaryDirectory(prefix="kestrel-bench-api-") as tmp:
        store = Path(tmp) / "store"
        service_up.link_warm_models(store)
        service = service_up.start(store, Path(tmp) / "up.log")
        try:
            with httpx.Client(base_url=service.base, timeout=120) as http:
                sae_id, run = make_sae(http, args.docs, args.n_latents)
                encodes = time_encodes(http, store, sae_id, args.encodes, args.warmup)
            queue = time_jobs(service.redis_url, args.jobs)
        finally:
            service_up.stop(service, 120)
    result = {
        **encodes,
        **queue,
        "model": MODEL,
        "layer": LAYER,
        "sae_latents": args.n_latents,
        "top_k": TOP_K,
        "run_tokens": run["n_tokens"],
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
