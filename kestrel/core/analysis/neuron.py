"""Per-dimension statistics of a stored layer: mean, std, min/max, fraction active, kurtosis.

One streaming pass over the run (``iter_row_batches``), shard by shard, so memory is one batch
whatever the run's size. Moments are merged batch by batch in float64 with the pairwise update of
Chan et al. / Pébay (central moments M2, M3, M4), not raw power sums: residual streams have
dimensions whose mean is far larger than their spread, and Σx⁴ − (…) cancels catastrophically
there even in float64.

Definitions (stated in the report too):

* std is the population standard deviation √(M2 / n);
* kurtosis is the **excess** kurtosis n·M4 / M2² − 3 (0 for a Gaussian, undefined → 0 when M2 = 0);
* fraction active is the share of rows where the value is > 0;
* an outlier dimension is one whose |mean| exceeds ``outlier_factor`` × the median std over all
  dimensions (a constant offset far larger than a typical dimension's spread), or whose max |x|
  exceeds ``outlier_factor`` × the median max |x| (rare, huge values). The |mean| is compared to
  the spread, not to the median |mean|, which is near 0 for a symmetric layer and would flag noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kestrel.core.analysis.common import (
    AnalysisOutput,
    ProgressFn,
    StopFn,
    check_stop,
    report_progress,
    stored_run_rows,
    stored_run_source,
)
from kestrel.core.analysis.config import NeuronConfig
from kestrel.core.analysis.report import Report, new_figure, table
from kestrel.core.errors import InvalidInputError
from kestrel.core.run_reader import iter_row_batches
from kestrel.core.runs import get_manifest
from kestrel.core.store import Store

BATCH_ROWS = 8192


@dataclass
class Moments:
    """Running count, mean and central moment sums per dimension (float64), plus extremes."""

    n: int
    mean_D: np.ndarray
    m2_D: np.ndarray
    m3_D: np.ndarray
    m4_D: np.ndarray
    min_D: np.ndarray
    max_D: np.ndarray
    active_D: np.ndarray

    @classmethod
    def of_batch(cls, x_ND: np.ndarray) -> Moments:
        mean_D = x_ND.mean(axis=0)
        centred_ND = x_ND - mean_D
        sq_ND = centred_ND * centred_ND
        return cls(
            n=len(x_ND),
            mean_D=mean_D,
            m2_D=sq_ND.sum(axis=0),
            m3_D=(sq_ND * centred_ND).sum(axis=0),
            m4_D=(sq_ND * sq_ND).sum(axis=0),
            min_D=x_ND.min(axis=0),
            max_D=x_ND.max(axis=0),
            active_D=(x_ND > 0).sum(axis=0).astype(np.int64),
        )

    def merge(self, other: Moments) -> Moments:
        """Combine two disjoint sets of rows exactly (Pébay 2008, eq. 2.1-2.3 for p = 2, 3, 4)."""
        na, nb = float(self.n), float(other.n)
        n = na + nb
        delta = other.mean_D - self.mean_D
        d_n = delta / n
        m2 = self.m2_D + other.m2_D + delta * d_n * na * nb
        m3 = (
            self.m3_D
            + other.m3_D
            + delta * d_n * d_n * na * nb * (na - nb)
            + 3.0 * d_n * (na * other.m2_D - nb * self.m2_D)
        )
        m4 = (
            self.m4_D
            + other.m4_D
            + delta * d_n**3 * na * nb * (na * na - na * nb + nb * nb)
            + 6.0 * d_n * d_n * (na * na * other.m2_D + nb * nb * self.m2_D)
            + 4.0 * d_n * (na * other.m3_D - nb * self.m3_D)
        )
        return Moments(
            n=int(n),
            mean_D=self.mean_D + d_n * nb,
            m2_D=m2,
            m3_D=m3,
            m4_D=m4,
            min_D=np.minimum(self.min_D, other.min_D),
            max_D=np.maximum(self.max_D, other.max_D),
            active_D=self.active_D + other.active_D,
        )

    def std(self) -> np.ndarray:
        return np.sqrt(self.m2_D / self.n)

    def excess_kurtosis(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            kurt_D = self.n * self.m4_D / (self.m2_D * self.m2_D) - 3.0
        return np.where(self.m2_D > 0, kurt_D, 0.0)


def stream_moments(
    store: Store,
    run_id: str,
    layer: str,
    config: NeuronConfig,
    total: int,
    progress: ProgressFn | None,
    should_stop: StopFn | None,
) -> Moments:
    """One pass over the run's rows of ``layer``; at most ``config.max_rows`` rows."""
    moments: Moments | None = None
    batches = iter_row_batches(store, run_id, layer, batch_size=BATCH_ROWS, filters=config.filters)
    for batch in batches:
        check_stop(should_stop, "the statistics pass")
        x_ND = batch.acts_ND.to(torch.float64).numpy()
        if config.max_rows is not None:
            x_ND = x_ND[: config.max_rows - (moments.n if moments is not None else 0)]
        if len(x_ND) == 0:
            break
        part = Moments.of_batch(x_ND)
        moments = part if moments is None else moments.merge(part)
        report_progress(progress, moments.n / max(total, 1), f"{moments.n:,} rows")
        if config.max_rows is not None and moments.n >= config.max_rows:
            break
    if moments is None:
        raise InvalidInputError(
            f"run {run_id!r} layer {layer!r} has no rows left after the filters; "
            "relax filters (skip_position_0, skip_special, max_norm_multiple)"
        )
    return moments


