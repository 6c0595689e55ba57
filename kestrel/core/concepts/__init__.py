"""Concepts: what each SAE latent responds to (discovery), what it is called (the dictionary),
and automatic names for it (labels).

    manifest = discover(store, sae_id, lm)                   # over the SAE's own training run
    manifest = discover(store, sae_id, lm, dataset=texts)    # or any dataset, through the model
    page = feature_page(store, sae_id, 12)                   # contexts, bins, histogram, logits
    label_features(store, sae_id, "heuristic")               # names from tokens and logit effects

Names load on first use (PEP 562), so importing the torch-free parts (``.config``, the
dictionary) does not pull in discovery and torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_MODULE_OF = {
    **dict.fromkeys(
        (
            "Concept",
            "delete_concept",
            "export_dictionary",
            "get_concept",
            "import_dictionary",
            "LabelScores",
            "parse_dictionary",
            "read_dictionary",
            "set_scores",
            "update_concepts",
        ),
        "dictionary",
    ),
    **dict.fromkeys(("DiscoveryConfig", "ScoringConfig"), "config"),
    **dict.fromkeys(("DiscoveryProgress", "discover"), "discovery"),
    **dict.fromkeys(("feature_page", "list_features"), "features"),
    "label_features": "labels",
    "read_manifest": "store",
}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'kestrel.core.concepts' has no attribute {name!r}")
    return getattr(import_module(f"kestrel.core.concepts.{module}"), name)


__all__ = sorted(_MODULE_OF)
