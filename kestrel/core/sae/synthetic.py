"""Ground-truth recovery: does this SAE's recipe find the features of data whose features are known?

Data: a dictionary of ``n_features`` random unit vectors in ``d`` dimensions (the SAE's width and
input width); each row is a sum of about ``l0`` of them (each feature on with probability
l0 / n_features) with nonnegative coefficients drawn uniformly from [0.5, 1.5]. An SAE of the same
architecture and config is trained briefly on it with Kestrel's own trainer (`train_sae`), and
scored by mean max cosine similarity (MMCS, Sharkey et al. 2022): for each true feature the best
|cos| with a learned decoder row, averaged over true features (``recovery``); the reverse
(each learned row's best match, averaged over learned rows) is reported as ``precision``.

Chance: the same score for a random decoder of the same shape (random unit rows), which for
n features in d dimensions sits near sqrt(2 ln n / d), far below 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from kestrel.core.sae.config import SAEConfig, TrainConfig
from kestrel.core.sae.progress import TrainingPoint
from kestrel.core.sae.trainer import train_sae

CHUNK_ROWS = 4096
COEFFICIENT_RANGE = (0.5, 1.5)
COSINE_CHUNK = 2048  # true features compared at once: bounds the [chunk, n_latents] matrix


class SparseDictionary:
    """A known dictionary and a reproducible stream of sparse combinations of it."""

    def __init__(self, n_features: int, d: int, l0: float, *, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        features_FD = torch.randn(n_features, d, generator=generator)
        self.features_FD = features_FD / features_FD.norm(dim=1, keepdim=True)
        self.p_on = min(1.0, l0 / n_features)
        self.seed = seed

    def rows(self, n_rows: int, *, epoch: int = 0, chunk: int = CHUNK_ROWS) -> Iterator[torch.Tensor]:
        """``n_rows`` rows in chunks; the same rows for the same seed and epoch."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 1)
        n_features = self.features_FD.shape[0]
        low, high = COEFFICIENT_RANGE
        for start in range(0, n_rows, chunk):
            b = min(chunk, n_rows - start)
            on_BF = torch.rand(b, n_features, generator=generator) < self.p_on
            rows_B, feats_B = on_BF.nonzero(as_tuple=True)
            coeffs = low + (high - low) * torch.rand(len(rows_B), generator=generator)
            x_BD = torch.zeros(b, self.features_FD.shape[1])
            x_BD.index_add_(0, rows_B, coeffs[:, None] * self.features_FD[feats_B])
            yield x_BD


def max_cosines(a_ND: torch.Tensor, b_MD: torch.Tensor) -> torch.Tensor:
    """For each row of a, the largest |cosine| with any row of b: [N]."""
    b_unit = F.normalize(b_MD.float(), dim=1)
    out = []
    for chunk in F.normalize(a_ND.float(), dim=1).split(COSINE_CHUNK):
        out.append((chunk @ b_unit.T).abs().max(dim=1).values)
    return torch.cat(out)


def recovery_scores(learned_FD: torch.Tensor, true_GD: torch.Tensor) -> dict[str, float]:
    """MMCS both ways, and the share of true features matched with |cos| ≥ 0.9."""
    best_true_G = max_cosines(true_GD, learned_FD)
    best_learned_F = max_cosines(learned_FD, true_GD)
    return {
        "recovery": float(best_true_G.mean()),
        "precision": float(best_learned_F.mean()),
        "recovered_fraction_0_9": float((best_true_G >= 0.9).float().mean()),
    }


def random_decoder_scores(n_latents: int, true_GD: torch.Tensor, *, seed: int = 0) -> dict[str, float]:
    """Chance: the same scores for random unit decoder rows."""
    generator = torch.Generator().manual_seed(seed + 7)
    return recovery_scores(torch.randn(n_latents, true_GD.shape[1], generator=generator), true_GD)


def synthetic_config(sae_config: dict[str, Any]) -> SAEConfig:
    """The SAE's own config, read as a fresh training of it (no model, run or import record)."""
    keep = {
        k: v for k, v in sae_config.items() if k not in ("model", "layer", "run_id", "data", "input_scale")
    }
    if keep.get("normalize_input") is None:
        keep["normalize_input"] = True
    for knob in ("l1_coefficient", "l0_coefficient"):
        if keep.get(knob) is None:
            keep.pop(knob, None)  # an import that did not say: the architecture's default
    return SAEConfig.from_dict(keep)


def synthetic_train_config(train_config: dict[str, Any] | None, n_rows: int, seed: int) -> TrainConfig:
    """The SAE's training settings where it has them, with a budget of ``n_rows`` on the CPU and
    no checkpoints (a brief scratch training, never resumed)."""
    base = {
        k: v for k, v in (train_config or {}).items() if k not in ("token_budget", "epochs", "batch_size")
    }
    base.update(
        token_budget=n_rows,
        batch_size=min(1024, max(64, n_rows // 256)),
        device="cpu",
        seed=seed,
        checkpoint_every=None,
        checkpoint_every_s=None,
        warmup_steps=None,
        l1_warmup_steps=None,
        dead_tokens_threshold=None,
    )
    return TrainConfig.from_dict(base)


def ground_truth_recovery(
    sae_config: dict[str, Any],
    train_config: dict[str, Any] | None,
    *,
    n_rows: int,
    l0: int | None = None,
    seed: int = 0,
    on_progress: Callable[[TrainingPoint], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any] | None:
    """Train the SAE's recipe on a known dictionary and score it; None when stopped."""
    cfg = synthetic_config(sae_config)
    l0 = l0 or cfg.k or 16
    dictionary = SparseDictionary(cfg.n_latents, cfg.d_in, l0, seed=seed)
    train_cfg = synthetic_train_config(train_config, n_rows, seed)
    result = train_sae(
        cfg,
        train_cfg,
        lambda epoch=0: dictionary.rows(n_rows, epoch=epoch),
        on_progress=on_progress,
        should_stop=should_stop,
        rows_per_epoch=n_rows,
    )
    if result.stopped:
        return None
    learned = recovery_scores(result.sae.W_dec.detach().float(), dictionary.features_FD)
    chance = random_decoder_scores(cfg.n_latents, dictionary.features_FD, seed=seed)
    return {
        **learned,
        "chance": chance,
        "settings": {
            "n_features": cfg.n_latents,
            "d": cfg.d_in,
            "l0": l0,
            "coefficients": f"uniform{COEFFICIENT_RANGE}",
            "rows": n_rows,
            "architecture": cfg.architecture,
            "train_config": train_cfg.model_dump(mode="json"),
        },
        "final_fvu": result.metrics.get("training", {}).get("final_fvu"),
        "steps": result.step,
    }
