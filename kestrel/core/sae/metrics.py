"""Evaluation of an SAE on held-out activation rows, streamed in bounded memory.

Definitions (shared with STYLE.md):

* FVU = Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over all evaluation rows, where mean(x) is the mean over all
  of them (not per batch). Sums are float64 and the variance is accumulated about the first
  batch's mean, so the usual Σ‖x‖² − n‖μ‖² cancellation does not bite when activations have a
  large common offset. Explained variance = 1 − FVU.
* L0 = mean number of non-zero latents per row.
* Dead here = never fired on any evaluation row; the row count is reported with the figure
  (training tracks its own "silent for N tokens" version).
* The density histogram bins log10(firing frequency) of the latents that fired at least once;
  those that never did are counted separately.

A transcoder's evaluation rows are its input and target side by side (as it trains on them); its
FVU is of the target, the layer it predicts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from kestrel.core.errors import InvalidInputError
from kestrel.core.sae.base import SAE
from kestrel.core.sae.batches import check_chunk
from kestrel.core.sae.transcoder import split_rows

#: Rows encoded at once; bounds the [rows, n_latents] pre-activation matrix.
EVAL_CHUNK_ROWS = 4096
HISTOGRAM_EDGES = [x / 2 for x in range(-16, 1)]  # log10 frequency from 1e-8 to 1, half-decades


class StreamingFVU:
    """Accumulates Σ‖x − x̂‖² and the total variance of x batch by batch."""

    def __init__(self) -> None:
        self.rows = 0
        self.squared_error = 0.0
        self.shift_D: Tensor | None = None
        self.shifted_sum_D: Tensor | None = None
        self.shifted_squares = 0.0

    def add(self, x_BD: Tensor, recon_BD: Tensor) -> None:
        x64_BD = x_BD.double()
        if self.shift_D is None:
            self.shift_D = x64_BD.mean(dim=0)
            self.shifted_sum_D = torch.zeros_like(self.shift_D)
        assert self.shifted_sum_D is not None
        centred_BD = x64_BD - self.shift_D
        self.shifted_sum_D += centred_BD.sum(dim=0)
        self.shifted_squares += float(centred_BD.pow(2).sum())
        self.squared_error += float((x64_BD - recon_BD.double()).pow(2).sum())
        self.rows += x_BD.shape[0]

    @property
    def total_variance(self) -> float:
        """Σ‖x − μ‖² = Σ‖x − c‖² − n‖μ − c‖² for the shift c."""
        if self.rows == 0 or self.shifted_sum_D is None:
            return 0.0
        return self.shifted_squares - float(self.shifted_sum_D.pow(2).sum()) / self.rows

    @property
    def fvu(self) -> float:
        variance = self.total_variance
        return self.squared_error / variance if variance > 0 else float("nan")


@torch.no_grad()
def evaluate(sae: SAE, batches: Iterable[Tensor], *, max_rows: int | None = None) -> dict[str, Any]:
    """FVU, explained variance, MSE, L0, dead fraction and latent density over the rows given."""
    was_training = sae.training
    sae.eval()
    param = next(sae.parameters())
    fvu = StreamingFVU()
    fire_counts_N = torch.zeros(sae.n_latents, dtype=torch.float64, device=param.device)
    active_total = 0.0
    try:
        for batch in batches:
            if batch.ndim != 2:
                raise InvalidInputError(f"evaluation batches must be [rows, d_in], got {tuple(batch.shape)}")
            check_chunk(batch, sae.config)
            for rows_BW in batch.split(EVAL_CHUNK_ROWS):
                if max_rows is not None:
                    rows_BW = rows_BW[: max_rows - fvu.rows]
                if rows_BW.shape[0] == 0:
                    break
                x_BD, target_BD = split_rows(sae.config, rows_BW.to(param.device, param.dtype))
                out = sae(x_BD)
                fvu.add(x_BD if target_BD is None else target_BD, out.reconstruction)
                fired_BK = out.latent_acts > 0
                active_total += float(fired_BK.sum())
                fire_counts_N += _count_by_latent(out.latent_indices, fired_BK, sae.n_latents)
            if max_rows is not None and fvu.rows >= max_rows:
                break
    finally:
        sae.train(was_training)
    if fvu.rows == 0:
        raise InvalidInputError("no evaluation rows were given")
    return _summarise(fvu, fire_counts_N, active_total, sae.n_latents)


def _count_by_latent(indices_BK: Tensor, fired_BK: Tensor, n_latents: int) -> Tensor:
    """Rows on which each latent fired, as float64 [n_latents]."""
    if indices_BK.shape[-1] == n_latents and indices_BK.stride(0) == 0:  # dense layout (relu_l1)
        return fired_BK.sum(dim=0, dtype=torch.float64)
    weights = fired_BK.reshape(-1).to(torch.float32)
    return torch.bincount(indices_BK.reshape(-1), weights=weights, minlength=n_latents).double()


def _summarise(
    fvu: StreamingFVU, fire_counts_N: Tensor, active_total: float, n_latents: int
) -> dict[str, Any]:
    rows = fvu.rows
    dead = int((fire_counts_N == 0).sum())
    return {
        "n_rows": rows,
        "fvu": fvu.fvu,
        "explained_variance": 1.0 - fvu.fvu,
        "mse": fvu.squared_error / rows,
        "l0": active_total / rows,
        "dead_fraction": dead / n_latents,
        "dead_latents": dead,
        "dead_definition": f"never fired on the {rows} evaluation rows",
        "density_histogram": density_histogram(fire_counts_N / rows),
    }


def density_histogram(frequency_N: Tensor) -> dict[str, Any]:
    """Counts of latents per half-decade of firing frequency; never-firing ones apart."""
    fired = frequency_N[frequency_N > 0].double()
    edges = torch.tensor(HISTOGRAM_EDGES, dtype=torch.float64)
    log_frequency = fired.log10().clamp(min=edges[0].item(), max=edges[-1].item()).cpu()
    counts = torch.histogram(log_frequency, bins=edges).hist if fired.numel() else torch.zeros(len(edges) - 1)
    return {
        "log10_frequency_edges": HISTOGRAM_EDGES,
        "counts": [int(c) for c in counts.tolist()],
        "never_fired": int((frequency_N == 0).sum()),
    }
