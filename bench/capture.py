"""Capture throughput against a bare forward, storage cost per token, and model load times.

The baseline is a plain forward of the same model cut after the deepest captured layer (the
decoder stack truncated, no LM head, no hooks, no storage) over the same token batches, with the
same thread count, timed in this same run. Passes alternate baseline/capture and the best of
``--repeats`` is kept for each, so a noisy neighbour does not decide the ratio.

    python bench/capture.py            # prints JSON; see bench/README.md for the latest figures
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import docstring_corpus

from kestrel.core.activations import capture
from kestrel.core.datasets import token_batches
from kestrel.core.models import LoadedModel, default_store_root, load_model
from kestrel.core.runs import CaptureOptions, delete_run
from kestrel.core.store import LocalStore

ONE_LAYER = ["model.layers.15"]
FOUR_LAYERS = ["model.layers.3", "model.layers.7", "model.layers.11", "model.layers.15"]


def time_load(store_root: Path) -> dict[str, float]:
    """Cold = GGUF dequantized and converted into an empty cache; cached = read back from it."""
    with tempfile.TemporaryDirectory() as fresh:
        cold = load_model("smollm2-135m", device="cpu", store_root=Path(fresh)).load_seconds
        cached = min(
            load_model("smollm2-135m", device="cpu", store_root=Path(fresh)).load_seconds for _ in range(2)
        )
    return {"load_cold_s": round(cold, 2), "load_cached_s": round(cached, 2)}


def bare_forward_seconds(lm: LoadedModel, batches: list, deepest_block: int) -> float:
    """A plain forward through blocks 0..deepest_block of the base model: no hooks, no head, no copy."""
    base = lm.model.model
    all_layers = base.layers
    base.layers = all_layers[: deepest_block + 1]
    try:
        started = time.perf_counter()
        with torch.inference_mode():
            for batch in batches:
                base(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT, use_cache=False)
        return time.perf_counter() - started
    finally:
        base.layers = all_layers


def storage_bytes(store: LocalStore, run_id: str) -> int:
    run_dir = store.artifact_dir("activations", run_id)
    return sum(p.stat().st_size for p in run_dir.rglob("*.safetensors"))


def bench_layers(
    lm: LoadedModel, texts: list[str], layers: list[str], options: CaptureOptions, repeats: int
) -> dict:
    batches = list(
        token_batches(texts, lm.tokenizer, max_length=options.max_length, token_budget=options.token_budget)
    )
    n_tokens = sum(b.n_tokens for b in batches)
    deepest = max(int(name.rsplit(".", 1)[1]) for name in layers)
    bare, kestrel, bytes_per_token = [], [], 0.0
    with tempfile.TemporaryDirectory() as root:
        store = LocalStore(root)
        for _ in range(repeats):
            bare.append(bare_forward_seconds(lm, batches, deepest))
            started = time.perf_counter()
            manifest = capture(lm, texts, layers, store, options=options)
            kestrel.append(time.perf_counter() - started)
            assert manifest.n_tokens == n_tokens
            bytes_per_token = storage_bytes(store, manifest.id) / n_tokens
            delete_run(store, manifest.id)
    bare_tps, capture_tps = n_tokens / min(bare), n_tokens / min(kestrel)
    d = lm.d_model
    return {
        "layers": layers,
        "n_tokens": n_tokens,
        "bare_tokens_per_s": round(bare_tps, 1),
        "capture_tokens_per_s": round(capture_tps, 1),
        "ratio": round(capture_tps / bare_tps, 3),
        "bytes_per_token": round(bytes_per_token, 2),
        "activation_bytes_per_token": 2 * d * len(layers)
        if options.dtype in ("fp16", "bf16")
        else 4 * d * len(layers),
        "metadata_bytes_per_token": round(
            bytes_per_token - (2 if options.dtype != "fp32" else 4) * d * len(layers), 2
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=400, help="documents (docstring paragraphs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--token-budget", type=int, default=8192)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    store_root = default_store_root()
    result: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
        }
    }
    result.update(time_load(store_root))
    lm = load_model("smollm2-135m", device="cpu", dtype="fp32", store_root=store_root)
    texts = docstring_corpus(max_docs=args.docs)
    options = CaptureOptions(dtype="fp16", token_budget=args.token_budget, max_length=256)
    result["per_layer_count"] = {
        str(len(layers)): bench_layers(lm, texts, layers, options, args.repeats)
        for layers in (ONE_LAYER, FOUR_LAYERS)
    }
    one = result["per_layer_count"]["1"]
    result.update(
        {k: one[k] for k in ("bare_tokens_per_s", "capture_tokens_per_s", "ratio", "bytes_per_token")}
    )
    result["targets"] = {
        "ratio_1_layer": ">= 0.95",
        "metadata_bytes_per_token": "<= 16",
        "load_cached_s": "<= 3",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
