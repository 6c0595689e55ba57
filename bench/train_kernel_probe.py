"""Training throughput of Kestrel's TopK SAE step against a plain dense PyTorch TopK loop.

Same shapes, data, optimiser (fused Adam), decoder-norm handling and thread count for both; the
dense loop scatters the top-k values into a [B, n] matrix and lets autograd do the rest. Prints
one JSON object. Usage:

    python bench/train_kernel_probe.py [--d-in 576] [--n-latents 4608] [--k 32] [--batch 4096]
                                       [--steps 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kestrel.core.sae import SAEConfig, TrainConfig
from kestrel.core.sae.trainer import train_sae


def dense_loop(x_SBD: torch.Tensor, n_latents: int, k: int, lr: float) -> float:
    """tokens/s of the textbook loop: dense latents, dense decode, autograd everywhere."""
    d_in = x_SBD.shape[-1]
    directions = torch.randn(n_latents, d_in)
    directions /= directions.norm(dim=1, keepdim=True)
    W_dec = torch.nn.Parameter(directions.clone())
    W_enc = torch.nn.Parameter(directions.T.clone())
    b_enc = torch.nn.Parameter(torch.zeros(n_latents))
    b_dec = torch.nn.Parameter(x_SBD[0].mean(dim=0))
    params = [W_enc, b_enc, W_dec, b_dec]
    optimizer = torch.optim.Adam(params, lr=lr, fused=True)

    def step(x_BD: torch.Tensor) -> None:
        pre_BN = (x_BD - b_dec) @ W_enc + b_enc
        top = pre_BN.topk(k, dim=1)
        latents_BN = torch.zeros_like(pre_BN).scatter(1, top.indices, top.values.relu())
        recon_BD = latents_BN @ W_dec + b_dec
        loss = (recon_BD - x_BD).pow(2).sum() / (x_BD - x_BD.mean(0)).pow(2).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=1, keepdim=True))

    step(x_SBD[0])  # warm-up
    start = time.perf_counter()
    for x_BD in x_SBD[1:]:
        step(x_BD)
    return (x_SBD.shape[0] - 1) * x_SBD.shape[1] / (time.perf_counter() - start)


def kestrel_loop(x_SBD: torch.Tensor, n_latents: int, k: int, lr: float) -> float:
    """tokens/s reported by `train_sae` (steady state, after the first step) on the same batches."""
    steps, batch, d_in = x_SBD.shape
    sae_config = SAEConfig(d_in=d_in, n_latents=n_latents, k=k)
    train_config = TrainConfig(lr=lr, batch_size=batch, log_every=1, warmup_steps=0, device="cpu")
    reports = []
    train_sae(sae_config, train_config, lambda epoch: list(x_SBD), rows_per_epoch=steps * batch,
              on_progress=reports.append)
    timed = reports[1:]
    return sum(r.tokens_per_s for r in timed) / len(timed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--n-latents", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x_SBD = torch.randn(args.steps + 1, args.batch, args.d_in)
    lr = 4e-4
    dense = dense_loop(x_SBD, args.n_latents, args.k, lr)
    ours = kestrel_loop(x_SBD, args.n_latents, args.k, lr)
    print(json.dumps({
        "shape": {"d_in": args.d_in, "n_latents": args.n_latents, "k": args.k, "batch": args.batch},
        "threads": args.threads,
        "dense_tokens_per_s": round(dense),
        "kestrel_tokens_per_s": round(ours),
        "speedup": round(ours / dense, 2),
    }))


if __name__ == "__main__":
    main()
