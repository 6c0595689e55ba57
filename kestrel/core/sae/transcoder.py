"""Transcoders in training: rows that carry an input and its target side by side, and the checks
a run makes before its first step (moved here from the trainer, which stays under 600 lines).

A transcoder (``SAEConfig.is_transcoder``) is trained by the SAE trainer unchanged: each row it
reads is ``[x | y]``, the encoder's input (``d_in`` wide) followed by the target the decoder
predicts (``d_out`` wide), as `kestrel.core.run_reader` reads two layers of one run with the same
rows. Splitting the rows here keeps every batching, shuffling and resuming rule of the trainer
the same for both kinds. Inputs and targets are scaled apart (each to mean norm sqrt(width)), so
the default learning rate fits both, and both factors are folded into the saved weights.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from kestrel.core.errors import InvalidInputError
from kestrel.core.sae.config import SAEConfig, TrainConfig


def split_rows(config: SAEConfig, rows_BW: Tensor) -> tuple[Tensor, Tensor | None]:
    """(input rows, target rows) of a transcoder's ``[x | y]`` rows; (rows, None) for an SAE."""
    if not config.is_transcoder:
        return rows_BW, None
    return rows_BW[:, : config.d_in], rows_BW[:, config.d_in :]


def norm_scale(rows_BD: Tensor) -> float:
    """The factor that brings the rows' mean norm to sqrt(width) (1 for all-zero rows)."""
    mean_norm = float(rows_BD.norm(dim=1).mean())
    return math.sqrt(rows_BD.shape[1]) / mean_norm if mean_norm > 0 else 1.0


def check_init(sae_config: SAEConfig, init_config: SAEConfig) -> None:
    """An initial SAE must have the shape the run trains: architecture, widths, kind."""
    sae_config.validate_against(init_config.d_in, source="the initial SAE")
    mine = (sae_config.architecture, sae_config.n_latents, sae_config.output_width, sae_config.kind)
    theirs = (init_config.architecture, init_config.n_latents, init_config.output_width, init_config.kind)
    if mine != theirs:
        raise InvalidInputError(
            f"the initial SAE is a {theirs[3]} {theirs[0]} with {theirs[1]} latents writing width "
            f"{theirs[2]}; the run asks for a {mine[3]} {mine[0]} with {mine[1]} latents writing "
            f"width {mine[2]}",
            details={"initial": list(theirs), "requested": list(mine)},
        )


def check_resumable(
    meta: dict[str, Any], checkpoint: str, sae_config: SAEConfig, train_config: TrainConfig
) -> None:
    """A checkpoint continues only the run that wrote it (bookkeeping fields may differ)."""
    saved_sae = SAEConfig.from_dict(meta["sae_config"])
    saved_train = TrainConfig.from_dict(meta["train_config"])
    ignored = {"model", "layer", "run_id", "data", "input_scale", "output_scale"}
    if saved_sae.model_dump(exclude=ignored) != sae_config.model_dump(exclude=ignored):
        raise InvalidInputError(
            f"checkpoint {checkpoint} belongs to a different SAE configuration",
            details=differences(
                saved_sae.model_dump(exclude=ignored), sae_config.model_dump(exclude=ignored)
            ),
        )
    if not saved_train.same_trajectory(train_config):
        raise InvalidInputError(
            f"checkpoint {checkpoint} was trained with different settings; resume with the same "
            "TrainConfig (only checkpoint_every, checkpoint_every_s, keep_checkpoints, log_every and "
            "device may change)",
            details=differences(saved_train.model_dump(), train_config.model_dump()),
        )


def differences(saved: dict[str, Any], requested: dict[str, Any]) -> dict[str, Any]:
    return {
        key: {"checkpoint": saved.get(key), "requested": requested.get(key)}
        for key in sorted(set(saved) | set(requested))
        if saved.get(key) != requested.get(key)
    }
