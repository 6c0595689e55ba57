"""BatchTopK SAE (Bussmann et al. 2024): k active latents per row on average over a batch.

Training keeps the k·B largest pre-activations of the whole batch, so busy rows may use more
latents than quiet ones. A token's encoding must not depend on its batch-mates, so inference
instead keeps every pre-activation above one threshold, the running mean of the smallest value
that training kept (saved as the `threshold` buffer; SAELens calls this a JumpReLU).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.functional import embedding_bag

from kestrel.core.sae.base import SAE, EncoderOutput, register_builtin
from kestrel.core.sae.config import SAEConfig

#: Rows are first cut to their top `ROW_CAP_FACTOR * k` entries before the batch-wide choice;
#: when some row is full at that cap the exact (slower) batch-wide selection runs instead.
ROW_CAP_FACTOR = 4
THRESHOLD_DECAY = 0.99


@register_builtin("batchtopk")
class BatchTopKSAE(SAE):
    """Batch-level top-k in training, a fixed threshold at inference."""

    def __init__(self, config: SAEConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__(config, generator=generator)
        self.register_buffer("threshold", torch.zeros(()))
        self._cap_hint = 0

    def _encode_2d(self, x_BD: Tensor) -> tuple[EncoderOutput, Tensor]:
        x_centred_BD = self._centre(x_BD)
        pre_BN = self._dense_pre_acts(x_centred_BD)
        if self.training:
            indices_BK, keep_BK = batch_topk_select(pre_BN, self.config.k, cap_hint=self._cap_hint)
            self._cap_hint = int(keep_BK.sum(dim=1).max()) + self.config.k  # the next batch's start
        else:
            indices_BK, keep_BK = threshold_select(pre_BN, float(self.threshold))
        values_BK = self._chosen_values(x_centred_BD, indices_BK, pre_BN)
        acts_BK = values_BK.relu() * keep_BK
        return EncoderOutput(acts_BK, indices_BK, pre_BN), x_centred_BD

    def _reconstruct(self, enc: EncoderOutput) -> Tensor:
        """Decode only the kept entries: rows are padded to the widest row, often 5x the mean."""
        kept_BK = enc.acts > 0
        counts_B = kept_BK.sum(dim=1)
        offsets_B = counts_B.cumsum(0) - counts_B
        return (
            embedding_bag(
                enc.indices[kept_BK],
                self.W_dec,
                offsets_B,
                per_sample_weights=enc.acts[kept_BK].to(self.W_dec.dtype),
                mode="sum",
            )
            + self.b_dec
        )

    @torch.no_grad()
    def on_training_step(self, enc: EncoderOutput) -> None:
        kept = enc.acts[enc.acts > 0]
        if kept.numel() == 0:
            return
        smallest = kept.min()
        if self.threshold <= 0:
            self.threshold.copy_(smallest)
        else:
            self.threshold.mul_(THRESHOLD_DECAY).add_((1 - THRESHOLD_DECAY) * smallest)


def batch_topk_select(pre_BN: Tensor, k: int, *, cap_hint: int = 0) -> tuple[Tensor, Tensor]:
    """Indices [B, C] and keep-mask of the k·B largest positive entries of the batch.

    Each row's chosen entries are among its C largest, so only [B, C] candidates (C a few times
    k) are ever ranked across the batch.
    """
    n_batch, n_latents = pre_BN.shape
    total = k * n_batch
    cap = min(n_latents, max(ROW_CAP_FACTOR * k, cap_hint))  # a start that rarely needs widening
    while True:
        values_BC, indices_BC = pre_BN.topk(cap, dim=1, sorted=False)
        # The k·B-th largest of a subset is at most that of the whole batch; they agree unless some
        # row has all its candidates above the cutoff (it might hold more), so widen until none has.
        cutoff = values_BC.reshape(-1).topk(total, sorted=False).values.min()
        if cap == n_latents or not bool((values_BC.min(dim=1).values >= cutoff).any()):
            break
        cap = min(n_latents, 2 * cap)
    keep_BC = (values_BC >= cutoff) & (values_BC > 0)
    return indices_BC, keep_BC.to(pre_BN.dtype)


def threshold_select(pre_BN: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Indices [B, K] and keep-mask of the entries above `threshold` (and above 0)."""
    keep_BN = pre_BN > max(threshold, 0.0)
    width = int(keep_BN.sum(dim=1).max())
    values_BK, indices_BK = pre_BN.topk(width, dim=1, sorted=True)
    keep_BK = values_BK > max(threshold, 0.0)
    return indices_BK, keep_BK.to(pre_BN.dtype)
