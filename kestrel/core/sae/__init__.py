"""Sparse autoencoders: architectures, streaming trainer, metrics, and files (incl. SAELens).

    result = train_sae(SAEConfig(d_in=576, n_latents=4608), TrainConfig(), data, eval_data=held_out)
    save_sae(result.sae, directory, metrics=result.metrics, history=result.history)
    out = load_sae(directory)(x)      # ForwardOutput(reconstruction, latent_acts, latent_indices, ...)

Names load on first use (PEP 562), so importing a torch-free part (``kestrel.core.sae.config``,
which the API's schemas do) does not import torch. Anything that needs the architectures
(``create``, ``lookup_architecture``, the trainer) loads them all first: they register on import.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_MODULE_OF = {
    **dict.fromkeys(
        (
            "SAE",
            "EncoderOutput",
            "ForwardOutput",
            "LossOutput",
            "LossSettings",
            "architectures",
            "create",
            "lookup_architecture",
            "register",
        ),
        "base",
    ),
    "latest_checkpoint": "checkpoint",
    **dict.fromkeys(("SAEConfig", "TrainConfig", "default_lr"), "config"),
    **dict.fromkeys(("load_sae", "save_sae"), "io"),
    **dict.fromkeys(("export_saelens", "import_saelens"), "saelens"),
    "evaluate": "metrics",
    "TrainingPoint": "progress",
    **dict.fromkeys(("TrainPlan", "TrainResult", "resolve_plan", "train_sae"), "trainer"),
}

TORCH_FREE = ("config", "progress")


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'kestrel.core.sae' has no attribute {name!r}")
    if module not in TORCH_FREE:  # the engine: its architectures register themselves on import
        import_module("kestrel.core.sae.base").load_builtin_architectures()
    return getattr(import_module(f"kestrel.core.sae.{module}"), name)


__all__ = sorted(_MODULE_OF)
