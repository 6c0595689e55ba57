"""Stream training on SmolLM2: 4 SAEs on 4 layers from one model pass, against the bare forward.

1. Texts: docstring paragraphs (bench/corpus.py, `--docs` of them, max 256 tokens each).
2. Baseline: the bare forward over the same token batches, cut after the deepest layer
   (`stop_after`, `use_cache=False`, no LM head), no hooks reading anything; `forward_tokens_per_s`
   is real (non-pad) tokens over wall time, best of the runs before and after the stream.
3. `kestrel.core.sae.stream.train_stream` over the same texts: one TopK SAE on each of
   `model.layers.{6,9,12,15}`, attention-sink rows skipped, 10% of documents held out, no spill;
   `stream_tokens_per_s` is the same token count over the whole call's wall time (tokenizer
   pre-pass, forward, shuffle buffers, SAE steps, held-out evaluation, publishing).
4. Each SAE's held-out FVU (rows of held-out documents, sinks excluded), L0 and dead fraction.

    python bench/stream.py        # prints JSON; figures in bench/README.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import docstring_corpus

from kestrel.core.datasets import token_batches
from kestrel.core.hooks import HookManager, run_until_stopped, stop_after
from kestrel.core.models import DEFAULT_MODEL, LoadedModel, default_store_root, load_model
from kestrel.core.runs import CaptureOptions
from kestrel.core.sae.stream import train_stream
from kestrel.core.store import LocalStore

LAYERS = ["model.layers.6", "model.layers.9", "model.layers.12", "model.layers.15"]


def forward_tokens_per_s(lm: LoadedModel, texts: list[str], options: CaptureOptions) -> tuple[float, int]:
    """The bare forward, cut after the deepest layer: what capture and streaming cannot beat."""
    batches = list(
        token_batches(texts, lm.tokenizer, max_length=options.max_length, token_budget=options.token_budget)
    )
    tokens = sum(batch.n_tokens for batch in batches)
    started = time.perf_counter()
    with HookManager(lm.model, [stop_after(LAYERS[-1])]), torch.no_grad():
        for batch in batches:
            forward = partial(
                lm.model,
                input_ids=batch.input_ids_BT,
                attention_mask=batch.attention_mask_BT,
                use_cache=False,
            )
            run_until_stopped(forward)
    return tokens / (time.perf_counter() - started), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--latents", type=int, default=1152)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()

    texts = docstring_corpus(max_docs=args.docs)
    lm = load_model(DEFAULT_MODEL, device="cpu", dtype="fp32", store_root=default_store_root())
    options = CaptureOptions(max_length=256)
    before, tokens = forward_tokens_per_s(lm, texts, options)
    saes = [
        {
            "layer": layer,
            "sae": {"architecture": "topk", "n_latents": args.latents, "k": args.k},
            "train": {"batch_size": args.batch_size, "seed": 0},
        }
        for layer in LAYERS
    ]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        summaries = train_stream(lm, texts, saes, LocalStore(Path(tmp)), options=options)
        stream_seconds = time.perf_counter() - started
    after, _ = forward_tokens_per_s(lm, texts, options)
    forward = max(before, after)
    stream = tokens / stream_seconds
    report = {
        "model": DEFAULT_MODEL,
        "layers": LAYERS,
        "docs": len(texts),
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "sae": {
            "architecture": "topk",
            "n_latents": args.latents,
            "k": args.k,
            "batch_size": args.batch_size,
        },
        "forward_tokens_per_s": round(forward, 1),
        "forward_runs_tokens_per_s": [round(before, 1), round(after, 1)],
        "stream_tokens_per_s": round(stream, 1),
        "ratio": round(stream / forward, 3),
        "stream_seconds": round(stream_seconds, 1),
        "n_saes": len(summaries),
        "saes": [
            {
                "layer": s.layer,
                "fvu": round(s.metrics["fvu"], 4),
                "l0": round(s.metrics["l0"], 1),
                "dead_fraction": round(s.metrics["dead_fraction"], 4),
                "heldout_rows": s.metrics["n_rows"],
                "steps": s.steps,
                "train_tokens": s.tokens,
            }
            for s in summaries
        ],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
