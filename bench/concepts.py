"""Concept discovery against capture, its memory at two dataset sizes, and the cost of steering.

1. Capture throughput: `kestrel.core.activations.capture` of SmolLM2 `model.layers.15` over the
   docstring corpus (bench/corpus.py), the capture benchmark's texts and settings.
2. Discovery throughput over the same texts as a dataset (a forward to the layer, stopped there,
   the SAE's encode, the streaming statistics, contexts, logit effects, publishing), with a TopK
   SAE of 4,608 latents (k = 32) trained on a capture of those texts. Capture and discovery
   alternate and the best of ``--repeats`` is kept for each, as bench/capture.py does. Logit
   effects depend only on the SAE and the model, so a re-run reuses them; the first discovery
   (which computes them: the bench starts from an SAE without features) is reported on its own.
3. Peak RSS (VmHWM) of a discovery over a dataset in a fresh process, at two sizes (the larger
   ``--rss-factor`` times the smaller), with a 2,048-token forward budget so that even the
   smaller spans many full batches (the allocator's high-water mark settles within the first
   ~25k tokens): bounded memory means the two are about equal.
4. Steering: a 20-token greedy generation with an SAE steering config (two latent edits at all
   positions, error term kept) against the same generation without it, alternating, best of
   ``--gen-repeats`` each (the median ratio of the pairs is reported too), with ``--gen-threads``
   threads (default 1: a batch-1 generation is latency-bound, and a second thread's OpenMP waits
   turn a busy neighbour into noise larger than the effect measured); in this process
   (`kestrel.core.models.generate`) and, with ``--api``, through the service: `kestrel up` on
   free ports over a temporary store holding a copy of the SAE, ``POST /v1/models/{name}/generate``
   with a saved steering config and ``compare: false`` against the same call without one.

    python bench/concepts.py        # prints JSON; figures in bench/README.md
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import service_up
from corpus import docstring_corpus

from kestrel.core import steering
from kestrel.core.activations import capture
from kestrel.core.concepts import DiscoveryConfig, discover
from kestrel.core.concepts.store import FeatureReader
from kestrel.core.models import default_store_root, generate, load_model
from kestrel.core.runs import CaptureOptions, delete_run
from kestrel.core.sae import artifacts
from kestrel.core.store import LocalStore

LAYER = "model.layers.15"
RUN_ID = "bench-concepts-l15"
SAE_ID = "bench-concepts-sae"
MAX_LENGTH = 256
PROMPT = "The history of the city begins with"
# Both RSS runs span many full forward batches, so what differs between them is only the length.
RSS_TOKEN_BUDGET = 2048


def ensure_sae(store: LocalStore, lm, texts: list[str], n_latents: int, k: int) -> str:
    """A TopK SAE trained on a capture of the bench texts, kept in the bench store between runs."""
    if not store.exists("activations", RUN_ID):
        capture(lm, texts, [LAYER], store, run_id=RUN_ID, options=CaptureOptions(max_length=MAX_LENGTH))
    if not store.exists("saes", SAE_ID):
        sae = {"architecture": "topk", "n_latents": n_latents, "k": k}
        artifacts.train_from_run(store, RUN_ID, LAYER, sae, {"batch_size": 4096, "epochs": 4}, sae_id=SAE_ID)
    return SAE_ID


def time_capture(lm, texts: list[str]) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as root:
        store = LocalStore(root)
        started = time.perf_counter()
        manifest = capture(lm, texts, [LAYER], store, options=CaptureOptions(max_length=MAX_LENGTH))
        seconds = time.perf_counter() - started
        delete_run(store, manifest.id)
    return seconds, manifest.n_tokens


def time_discovery(store: LocalStore, lm, texts: list[str]) -> tuple[float, dict]:
    config = DiscoveryConfig(max_length=MAX_LENGTH)
    started = time.perf_counter()
    manifest = discover(store, SAE_ID, lm, dataset=texts, config=config)
    return time.perf_counter() - started, manifest


def peak_rss_mb(store_root: Path, n_docs: int, threads: int) -> dict:
    """VmHWM of a discovery over ``n_docs`` documents, in a fresh process."""
    code = (
        f"import sys, torch; torch.set_num_threads({threads})\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "from corpus import docstring_corpus\n"
        "from kestrel.core.concepts import DiscoveryConfig, discover\n"
        "from kestrel.core.models import default_store_root, load_model\n"
        "from kestrel.core.store import LocalStore\n"
        "lm = load_model('smollm2-135m', device='cpu', store_root=default_store_root())\n"
        f"store = LocalStore({str(store_root)!r})\n"
        f"texts = docstring_corpus(max_docs={n_docs})\n"
        f"config = DiscoveryConfig(max_length={MAX_LENGTH}, token_budget={RSS_TOKEN_BUDGET})\n"
        f"m = discover(store, {SAE_ID!r}, lm, dataset=texts, config=config)\n"
        "print(m['n_tokens'])\n"
        "print([int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')][0] / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    tokens, rss = out.stdout.strip().splitlines()[-2:]
    return {"docs": n_docs, "tokens": int(tokens), "peak_rss_mb": round(float(rss), 1)}


def steering_ratio(store: LocalStore, lm, repeats: int, new_tokens: int) -> dict:
    """Steered against unsteered generate time, alternating: best of each, and the median pair ratio."""
    density = FeatureReader(store, SAE_ID).full("density")["density"]
    first, second = torch.argsort(density, descending=True)[:2].tolist()  # latents that do fire
    config = steering.SteeringConfig(
        sae_id=SAE_ID,
        edits=[
            {"latent": first, "op": "clamp", "value": 8.0},
            {"latent": second, "op": "scale", "value": 0.0},
        ],
    )
    plan = steering.plan_from_store(store, lm, config)
    plain_out = generate(lm, [PROMPT], max_new_tokens=new_tokens)  # warm-up
    steered_out = generate(lm, [PROMPT], max_new_tokens=new_tokens, hooks=plan.hooks)
    generated = {"default": len(plain_out[0].token_ids), "steered": len(steered_out[0].token_ids)}
    ratios, plain, steered = [], [], []
    for _ in range(repeats):
        started = time.perf_counter()
        generate(lm, [PROMPT], max_new_tokens=new_tokens)
        plain.append(time.perf_counter() - started)
        started = time.perf_counter()
        generate(lm, [PROMPT], max_new_tokens=new_tokens, hooks=plan.hooks)
        steered.append(time.perf_counter() - started)
        ratios.append(steered[-1] / plain[-1])
    return {
        "new_tokens": new_tokens,
        "generated_tokens": generated,
        "unsteered_s_best": round(min(plain), 4),
        "steered_s_best": round(min(steered), 4),
        "ratio_best": round(min(steered) / min(plain), 3),
        "ratio_median_of_pairs": round(statistics.median(ratios), 3),
    }


def api_steering_ratio(bench_store: LocalStore, repeats: int, new_tokens: int, threads: int) -> dict:
    """The same comparison through the service: steered-only generate calls against plain ones."""
    import httpx

    density = FeatureReader(bench_store, SAE_ID).full("density")["density"]
    first, second = torch.argsort(density, descending=True)[:2].tolist()
    with tempfile.TemporaryDirectory(prefix="kestrel-bench-concepts-") as tmp:
        store = Path(tmp) / "store"
        (store / "saes").mkdir(parents=True)
        (store / "models").symlink_to(default_store_root() / "models", target_is_directory=True)
        shutil.copytree(bench_store.artifact_dir("saes", SAE_ID), store / "saes" / SAE_ID, symlinks=True)
        # the workers compute with the bench's thread count
        service = service_up.start(store, Path(tmp) / "up.log", OMP_NUM_THREADS=str(threads))
        try:
            with httpx.Client(base_url=service.base, timeout=300) as http:
                edits = [
                    {"latent": first, "op": "clamp", "value": 8.0},
                    {"latent": second, "op": "scale", "value": 0.0},
                ]
                created = http.post("/v1/steering", json={"sae_id": SAE_ID, "edits": edits})
                created.raise_for_status()
                plain = {"prompts": [PROMPT], "max_new_tokens": new_tokens}
                steered = {**plain, "steering_id": created.json()["id"], "compare": False}
                model = "/v1/models/smollm2-135m/generate"

                generated: dict[str, int] = {}

                def call(body: dict) -> float:
                    started = time.perf_counter()
                    answer = http.post(model, json=body)
                    seconds = time.perf_counter() - started
                    answer.raise_for_status()
                    item = answer.json()["items"][0]
                    side = "steered" if "steering_id" in body else "default"
                    generated[side] = len(item[side]["token_ids"])
                    return seconds

                call(plain), call(steered)  # warm-up: model and SAE loaded in the generate worker
                plain_s, steered_s = [], []
                for _ in range(repeats):
                    plain_s.append(call(plain))
                    steered_s.append(call(steered))
        finally:
            service_up.stop(service, 120)
    ratios = [s / p for s, p in zip(steered_s, plain_s, strict=True)]
    return {
        "new_tokens": new_tokens,
        "generated_tokens": generated,
        "unsteered_s_best": round(min(plain_s), 4),
        "steered_s_best": round(min(steered_s), 4),
        "ratio_best": round(min(steered_s) / min(plain_s), 3),
        "ratio_median_of_pairs": round(statistics.median(ratios), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=400, help="documents (docstring paragraphs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gen-repeats", type=int, default=7)
    parser.add_argument("--rss-docs", type=int, default=800, help="documents of the small RSS run")
    parser.add_argument("--rss-factor", type=int, default=4, help="large RSS run / small")
    parser.add_argument("--n-latents", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--store", type=Path, default=default_store_root() / "bench")
    parser.add_argument("--api", action="store_true", help="also time steered generation through the API")
    parser.add_argument(
        "--gen-threads",
        type=int,
        default=1,
        help="threads of the generation timings (batch 1: latency-bound)",
    )
    parser.add_argument("--only-steering", action="store_true", help="skip capture, discovery and RSS")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    store = LocalStore(args.store)
    lm = load_model("smollm2-135m", device="cpu", dtype="fp32", store_root=default_store_root())
    texts = docstring_corpus(max_docs=args.docs)
    ensure_sae(store, lm, texts, args.n_latents, args.k)
    # Start without features, so the first discovery pays for the logit effects (later ones reuse them).
    shutil.rmtree(store.artifact_dir("saes", SAE_ID) / "features", ignore_errors=True)
    result: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "generation_threads": args.gen_threads,
            "torch": torch.__version__,
        },
        "layer": LAYER,
        "sae": {"id": SAE_ID, "n_latents": args.n_latents, "k": args.k},
    }
    if not args.only_steering:
        result.update(bench_discovery(store, lm, texts, args))
    if not store.exists("saes", SAE_ID) or not (store.artifact_dir("saes", SAE_ID) / "features").is_dir():
        discover(store, SAE_ID, lm, config=DiscoveryConfig(max_length=MAX_LENGTH))
    torch.set_num_threads(args.gen_threads)
    steer = steering_ratio(store, lm, args.gen_repeats, 20)
    result.update({"steered_over_unsteered": steer["ratio_best"], "steering": steer})
    if args.api:
        api = api_steering_ratio(store, args.gen_repeats, 20, args.gen_threads)
        result.update({"api_steered_over_unsteered": api["ratio_best"], "api_steering": api})
    result["targets"] = {
        "discovery_over_capture": ">= 0.7",
        "peak_rss_mb_large / peak_rss_mb_small": "about 1 (no growth with dataset length)",
        "steered_over_unsteered": "<= 1.3",
        "api_steered_over_unsteered": "<= 1.3",
    }
    print(json.dumps(result, indent=2))


def bench_discovery(store: LocalStore, lm, texts: list[str], args: argparse.Namespace) -> dict:
    """Capture against discovery on the same texts (alternating, best of repeats), and peak RSS."""
    capture_s, discovery_s, first = [], [], None
    n_tokens = 0
    for _ in range(args.repeats):
        seconds, n_tokens = time_capture(lm, texts)
        capture_s.append(seconds)
        seconds, manifest = time_discovery(store, lm, texts)
        discovery_s.append(seconds)
        first = first or {"seconds": round(seconds, 2), "tokens_per_s": round(n_tokens / seconds, 1)}
        assert manifest["n_tokens"] == n_tokens, (manifest["n_tokens"], n_tokens)
    started = time.perf_counter()
    from_run = discover(store, SAE_ID, lm, config=DiscoveryConfig(max_length=MAX_LENGTH))
    from_run_s = time.perf_counter() - started
    capture_tps = n_tokens / min(capture_s)
    discovery_tps = n_tokens / min(discovery_s)
    small = peak_rss_mb(args.store, args.rss_docs, args.threads)
    large = peak_rss_mb(args.store, args.rss_docs * args.rss_factor, args.threads)
    return {
        "n_docs": len(texts),
        "n_tokens": n_tokens,
        "capture_tokens_per_s": round(capture_tps, 1),
        "discovery_tokens_per_s": round(discovery_tps, 1),
        "discovery_over_capture": round(discovery_tps / capture_tps, 3),
        "discovery_first_run": first,
        "discovery_from_run_tokens_per_s": round(from_run["n_tokens"] / from_run_s, 1),
        "peak_rss_mb_small": small["peak_rss_mb"],
        "peak_rss_mb_large": large["peak_rss_mb"],
        "rss_runs": {"small": small, "large": large},
    }


if __name__ == "__main__":
    main()
