"""Analyses as the store holds them: list, read, the report and plots by name, delete.

Running one is `kestrel.core.analysis.runner` (numpy, matplotlib, scikit-learn, torch); these
reads need none of it, so the API process serves them without loading the engine.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from kestrel.core.errors import NotFoundError
from kestrel.core.store import Store, StoredManifest, read_typed_manifests, validate_id

KIND = "analyses"
FORMAT_VERSION = 1
PLOT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
AnalysisKind = Literal["neuron", "feature", "causal", "circuit", "graph"]


class AnalysisManifest(StoredManifest):
    """An analysis's manifest.json (docs/store-format.md), written last by `run_analysis`."""

    format_version: int = FORMAT_VERSION
    id: str
    kind: AnalysisKind
    title: str
    created: str
    source: dict[str, Any] = Field(description="what was analysed: run, model, layer(s), SAE, dataset")
    config: dict[str, Any] = Field(description="the validated config, as sent")
    key_numbers: dict[str, Any] = Field(description="the headline figures of the report")
    plots: list[str] = Field(description="names for GET /v1/analyses/{id}/plots/{name}")
    files: list[str] = Field(default_factory=list, description="the artifact's files besides manifest.json")
    seconds: float | None = Field(None, description="wall time of the analysis")


def list_analyses(store: Store) -> list[AnalysisManifest]:
    """Manifests of every complete analysis, newest first."""
    manifests = read_typed_manifests(store, KIND, AnalysisManifest)
    return sorted(manifests, key=lambda m: (m.created, m.id), reverse=True)


def get_analysis(store: Store, analysis_id: str) -> AnalysisManifest:
    return AnalysisManifest.model_validate(store.read_json(KIND, validate_id(analysis_id, "analysis id")))


def get_results(store: Store, analysis_id: str) -> dict[str, Any]:
    return store.read_json(KIND, validate_id(analysis_id, "analysis id"), "results.json")


def report_path(store: Store, analysis_id: str) -> Path:
    """A local copy of the report (a remote store caches it first)."""
    return store.local_path(KIND, validate_id(analysis_id, "analysis id"), "report.md")


def plot_path(store: Store, analysis_id: str, name: str) -> Path:
    """A plot's PNG by name (``patching`` or ``patching.png``); 404 listing the plots there are."""
    manifest = get_analysis(store, analysis_id)
    stem = name[:-4] if name.endswith(".png") else name
    if not PLOT_NAME.fullmatch(stem) or stem not in manifest.plots:
        available = ", ".join(manifest.plots) or "none"
        raise NotFoundError(
            f"analysis {analysis_id!r} has no plot {name!r}; its plots: {available}",
            details={"id": analysis_id, "plot": name, "plots": manifest.plots},
        )
    return store.local_path(KIND, analysis_id, f"plots/{stem}.png")


def delete_analysis(store: Store, analysis_id: str) -> None:
    store.delete(KIND, validate_id(analysis_id, "analysis id"))
