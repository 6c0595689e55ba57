"""A transcoder on SmolLM2's layer-10 MLP: held-out FVU of the MLP's output, L0, dead latents.

1. Capture `model.layers.10.mlp:input` (what the MLP reads: the post-attention RMSNorm's output)
   and `model.layers.10.mlp` (what it writes) in one pass over the docstring corpus
   (bench/corpus.py) into a bench store, once (later invocations reuse the run).
2. Train a TopK transcoder (`--n-latents`, `--k`; `--skip` for a skip-transcoder) from the input
   layer to the output layer with the SAE trainer, attention-sink rows left out as bench/train.py
   does (`RowFilter.recommended()`: position 0, special tokens, and rows over 10x their layer's
   median norm, each layer held to its own median).
3. Report the held-out FVU of the MLP output (documents no training row came from), L0, the
   dead fraction, rows trained on and seconds, as JSON; and, as a yardstick, the FVU of the best
   linear map from input to output (least squares on the training rows), which a skip-transcoder
   contains.

    python bench/transcoder.py                  # prints JSON; figures in bench/README.md
    python bench/transcoder.py --skip           # a skip-transcoder
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import docstring_corpus

from kestrel.core.activations import capture
from kestrel.core.models import default_store_root, load_model
from kestrel.core.run_reader import iter_batches
from kestrel.core.runs import CaptureOptions, RowFilter
from kestrel.core.sae import artifacts
from kestrel.core.store import LocalStore

MLP = "model.layers.10.mlp"
MLP_IN = f"{MLP}:input"


def ensure_run(store: LocalStore, n_docs: int, max_length: int, device: str) -> str:
    run_id = f"bench-smollm2-l10-mlp-{n_docs}-{max_length}"
    if not store.exists("activations", run_id):
        lm = load_model("smollm2-135m", device=device, dtype="fp32", store_root=default_store_root())
        texts = docstring_corpus(max_docs=n_docs)
        options = CaptureOptions(max_length=max_length, dtype="fp32")
        capture(lm, texts, [MLP_IN, MLP], store, run_id=run_id, options=options, progress_bar=True)
    return run_id


def linear_baseline_fvu(store: LocalStore, run_id: str, d_in: int) -> float:
    """FVU on held-out rows of the least-squares affine map input -> output (training rows)."""
    filters = RowFilter.recommended()

    def rows(split: str) -> torch.Tensor:
        batches = iter_batches(
            store, run_id, MLP_IN, batch_size=65536, filters=filters, split=split, target_layer=MLP
        )
        return torch.cat(list(batches)).double()

    train, held = rows("train"), rows("heldout")
    x = torch.cat([train[:, :d_in], torch.ones(len(train), 1, dtype=train.dtype)], dim=1)
    w = torch.linalg.lstsq(x, train[:, d_in:]).solution
    xh = torch.cat([held[:, :d_in], torch.ones(len(held), 1, dtype=held.dtype)], dim=1)
    y = held[:, d_in:]
    return float((xh @ w - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=400, help="corpus documents to capture")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--n-latents", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--skip", action="store_true", help="train a skip-transcoder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--store", default=str(default_store_root() / "bench"))
    args = parser.parse_args()

    store = LocalStore(Path(args.store))
    started = time.perf_counter()
    run_id = ensure_run(store, args.docs, args.max_length, args.device)
    capture_s = time.perf_counter() - started
    manifest = store.read_json("activations", run_id)
    sae_config = {"architecture": "topk", "n_latents": args.n_latents, "k": args.k, "skip": args.skip}
    train = {"epochs": args.epochs, "batch_size": args.batch_size, "seed": 0, "device": args.device}
    started = time.perf_counter()
    summary = artifacts.train_from_run(
        store, run_id, MLP_IN, sae_config, train, target_layer=MLP, sae_id=None
    )
    train_s = time.perf_counter() - started
    metrics = summary.metrics
    d_in = manifest["layers"][MLP_IN]["d"]
    print(
        json.dumps(
            {
                "model": "SmolLM2-135M",
                "input": MLP_IN,
                "target": MLP,
                "kind": summary.kind,
                "n_latents": args.n_latents,
                "k": args.k,
                "run_tokens": manifest["n_tokens"],
                "docs": args.docs,
                "fvu": round(metrics["fvu"], 4),
                "l0": round(metrics["l0"], 2),
                "dead_fraction": round(metrics["dead_fraction"], 4),
                "heldout_rows": metrics["n_rows"],
                "tokens": summary.tokens,
                "steps": summary.steps,
                "seconds": round(train_s, 1),
                "capture_seconds": round(capture_s, 1),
                "all_rows_fvu_sinks_included": round(metrics["all_rows"]["fvu"], 4),
                "linear_map_fvu": round(linear_baseline_fvu(store, run_id, d_in), 4),
                "sae_id": summary.id,
            },
            indent=2,
        )
    )
    artifacts.delete_sae(store, summary.id)


if __name__ == "__main__":
    main()
