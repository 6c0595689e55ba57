"""A latent's effect on the next-token distribution: the direct path against a measurement.

Feature pages list the tokens a latent "promotes" and "suppresses" from the **direct path**
``W_dec[l] · diag(g) · W_Uᵀ`` (`kestrel.core.concepts.contexts.logit_effects`): what the decoder
row would do to the logits if it reached the unembedding untouched, through the final norm's gain
``g`` only. That ignores every layer between the SAE's layer and the head, and the final norm's
division by the residual's RMS. It is exact for an SAE on the last block's output (up to the norm's
scale) and increasingly a guess for earlier layers, whose later blocks read the direction and
write their own.

`measured_logit_effect` measures instead: add ``scale · W_dec[l]`` to the layer's output at every
position of real contexts, run the rest of the model, and average the change in log-probabilities
over the positions. `agreement` compares the two vectors over the vocabulary (top-k overlap of
the promoted and suppressed tokens, Spearman rank correlation); `check_latent` does it all for
one latent of an SAE and is what the API serves (``POST /v1/saes/{id}/features/{latent}/logits``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from scipy.stats import spearmanr
from torch import Tensor

from kestrel.core.concepts.contexts import PAD_TOKEN, direct_logits, unembedding
from kestrel.core.devices import layer_device
from kestrel.core.errors import InvalidInputError
from kestrel.core.hooks import Controller, HookContext
from kestrel.core.models import LoadedModel, forward

MEASURE_BATCH = 8


@torch.no_grad()
def direct_logit_effect(lm: LoadedModel, direction_D: Tensor) -> Tensor:
    """[V] ``direction · diag(gain) · W_Uᵀ``: the feature page's promotes/suppresses, whole."""
    return direct_logits(direction_D[None], *unembedding(lm))[0]


@torch.no_grad()
def measured_logit_effect(
    lm: LoadedModel,
    layer: str,
    direction_D: Tensor,
    texts: Sequence[str],
    *,
    max_length: int = 64,
) -> Tensor:
    """[V] mean over the texts' token positions of log p(·|steered) − log p(·|clean), where steered
    adds ``direction_D`` (already scaled) to ``layer``'s output at every position."""
    return measured_effects(lm, layer, direction_D, texts, max_length=max_length)["logprob"]


@torch.no_grad()
def measured_effects(
    lm: LoadedModel,
    layer: str,
    direction_D: Tensor,
    texts: Sequence[str],
    *,
    max_length: int = 64,
) -> dict[str, Tensor]:
    """``logprob``: [V] the mean change in log-probability (logit units, what the direct path
    predicts; it ranks a rare token lifted from −20 to −15 first); ``prob``: [V] the mean change in
    probability (what the model actually says more or less often)."""
    if not texts:
        raise InvalidInputError("measuring a logit effect needs at least one context")
    vector_D = direction_D.float().to(layer_device(lm, layer))

    def add(x: Tensor, _: HookContext) -> Tensor:
        return x + vector_D.to(dtype=x.dtype, device=x.device)

    total_V: Tensor | None = None
    prob_V: Tensor | None = None
    n_positions = 0
    for start in range(0, len(texts), MEASURE_BATCH):
        batch = list(texts[start : start + MEASURE_BATCH])
        clean = forward(lm, batch, max_length=max_length)
        steered = forward(lm, batch, hooks=[Controller(layer, add)], max_length=max_length)
        mask_BT = clean.attention_mask_BT.bool()
        after_NV = steered.logits_BTV.float().log_softmax(-1)[mask_BT]
        before_NV = clean.logits_BTV.float().log_softmax(-1)[mask_BT]
        part_V = (after_NV - before_NV).sum(0).cpu()
        part_prob_V = (after_NV.exp() - before_NV.exp()).sum(0).cpu()
        total_V = part_V if total_V is None else total_V + part_V
        prob_V = part_prob_V if prob_V is None else prob_V + part_prob_V
        n_positions += int(mask_BT.sum())
    assert total_V is not None and prob_V is not None
    return {"logprob": total_V / max(n_positions, 1), "prob": prob_V / max(n_positions, 1)}


def spearman(a_V: Tensor, b_V: Tensor) -> float:
    """Spearman rank correlation (tied values share their average rank); 0 when either side is
    constant, where scipy answers nan (no ordering to agree with)."""
    a, b = a_V.double().cpu().numpy(), b_V.double().cpu().numpy()
    if a.min() == a.max() or b.min() == b.max():
        return 0.0
    return float(spearmanr(a, b).statistic)


def agreement(direct_V: Tensor, measured_V: Tensor, k: int) -> dict[str, float]:
    """How far the direct path predicts the measurement: the share of the measured top-k
    promoted (suppressed) tokens that the direct path also puts in its top-k, and the rank
    correlation over the whole vocabulary."""
    direct_V, measured_V = direct_V.float().cpu(), measured_V.float().cpu()

    def overlap(largest: bool) -> float:
        a = set(direct_V.topk(k, largest=largest).indices.tolist())
        b = set(measured_V.topk(k, largest=largest).indices.tolist())
        return len(a & b) / k

    return {
        "promoted_overlap": overlap(True),
        "suppressed_overlap": overlap(False),
        "spearman": spearman(direct_V, measured_V),
    }


def _top(tokenizer: Any, values_V: Tensor, k: int, largest: bool) -> list[dict[str, Any]]:
    top = values_V.topk(k, largest=largest)
    ids = top.indices.tolist()
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    return [
        {"token": text, "token_id": i, "value": float(v)}
        for text, i, v in zip(texts, ids, top.values.tolist(), strict=True)
    ]


def latent_contexts(store: Any, sae_id: str, latent: int, n: int) -> list[str]:
    """The texts of a latent's top discovery contexts (its token windows, decoded): real text on
    which the latent fires, so the measurement adds the direction where it naturally belongs."""
    from kestrel.core.concepts.store import FeatureReader

    reader = FeatureReader(store, sae_id)
    windows_KW = reader.latent(latent, "top_windows")["top_windows"]
    texts = []
    for window in windows_KW.tolist():
        tokens = [reader.token(t) for t in window if t != PAD_TOKEN]
        if tokens:
            texts.append("".join(tokens))
        if len(texts) == n:
            break
    return texts


def check_latent(
    lm: LoadedModel,
    layer: str,
    decoder_row_D: Tensor,
    scale: float,
    texts: Sequence[str],
    *,
    k: int = 10,
    max_length: int = 64,
) -> dict[str, Any]:
    """Direct path and measurement for one decoder row added at ``scale`` (its max activation),
    their top-k tokens each way, and their agreement."""
    if not scale > 0:
        raise InvalidInputError(f"the scale of the added direction must be > 0, got {scale}")
    direct_V = direct_logit_effect(lm, decoder_row_D).cpu()
    measured = measured_effects(lm, layer, scale * decoder_row_D, texts, max_length=max_length)
    measured_V, prob_V = measured["logprob"], measured["prob"]
    k = min(k, len(direct_V))
    return {
        "layer": layer,
        "scale": scale,
        "n_contexts": len(texts),
        "direct": {
            "positive": _top(lm.tokenizer, direct_V, k, True),
            "negative": _top(lm.tokenizer, direct_V, k, False),
        },
        "measured": {
            "positive": _top(lm.tokenizer, measured_V, k, True),
            "negative": _top(lm.tokenizer, measured_V, k, False),
        },
        "measured_probability": {
            "positive": _top(lm.tokenizer, prob_V, k, True),
            "negative": _top(lm.tokenizer, prob_V, k, False),
        },
        "agreement": agreement(direct_V, measured_V, k),
    }
