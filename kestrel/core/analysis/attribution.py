"""Attribution patching (AtP, AtP*): every patch of a circuit analysis estimated from gradients.

Activation patching (``circuit.py``) runs one forward per cell. Attribution patching replaces them
with a first-order Taylor expansion around the corrupted run (Nanda 2022; Kramár et al. 2024,
"AtP*: An efficient and scalable method for localizing LLM behaviour to components"):

    Δmetric(cell) ≈ Σ (a_clean − a_corrupt) · ∂metric/∂a  at the corrupted run,

summed over the cell's slice of the activation. The metric is the mean over pairs of
``logit(correct) − logit(wrong)`` at the last position, and the direction is the one patching
uses (clean values written into the corrupted run), so an estimate divided by the clean − corrupt
gap is the same "fraction restored" the patching heatmap shows. One clean forward, one corrupted
forward and one backward give every cell of every component kind at once:

* ``resid``: each chosen layer's output at each position (layers × positions);
* ``heads``: each attention head's output, i.e. its slice of the output projection's input, at
  every position (layers × heads);
* ``latents``: each latent of an SAE on its layer, at every position, through the SAE with its
  reconstruction error kept: the decoder is linear, so ∂metric/∂f = W_dec · ∂metric/∂x.

The AtP* fixes: ``qkfix.py`` (the next block's attention under a residual patch computed exactly,
softmax and values) and ``GradDrop`` here (gradients with each block's contribution dropped in
turn, against cancellation between paths; a ranking score, one extra backward per block).

Gradients come from zero tensors added to the activations by ordinary hook-manager controllers
(``GradientTaps``): the forward values are bit-identical, the same mechanism serves forward
outputs and pre-forward inputs, and ``torch.autograd.grad`` on those leaves computes no parameter
gradient, so the shared model's ``.grad`` is never touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kestrel.core.errors import InvalidInputError
from kestrel.core.hooks import ActivationRecorder, Controller, Detector, HookContext, hooks
from kestrel.core.models import LoadedModel

#: Output projections of the attention modules of the supported families (Llama, Qwen, Gemma,
#: Mistral: o_proj; GPT-2: c_proj; GPT-NeoX: dense; others: out_proj).
OUTPUT_PROJECTIONS = ("o_proj", "c_proj", "dense", "out_proj")


@dataclass(frozen=True)
class HeadSite:
    """A block's attention heads: the output projection whose input is the heads' outputs, concatenated."""

    block: str
    projection: str
    n_heads: int


@dataclass(frozen=True)
class LatentSite:
    """An SAE on a layer, whose latents are the candidates."""

    sae_id: str
    layer: str
    sae: Any


@dataclass
class Pairs:
    """The encoded prompt pairs: ``[P, T]`` ids and ``[P]`` answer ids."""

    clean_PT: Tensor
    corrupt_PT: Tensor
    correct_P: Tensor
    wrong_P: Tensor


@dataclass
class Estimates:
    """Estimated Δ(mean logit difference) per cell, and the activations real patching needs."""

    resid_LT: np.ndarray
    heads_LH: np.ndarray | None = None
    latents_N: np.ndarray | None = None
    grad_drop: dict[str, np.ndarray] = field(default_factory=dict)
    """Per component kind, the GradDrop score (≥ 0) of each cell, when asked for."""
    qk_correction_LT: np.ndarray | None = None
    """What the QK fix added to ``resid_LT`` (already included there)."""
    clean_resid: dict[str, Tensor] = field(default_factory=dict)
    clean_heads: dict[str, Tensor] = field(default_factory=dict)
    latent_delta_PTN: Tensor | None = None
    """Clean − corrupt dense latents: what patching latent i adds, times its decoder row."""
    clean_metric: float = float("nan")
    """The clean mean logit difference as the attribution forward computed it (a faithfulness check)."""


def mean_logit_diff(logits_PTV: Tensor, pairs: Pairs) -> Tensor:
    """Mean over pairs of logit(correct) − logit(wrong) at the last position (a scalar with a graph)."""
    last_PV = logits_PTV[:, -1]
    last_PV = last_PV.to(torch.promote_types(last_PV.dtype, torch.float32))  # fp16/bf16 up, fp64 kept
    rows = torch.arange(len(last_PV), device=last_PV.device)
    correct, wrong = pairs.correct_P.to(last_PV.device), pairs.wrong_P.to(last_PV.device)
    return (last_PV[rows, correct] - last_PV[rows, wrong]).mean()


class GradientTaps:
    """Adds a zero leaf to each tapped activation for one forward; ``grads`` then gives ∂metric/∂a."""

    def __init__(self) -> None:
        self.leaves: dict[tuple[str, str], Tensor] = {}

    def controller(self, layer: str, when: str = "forward") -> Controller:
        key = (layer, when)

        def tap(x: Tensor, ctx: HookContext) -> Tensor:
            if ctx.call != 0:
                raise InvalidInputError(
                    f"layer {layer!r} runs more than once per forward; attribution needs one value per "
                    "position: choose a module that runs once",
                    details={"layer": layer},
                )
            leaf = torch.zeros_like(x, requires_grad=True)
            self.leaves[key] = leaf
            return x + leaf

        return Controller(layer, tap, when)  # type: ignore[arg-type]

    def grads(self, metric: Tensor, *, retain_graph: bool = False) -> dict[tuple[str, str], Tensor]:
        keys = list(self.leaves)
        values = torch.autograd.grad(
            metric, [self.leaves[k] for k in keys], retain_graph=retain_graph, allow_unused=True
        )
        return {
            k: (torch.zeros_like(self.leaves[k]) if g is None else g).float()
            for k, g in zip(keys, values, strict=True)
        }


class _GradGate(torch.autograd.Function):
    """Identity forward; backward sends the gradient through the block (open) or around it (closed).

    As if the block's output were ``input + gate·(output − input)``: closing it is GradDrop's
    "no gradient through this layer's contribution", the residual stream still carrying it past.
    """

    @staticmethod
    def forward(ctx: Any, output: Tensor, block_input: Tensor, gate: _Gate) -> Tensor:
        ctx.gate = gate
        return output.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        return (grad, None, None) if ctx.gate.open else (None, grad, None)


@dataclass
class _Gate:
    open: bool = True


class GradDrop:
    """One gate per block; ``closed(i)`` drops block i's gradient for the backward passes inside it."""

    def __init__(self, blocks: Sequence[str]) -> None:
        self.blocks = list(blocks)
        self.gates = {block: _Gate() for block in self.blocks}
        self.inputs: dict[str, Tensor] = {}

    def hooks(self) -> list[Detector | Controller]:
        out: list[Detector | Controller] = []
        for block in self.blocks:
            out.append(Detector(block, self._keep_input(block), "pre"))
            out.append(Controller(block, self._gate(block)))
        return out

    def _keep_input(self, block: str):
        def keep(x: Tensor, _: HookContext) -> None:
            self.inputs[block] = x  # live (not detached): the gate's backward routes to it

        return keep

    def _gate(self, block: str):
        def gate(x: Tensor, _: HookContext) -> Tensor:
            block_input = self.inputs[block]
            if block_input.shape != x.shape:
                raise InvalidInputError(f"block {block!r} changes the shape; GradDrop needs a residual block")
            return _GradGate.apply(x, block_input, self.gates[block])

        return gate

    def set_closed(self, block: str | None) -> None:
        for name, gate in self.gates.items():
            gate.open = name != block


