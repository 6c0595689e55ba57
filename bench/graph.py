"""An attribution graph of the README's prompt over transcoders on all 30 of SmolLM2's MLPs (issue #15).

1. Capture the input (`model.layers.<i>.mlp:input`) and output (`model.layers.<i>.mlp`) of every
   MLP in ONE pass over the docstring corpus (bench/corpus.py) into a scratch store; a later
   invocation with the same `--docs`/`--max-length` reuses the run.
2. Train a small TopK transcoder per block (`--n-latents`, `--k`, `--epochs`), attention-sink rows
   left out as bench/transcoder.py does, and record each block's held-out FVU of the MLP output.
3. Build the attribution graph of "The capital of France is" -> " Paris" over all the
   transcoders (`kestrel.core.analysis.graph.attribution_graph`), prune it with the `graph`
   analysis's defaults, and report replacement and completeness (circuit-tracer's scores), the
   feature count, the pruned graph's size and the timings.
4. With `--half` (default on), build the graph again with transcoders on every other block only
   (the same transcoders; the other MLPs become whole error nodes) to show how coverage drives
   completeness.

    KESTREL_STORE_ROOT=<model cache root> python bench/graph.py --store /tmp/graphbench/store

Prints one JSON object; progress goes to stderr. The transcoders are deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import docstring_corpus

from kestrel.core.activations import capture
from kestrel.core.analysis.graph import attribution_graph, prune
from kestrel.core.models import LoadedModel, default_store_root, load_model
from kestrel.core.runs import CaptureOptions
from kestrel.core.sae import artifacts
from kestrel.core.store import LocalStore

PROMPT = "The capital of France is"
TARGET = " Paris"
BLOCKS = 30


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def mlp(block: int) -> str:
    return f"model.layers.{block}.mlp"


def ensure_run(store: LocalStore, lm: LoadedModel, n_docs: int, max_length: int) -> str:
    """One capture of every MLP's input and output (reused when already stored)."""
    run_id = f"bench-smollm2-all-mlps-{n_docs}-{max_length}"
    if not store.exists("activations", run_id):
        layers = [name for b in range(BLOCKS) for name in (f"{mlp(b)}:input", mlp(b))]
        options = CaptureOptions(max_length=max_length, dtype="fp32")
        texts = docstring_corpus(max_docs=n_docs)
        capture(lm, texts, layers, store, run_id=run_id, options=options, progress_bar=True)
    return run_id


def train_all(store: LocalStore, run_id: str, args: argparse.Namespace) -> dict[int, Any]:
    """A TopK transcoder per block; returns block -> (sae_id, held-out FVU, seconds)."""
    sae_config = {"architecture": "topk", "n_latents": args.n_latents, "k": args.k}
    train = {"epochs": args.epochs, "batch_size": args.batch_size, "seed": 0, "device": args.device}
    trained: dict[int, Any] = {}
    for block in range(BLOCKS):
        started = time.perf_counter()
        summary = artifacts.train_from_run(
            store, run_id, f"{mlp(block)}:input", sae_config, train, target_layer=mlp(block)
        )
        seconds = time.perf_counter() - started
        trained[block] = (summary.id, float(summary.metrics["fvu"]), seconds)
        log(f"block {block}: held-out FVU {summary.metrics['fvu']:.4f} ({seconds:.0f} s)")
    return trained


