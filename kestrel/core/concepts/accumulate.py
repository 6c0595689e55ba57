"""Streaming per-latent statistics in memory bounded by the SAE's size, never the dataset's.

Every firing of a latent on a row is a candidate ``(latent, value, row)``. Two selections are
kept for all latents at once by `GroupedBottomK`, a running "m smallest keys per group" merge
done with sorts and one ``topk`` over the touched groups, with no Python loop per latent or row:

* **top contexts**: per latent, key = −activation, so the m smallest keys are the top-N rows;
* **bin samples**: per (latent, histogram bin), key = a uniform random number, so the kept rows
  are a uniform sample of that bin's firings (the bottom-k / priority-sampling trick).

The histogram bins are fixed and log-spaced on the activation axis (10 per decade from 1e-3 to
1e3 by default), because the equal-width bins a feature page shows ("below the top value") are
only known once the top value is. At the end, each equal-width bin [lo, hi) takes the m
smallest keys among the kept samples of the log bins inside it; since the bottom-m of a union is
the bottom-m of the parts' bottom-m sets, that is an exact uniform sample of the bin's firings,
except where a log bin straddles a bin edge: there the kept samples are still uniform over the
log bin but may be fewer than m after the split. One pass over the data, no second forward.

Rows are named by packed ids ``doc_index << 24 | position`` (`pack_rows`), so no per-row
metadata store is needed: contexts are rebuilt at the end from the documents (see `contexts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kestrel.core.concepts.config import log_bin_count

POSITION_BITS = 24
POSITION_MASK = (1 << POSITION_BITS) - 1
EMPTY_ROW = -1
IN_TOP_CHUNK = 1024


def pack_rows(doc_index_N: Tensor, position_N: Tensor) -> Tensor:
    """One int64 per row that sorts by (document, position): ``doc << 24 | position``."""
    return (doc_index_N.to(torch.int64) << POSITION_BITS) | position_N.to(torch.int64)


def unpack_rows(rows: Tensor) -> tuple[Tensor, Tensor]:
    """(doc_index, position) of packed row ids."""
    return rows >> POSITION_BITS, rows & POSITION_MASK


class GroupedBottomK:
    """For each of ``n_groups`` groups, the ``m`` entries with the smallest keys seen so far.

    Keys are kept sorted ascending per group (``+inf`` marks an empty slot), so the last column
    is each group's admission threshold and most candidates of a long stream are rejected by one
    gather before any sorting.
    """

    def __init__(self, n_groups: int, m: int, payload: dict[str, torch.dtype]) -> None:
        self.n_groups, self.m = n_groups, m
        self.keys_GM = torch.full((n_groups, m), math.inf)
        self.payload_GM = {
            name: torch.full((n_groups, m), EMPTY_ROW if not dtype.is_floating_point else 0, dtype=dtype)
            for name, dtype in payload.items()
        }

    def update(self, group_C: Tensor, key_C: Tensor, **payload_C: Tensor) -> None:
        """Merge candidates (one per entry of ``group_C``) into the kept sets."""
        if self.m == 0 or group_C.numel() == 0:
            return
        admitted_C = key_C < self.keys_GM[group_C, -1]
        if not bool(admitted_C.any()):
            return
        group_C, key_C = group_C[admitted_C], key_C[admitted_C]
        payload_C = {name: value[admitted_C] for name, value in payload_C.items()}
        order_C = torch.argsort(key_C, stable=True)
        order_C = order_C[torch.argsort(group_C[order_C], stable=True)]
        groups_U, counts_U = torch.unique_consecutive(group_C[order_C], return_counts=True)
        slot_C = torch.repeat_interleave(torch.arange(len(groups_U)), counts_U)
        rank_C = torch.arange(len(order_C)) - (torch.cumsum(counts_U, 0) - counts_U)[slot_C]
        first_C = rank_C < self.m
        order_C, slot_C, rank_C = order_C[first_C], slot_C[first_C], rank_C[first_C]
        candidate_keys_UM = torch.full((len(groups_U), self.m), math.inf)
        candidate_keys_UM[slot_C, rank_C] = key_C[order_C]
        merged_keys_U2M = torch.cat([self.keys_GM[groups_U], candidate_keys_UM], dim=1)
        best_keys_UM, best_UM = merged_keys_U2M.topk(self.m, dim=1, largest=False, sorted=True)
        self.keys_GM[groups_U] = best_keys_UM
        for name, kept_GM in self.payload_GM.items():
            candidate_UM = torch.zeros((len(groups_U), self.m), dtype=kept_GM.dtype)
            candidate_UM[slot_C, rank_C] = payload_C[name][order_C].to(kept_GM.dtype)
            merged_U2M = torch.cat([kept_GM[groups_U], candidate_UM], dim=1)
            kept_GM[groups_U] = merged_U2M.gather(1, best_UM)

    def filled_GM(self) -> Tensor:
        return torch.isfinite(self.keys_GM)


@dataclass(frozen=True)
class LogBins:
    """Fixed log-spaced activation bins; the first and last are open-ended."""

    low: float
    high: float
    per_decade: int

    @property
    def n_bins(self) -> int:
        return log_bin_count(self.low, self.high, self.per_decade)

    def index(self, values_C: Tensor) -> Tensor:
        scaled = (torch.log10(values_C.clamp_min(1e-30)) - math.log10(self.low)) * self.per_decade
        return scaled.floor().clamp(0, self.n_bins - 1).to(torch.int64)

    def edges(self) -> Tensor:
        """n_bins + 1 edges; values below edges[1] count in bin 0, above edges[-2] in the last."""
        steps = torch.arange(self.n_bins + 1, dtype=torch.float64) / self.per_decade
        return (self.low * torch.pow(10.0, steps)).to(torch.float32)


@dataclass
class FeatureTables:
    """Per-latent results of a pass, before contexts are attached. L latents throughout."""

    top_values_LN: Tensor
    """Top activations, descending; 0 in unused slots."""
    top_rows_LN: Tensor
    """Packed rows of the top activations; -1 in unused slots."""
    bin_values_LBM: Tensor
    """Samples from B equal-width bins of (0, max]; bin b is [b·max/B, (b+1)·max/B). 0 if unused."""
    bin_rows_LBM: Tensor
    """Packed rows of the samples; -1 in unused slots. Rows already among the top are left out."""
    fire_count_L: Tensor
    max_activation_L: Tensor
    mean_activation_L: Tensor
    hist_counts_LF: Tensor
    """Firings per log-spaced bin (see `hist_edges_F1`)."""
    hist_edges_F1: Tensor
    n_rows: int


class FeatureAccumulator:
    """Top-N rows, per-bin samples, firing counts and a histogram for every latent of an SAE."""

    def __init__(
        self,
        n_latents: int,
        *,
        top_n: int,
        n_bins: int,
        samples_per_bin: int,
        log_bins: LogBins,
        seed: int = 0,
    ) -> None:
        self.n_latents, self.n_bins, self.samples_per_bin = n_latents, n_bins, samples_per_bin
        self.log_bins = log_bins
        payload = {"value": torch.float32, "row": torch.int64}
        self.top = GroupedBottomK(n_latents, top_n, payload)
        self.samples = GroupedBottomK(n_latents * log_bins.n_bins, samples_per_bin, payload)
        self.hist_counts = torch.zeros(n_latents * log_bins.n_bins, dtype=torch.int64)
        self.fire_count_L = torch.zeros(n_latents, dtype=torch.int64)
        self.act_sum_L = torch.zeros(n_latents, dtype=torch.float64)
        self.n_rows = 0
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, acts_NK: Tensor, indices_NK: Tensor, rows_N: Tensor) -> None:
        """One batch of encoded rows: the SAE's (value, index) pairs and each row's packed id."""
        self.n_rows += len(rows_N)
        fired_NK = acts_NK > 0
        values_C = acts_NK[fired_NK].to(device="cpu", dtype=torch.float32)
        latents_C = indices_NK[fired_NK].to(device="cpu", dtype=torch.int64)
        rows_C = rows_N.to("cpu")[:, None].expand(fired_NK.shape)[fired_NK.cpu()]
        self.fire_count_L += torch.bincount(latents_C, minlength=self.n_latents)
        self.act_sum_L += torch.bincount(latents_C, weights=values_C.double(), minlength=self.n_latents)
        log_group_C = latents_C * self.log_bins.n_bins + self.log_bins.index(values_C)
        self.hist_counts += torch.bincount(log_group_C, minlength=len(self.hist_counts))
        self.top.update(latents_C, -values_C, value=values_C, row=rows_C)
        random_keys_C = torch.rand(len(values_C), generator=self.generator)
        self.samples.update(log_group_C, random_keys_C, value=values_C, row=rows_C)

    def finish(self) -> FeatureTables:
        """Turn the kept sets into tables; the equal-width bins are chosen here (module docstring)."""
        top_filled_LN = self.top.filled_GM()
        top_values_LN = torch.where(top_filled_LN, self.top.payload_GM["value"], 0.0)
        top_rows_LN = torch.where(top_filled_LN, self.top.payload_GM["row"], EMPTY_ROW)
        max_L = top_values_LN[:, 0]
        bin_values_LBM, bin_rows_LBM = self._equal_width_samples(max_L, top_rows_LN)
        fired_L = self.fire_count_L.clamp_min(1)
        return FeatureTables(
            top_values_LN=top_values_LN,
            top_rows_LN=top_rows_LN,
            bin_values_LBM=bin_values_LBM,
            bin_rows_LBM=bin_rows_LBM,
            fire_count_L=self.fire_count_L.clone(),
            max_activation_L=max_L.clone(),
            mean_activation_L=(self.act_sum_L / fired_L).to(torch.float32),
            hist_counts_LF=self.hist_counts.view(self.n_latents, self.log_bins.n_bins).clone(),
            hist_edges_F1=self.log_bins.edges(),
            n_rows=self.n_rows,
        )

    def _equal_width_samples(self, max_L: Tensor, top_rows_LN: Tensor) -> tuple[Tensor, Tensor]:
        n_latents, n_bins, m = self.n_latents, self.n_bins, self.samples_per_bin
        width = self.log_bins.n_bins * m
        keys_LX = self.samples.keys_GM.view(n_latents, width)
        values_LX = self.samples.payload_GM["value"].view(n_latents, width)
        rows_LX = self.samples.payload_GM["row"].view(n_latents, width)
        valid_LX = torch.isfinite(keys_LX) & ~_in_top(rows_LX, top_rows_LN)
        scale_L1 = (n_bins / max_L.clamp_min(torch.finfo(torch.float32).tiny))[:, None]
        bin_LX = (values_LX * scale_L1).floor().to(torch.int64).clamp(0, n_bins - 1)
        latent_LX = torch.arange(n_latents)[:, None].expand_as(bin_LX)
        chosen = GroupedBottomK(n_latents * n_bins, m, {"value": torch.float32, "row": torch.int64})
        chosen.update(
            (latent_LX * n_bins + bin_LX)[valid_LX],
            keys_LX[valid_LX],
            value=values_LX[valid_LX],
            row=rows_LX[valid_LX],
        )
        filled_GM = chosen.filled_GM()
        values_GM = torch.where(filled_GM, chosen.payload_GM["value"], 0.0)
        rows_GM = torch.where(filled_GM, chosen.payload_GM["row"], EMPTY_ROW)
        values_GM, order_GM = values_GM.sort(dim=1, descending=True)  # strongest first within a bin
        rows_GM = rows_GM.gather(1, order_GM)
        return values_GM.view(n_latents, n_bins, m), rows_GM.view(n_latents, n_bins, m)


def _in_top(rows_LX: Tensor, top_rows_LN: Tensor) -> Tensor:
    """Which kept samples are already among their latent's top rows (chunked over latents)."""
    out_LX = torch.zeros(rows_LX.shape, dtype=torch.bool)
    for start in range(0, len(rows_LX), IN_TOP_CHUNK):
        block = slice(start, start + IN_TOP_CHUNK)
        out_LX[block] = (rows_LX[block, :, None] == top_rows_LN[block, None, :]).any(dim=-1)
    return out_LX & (rows_LX != EMPTY_ROW)