def head_sites(lm: LoadedModel, blocks: Sequence[str]) -> list[HeadSite]:
    """Each block's attention output projection, found by the families' names."""
    modules = dict(lm.model.named_modules())
    n_heads = int(getattr(lm.model.config, "num_attention_heads", 0) or getattr(lm.model.config, "n_head", 0))
    if n_heads <= 0:
        raise InvalidInputError(f"model {lm.name!r} does not say how many attention heads it has")
    attention = {info.index: info.name for info in lm.layers if info.kind == "attention"}
    index = {info.name: info.index for info in lm.layers if info.kind == "block"}
    sites = []
    for block in blocks:
        name = attention.get(index.get(block))
        projection = next(
            (f"{name}.{leaf}" for leaf in OUTPUT_PROJECTIONS if name and f"{name}.{leaf}" in modules), None
        )
        if projection is None:
            raise InvalidInputError(
                f"block {block!r} has no attention output projection named one of "
                f"{list(OUTPUT_PROJECTIONS)}; "
                "heads cannot be attributed on this model",
                details={"block": block},
            )
        sites.append(HeadSite(block, projection, n_heads))
    return sites


def dense_latents(sae: Any, x: Tensor) -> Tensor:
    """``[..., n_latents]`` latent values of ``x`` (zeros where the SAE left a latent off)."""
    x_f = x.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)
    encoded = sae.encode(x_f)
    return sae.dense(encoded.acts, encoded.indices)


