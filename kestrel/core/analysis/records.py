"""Analyses as the store holds them: list, read, the report and plots by name, delete.

Running one is `kestrel.core.analysis.runner` (numpy, matplotlib, scikit-learn, torch); these
reads need none of it, so the API process serves them without loading the engine.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kestrel.core.errors import NotFoundError
from kestrel.core.store import Store, read_manifests, validate_id

KIND = "analyses"
PLOT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def list_analyses(store: Store) -> list[dict[str, Any]]:
    """Manifests of every complete analysis, newest first."""
    manifests = read_manifests(store, KIND)
    return sorted(manifests, key=lambda m: (m.get("created", ""), m["id"]), reverse=True)


def get_analysis(store: Store, analysis_id: str) -> dict[str, Any]:
    return store.read_json(KIND, validate_id(analysis_id, "analysis id"))


def get_results(store: Store, analysis_id: str) -> dict[str, Any]:
    return store.read_json(KIND, validate_id(analysis_id, "analysis id"), "results.json")


def report_path(store: Store, analysis_id: str) -> Path:
    """A local copy of the report (a remote store caches it first)."""
    return store.local_path(KIND, validate_id(analysis_id, "analysis id"), "report.md")


def plot_path(store: Store, analysis_id: str, name: str) -> Path:
    """A plot's PNG by name (``patching`` or ``patching.png``); 404 listing the plots there are."""
    manifest = get_analysis(store, analysis_id)
    stem = name[:-4] if name.endswith(".png") else name
    if not PLOT_NAME.fullmatch(stem) or stem not in manifest.get("plots", []):
        available = ", ".join(manifest.get("plots", [])) or "none"
        raise NotFoundError(
            f"analysis {analysis_id!r} has no plot {name!r}; its plots: {available}",
            details={"id": analysis_id, "plot": name, "plots": manifest.get("plots", [])},
        )
    return store.local_path(KIND, analysis_id, f"plots/{stem}.png")


def delete_analysis(store: Store, analysis_id: str) -> None:
    store.delete(KIND, validate_id(analysis_id, "analysis id"))
