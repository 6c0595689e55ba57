"""AtP*'s QK fix for residual cells: the next block's attention softmax computed exactly.

AtP's worst failure (Kramár et al. 2024, §3.1) is attention saturation: when a patch moves a
query or key far, the softmax's gradient at the corrupted point says little about the change in
the attention pattern (a logit that goes from −10 to +10 has ~0 gradient and a large effect). The
fix computes the attention probabilities that the patch produces exactly, and uses the gradient
only from the probabilities onward:

    c*(n) = c_AtP(n) − Σ_head [∂m/∂q · Δq + ∂m/∂k · Δk]  +  Σ_head (A_patched − A_corrupt) · ∂m/∂A

Patching a block's output at position t hands the next block exactly the clean run's input at t,
so that block's query and key at t *are* the clean run's (the input norm acts per position and
rotary embeddings depend only on t): row t of the patched attention logits is the clean query
against the corrupted keys with key t clean, and column t of every later row is the corrupted
query against the clean key. Both runs' queries and keys are recorded, so the patched pattern is
exact and costs O(T²) per cell, no forward.

What is left linear: the patch's effect on the queries and keys of blocks after the next one
(they see it only through intermediate layers, so their query/key change is not recorded in
any run), and head or latent cells, whose patches write into the residual stream through a
projection whose effect on downstream queries and keys is not in either run either.

Queries and keys are read with an attention function of Kestrel's own registered in
transformers' ``AttentionInterface`` and selected for the two forwards only: the eager formula
(scaled dot product, additive mask, float32 softmax) with the recording added. It is used for the
families whose attention is exactly that (``SUPPORTED``); the caller checks that the clean metric
it produces matches the model's own, and drops the fix (saying so) when it does not.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kestrel.core.models import LoadedModel

NAME = "kestrel_qkfix"
#: Families whose attention is the eager formula with rotary or no position terms in the logits.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "olmo2", "smollm3")


@dataclass
class _Record:
    query: Tensor | None = None  # [P, Hq, T, dh], after rotary embeddings
    key: Tensor | None = None  # [P, Hkv, T, dh]
    mask: Tensor | None = None  # additive, broadcastable to [P, Hq, T, T], or None
    scaling: float = 1.0


@dataclass
class _State:
    names: dict[int, str]
    run: str
    records: dict[str, dict[str, _Record]] = field(default_factory=dict)
    leaves: dict[str, Tensor] = field(default_factory=dict)


_ACTIVE: _State | None = None


def applies(lm: LoadedModel) -> str | None:
    """None when the fix can be used on this model, else the reason it cannot."""
    config = lm.model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        return f"model type {model_type!r} is not one whose attention the fix reproduces ({', '.join(SUPPORTED)})"
    if getattr(config, "attn_logit_softcapping", None):
        return "attention logit soft-capping is not reproduced"
    return None


def _register() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if NAME not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(NAME, _attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)


def _attention(
    module: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **_: Any,
) -> tuple[Tensor, Tensor]:
    """The eager attention, recording queries and keys (and, in the corrupted run, tapping them)."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    state = _ACTIVE
    name = state.names.get(id(module)) if state is not None else None
    mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]]
    if name is not None and state is not None:
        if state.run == "corrupt":
            query, key = _tap(state, f"{name}.q", query), _tap(state, f"{name}.k", key)
        state.records.setdefault(state.run, {})[name] = _Record(
            query.detach(), key.detach(), None if mask is None else mask.detach(), scaling
        )
    n_rep = query.shape[1] // key.shape[1]
    key_r, value_r = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(query, key_r.transpose(2, 3)) * scaling
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if name is not None and state is not None and state.run == "corrupt":
        probs = _tap(state, f"{name}.a", probs)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value_r).transpose(1, 2).contiguous(), probs


def _tap(state: _State, key: str, x: Tensor) -> Tensor:
    leaf = torch.zeros_like(x, requires_grad=True)
    state.leaves[key] = leaf
    return x + leaf


class QKFix:
    """Records both runs' queries and keys of the blocks after the residual cells, then corrects."""

    def __init__(self, lm: LoadedModel, resid_layers: Sequence[str]) -> None:
        _register()
        self.lm = lm
        blocks = [info for info in lm.layers if info.kind == "block"]
        attention = {info.index: info.name for info in lm.layers if info.kind == "attention"}
        modules = dict(lm.model.named_modules())
        self.next_attention: dict[str, str] = {}
        for i, info in enumerate(blocks[:-1]):
            if info.name in resid_layers and blocks[i + 1].index in attention:
                self.next_attention[info.name] = attention[blocks[i + 1].index]
        names = {id(modules[name]): name for name in set(self.next_attention.values())}
        self.state = _State(names=names, run="")

    @contextmanager
    def recording(self, run: str) -> Iterator[None]:
        """The model computes attention with ``_attention`` for this block only."""
        global _ACTIVE
        config = self.lm.model.config
        before = config._attn_implementation
        self.state.run = run
        config._attn_implementation = NAME
        _ACTIVE = self.state
        try:
            yield
        finally:
            _ACTIVE = None
            config._attn_implementation = before

    def leaves(self) -> dict[str, Tensor]:
        return dict(self.state.leaves)

    def correction(self, resid_layers: Sequence[str], grads: dict[str, Tensor]) -> np.ndarray:
        """``[L, T]``: exact-softmax QK term minus its linear estimate, per residual cell (0 where n/a)."""
        clean, corrupt = self.state.records.get("clean", {}), self.state.records.get("corrupt", {})
        rows = []
        for layer in resid_layers:
            name = self.next_attention.get(layer)
            if name is None or name not in clean or name not in corrupt:
                rows.append(None)
                continue
            rows.append(
                _layer_correction(clean[name], corrupt[name], {k: grads[f"{name}.{k}"] for k in "qka"})
            )
        width = next((len(r) for r in rows if r is not None), 0)
        return np.stack([np.zeros(width) if r is None else r for r in rows]) if rows else np.zeros((0, 0))


def _layer_correction(clean: _Record, corrupt: _Record, grads: dict[str, Tensor]) -> np.ndarray:
    """Per position t: patched attention (clean q and k at t) exactly, minus the linear q/k term."""
    q_c, k_c = corrupt.query.float(), corrupt.key.float()
    q_k, k_k = clean.query.float().to(q_c.device), clean.key.float().to(q_c.device)
    g_q, g_k, g_a = (grads[k].to(q_c.device) for k in "qka")
    n_rep = q_c.shape[1] // k_c.shape[1]
    mask = None if corrupt.mask is None else corrupt.mask.float()

    def probs(q: Tensor, k: Tensor) -> Tensor:
        scores = torch.matmul(q, k.repeat_interleave(n_rep, dim=1).transpose(2, 3)) * corrupt.scaling
        return torch.softmax(scores if mask is None else scores + mask, dim=-1)

    a_c = probs(q_c, k_c)
    linear_T = (g_q * (q_k - q_c)).sum(dim=(0, 1, 3)) + (g_k * (k_k - k_c)).sum(dim=(0, 1, 3))
    exact = []
    for t in range(q_c.shape[2]):
        q, k = q_c.clone(), k_c.clone()
        q[:, :, t], k[:, :, t] = q_k[:, :, t], k_k[:, :, t]
        exact.append(((probs(q, k) - a_c) * g_a).sum())
    return (torch.stack(exact) - linear_T).cpu().numpy().astype(np.float64)