def estimate(
    lm: LoadedModel,
    pairs: Pairs,
    resid_layers: Sequence[str],
    *,
    heads: Sequence[HeadSite] = (),
    latents: LatentSite | None = None,
    grad_drop_blocks: Sequence[str] = (),
    qk_fix: Any = None,
) -> Estimates:
    """One clean forward, one corrupted forward + backward: AtP estimates for every cell.

    ``qk_fix`` (a ``qkfix.QKFix`` or None) records queries and keys in both runs and corrects the
    residual cells afterwards; ``grad_drop_blocks`` adds one backward per block for GradDrop.
    """
    recorders = {
        "resid": ActivationRecorder(resid_layers, to_cpu=False),
        "heads": ActivationRecorder([h.projection for h in heads], when="pre", to_cpu=False),
        "sae": ActivationRecorder([latents.layer] if latents else [], to_cpu=False),
    }
    clean_hooks = [h for r in recorders.values() for h in r.hooks()]
    with torch.no_grad(), _maybe(qk_fix, "clean"), hooks(lm.model, *clean_hooks):
        clean_logits = lm.model(
            input_ids=pairs.clean_PT, attention_mask=torch.ones_like(pairs.clean_PT)
        ).logits
    clean_metric = float(mean_logit_diff(clean_logits, pairs))
    clean = {name: {layer: r.last(layer) for layer in r.layers} for name, r in recorders.items()}
    for r in recorders.values():
        r.clear()

    taps = GradientTaps()
    drop = GradDrop(grad_drop_blocks)
    tap_hooks = (
        [taps.controller(layer) for layer in resid_layers]
        + [taps.controller(h.projection, "pre") for h in heads]
        + ([taps.controller(latents.layer)] if latents and latents.layer not in resid_layers else [])
    )
    # Gates first: a block's own tap then sits after its gate, so dropping a block does not cut
    # the gradient of that block's own output.
    corrupt_hooks = drop.hooks() + tap_hooks + [h for r in recorders.values() for h in r.hooks()]
    corrupt_hooks += qk_fix.hooks() if qk_fix is not None else []
    with torch.enable_grad(), _maybe(qk_fix, "corrupt"), hooks(lm.model, *corrupt_hooks):
        logits = lm.model(input_ids=pairs.corrupt_PT, attention_mask=torch.ones_like(pairs.corrupt_PT)).logits
        metric = mean_logit_diff(logits, pairs)
        extra = qk_fix.leaves() if qk_fix is not None else {}
        grads, extra_grads = _all_grads(taps, metric, extra, retain=bool(grad_drop_blocks))
        corrupt = {name: {layer: r.last(layer) for layer in r.layers} for name, r in recorders.items()}
        result = _products(grads, clean, corrupt, resid_layers, heads, latents)
        if grad_drop_blocks:
            result.grad_drop = _grad_drop(drop, taps, metric, clean, corrupt, resid_layers, heads, latents)
    if qk_fix is not None:
        correction_LT = qk_fix.correction(resid_layers, extra_grads, clean["resid"], corrupt["resid"])
        result.qk_correction_LT = correction_LT
        result.resid_LT = result.resid_LT + correction_LT
    result.clean_metric = clean_metric
    result.clean_resid = clean["resid"]
    result.clean_heads = clean["heads"]
    return result


def _maybe(qk_fix: Any, run: str):
    from contextlib import nullcontext

    return qk_fix.recording(run) if qk_fix is not None else nullcontext()


