"""SAE training on SmolLM2 `model.layers.15`: quality, throughput against a plain loop, memory.

1. Capture `model.layers.15` over the docstring corpus (bench/corpus.py) into a bench store, once
   (the run is reused by later invocations): a large run and a small one (a quarter of the texts).
2. Train a TopK SAE (4,608 latents, k = 32, default settings, `--epochs` epochs) on the large run,
   attention-sink rows skipped; report held-out FVU, L0, dead fraction, and CE-loss recovered on
   held-out texts with the model in the loop.
3. Throughput: Kestrel's `tokens_per_s` (whole training, data reading included) against a plain
   dense PyTorch TopK loop (dense latents, dense decode, autograd, fused Adam) on the same shapes,
   batch size and thread count, timed in this run on rows of the same run (twice before the
   training and once after; the best of the three).
4. Peak RSS of one epoch of training in a fresh process, on the small and on the large run
   (`--skip-rss` leaves it out).

On a GPU (`--device cuda`, the default when one is present) the model, the trainer and the
reference loop all run there, both with bf16 autocast for the encoder and decoder matmuls and fp32
weights, and the reference is timed to a `torch.cuda.synchronize()`.

    python bench/train.py                       # prints JSON; figures in bench/README.md
    python bench/train.py --device cuda         # the same on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
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

LAYER = "model.layers.15"
LARGE, SMALL = "bench-smollm2-l15-large", "bench-smollm2-l15-small"


def ensure_runs(store: LocalStore, lm, n_docs: int) -> dict[str, int]:
    texts = docstring_corpus(max_docs=n_docs)
    sizes = {}
    for run_id, subset in ((LARGE, texts), (SMALL, texts[: len(texts) // 4])):
        if not store.exists("activations", run_id):
            capture(
                lm,
                subset,
                [LAYER],
                store,
                run_id=run_id,
                options=CaptureOptions(max_length=256),
                progress_bar=True,
            )
        sizes[run_id] = store.read_json("activations", run_id)["n_tokens"]
    return sizes


def derived_run(store: LocalStore, source: str, run_id: str, shard_names: list[str]) -> str:
    """A run made of hard links to another run's shards (repeats allowed): sizes for the RSS test
    without capturing for an hour. It is a valid run; repeated shards simply repeat rows."""
    if store.exists("activations", run_id):
        return run_id
    src = store.artifact_dir("activations", source)
    manifest = store.read_json("activations", source)
    rows = {s["name"]: s["n_tokens"] for s in manifest["shards"]}
    with store.writer("activations", run_id) as writer:
        shards = []
        for i, name in enumerate(shard_names):
            for sub in (LAYER, "tokens"):
                (writer.directory / sub).mkdir(exist_ok=True)
                os.link(src / sub / f"{name}.safetensors", writer.directory / sub / f"{i:05d}.safetensors")
            shards.append({"name": f"{i:05d}", "n_tokens": rows[name]})
        os.link(src / "docs.jsonl", writer.directory / "docs.jsonl")
        n_tokens = sum(s["n_tokens"] for s in shards)
        writer.commit(
            {**manifest, "id": run_id, "shards": shards, "n_tokens": n_tokens, "derived_from": source}
        )
    return run_id


def dense_reference_tokens_per_s(
    store: LocalStore, n_latents: int, k: int, batch: int, steps: int, device: str = "cpu"
) -> float:
    """The textbook TopK loop on real rows of the run: what Kestrel's trainer is compared with
    (bf16 autocast on CUDA, as the trainer uses)."""
    rows = []
    for x in iter_batches(
        store, LARGE, LAYER, batch_size=batch, filters=RowFilter.recommended(), drop_last=True
    ):
        rows.append(x)
        if len(rows) > steps:
            break
    x_SBD = torch.stack(rows).to(device, torch.float32)
    d_in = x_SBD.shape[-1]
    directions = torch.randn(n_latents, d_in, device=device)
    directions /= directions.norm(dim=1, keepdim=True)
    W_dec = torch.nn.Parameter(directions.clone())
    W_enc = torch.nn.Parameter(directions.T.clone())
    b_enc = torch.nn.Parameter(torch.zeros(n_latents, device=device))
    b_dec = torch.nn.Parameter(x_SBD[0].mean(dim=0))
    params = [W_enc, b_enc, W_dec, b_dec]
    optimizer = torch.optim.Adam(params, lr=4e-4, fused=True)

    on_cuda = torch.device(device).type == "cuda"

    def step(x_BD: torch.Tensor) -> None:
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=on_cuda):
            pre_BN = (x_BD - b_dec) @ W_enc + b_enc
            top = pre_BN.topk(k, dim=1)
            latents_BN = torch.zeros_like(pre_BN).scatter(1, top.indices, top.values.relu())
            recon_BD = latents_BN @ W_dec + b_dec
        loss = (recon_BD.float() - x_BD).pow(2).sum() / (x_BD - x_BD.mean(0)).pow(2).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=1, keepdim=True))

    step(x_SBD[0])
    synchronize(device)
    started = time.perf_counter()
    for x_BD in x_SBD[1:]:
        step(x_BD)
    synchronize(device)
    return (len(x_SBD) - 1) * batch / (time.perf_counter() - started)


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_rss_mb(store_root: Path, run_id: str, sae: dict, batch: int, threads: int) -> float:
    """Peak RSS of one epoch of training on ``run_id``, in a fresh process."""
    code = (
        f"import torch; torch.set_num_threads({threads})\n"
        "from kestrel.core.store import LocalStore\n"
        "from kestrel.core.sae import artifacts\n"
        f"store = LocalStore({str(store_root)!r})\n"
        f"train = {{'batch_size': {batch}, 'epochs': 1}}\n"
        f"s = artifacts.train_from_run(store, {run_id!r}, {LAYER!r}, {sae!r}, train)\n"
        "artifacts.delete_sae(store, s.id)\n"
        # VmHWM, not ru_maxrss: after fork+exec ru_maxrss still counts the parent's pages
        "print([int(x.split()[1]) for x in open('/proc/self/status') if x.startswith('VmHWM')][0] / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return round(float(out.stdout.strip().splitlines()[-1]), 1)


def rss_at_two_sizes(store: LocalStore, root: Path, sae: dict, batch: int, threads: int) -> dict:
    """One epoch on 3 shards of the large run, and on its 6 shards three times over (6x the rows).

    Both are larger than the shuffle buffer plus a shard, so both reach the reader's steady state;
    a smaller run never fills the buffer and would understate the bound.
    """
    names = [s["name"] for s in store.read_json("activations", LARGE)["shards"]]
    small = derived_run(store, LARGE, "bench-rss-small", names[:3])
    large = derived_run(store, LARGE, "bench-rss-large", names * 3)
    result = {}
    for label, run_id in (("small_run", small), ("large_run", large)):
        result[label] = peak_rss_mb(root, run_id, sae, batch, threads)
        result[f"{label}_tokens"] = store.read_json("activations", run_id)["n_tokens"]
    return result


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--n-latents", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--store", type=Path, default=default_store_root() / "bench")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-rss", action="store_true", help="leave out the two peak-RSS runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    store = LocalStore(args.store)
    lm = load_model("smollm2-135m", device=args.device, store_root=default_store_root())
    sizes = ensure_runs(store, lm, args.docs)
    sae = {"architecture": "topk", "n_latents": args.n_latents, "k": args.k}
    train = {"batch_size": args.batch, "epochs": args.epochs, "seed": 0, "device": args.device}

    def reference_run() -> float:
        shapes = (args.n_latents, args.k, args.batch)
        return dense_reference_tokens_per_s(store, *shapes, steps=6, device=args.device)

    # the reference is timed before and after the training and its best figure kept: on a shared
    # machine the load moves, and the ratio must not profit from a reference timed in a busy spell
    references = [reference_run(), reference_run()]
    reports = []
    started = time.perf_counter()
    summary = artifacts.train_from_run(store, LARGE, LAYER, sae, train, on_progress=reports.append)
    seconds = time.perf_counter() - started
    references.append(reference_run())
    reference = max(references)
    ce = artifacts.evaluate_sae(store, summary.id, lm)
    # steady-state step throughput (data reading included), as the progress reports measure it;
    # the wall time above also holds the row count before epoch 1 and the held-out evaluations
    steady = sorted(r.tokens_per_s for r in reports[1:])
    tokens_per_s = steady[len(steady) // 2]
    metrics = summary.metrics
    rss = None if args.skip_rss else rss_at_two_sizes(store, args.store, sae, args.batch, args.threads)
    result = {
        "machine": {"threads": args.threads, "torch": torch.__version__, "device": device_name(args.device)},
        "run_tokens": sizes,
        "sae": {**sae, "epochs": args.epochs, "batch_size": args.batch, "id": summary.id},
        "train_tokens": summary.tokens,
        "train_seconds": round(seconds, 1),
        "train_wall_tokens_per_s": round(summary.tokens / seconds),
        "tokens_per_s": round(tokens_per_s),
        "reference_tokens_per_s": round(reference),
        "reference_runs_tokens_per_s": [round(r) for r in references],
        "speedup": round(tokens_per_s / reference, 2),
        "fvu": round(metrics["fvu"], 4),
        "explained_variance": round(metrics["explained_variance"], 4),
        "l0": round(metrics["l0"], 2),
        "dead_fraction": round(metrics["dead_fraction"], 4),
        "dead_definition": metrics.get("dead_definition"),
        "fvu_all_rows": round(metrics["all_rows"]["fvu"], 4),
        "ce_loss_clean": round(ce["ce_loss_clean"], 4),
        "ce_loss_sae": round(ce["ce_loss_sae"], 4),
        "ce_loss_zero_ablated": round(ce["ce_loss_zero_ablated"], 4),
        "ce_loss_recovered": round(ce["ce_loss_recovered"], 4),
        "kl_sae": round(ce["kl_sae"], 4),
        "peak_rss_mb": rss,
        "bench_process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "targets": {
            "fvu": "<= 0.25",
            "dead_fraction": "<= 0.05",
            "ce_loss_recovered": ">= 0.8",
            "speedup": ">= 3",
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
