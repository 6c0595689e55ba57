"""k-sparse probing: how well a handful of an SAE's latents predict a label a person supplies.

Follows SAEBench's sparse-probing evaluation (adamkarvonen/SAEBench, ``evals/sparse_probing``):

* each text becomes one vector: the mean of its token activations (and, encoded token by token,
  the mean of its SAE latents) over the positions the SAE was trained on (real tokens less
  position 0 and special tokens, and less rows past the run's norm threshold);
* every class is a binary task, the class against the rest: the negatives are drawn evenly from
  the other classes and cut to as many as the positives, so each task is balanced (chance 0.5);
  a two-class dataset is one task;
* on the train split, the k latents with the largest |mean(positive) − mean(negative)| are kept,
  and a logistic regression (scikit-learn, L2, C=1, max_iter=1000) on those k is scored by its
  accuracy on the held-out split; the same regression on all of the model's activations is the
  dense probe, the ceiling;
* a figure is the mean over tasks. The chance baseline is the majority class of each held-out
  split (≈ 0.5 by construction).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from kestrel.core.datasets import token_batches
from kestrel.core.hooks import Detector, HookManager, run_until_stopped, stop_after
from kestrel.core.models import LoadedModel
from kestrel.core.runs import RowFilter
from kestrel.core.sae.base import SAE
from kestrel.core.sae.metrics import StreamingFVU
from kestrel.core.sae.model_eval import splice_mask

PROBE_MAX_ITER = 1000  # SAEBench's: sklearn's default of 100 warns of non-convergence


def dense_latents(sae: SAE, x_ND: torch.Tensor) -> torch.Tensor:
    """The SAE's latents of each row as a dense [rows, n_latents] float32 matrix."""
    enc = sae.encode(x_ND.to(sae.W_enc.device))
    return sae.dense(enc.acts, enc.indices).float()


@dataclass
class PooledTexts:
    """Per text: mean activation and mean latents over its kept tokens; the token-level sums the
    ledger's FVU/L0/dead figures fall back on when the SAE has no capture run."""

    acts_ND: torch.Tensor
    latents_NF: torch.Tensor
    fvu: StreamingFVU = field(default_factory=StreamingFVU)
    active_total: float = 0.0
    fire_counts_F: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        return self.fvu.rows


def pool_texts(
    lm: LoadedModel,
    sae: SAE,
    layer: str,
    texts: Sequence[str],
    *,
    filters: RowFilter,
    norm_median: float | None,
    max_length: int = 128,
    token_budget: int = 4096,
    on_progress: Callable[[float], None] | None = None,
) -> PooledTexts:
    """Mean-pool the layer's activations and the SAE's latents of each text (see module doc).

    A text with no kept token (one token long, say) pools to zeros, as in SAEBench.
    """
    max_norm = filters.max_norm_multiple * norm_median if filters.max_norm_multiple and norm_median else None
    special = list(lm.tokenizer.all_special_ids) if filters.skip_special else []
    n, d, f = len(texts), sae.d_in, sae.n_latents
    sums_ND, lat_sums_NF = torch.zeros(n, d, dtype=torch.float64), torch.zeros(n, f, dtype=torch.float64)
    counts_N = torch.zeros(n, dtype=torch.float64)
    pooled = PooledTexts(sums_ND, lat_sums_NF, fire_counts_F=torch.zeros(f, dtype=torch.float64))
    batches = list(token_batches(list(texts), lm.tokenizer, max_length=max_length, token_budget=token_budget))
    seen: dict[str, torch.Tensor] = {}
    hooks = [Detector(layer, lambda h, ctx: seen.__setitem__("h", h.detach())), stop_after(layer)]
    with torch.inference_mode():
        for i, batch in enumerate(batches):
            ids_BT, attn_BT = batch.input_ids_BT.to(lm.device), batch.attention_mask_BT.to(lm.device)
            with HookManager(lm.model, hooks):
                run_until_stopped(
                    partial(lm.model, input_ids=ids_BT, attention_mask=attn_BT, use_cache=False)
                )
            h_BTD = seen.pop("h").float()
            keep_BT = splice_mask(ids_BT, attn_BT, special, filters).to(h_BTD.device)
            if max_norm is not None:
                keep_BT &= h_BTD.norm(dim=-1) <= max_norm
            x_ND = h_BTD[keep_BT].to(sae.W_enc.device)
            out = sae(x_ND)
            latents_NF = torch.zeros(x_ND.shape[0], f, device=x_ND.device)
            latents_NF.scatter_(1, out.latent_indices, out.latent_acts.float())
            doc_N = batch.doc_index_B.to(keep_BT.device)[:, None].expand_as(keep_BT)[keep_BT].cpu()
            sums_ND.index_add_(0, doc_N, x_ND.double().cpu())
            lat_sums_NF.index_add_(0, doc_N, latents_NF.double().cpu())
            counts_N.index_add_(0, doc_N, torch.ones_like(doc_N, dtype=torch.float64))
            if x_ND.shape[0]:
                pooled.fvu.add(x_ND, out.reconstruction)
                pooled.active_total += float((latents_NF > 0).sum())
                pooled.fire_counts_F += (latents_NF > 0).sum(dim=0).double().cpu()
            if on_progress is not None:
                on_progress((i + 1) / len(batches))
    scale_N = counts_N.clamp(min=1)[:, None]
    pooled.acts_ND = (sums_ND / scale_N).float()
    pooled.latents_NF = (lat_sums_NF / scale_N).float()
    return pooled


