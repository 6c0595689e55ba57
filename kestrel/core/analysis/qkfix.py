"""AtP*'s QK fix for residual cells: the next block's attention under the patch computed exactly.

AtP's worst failure (Kramár et al. 2024, §3.1) is attention saturation: when a patch moves a
query or key far, the softmax's gradient at the corrupted point says little about the change in
the attention pattern (a logit that goes from −10 to +10 has ~0 gradient and a large effect). The
paper computes the patched attention probabilities exactly and uses the gradient only from there
on. Here the same idea is applied to the block right after a residual cell, one step further:

    c*(n) = c_AtP(n) − ∂m/∂r_attn · Δr  +  ∂m/∂z · (z_patched − z_corrupt)

where ``∂m/∂r_attn`` is the gradient reaching the block's input through its attention input norm
only (a tap on that norm's input), i.e. the AtP estimate's own share for that path, and z the
heads' outputs (the output projection's input). Patching a block's output at position t hands
the next block exactly the clean run's input at t, so that block's query, key and value at t
*are* the clean run's (the input norm acts per position, rotary embeddings depend only on t):
the patched pattern (row t: the clean query against the corrupted keys with key t clean; column
t of every later row: the corrupted query against the clean key) and the patched values give
z_patched exactly, at O(T²) per cell and no forward. Including the values also catches the
pattern × value cross term that a softmax-only fix would leave out.

What is left linear: the patch's effect on the queries and keys of blocks after the next one
(they see it only through intermediate layers, so their change is not recorded in any run), the
next block's MLP, and head or latent cells, whose patches write into the residual stream through
a projection whose effect on downstream queries and keys is in neither run.

Queries, keys and values are read with an attention function of Kestrel's own registered in
transformers' ``AttentionInterface`` and selected for the two attribution forwards only: the
eager formula (scaled dot product, additive mask, float32 softmax) with the recording added. It
is used for the families whose attention is exactly that and whose attention input norm is
``input_layernorm`` (``SUPPORTED``); the caller checks that the clean metric it produces matches
the model's own, and drops the fix (saying why) when it does not.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kestrel.core.hooks import Controller, HookContext
from kestrel.core.models import LoadedModel

NAME = "kestrel_qkfix"
#: Families whose attention is the eager formula with rotary or no position terms in the logits.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "smollm3")


@dataclass
class _Record:
    query: Tensor | None = None  # [P, Hq, T, dh], after rotary embeddings
    key: Tensor | None = None  # [P, Hkv, T, dh]
    value: Tensor | None = None  # [P, Hkv, T, dh]
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
        families = ", ".join(SUPPORTED)
        return f"model type {model_type!r} is not one whose attention the fix reproduces ({families})"
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
        state.records.setdefault(state.run, {})[name] = _Record(
            query.detach(), key.detach(), value.detach(), None if mask is None else mask.detach(), scaling
        )
    n_rep = query.shape[1] // key.shape[1]
    key_r, value_r = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(query, key_r.transpose(2, 3)) * scaling
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value_r)
    if name is not None and state is not None and state.run == "corrupt":
        out = _tap(state, f"{name}.z", out)
    return out.transpose(1, 2).contiguous(), probs


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
        self.attention_norm: dict[str, str] = {}
        for i, info in enumerate(blocks[:-1]):
            following = blocks[i + 1]
            norm = f"{following.name}.input_layernorm"  # feeds the attention, and nothing else
            if info.name in resid_layers and following.index in attention and norm in modules:
                self.next_attention[info.name] = attention[following.index]
                self.attention_norm[info.name] = norm
        names = {id(modules[name]): name for name in set(self.next_attention.values())}
        self.state = _State(names=names, run="")

    def hooks(self) -> list[Controller]:
        """Taps on the next blocks' attention norms: the gradient of the attention path alone."""
        return [Controller(norm, self._tap_norm(layer), "pre") for layer, norm in self.attention_norm.items()]

    def _tap_norm(self, layer: str):
        def tap(x: Tensor, _: HookContext) -> Tensor:
            return _tap(self.state, f"{self.next_attention[layer]}.r", x)

        return tap

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

    def correction(
        self,
        resid_layers: Sequence[str],
        grads: dict[str, Tensor],
        clean: dict[str, Tensor],
        corrupt: dict[str, Tensor],
    ) -> np.ndarray:
        """``[L, T]``: the exact next-attention term minus that path's linear estimate (0 where n/a)."""
        records = self.state.records
        width = next(iter(clean.values())).shape[1] if clean else 0
        rows = []
        for layer in resid_layers:
            name = self.next_attention.get(layer)
            if name is None or name not in records.get("clean", {}) or name not in records.get("corrupt", {}):
                rows.append(np.zeros(width))
                continue
            exact_T = _exact_term(records["clean"][name], records["corrupt"][name], grads[f"{name}.z"])
            delta_PTD = clean[layer].float() - corrupt[layer].float()
            linear_T = (grads[f"{name}.r"].to(delta_PTD.device) * delta_PTD).sum(dim=(0, 2)).cpu().numpy()
            rows.append(exact_T - linear_T)
        return np.stack(rows) if rows else np.zeros((0, width))


def _probs(q: Tensor, k: Tensor, record: _Record) -> Tensor:
    """The eager attention pattern of queries ``q`` against keys ``k`` under ``record``'s mask."""
    n_rep = q.shape[1] // k.shape[1]
    scores = torch.matmul(q, k.repeat_interleave(n_rep, dim=1).transpose(2, 3)) * record.scaling
    if record.mask is not None:
        scores = scores + record.mask.float().to(scores.device)
    return torch.softmax(scores, dim=-1)


def _patched_probs(clean: _Record, corrupt: _Record, t: int) -> Tensor:
    """``[P, H, T, T]``: the pattern when position t's query and key are the clean run's."""
    q, k = corrupt.query.float().clone(), corrupt.key.float().clone()
    q[:, :, t] = clean.query[:, :, t].float().to(q.device)
    k[:, :, t] = clean.key[:, :, t].float().to(k.device)
    return _probs(q, k, corrupt)


def _exact_term(clean: _Record, corrupt: _Record, g_z: Tensor) -> np.ndarray:
    """Per position t: ∂m/∂z · (z with t's query, key and value clean − z), z the heads' outputs."""
    v_c, v_k = corrupt.value.float(), clean.value.float().to(corrupt.value.device)
    n_rep = corrupt.query.shape[1] // v_c.shape[1]
    z_c = torch.matmul(
        _probs(corrupt.query.float(), corrupt.key.float(), corrupt), v_c.repeat_interleave(n_rep, dim=1)
    )
    g_z = g_z.to(z_c.device)
    exact = []
    for t in range(z_c.shape[2]):
        v = v_c.clone()
        v[:, :, t] = v_k[:, :, t]
        z = torch.matmul(_patched_probs(clean, corrupt, t), v.repeat_interleave(n_rep, dim=1))
        exact.append((g_z * (z - z_c)).sum())
    return torch.stack(exact).cpu().numpy().astype(np.float64)
