"""Circuit analysis: which (layer, position), head or SAE latent carries the difference between two prompts.

For each pair, the clean prompt's answer is ``correct`` and the corrupted prompt's is ``wrong``;
the metric is the logit difference ``logit(correct) − logit(wrong)`` at the last position. A
cell is one activation slice of the corrupted run replaced by its clean value (a ``Controller``
from ``kestrel.core.hooks``, removed when the forward ends), and its score is

    fraction restored = (mean patched − mean corrupt) / (mean clean − mean corrupt),

means over pairs (a ratio of means: one pair with a near-zero gap cannot blow it up). 1 means the
patch alone restores the clean behaviour; 0 means that slice carries none of it. Clean and
corrupted prompts must have the same number of tokens, so position t means the same slot in both.

Two methods, one grid per component kind (``Grid``): ``atp`` (the default) estimates every cell
from gradients (``attribution.py``, AtP*) and confirms each kind's ``confirm_top`` candidates by
real patching; ``patching`` patches every cell (one forward each) and still reports the estimate
and its agreement over all cells. Both timings are kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import Tensor

from kestrel.core.analysis import attribution, circuit_report, qkfix
from kestrel.core.analysis.common import (
    AnalysisOutput,
    ModelLoader,
    ProgressFn,
    StopFn,
    check_stop,
    report_progress,
    require_loader,
)
from kestrel.core.analysis.config import MAX_PATCH_FORWARDS, CircuitConfig
from kestrel.core.devices import layer_device
from kestrel.core.errors import InvalidInputError
from kestrel.core.hooks import Controller, HookContext, hooks
from kestrel.core.models import LoadedModel
from kestrel.core.store import Store

MIN_GAP = 1e-6


def _token_ids(lm: LoadedModel, text: str) -> list[int]:
    """Tokens of a prompt exactly as a forward sees them (special tokens included)."""
    return list(lm.tokenizer(text)["input_ids"])


def answer_id(lm: LoadedModel, answer: str, where: str) -> int:
    ids = lm.tokenizer(answer, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = lm.tokenizer.convert_ids_to_tokens(ids)
        raise InvalidInputError(
            f"{where} {answer!r} is {len(ids)} tokens {pieces}; an answer must be exactly one token "
            "(a leading space often matters, e.g. ' Paris')"
        )
    return int(ids[0])


def encode_pairs(lm: LoadedModel, config: CircuitConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(clean ids [P, T], corrupted ids [P, T], correct ids [P], wrong ids [P])``, checking lengths."""
    clean, corrupt = [], []
    for i, pair in enumerate(config.pairs):
        a, b = _token_ids(lm, pair.clean), _token_ids(lm, pair.corrupted)
        if len(a) != len(b):
            raise InvalidInputError(
                f"pairs[{i}]: the clean prompt is {len(a)} tokens and the corrupted one {len(b)}; "
                "they must have the same number of tokens so positions line up",
                details={"pair": i, "clean_tokens": len(a), "corrupted_tokens": len(b)},
            )
        if clean and len(a) != len(clean[0]):
            raise InvalidInputError(
                f"pairs[{i}] is {len(a)} tokens but pairs[0] is {len(clean[0])}; "
                "every prompt must have the same number of tokens (one heatmap of positions)",
                details={"pair": i},
            )
        clean.append(a)
        corrupt.append(b)
    correct = [answer_id(lm, p.correct, f"pairs[{i}].correct") for i, p in enumerate(config.pairs)]
    wrong = [answer_id(lm, p.wrong, f"pairs[{i}].wrong") for i, p in enumerate(config.pairs)]
    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.long, device=lm.device)  # noqa: E731
    return as_tensor(clean), as_tensor(corrupt), as_tensor(correct), as_tensor(wrong)


def logit_diff(lm: LoadedModel, ids_PT: Tensor, correct_P: Tensor, wrong_P: Tensor, controls=()) -> Tensor:
    """[P] logit(correct) − logit(wrong) at the last position, with ``controls`` active."""
    with hooks(lm.model, *controls), torch.no_grad():
        logits_PV = lm.model(input_ids=ids_PT, attention_mask=torch.ones_like(ids_PT)).logits[:, -1].float()
    rows = torch.arange(len(ids_PT), device=logits_PV.device)
    correct_P, wrong_P = correct_P.to(logits_PV.device), wrong_P.to(logits_PV.device)
    return (logits_PV[rows, correct_P] - logits_PV[rows, wrong_P]).cpu()


