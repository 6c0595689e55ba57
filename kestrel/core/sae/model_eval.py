"""SAE quality with the model in the loop: next-token loss clean, spliced, and zero-ablated.

    CE-loss recovered = (L_zero − L_sae) / (L_zero − L_clean)

measured on held-out texts. The SAE's reconstruction (or zeros) replaces the layer's output only
at the positions the SAE was trained on: by default every real token except position 0 and special
tokens, and except rows whose norm exceeds the run's outlier threshold. Those attention-sink rows
are left clean in all three passes, because an SAE trained without them reconstructs them badly
and splicing that in would measure the sink, not the dictionary (the same reason the trainer skips
them). The report says which positions were spliced and how many.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kestrel.core.datasets import token_batches
from kestrel.core.devices import layer_device
from kestrel.core.hooks import Controller, HookContext, HookManager
from kestrel.core.models import LoadedModel
from kestrel.core.runs import RowFilter
from kestrel.core.sae.base import SAE


@dataclass
class _Sums:
    clean: float = 0.0
    sae: float = 0.0
    zero: float = 0.0
    kl: float = 0.0
    kl_zero: float = 0.0
    tokens: int = 0
    spliced: int = 0
    positions: int = 0


def splice_mask(
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    special_ids: Sequence[int],
    filters: RowFilter,
) -> torch.Tensor:
    """Positions where the SAE stands in for the layer (before the norm filter, applied in the hook)."""
    mask_BT = attention_mask_BT.bool().clone()
    if filters.skip_position_0:
        mask_BT[:, 0] = False
    if filters.skip_special and special_ids:
        mask_BT &= ~torch.isin(input_ids_BT, torch.tensor(list(special_ids), device=input_ids_BT.device))
    return mask_BT


def _splicer(
    layer: str,
    mask: dict[str, torch.Tensor],
    replacement: Callable[[torch.Tensor], torch.Tensor],
    max_norm: float | None,
    counts: _Sums | None,
) -> Controller:
    def splice(h_BTD: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        where_BT = mask["BT"].to(h_BTD.device)  # a split model runs the layer on its own device
        if max_norm is not None:
            where_BT = where_BT & (h_BTD.float().norm(dim=-1) <= max_norm)
        if counts is not None:
            counts.spliced += int(where_BT.sum())
        out_BTD = h_BTD.clone()
        out_BTD[where_BT] = replacement(h_BTD[where_BT]).to(device=h_BTD.device, dtype=h_BTD.dtype)
        return out_BTD

    return Controller(layer, splice)


def next_token_losses(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor):
    """Per-token cross-entropy of predicting token t+1 from position t, padding excluded."""
    valid_BT = attention_mask_BT[:, 1:].bool() & attention_mask_BT[:, :-1].bool()
    logits_NV = logits_BTV[:, :-1][valid_BT].float()
    targets_N = input_ids_BT[:, 1:][valid_BT]
    return F.cross_entropy(logits_NV, targets_N, reduction="none"), logits_NV


def ce_loss_metrics(
    lm: LoadedModel,
    sae: SAE,
    layer: str,
    texts: Sequence[str],
    *,
    filters: RowFilter | None = None,
    norm_median: float | None = None,
    max_length: int = 256,
    token_budget: int = 1024,  # three [tokens, vocab] logit tensors live at once: keep them small
    on_progress: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Clean, SAE-spliced and zero-ablated next-token loss over ``texts``, and CE-loss recovered."""
    filters = filters or RowFilter.recommended()
    max_norm = filters.max_norm_multiple * norm_median if filters.max_norm_multiple and norm_median else None
    special_ids = list(lm.tokenizer.all_special_ids) if filters.skip_special else []
    sae = sae.to(layer_device(lm, layer)).eval()  # where the spliced layer runs
    sums = _Sums()
    mask: dict[str, torch.Tensor] = {}
    reconstruct = lambda h_ND: sae(h_ND.to(sae.W_dec.device).float()).reconstruction  # noqa: E731
    with_sae = [_splicer(layer, mask, reconstruct, max_norm, sums)]
    zeroed = [_splicer(layer, mask, torch.zeros_like, max_norm, None)]
    batches = list(token_batches(texts, lm.tokenizer, max_length=max_length, token_budget=token_budget))
    with torch.inference_mode():
        for i, batch in enumerate(batches):
            ids_BT, attn_BT = batch.input_ids_BT.to(lm.device), batch.attention_mask_BT.to(lm.device)
            mask["BT"] = splice_mask(ids_BT, attn_BT, special_ids, filters)
            sums.positions += int(mask["BT"].sum())
            clean_N, clean_logits_NV = _losses(lm, ids_BT, attn_BT, [])
            sae_N, sae_logits_NV = _losses(lm, ids_BT, attn_BT, with_sae)
            zero_N, zero_logits_NV = _losses(lm, ids_BT, attn_BT, zeroed)
            sums.clean += float(clean_N.sum())
            sums.sae += float(sae_N.sum())
            sums.zero += float(zero_N.sum())
            sums.kl += float(_kl(clean_logits_NV, sae_logits_NV).sum())
            sums.kl_zero += float(_kl(clean_logits_NV, zero_logits_NV).sum())
            sums.tokens += len(clean_N)
            if on_progress is not None:
                on_progress((i + 1) / len(batches))
    return _summary(sums, filters, max_norm, len(texts))


def _losses(lm: LoadedModel, ids_BT, attn_BT, hooks: list[Controller]):
    with HookManager(lm.model, hooks):
        logits_BTV = lm.model(input_ids=ids_BT, attention_mask=attn_BT, use_cache=False).logits
    return next_token_losses(logits_BTV, ids_BT, attn_BT)


def _kl(clean_logits_NV: torch.Tensor, other_logits_NV: torch.Tensor) -> torch.Tensor:
    """KL(clean ‖ other) per token, in nats."""
    clean_logp = F.log_softmax(clean_logits_NV, dim=-1)
    other_logp = F.log_softmax(other_logits_NV, dim=-1)
    return (clean_logp.exp() * (clean_logp - other_logp)).sum(-1)


def _summary(sums: _Sums, filters: RowFilter, max_norm: float | None, n_texts: int) -> dict[str, Any]:
    n = max(sums.tokens, 1)
    clean, spliced, zero = sums.clean / n, sums.sae / n, sums.zero / n
    recovered = (zero - spliced) / (zero - clean) if zero != clean else float("nan")
    return {
        "ce_loss_clean": clean,
        "ce_loss_sae": spliced,
        "ce_loss_zero_ablated": zero,
        "ce_loss_recovered": recovered,
        "kl_sae": sums.kl / n,
        "kl_zero_ablated": sums.kl_zero / n,  # the ledger's baseline for kl_sae
        "n_texts": n_texts,
        "n_predicted_tokens": sums.tokens,
        "n_spliced_positions": sums.spliced,
        "n_candidate_positions": sums.positions,
        "spliced_rows": {**filters.model_dump(), "max_norm": max_norm},
    }
