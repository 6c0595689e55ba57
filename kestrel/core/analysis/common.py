"""What every analysis returns, and the progress / stop plumbing they share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kestrel.core.analysis.report import Report
from kestrel.core.errors import CancelledError, InvalidInputError
from kestrel.core.runs import RunManifest

ProgressFn = Callable[[float | None, str], None]
StopFn = Callable[[], bool]
ModelLoader = Callable[[str], Any]  # model name -> LoadedModel (a worker's cache, or load_model)


@dataclass
class AnalysisOutput:
    """An analysis's result before it is written: the runner turns it into an artifact."""

    source: dict[str, Any]
    """What was analysed: run / model / layer / SAE / dataset, for the manifest."""
    key_numbers: dict[str, Any]
    """A handful of headline figures, JSON-able, copied into the manifest for listings."""
    results: dict[str, Any]
    """Everything measured, JSON-able: ``results.json``."""
    report: Report


def report_progress(progress: ProgressFn | None, fraction: float | None, message: str) -> None:
    if progress is not None:
        progress(None if fraction is None else min(max(fraction, 0.0), 0.99), message)


def check_stop(should_stop: StopFn | None, what: str) -> None:
    """Cooperative cancel between steps: nothing is published for a stopped analysis."""
    if should_stop is not None and should_stop():
        raise CancelledError(f"analysis stopped during {what}; nothing was written")


def require_loader(model_loader: ModelLoader | None, kind: str) -> ModelLoader:
    if model_loader is None:
        raise InvalidInputError(f"the {kind} analysis needs a model; no model loader was given")
    return model_loader


def stored_run_source(config: Any, manifest: RunManifest, d: int, **counts: int) -> dict[str, Any]:
    """The ``source`` of an analysis over a stored run (neuron, feature): run, layer, what was read."""
    return {
        "run_id": config.run_id,
        "layer": config.layer,
        "model": manifest.model.name,
        "d": d,
        **counts,
        "filters": config.filters.model_dump(),
    }


def stored_run_rows(source: dict[str, Any], count_label: str, count_key: str) -> list[tuple[str, Any]]:
    """The report's Source table for ``stored_run_source``."""
    return [
        ("run", source["run_id"]),
        ("model", source["model"]),
        ("layer", source["layer"]),
        ("width d", source["d"]),
        (count_label, source[count_key]),
        ("row filters", ", ".join(f"{k}={v}" for k, v in source["filters"].items())),
    ]