def patch_position(layer: str, clean_PTD: Tensor, position: int) -> Controller:
    """Replace one position of the layer's output by the clean run's value there."""

    def patch(x: Tensor, _: HookContext) -> Tensor:
        if x.shape[:2] != clean_PTD.shape[:2]:
            raise InvalidInputError(f"layer {layer!r} output {tuple(x.shape)} is not [pairs, tokens, ...]")
        out = x.clone()
        out[:, position] = clean_PTD[:, position].to(device=x.device, dtype=x.dtype)
        return out

    return Controller(layer, patch)


def _layers(lm: LoadedModel, config: CircuitConfig) -> list[str]:
    if config.layers is None:
        return [info.name for info in lm.layers if info.kind == "block"]
    for layer in config.layers:
        lm.layer(layer)  # NotFoundError naming close layers
    return list(config.layers)


def _labels(lm: LoadedModel, clean_PT: Tensor, corrupt_PT: Tensor) -> list[str]:
    """Position labels from the first pair: the token, or ``clean→corrupt`` where they differ."""
    a = [lm.tokenizer.decode([i]) for i in clean_PT[0].tolist()]
    b = [lm.tokenizer.decode([i]) for i in corrupt_PT[0].tolist()]
    return [f"{x}" if x == y else f"{x}→{y}" for x, y in zip(a, b, strict=True)]


@dataclass
class Grid:
    """One component kind's cells: estimates for all, real patching for some (NaN elsewhere)."""

    kind: str
    rows: list[str]
    columns: list[str]
    estimate: np.ndarray  # fraction restored, from AtP*
    patch: Callable[[int, int], list[Controller]]
    measured: np.ndarray = field(init=False)
    grad_drop: np.ndarray | None = None
    live: np.ndarray | None = None
    """Cells that differ between the runs at all (latents): the others restore exactly nothing."""

    def __post_init__(self) -> None:
        self.measured = np.full(self.estimate.shape, np.nan)

    def candidates(self, method: str, top: int, live: np.ndarray | None = None) -> list[tuple[int, int]]:
        """Every cell (patching; only ``live`` ones if given), or the top ``top`` by |estimate|
        (by the GradDrop score when there is one)."""
        if method == "patching":
            cells = np.argwhere(np.ones_like(self.estimate, dtype=bool) if live is None else live)
            return [(int(r), int(c)) for r, c in cells]
        score = np.abs(self.estimate) if self.grad_drop is None else np.maximum(self.grad_drop, 0.0)
        order = np.argsort(-score, axis=None, kind="stable")[:top]
        return [tuple(int(i) for i in np.unravel_index(int(flat), score.shape)) for flat in order]  # type: ignore[misc]

    def agreement(self) -> dict[str, Any]:
        """Spearman and mean |error| of the estimate against real patching, over the patched cells.

        Over a few confirmed cells of similar size, ranks are noise; the mean error says more there.
        """
        done = ~np.isnan(self.measured)
        n = int(done.sum())
        rho = None
        if n >= 3 and np.ptp(self.estimate[done]) > 0 and np.ptp(self.measured[done]) > 0:
            rho = float(spearmanr(self.estimate[done], self.measured[done]).statistic)
        over = "all" if n == self.estimate.size else "confirmed"
        error = float(np.abs(self.estimate[done] - self.measured[done]).mean()) if n else None
        return {"spearman": rho, "mean_abs_error": error, "n_cells": n, "over": over}