def outliers(values_D: np.ndarray, reference_D: np.ndarray, factor: float) -> tuple[list[int], float]:
    """Dimensions whose value exceeds ``factor`` × the median of ``reference_D``, largest first;
    and that threshold."""
    threshold = float(factor * np.median(reference_D))
    index = np.flatnonzero(values_D > threshold) if threshold > 0 else np.flatnonzero(values_D > 0)
    return [int(i) for i in index[np.argsort(-values_D[index])]], threshold


def analyze(
    store: Store,
    config: NeuronConfig,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    **_: object,
) -> AnalysisOutput:
    manifest = get_manifest(store, config.run_id)
    manifest.layer(config.layer)  # NotFoundError naming the run's layers
    total = min(manifest.n_tokens, config.max_rows or manifest.n_tokens)
    moments = stream_moments(store, config.run_id, config.layer, config, total, progress, should_stop)
    stats = {
        "mean": moments.mean_D,
        "std": moments.std(),
        "min": moments.min_D,
        "max": moments.max_D,
        "fraction_active": moments.active_D / moments.n,
        "kurtosis": moments.excess_kurtosis(),
    }
    abs_mean_D = np.abs(moments.mean_D)
    max_abs_D = np.maximum(np.abs(moments.min_D), np.abs(moments.max_D))
    by_mean, mean_threshold = outliers(abs_mean_D, stats["std"], config.outlier_factor)
    by_max, max_threshold = outliers(max_abs_D, max_abs_D, config.outlier_factor)
    named = sorted(set(by_mean) | set(by_max), key=lambda i: -max_abs_D[i])
    top_kurtosis = [int(i) for i in np.argsort(-stats["kurtosis"])[: config.top_n]]
    d = len(moments.mean_D)
    source = stored_run_source(config, manifest, d, n_rows=moments.n)
    key_numbers = {
        "rows": moments.n,
        "dimensions": d,
        "outlier_dimensions": named[: config.top_n],
        "n_outliers": len(named),
        "median_abs_mean": float(np.median(abs_mean_D)),
        "median_std": float(np.median(stats["std"])),
        "median_kurtosis": float(np.median(stats["kurtosis"])),
        "max_kurtosis": float(stats["kurtosis"].max()),
    }
    results = {
        "definitions": {
            "std": "population standard deviation sqrt(M2 / n)",
            "kurtosis": "excess kurtosis n*M4/M2^2 - 3 (0 for a Gaussian)",
            "fraction_active": "share of rows with value > 0",
            "outlier_rule": (
                f"|mean| > {config.outlier_factor:g} x the median std, "
                f"or max|x| > {config.outlier_factor:g} x the median max|x|, over dimensions"
            ),
        },
        "n_rows": moments.n,
        "per_dimension": {name: values.astype(float).tolist() for name, values in stats.items()},
        "outliers": {
            "by_abs_mean": by_mean,
            "abs_mean_threshold": mean_threshold,
            "by_max_abs": by_max,
            "max_abs_threshold": max_threshold,
            "named": named,
        },
        "top_kurtosis": top_kurtosis,
    }
    report = _report(
        config,
        source,
        key_numbers,
        stats,
        abs_mean_D,
        max_abs_D,
        named,
        top_kurtosis,
        (mean_threshold, max_threshold),
    )
    return AnalysisOutput(source, key_numbers, results, report)


