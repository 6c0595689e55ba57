"""JumpReLU SAE (Rajamanoharan et al. 2024; Gemma Scope): a learned threshold per latent.

f_i(x) = z_i · 1[z_i > θ_i] with z = (x − b_dec) W_encᵀ + b_enc (and f_i ≥ 0). This is the
format of the published Gemma Scope SAEs and of SAELens's ``jumprelu`` architecture, whose
inference it matches exactly: SAELens computes ReLU(z) · 1[z > θ].

Training follows SAELens's JumpReLU definition (its default "step" mode, which is DeepMind's):

    loss = mean_rows ‖x − x̂‖² + λ · mean_rows Σ_i H(z_i − θ_i)

The step function H has no useful derivative, so θ learns through straight-through estimators
with a rectangle kernel of width ε (the bandwidth): ∂/∂θ of the L0 term is −(1/ε)·rect((z−θ)/ε)
and of the activation z·H(z−θ) is −(θ/ε)·rect((z−θ)/ε); the pre-activations get only the plain
gradient 1[z > θ] (no estimator on z, as in DeepMind's setup). θ is a plain parameter (as in
SAELens 6.54), initialised to 0.01 and projected back to θ ≥ 0 before each step. The decoder is
unconstrained and starts at norm 0.1 (the L0 penalty does not depend on decoder norms). The L0
weight λ is `l0_coefficient`, warmed up like relu_l1's L1 weight (`l1_warmup_steps`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.functional import linear

from kestrel.core.sae.base import (
    SAE,
    EncoderOutput,
    LossOutput,
    LossSettings,
    register_builtin,
)
from kestrel.core.sae.config import SAEConfig, check_l0_coefficient
from kestrel.core.sae.relu_l1 import penalised_loss

#: SAELens's defaults (JumpReLUTrainingSAEConfig), in units of inputs of mean norm sqrt(d_in).
BANDWIDTH = 0.05
INIT_THRESHOLD = 0.01


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLUFn(torch.autograd.Function):
    """z · 1[z > θ]; backward: 1[z > θ] to z, the straight-through estimate to θ."""

    @staticmethod
    def forward(ctx: Any, z_BN: Tensor, threshold_N: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z_BN, threshold_N)
        ctx.bandwidth = bandwidth
        return z_BN * (z_BN > threshold_N).to(z_BN.dtype)

    @staticmethod
    def backward(ctx: Any, grad_BN: Tensor) -> tuple[Tensor, Tensor, None]:
        z_BN, threshold_N = ctx.saved_tensors
        bandwidth = ctx.bandwidth
        kernel_BN = _rectangle((z_BN - threshold_N) / bandwidth)
        grad_threshold_N = (-(threshold_N / bandwidth) * kernel_BN * grad_BN).sum(dim=0)
        return (z_BN > threshold_N).to(grad_BN.dtype) * grad_BN, grad_threshold_N, None


class _StepFn(torch.autograd.Function):
    """1[z > θ]; backward: the straight-through estimate to θ only."""

    @staticmethod
    def forward(ctx: Any, z_BN: Tensor, threshold_N: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z_BN, threshold_N)
        ctx.bandwidth = bandwidth
        return (z_BN > threshold_N).to(z_BN.dtype)

    @staticmethod
    def backward(ctx: Any, grad_BN: Tensor) -> tuple[None, Tensor, None]:
        z_BN, threshold_N = ctx.saved_tensors
        bandwidth = ctx.bandwidth
        kernel_BN = _rectangle((z_BN - threshold_N) / bandwidth)
        return None, (-(1.0 / bandwidth) * kernel_BN * grad_BN).sum(dim=0), None


@register_builtin("jumprelu")
class JumpReLUSAE(SAE):
    """Each latent fires when its pre-activation exceeds its own threshold (saved as `threshold`)."""

    unit_norm_decoder = False
    decoder_init_norm = 0.1

    def __init__(self, config: SAEConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__(config, generator=generator)
        self.threshold = nn.Parameter(torch.full((config.n_latents,), INIT_THRESHOLD))

    @classmethod
    def check_config(cls, config: SAEConfig) -> None:
        super().check_config(config)
        check_l0_coefficient(config)

    def _encode_2d(self, x_BD: Tensor) -> tuple[EncoderOutput, Tensor]:
        """Eval: the kept entries only, padded to the busiest row. Training: dense, for the STE."""
        x_centred_BD = self._centre(x_BD)
        pre_BN = linear(x_centred_BD, self.W_enc, self.b_enc)
        threshold_N = self.threshold.to(pre_BN.dtype)
        if self.training:
            acts_BN = _JumpReLUFn.apply(pre_BN, threshold_N, BANDWIDTH)
            indices_BN = torch.arange(self.n_latents, device=x_BD.device).expand(x_BD.shape[0], -1)
            return EncoderOutput(acts_BN, indices_BN, pre_BN), x_centred_BD
        keep_BN = (pre_BN > threshold_N) & (pre_BN > 0)
        width = int(keep_BN.sum(dim=1).max()) if pre_BN.shape[0] else 0
        kept_BK, indices_BK = pre_BN.masked_fill(~keep_BN, float("-inf")).topk(width, dim=1)
        acts_BK = torch.where(kept_BK > float("-inf"), kept_BK, torch.zeros_like(kept_BK))
        return EncoderOutput(acts_BK, indices_BK, pre_BN), x_centred_BD

    def _reconstruct(self, enc: EncoderOutput) -> Tensor:
        if enc.acts.shape[-1] == self.n_latents and enc.indices.stride(0) == 0:  # the dense layout
            return enc.acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        return super()._reconstruct(enc)

    def training_loss(self, x_BD: Tensor, settings: LossSettings) -> LossOutput:
        with torch.no_grad():
            self.threshold.clamp_(min=0.0)  # projected, not clamped in the graph (as SAELens)
        enc, _ = self._encode_2d(x_BD)
        threshold_N = self.threshold.to(enc.pre_acts.dtype)
        l0_per_row = _StepFn.apply(enc.pre_acts, threshold_N, BANDWIDTH).sum() / x_BD.shape[0]
        coefficient = float(self.config.l0_coefficient) * settings.l1_scale
        return penalised_loss(x_BD, enc, self._reconstruct(enc), l0_per_row, coefficient)
