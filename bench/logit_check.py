"""Feature pages' direct-path logit effects against a measurement, on SmolLM2 (issue #14).

For SAEs on ``model.layers.{9,15,29}`` (TopK, trained on a capture of the docstring corpus,
bench/corpus.py) and the `--latents` latents that fired most often in discovery, compare the
direct path ``W_dec · diag(gain) · W_Uᵀ`` with the measured mean change in log-probabilities when
the decoder row, scaled to the latent's max activation, is added at the layer on the latent's top
contexts (`kestrel.core.logit_check.check_latent`). A control adds a token's own unembedding row
at the last layer, where the direct path is exact up to the final norm's scale.

    python bench/logit_check.py        # prints JSON; figures in bench/README.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import docstring_corpus

from kestrel.core import concepts, logit_check
from kestrel.core.activations import capture
from kestrel.core.concepts.store import FeatureReader
from kestrel.core.models import load_model
from kestrel.core.runs import CaptureOptions
from kestrel.core.sae import artifacts
from kestrel.core.store import LocalStore


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=300)
    parser.add_argument("--layers", default="9,15,29")
    parser.add_argument("--latents", type=int, default=5)
    parser.add_argument("--contexts", type=int, default=8)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--store-root", type=Path, default=Path("/work/main/.kestrel"))
    args = parser.parse_args()
    torch.manual_seed(0)
    lm = load_model(device="cpu", store_root=args.store_root)
    texts = docstring_corpus(max_docs=args.docs)
    layers = [f"model.layers.{n}" for n in args.layers.split(",")]
    out: dict = {"docs": len(texts), "k": args.k, "layers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp) / "store")
        run = capture(lm, texts, layers, store, options=CaptureOptions(dtype="fp32", max_length=64))
        for layer in layers:
            sae_id = "sae-" + layer.rsplit(".", 1)[1]
            artifacts.train_from_run(
                store,
                run.id,
                layer,
                {"architecture": "topk", "n_latents": 512, "k": 32},
                {"batch_size": 512, "epochs": 2, "seed": 0},
                sae_id=sae_id,
            )
            concepts.discover(store, sae_id, lm)
            loaded, _ = artifacts.load_sae(store, sae_id)
            reader = FeatureReader(store, sae_id)
            stats = reader.full("fire_count", "max_activation")
            chosen = stats["fire_count"].topk(args.latents).indices.tolist()
            rows = []
            for latent in chosen:
                contexts = logit_check.latent_contexts(store, sae_id, latent, args.contexts)
                report = logit_check.check_latent(
                    lm,
                    layer,
                    loaded.W_dec.detach()[latent],
                    float(stats["max_activation"][latent]),
                    contexts,
                    k=args.k,
                )
                rows.append(
                    {
                        "latent": latent,
                        **report["agreement"],
                        "direct_top": [t["token"] for t in report["direct"]["positive"][:6]],
                        "measured_top": [t["token"] for t in report["measured"]["positive"][:6]],
                        "measured_prob_top": [
                            t["token"] for t in report["measured_probability"]["positive"][:6]
                        ],
                    }
                )
            out["layers"][layer] = {
                "latents": rows,
                "spearman_mean": statistics.mean(r["spearman"] for r in rows),
                "promoted_overlap_mean": statistics.mean(r["promoted_overlap"] for r in rows),
                "suppressed_overlap_mean": statistics.mean(r["suppressed_overlap"] for r in rows),
            }
            print(json.dumps({layer: out["layers"][layer]}), file=sys.stderr, flush=True)
        # control: a token's unembedding row at the last block, where the direct path is exact
        unembed_VD, _ = contexts.unembedding(lm)
        token = lm.tokenizer.encode(" function")[0]
        row = unembed_VD[token] / unembed_VD[token].norm()
        control = logit_check.check_latent(lm, layers[-1], row, 20.0, texts[:16], k=args.k)
        out["control_unembedding_row_last_layer"] = {
            **control["agreement"],
            "measured_top": [t["token"] for t in control["measured"]["positive"][:6]],
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