def _dimension_rows(dims: list[int], stats: dict[str, np.ndarray]) -> list[list[object]]:
    return [
        [i, *(float(stats[name][i]) for name in ("mean", "std", "min", "max", "fraction_active", "kurtosis"))]
        for i in dims
    ]


def _report(config, source, key_numbers, stats, abs_mean_D, max_abs_D, named, top_kurtosis, thresholds):
    header = ["dim", "mean", "std", "min", "max", "frac > 0", "excess kurtosis"]
    rule = (
        f"A dimension is named an **outlier** when its |mean| exceeds {config.outlier_factor:g}× the "
        f"median std over all dimensions (threshold {thresholds[0]:.4g}), or its max |x| exceeds "
        f"{config.outlier_factor:g}× the median max |x| (threshold {thresholds[1]:.4g})."
    )
    outlier_body = (
        rule
        + "\n\n"
        + (
            table(header, _dimension_rows(named[: config.top_n], stats))
            if named
            else "No dimension is an outlier."
        )
    )
    report = Report(
        title=config.title or f"Neuron statistics: {config.layer} of run {config.run_id}",
        measured=(
            "For every dimension of the layer's activations: mean, standard deviation (population), "
            "minimum and maximum, the fraction of rows where the value is > 0, and the **excess** "
            "kurtosis (n·M4/M2² − 3, so 0 for a Gaussian; heavy-tailed dimensions score high). "
            "Computed exactly in float64 in one streaming pass over the stored rows."
        ),
        source=stored_run_rows(source, "rows read", "n_rows"),
        key_numbers=[
            ("outlier dimensions", ", ".join(map(str, named[:20])) or "none"),
            ("median |mean|", key_numbers["median_abs_mean"]),
            ("median std", key_numbers["median_std"]),
            ("median excess kurtosis", key_numbers["median_kurtosis"]),
            ("max excess kurtosis", key_numbers["max_kurtosis"]),
        ],
        sections=[
            ("Outlier dimensions", outlier_body),
            (
                f"Highest excess kurtosis (top {len(top_kurtosis)})",
                table(header, _dimension_rows(top_kurtosis, stats)),
            ),
        ],
        notes=[
            "Outlier dimensions with a large |mean| are often constant offsets (e.g. massive activations); "
            "ones with a large max |x| but ordinary mean fire rarely and strongly.",
            "High excess kurtosis marks heavy-tailed, sparse-looking dimensions; near 0 is Gaussian-like.",
            "Every number is in results.json, per dimension, under per_dimension.",
        ],
    )
    report.add_plot(
        "dimensions",
        "|mean|, std and max |x| per dimension; dashed: outlier thresholds",
        _dimensions_figure(abs_mean_D, stats["std"], max_abs_D, thresholds),
    )
    report.add_plot(
        "kurtosis",
        "Excess kurtosis per dimension (histogram, log count)",
        _kurtosis_figure(stats["kurtosis"]),
    )
    return report


def _dimensions_figure(abs_mean_D, std_D, max_abs_D, thresholds):
    figure = new_figure(9, 6)
    axes = figure.subplots(3, 1, sharex=True)
    dims = np.arange(len(abs_mean_D))
    for ax, values, label, threshold in (
        (axes[0], abs_mean_D, "|mean|", thresholds[0]),
        (axes[1], std_D, "std", None),
        (axes[2], max_abs_D, "max |x|", thresholds[1]),
    ):
        # one polygon per panel, not one bar per dimension: d can be in the thousands
        ax.fill_between(dims, values, step="mid", color="tab:blue", linewidth=0)
        if threshold is not None and threshold > 0:
            ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1)
        ax.set_ylabel(label)
        if values.max() > 0 and values.max() > 50 * max(np.median(values), 1e-12):
            ax.set_yscale("log")
    axes[2].set_xlabel("dimension")
    return figure


def _kurtosis_figure(kurtosis_D):
    figure = new_figure(7, 4)
    ax = figure.subplots()
    ax.hist(kurtosis_D, bins=min(60, max(10, len(kurtosis_D) // 4)), color="tab:purple", log=True)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("excess kurtosis")
    ax.set_ylabel("dimensions")
    return figure