# ---------------------------------------------------------------------------------------------
# The probes (no model: arrays in, accuracies out)


@dataclass(frozen=True)
class BinaryTask:
    """One class against the rest, balanced, split into train and test indices of the dataset."""

    name: str
    train_idx: np.ndarray
    train_y: np.ndarray
    test_idx: np.ndarray
    test_y: np.ndarray


def binary_tasks(labels: Sequence[str], test_fraction: float, seed: int) -> list[BinaryTask]:
    """SAEBench's tasks: per class, positives against as many negatives drawn evenly from the
    other classes; the dataset is split (stratified) once, then each task is formed on each side."""
    labels_N = np.asarray(labels)
    classes = sorted(set(labels_N.tolist()))
    train_idx, test_idx = train_test_split(
        np.arange(len(labels_N)), test_size=test_fraction, random_state=seed, stratify=labels_N
    )
    rng = np.random.default_rng(seed)
    chosen = classes[:1] if len(classes) == 2 else classes
    tasks = []
    for name in chosen:
        tr_i, tr_y = _balanced(train_idx, labels_N, name, rng)
        te_i, te_y = _balanced(test_idx, labels_N, name, rng)
        tasks.append(BinaryTask(name, tr_i, tr_y, te_i, te_y))
    return tasks


def _balanced(idx: np.ndarray, labels_N: np.ndarray, positive: str, rng: np.random.Generator):
    pos = idx[labels_N[idx] == positive]
    others = sorted(set(labels_N[idx].tolist()) - {positive})
    per_class = math.ceil(len(pos) / max(len(others), 1))
    shuffled = [rng.permutation(idx[labels_N[idx] == other]) for other in others]
    neg = np.concatenate([s[:per_class] for s in shuffled])
    if len(neg) < len(pos):  # a small class left a gap: fill it from the others' remainders
        spare = rng.permutation(np.concatenate([s[per_class:] for s in shuffled]))
        neg = np.concatenate([neg, spare[: len(pos) - len(neg)]])
    neg = rng.permutation(neg)[: len(pos)]
    pos = rng.permutation(pos)[: len(neg)]  # fewer negatives than positives overall: trim
    both = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(len(pos), dtype=int), np.zeros(len(neg), dtype=int)])
    order = rng.permutation(len(both))
    return both[order], y[order]


def top_k_mean_diff(x_NF: np.ndarray, y_N: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k columns whose class means differ most (|mean₁ − mean₀|), largest first."""
    diff_F = np.abs(x_NF[y_N == 1].mean(axis=0) - x_NF[y_N == 0].mean(axis=0))
    return np.argsort(-diff_F, kind="stable")[:k]


def probe_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """Held-out accuracy of SAEBench's probe: L2 logistic regression, C=1."""
    if len(set(y_train.tolist())) < 2:
        return float("nan")
    probe = LogisticRegression(C=1.0, max_iter=PROBE_MAX_ITER)
    probe.fit(x_train, y_train)
    return float((probe.predict(x_test) == y_test).mean())


def majority_accuracy(y_train: np.ndarray, y_test: np.ndarray) -> float:
    """Chance: always answer the train split's most common class."""
    majority = int(np.bincount(y_train, minlength=2).argmax())
    return float((y_test == majority).mean())


def sparse_probing(
    acts_ND: torch.Tensor,
    latents_NF: torch.Tensor,
    labels: Sequence[str],
    ks: Sequence[int],
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean held-out accuracy of k-latent probes for each k, of the dense probe, and chance."""
    acts, latents = acts_ND.double().numpy(), latents_NF.double().numpy()
    tasks = binary_tasks(labels, test_fraction, seed)
    per_task = []
    for task in tasks:
        if len(task.test_idx) == 0 or len(set(task.train_y.tolist())) < 2:
            continue  # the split left this class nothing to test (or train) on: no accuracy to report
        tr_lat, te_lat = latents[task.train_idx], latents[task.test_idx]
        row: dict[str, Any] = {
            "class": task.name,
            "n_train": len(task.train_idx),
            "n_test": len(task.test_idx),
            "chance": majority_accuracy(task.train_y, task.test_y),
            "dense": probe_accuracy(acts[task.train_idx], task.train_y, acts[task.test_idx], task.test_y),
            "top_k": {},
            "latents": {},
        }
        for k in ks:
            chosen = top_k_mean_diff(tr_lat, task.train_y, min(k, tr_lat.shape[1]))
            row["top_k"][str(k)] = probe_accuracy(
                tr_lat[:, chosen], task.train_y, te_lat[:, chosen], task.test_y
            )
            row["latents"][str(k)] = [int(i) for i in chosen]
        per_task.append(row)
    return {
        "accuracy": {str(k): _mean(t["top_k"][str(k)] for t in per_task) for k in ks},
        "dense_accuracy": _mean(t["dense"] for t in per_task),
        "chance": _mean(t["chance"] for t in per_task),
        "tasks": per_task,
        "n_texts": len(labels),
        "n_classes": len(set(labels)),
    }


def _mean(values) -> float:
    finite = [v for v in values if v == v]
    return float(np.mean(finite)) if finite else float("nan")
