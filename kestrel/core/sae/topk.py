"""TopK SAE (Gao et al. 2024): each row keeps exactly its k largest pre-activations.

The default architecture: sparsity is set directly by k instead of tuned through a penalty, no
activation shrinkage, and the k-sparse structure makes both decoding and the backward cheap.
"""

from __future__ import annotations

from torch import Tensor

from kestrel.core.sae.base import SAE, EncoderOutput, register_builtin


@register_builtin("topk")
class TopKSAE(SAE):
    """ReLU of the k largest pre-activations per row; the rest are zero."""

    def _encode_2d(self, x_BD: Tensor) -> tuple[EncoderOutput, Tensor]:
        x_centred_BD = self._centre(x_BD)
        pre_BN = self._dense_pre_acts(x_centred_BD)
        _, top_indices_BK = pre_BN.topk(self.config.k, dim=1, sorted=False)
        top_acts_BK = self._chosen_values(x_centred_BD, top_indices_BK, pre_BN).relu()
        return EncoderOutput(top_acts_BK, top_indices_BK, pre_BN), x_centred_BD