def graph_figures(lm: LoadedModel, transcoders: dict[int, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Build, score and prune the README prompt's graph over ``transcoders``."""
    started = time.perf_counter()

    def on_batch(done: int, total: int) -> None:
        if done == total or done % (args.graph_batch * 20) == 0:
            log(f"graph ({len(transcoders)} transcoders): {done}/{total} backward rows")

    graph = attribution_graph(
        lm, PROMPT, transcoders, target=TARGET, batch=args.graph_batch, on_batch=on_batch
    )
    seconds = time.perf_counter() - started
    nodes, edges = prune(graph)
    kinds = [node.kind for node in graph.nodes]
    kept = nodes.nonzero().flatten().tolist()
    return {
        "transcoder_blocks": sorted(transcoders),
        "replacement": round(graph.scores["replacement"], 4),
        "completeness": round(graph.scores["completeness"], 4),
        "n_features": kinds.count("feature"),
        "n_tokens": len(graph.tokens),
        "demeaned_target_logit": round(graph.target_logit, 3),
        "pruned_nodes": len(kept),
        "pruned_features": sum(graph.nodes[i].kind == "feature" for i in kept),
        "pruned_edges": int(edges.sum()),
        "seconds": round(seconds, 1),
    }


def _time_left(deadline: str | None) -> float:
    """Seconds until ``deadline`` (UTC "HH:MM" today); infinite without one."""
    if deadline is None:
        return float("inf")
    now = datetime.now(UTC)
    hour, minute = (int(part) for part in deadline.split(":"))
    return (now.replace(hour=hour, minute=minute, second=0, microsecond=0) - now).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=300, help="corpus documents to capture")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--n-latents", type=int, default=1152)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--graph-batch", type=int, default=32, help="backward rows per pass")
    parser.add_argument("--no-half", dest="half", action="store_false", help="skip the half-coverage graph")
    parser.add_argument("--deadline", help='UTC "HH:MM": skip the half-coverage graph if it would end later')
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--store", default=str(default_store_root() / "bench"))
    args = parser.parse_args()

    store = LocalStore(Path(args.store))
    lm = load_model("smollm2-135m", device=args.device, dtype="fp32", store_root=default_store_root())
    started = time.perf_counter()
    run_id = ensure_run(store, lm, args.docs, args.max_length)
    capture_s = time.perf_counter() - started
    manifest = store.read_json("activations", run_id)
    log(f"run {run_id}: {manifest['n_tokens']} tokens ({capture_s:.0f} s)")
    started = time.perf_counter()
    trained = train_all(store, run_id, args)
    train_s = time.perf_counter() - started
    try:
        saes = {
            b: artifacts.load_sae(store, sae_id)[0].to(args.device).eval()
            for b, (sae_id, _, _) in trained.items()
        }
        full = graph_figures(lm, saes, args)
        log(f"full graph: {full}")
        half = None
        if args.half and _time_left(args.deadline) > 0.6 * full["seconds"]:
            half = graph_figures(lm, {b: s for b, s in saes.items() if b % 2 == 0}, args)
        elif args.half:
            log("half-coverage graph skipped: it would not finish before --deadline")
        fvus = [fvu for _, fvu, _ in trained.values()]
        print(
            json.dumps(
                {
                    "model": "SmolLM2-135M",
                    "prompt": PROMPT,
                    "target": TARGET,
                    "docs": args.docs,
                    "max_length": args.max_length,
                    "run_tokens": manifest["n_tokens"],
                    "transcoder": {
                        "architecture": "topk",
                        "n_latents": args.n_latents,
                        "k": args.k,
                        "epochs": args.epochs,
                        "batch_size": args.batch_size,
                    },
                    "replacement": full["replacement"],
                    "completeness": full["completeness"],
                    "n_features": full["n_features"],
                    "graph": full,
                    "half_coverage_graph": half,
                    "heldout_fvu_per_block": {b: round(fvu, 4) for b, (_, fvu, _) in trained.items()},
                    "heldout_fvu_mean": round(sum(fvus) / len(fvus), 4),
                    "heldout_fvu_max": round(max(fvus), 4),
                    "capture_seconds": round(capture_s, 1),
                    "training_seconds_total": round(train_s, 1),
                    "graph_seconds": full["seconds"],
                    "torch_threads": torch.get_num_threads(),
                },
                indent=2,
            )
        )
    finally:
        for sae_id, _, _ in trained.values():
            artifacts.delete_sae(store, sae_id)


if __name__ == "__main__":
    main()