def analyze(
    store: Store,
    config: CircuitConfig,
    *,
    model_loader: ModelLoader | None = None,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    **_: object,
) -> AnalysisOutput:
    lm = require_loader(model_loader, "circuit")(_model_name(config, store), config.model_dtype)
    layers = _layers(lm, config)
    clean_PT, corrupt_PT, correct_P, wrong_P = encode_pairs(lm, config)
    pairs = attribution.Pairs(clean_PT, corrupt_PT, correct_P, wrong_P)
    n_positions = clean_PT.shape[1]
    if len(layers) * n_positions > MAX_PATCH_FORWARDS:
        raise InvalidInputError(
            f"{len(layers)} layers × {n_positions} positions = {len(layers) * n_positions} cells; "
            f"the limit is {MAX_PATCH_FORWARDS}: choose fewer layers or shorter prompts"
        )
    latent_site = _latent_site(lm, config, store)
    clean_P = logit_diff(lm, clean_PT, correct_P, wrong_P)
    corrupt_P = logit_diff(lm, corrupt_PT, correct_P, wrong_P)
    gap = float(clean_P.mean() - corrupt_P.mean())
    if abs(gap) < MIN_GAP:
        raise InvalidInputError(
            "the clean and corrupted prompts give the same mean logit difference "
            f"({float(clean_P.mean()):.4g}); "
            "there is nothing to restore: check the prompts and the answers"
        )
    check_stop(should_stop, "attribution")
    report_progress(progress, 0.0, "attribution: one forward and backward")
    started = time.perf_counter()
    estimates, qk = _estimate(lm, config, pairs, layers, latent_site, float(clean_P.mean()))
    atp_s = time.perf_counter() - started
    grids = _grids(lm, config, layers, estimates, clean_PT, corrupt_PT, gap, latent_site)
    started = time.perf_counter()
    n_patched = _patch(lm, config, pairs, grids, float(corrupt_P.mean()), gap, progress, should_stop)
    patching_s = time.perf_counter() - started
    timings = {"atp_s": atp_s, "patching_s": patching_s, "n_patched": n_patched}
    return circuit_report.output(config, lm, layers, clean_P, corrupt_P, grids, qk, timings)


def _model_name(config: CircuitConfig, store: Store) -> str:
    """The SAE's model when its latents are attributed; a different explicit model is a mistake."""
    if config.sae_id is None:
        return config.model
    from kestrel.core.sae.artifacts import get_sae, require_loadable_model

    summary = get_sae(store, config.sae_id)
    summary.require_sae("circuit latent attribution")  # its latents would be patched into `layer`
    require_loadable_model(store, summary)
    if "model" in config.model_fields_set and summary.model_name and config.model != summary.model_name:
        raise InvalidInputError(f"sae {config.sae_id!r} reads {summary.model_name!r}, not {config.model!r}")
    return summary.model_name or config.model


def _latent_site(lm: LoadedModel, config: CircuitConfig, store: Store) -> attribution.LatentSite | None:
    if config.sae_id is None:
        return None
    from kestrel.core.sae.artifacts import load_sae

    sae, summary = load_sae(store, config.sae_id, device=lm.device)
    lm.layer(summary.layer_name)  # NotFoundError naming close layers
    sae = sae.to(layer_device(lm, summary.layer_name)).eval()
    return attribution.LatentSite(config.sae_id, summary.layer_name, sae)


def _estimate(lm, config, pairs, layers, latent_site, clean_mean: float):
    """AtP* estimates; the QK fix is dropped (and the reason kept) where it cannot reproduce the model."""
    reason = qkfix.applies(lm) if config.qk_fix else "not asked for (qk_fix: false)"
    blocks = [info.name for info in lm.layers if info.kind == "block"]
    heads = attribution.head_sites(lm, _head_blocks(lm, layers)) if "heads" in config.components else []
    kwargs = {"heads": heads, "latents": latent_site, "grad_drop_blocks": blocks if config.grad_drop else ()}
    if reason is None:
        fix = qkfix.QKFix(lm, layers)
        estimates = attribution.estimate(lm, pairs, layers, qk_fix=fix, **kwargs)
        if abs(estimates.clean_metric - clean_mean) <= 1e-3 * max(1.0, abs(clean_mean)):
            return estimates, {
                "applied": True,
                "reason": None,
                "blocks": sorted(set(fix.next_attention.values())),
            }
        reason = (
            f"the fix's attention gave a clean logit difference of {estimates.clean_metric:.6g}, "
            f"the model's own {clean_mean:.6g}"
        )
    return attribution.estimate(lm, pairs, layers, **kwargs), {
        "applied": False,
        "reason": reason,
        "blocks": [],
    }


def _head_blocks(lm: LoadedModel, layers: list[str]) -> list[str]:
    """The blocks whose heads are attributed: those of the chosen layers (every block by default)."""
    indices = {lm.layer(layer).index for layer in layers} - {None}
    return [info.name for info in lm.layers if info.kind == "block" and info.index in indices]


