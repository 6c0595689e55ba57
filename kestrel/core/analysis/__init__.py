"""Analyses of stored runs and of models, each written as an artifact with a readable report.

* ``neuron``: per-dimension statistics of a stored layer (one streaming pass), outliers named;
* ``feature``: PCA and k-means clusters of a stored layer, with the contexts nearest each centre;
* ``causal``: zero / mean ablation of layers or SAE latents, Δ next-token loss and KL, ranked;
* ``circuit``: activation patching between clean and corrupted prompts, layer × position.

``run_analysis(store, config, ...)`` runs any of them and publishes
``analyses/<id>/{manifest.json, results.json, report.md, plots/*.png}`` (docs/store-format.md).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Loaded on first use (PEP 562), so importing the configs (the API's schemas do) does not pull
# in matplotlib and scikit-learn: the API process validates requests and never draws a plot.
_CONFIG_NAMES = (
    "AnalysisConfig",
    "AnalysisKind",
    "CausalConfig",
    "CircuitConfig",
    "FeatureConfig",
    "NeuronConfig",
    "PromptPair",
    "parse_config",
)
# Store reads: torch-free, so the API serves them without the engine.
_RECORD_NAMES = (
    "KIND",
    "delete_analysis",
    "get_analysis",
    "get_results",
    "list_analyses",
    "plot_path",
    "report_path",
)
_RUNNER_NAMES = ("run_analysis",)


def __getattr__(name: str) -> Any:
    if name in _CONFIG_NAMES:
        return getattr(import_module("kestrel.core.analysis.config"), name)
    if name in _RECORD_NAMES:
        return getattr(import_module("kestrel.core.analysis.records"), name)
    if name in _RUNNER_NAMES:
        return getattr(import_module("kestrel.core.analysis.runner"), name)
    raise AttributeError(f"module 'kestrel.core.analysis' has no attribute {name!r}")


__all__ = sorted((*_CONFIG_NAMES, *_RECORD_NAMES, *_RUNNER_NAMES))
