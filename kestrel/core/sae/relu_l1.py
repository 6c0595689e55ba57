"""ReLU SAE with an L1 penalty weighted by decoder norm (Anthropic, "April update" 2024).

loss = mean_rows ‖x − x̂‖² + λ · mean_rows Σ_i f_i(x) · ‖W_dec[i]‖

Weighting each activation by its decoder row's norm makes the penalty invariant to moving scale
between a latent's activation and its direction, so the decoder needs no unit-norm constraint.
λ is in units of the (normalised, mean norm sqrt(d_in)) input: keep `normalize_input` on, or
retune λ to the activations' scale. Its activations are dense-with-zeros, so it decodes with a
plain matmul.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.functional import linear

from kestrel.core.sae.base import (
    SAE,
    EncoderOutput,
    LossOutput,
    LossSettings,
    batch_total_variance,
    register_builtin,
)


@register_builtin("relu_l1")
class ReLUL1SAE(SAE):
    """f(x) = ReLU((x − b_dec) W_encᵀ + b_enc); every latent may be active."""

    unit_norm_decoder = False
    decoder_init_norm = 0.1  # small decoder (and tied encoder) rows start with a small reconstruction

    def _encode_2d(self, x_BD: Tensor) -> tuple[EncoderOutput, Tensor]:
        x_centred_BD = self._centre(x_BD)
        pre_BN = linear(x_centred_BD, self.W_enc, self.b_enc)
        # Every latent is a candidate: an expanded (stride-0) index view costs no memory.
        indices_BN = torch.arange(self.n_latents, device=x_BD.device).expand(x_BD.shape[0], -1)
        return EncoderOutput(pre_BN.relu(), indices_BN, pre_BN), x_centred_BD

    def _reconstruct(self, enc: EncoderOutput) -> Tensor:
        return enc.acts @ self.W_dec + self.b_dec

    def training_loss(self, x_BD: Tensor, settings: LossSettings) -> LossOutput:
        enc, _ = self._encode_2d(x_BD)
        weighted_l1 = (enc.acts.sum(dim=0) * self.W_dec.norm(dim=1)).sum() / x_BD.shape[0]
        coefficient = float(self.config.l1_coefficient) * settings.l1_scale
        return penalised_loss(x_BD, enc, self._reconstruct(enc), weighted_l1, coefficient)


def penalised_loss(
    x_BD: Tensor, enc: EncoderOutput, recon_BD: Tensor, penalty: Tensor, coefficient: float
) -> LossOutput:
    """Reconstruction error plus ``coefficient`` times a per-row sparsity penalty (relu_l1's
    weighted L1, jumprelu's L0), for dense-layout activations ``[B, n_latents]``."""
    n_rows = x_BD.shape[0]
    squared_error = (recon_BD - x_BD).pow(2).sum()
    active_BN = enc.acts > 0
    return LossOutput(
        loss=squared_error / n_rows + coefficient * penalty,
        fvu=(squared_error / batch_total_variance(x_BD)).detach(),
        l0=active_BN.sum(dim=1).float().mean(),
        fire_counts_N=active_BN.sum(dim=0).float(),
        aux_loss=torch.zeros((), device=x_BD.device),
        sparsity_loss=penalty.detach(),
    )
