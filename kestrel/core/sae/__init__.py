"""Sparse autoencoders: architectures, streaming trainer, metrics, and files (incl. SAELens).

    result = train_sae(SAEConfig(d_in=576, n_latents=4608), TrainConfig(), data, eval_data=held_out)
    save_sae(result.sae, directory, metrics=result.metrics, history=result.history)
    out = load_sae(directory)(x)      # ForwardOutput(reconstruction, latent_acts, latent_indices, ...)

The architecture modules register themselves on import; importing this package loads them all.
"""

from kestrel.core.sae import batchtopk, relu_l1, topk  # noqa: F401  (registration)
from kestrel.core.sae.base import (
    SAE,
    EncoderOutput,
    ForwardOutput,
    LossOutput,
    LossSettings,
    architectures,
    create,
    lookup_architecture,
    register,
)
from kestrel.core.sae.checkpoint import latest_checkpoint
from kestrel.core.sae.config import SAEConfig, TrainConfig, default_lr
from kestrel.core.sae.io import export_saelens, import_saelens, load_sae, save_sae
from kestrel.core.sae.metrics import evaluate
from kestrel.core.sae.trainer import Progress, TrainPlan, TrainResult, resolve_plan, train_sae

__all__ = [
    "SAE",
    "EncoderOutput",
    "ForwardOutput",
    "LossOutput",
    "LossSettings",
    "Progress",
    "SAEConfig",
    "TrainConfig",
    "TrainPlan",
    "TrainResult",
    "architectures",
    "create",
    "default_lr",
    "evaluate",
    "export_saelens",
    "import_saelens",
    "latest_checkpoint",
    "load_sae",
    "lookup_architecture",
    "register",
    "resolve_plan",
    "save_sae",
    "train_sae",
]