def _grids(
    lm, config, layers, est: attribution.Estimates, clean_PT, corrupt_PT, gap, latent_site
) -> list[Grid]:
    labels = _labels(lm, clean_PT, corrupt_PT)
    clean = est.clean_resid
    grids = [
        Grid(
            "resid",
            layers,
            labels,
            est.resid_LT / gap,
            lambda r, c: [patch_position(layers[r], clean[layers[r]], c)],
            grad_drop=_scaled(est.grad_drop.get("resid"), gap),
        )
    ]
    if est.heads_LH is not None:
        sites = attribution.head_sites(lm, _head_blocks(lm, layers))
        grids.append(
            Grid(
                "heads",
                [s.block for s in sites],
                [str(h) for h in range(est.heads_LH.shape[1])],
                est.heads_LH / gap,
                lambda r, c: [patch_head(sites[r], est.clean_heads[sites[r].projection], c)],
                grad_drop=_scaled(est.grad_drop.get("heads"), gap),
            )
        )
    if est.latents_N is not None and latent_site is not None:
        grids.append(
            Grid(
                "latents",
                [latent_site.layer],
                [str(i) for i in range(len(est.latents_N))],
                est.latents_N[None] / gap,
                lambda r, c: [patch_latent(latent_site, est.latent_delta_PTN, c)],
                grad_drop=_scaled(
                    None if "latents" not in est.grad_drop else est.grad_drop["latents"][None], gap
                ),
                live=(est.latent_delta_PTN != 0).any(dim=(0, 1)).cpu().numpy()[None],
            )
        )
    return grids


def _scaled(values: np.ndarray | None, gap: float) -> np.ndarray | None:
    return None if values is None else values / abs(gap)


def _patch(lm, config, pairs: attribution.Pairs, grids, corrupt_mean, gap, progress, should_stop) -> int:
    """Real patching: every cell (patching) or each grid's top ``confirm_top`` (atp)."""
    todo = []
    for grid in grids:
        todo += [(grid, r, c) for r, c in grid.candidates(config.method, config.confirm_top, grid.live)]
    if config.method == "patching" and len(todo) > MAX_PATCH_FORWARDS:
        raise InvalidInputError(
            f"{len(todo)} cells to patch (resid, heads and the SAE's active latents); the limit is "
            f"{MAX_PATCH_FORWARDS}: use method 'atp', or fewer layers or components"
        )
    for i, (grid, r, c) in enumerate(todo):
        check_stop(should_stop, "patching")
        diff_P = logit_diff(lm, pairs.corrupt_PT, pairs.correct_P, pairs.wrong_P, grid.patch(r, c))
        grid.measured[r, c] = (float(diff_P.mean()) - corrupt_mean) / gap
        if (i + 1) % 16 == 0 or i + 1 == len(todo):
            report_progress(progress, 0.05 + 0.9 * (i + 1) / len(todo), f"patched {i + 1}/{len(todo)} cells")
    for grid in grids:
        if config.method == "patching" and grid.live is not None:
            grid.measured[~grid.live] = 0.0  # no difference between the runs: nothing to patch
    return len(todo)


def patch_head(site: attribution.HeadSite, clean_PTD: Tensor, head: int) -> Controller:
    """Replace one head's output (its slice of the output projection's input) at every position."""
    width = clean_PTD.shape[-1] // site.n_heads
    span = slice(head * width, (head + 1) * width)

    def patch(x: Tensor, _: HookContext) -> Tensor:
        out = x.clone()
        out[..., span] = clean_PTD[..., span].to(device=x.device, dtype=x.dtype)
        return out

    return Controller(site.projection, patch, "pre")


def patch_latent(site: attribution.LatentSite, delta_PTN: Tensor, latent: int) -> Controller:
    """Set one latent to its clean value at every position, the SAE's reconstruction error kept."""
    direction_D = site.sae.W_dec.detach()[latent]
    add_PTD = delta_PTN[..., latent, None].to(direction_D.dtype) * direction_D

    def patch(x: Tensor, _: HookContext) -> Tensor:
        return x + add_PTD.to(device=x.device, dtype=x.dtype)

    return Controller(site.layer, patch)