def _all_grads(
    taps: GradientTaps, metric: Tensor, extra: dict[str, Tensor], *, retain: bool
) -> tuple[dict[tuple[str, str], Tensor], dict[str, Tensor]]:
    """Gradients at the taps and at the QK fix's leaves, from one backward."""
    if not extra:
        return taps.grads(metric, retain_graph=retain), {}
    names = list(extra)
    for name in names:
        taps.leaves[("qk", name)] = extra[name]
    grads = taps.grads(metric, retain_graph=retain)
    qk = {name: grads.pop(("qk", name)) for name in names}
    for name in names:
        del taps.leaves[("qk", name)]
    return grads, qk


def _products(grads, clean, corrupt, resid_layers, heads, latents) -> Estimates:
    """Σ (clean − corrupt) · gradient over each cell's slice, summed over pairs (the metric is a mean)."""
    resid_LT = np.stack(
        [
            _dot(clean["resid"][layer], corrupt["resid"][layer], grads[(layer, "forward")], (0, 2))
            for layer in resid_layers
        ]
    )
    out = Estimates(resid_LT=resid_LT)
    if heads:
        rows = []
        for site in heads:
            delta_PTHE = _split_heads(
                clean["heads"][site.projection] - corrupt["heads"][site.projection], site
            )
            grad_PTHE = _split_heads(grads[(site.projection, "pre")], site)
            rows.append((delta_PTHE.float() * grad_PTHE).sum(dim=(0, 1, 3)).cpu().numpy())
        out.heads_LH = np.stack(rows).astype(np.float64)
    if latents is not None:
        sae = latents.sae
        delta_PTN = dense_latents(sae, clean["sae"][latents.layer]) - dense_latents(
            sae, corrupt["sae"][latents.layer]
        )
        grad_PTN = grads[(latents.layer, "forward")].to(sae.W_dec.device) @ sae.W_dec.detach().float().T
        out.latents_N = (delta_PTN.float() * grad_PTN).sum(dim=(0, 1)).cpu().numpy().astype(np.float64)
        out.latent_delta_PTN = delta_PTN.detach()
    return out


def _dot(clean: Tensor, corrupt: Tensor, grad: Tensor, dims: tuple[int, ...]) -> np.ndarray:
    delta = clean.float() - corrupt.float()
    if delta.shape != grad.shape:
        raise InvalidInputError(f"activation {tuple(delta.shape)} and gradient {tuple(grad.shape)} differ")
    return (delta * grad.to(delta.device)).sum(dim=dims).cpu().numpy().astype(np.float64)


def _split_heads(x_PTD: Tensor, site: HeadSite) -> Tensor:
    width = x_PTD.shape[-1]
    if width % site.n_heads:
        raise InvalidInputError(
            f"{site.projection!r} input width {width} is not a multiple of {site.n_heads} heads",
            details={"layer": site.projection},
        )
    return x_PTD.reshape(*x_PTD.shape[:-1], site.n_heads, width // site.n_heads)


def _grad_drop(drop: GradDrop, taps, metric, clean, corrupt, resid_layers, heads, latents) -> dict:
    """AtP* GradDrop: (1 / (L − 1)) Σ_l |AtP with block l's gradient dropped|, per cell (≥ 0).

    A cell whose paths cancel (one raises the metric, another lowers it) has a small AtP estimate
    but large estimates once one of the paths is cut; this score keeps such cells among the
    candidates real patching confirms. One extra backward per block, on the kept graph.
    """
    sums: dict[str, np.ndarray] = {}
    n = len(drop.blocks)
    try:
        for i, block in enumerate(drop.blocks):
            drop.set_closed(block)
            grads = taps.grads(metric, retain_graph=i < n - 1)
            part = _products(grads, clean, corrupt, resid_layers, heads, latents)
            for name, values in (
                ("resid", part.resid_LT),
                ("heads", part.heads_LH),
                ("latents", part.latents_N),
            ):
                if values is not None:
                    sums[name] = sums.get(name, 0.0) + np.abs(values)
    finally:
        drop.set_closed(None)
    return {name: total / max(n - 1, 1) for name, total in sums.items()}
