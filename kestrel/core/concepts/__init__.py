"""Concepts: what each SAE latent responds to (discovery), what it is called (the dictionary),
and automatic names for it (labels).

    manifest = discover(store, sae_id, lm)                   # over the SAE's own training run
    manifest = discover(store, sae_id, lm, dataset=texts)    # or any dataset, through the model
    page = feature_page(store, sae_id, 12)                   # contexts, bins, histogram, logits
    label_features(store, sae_id, "heuristic")               # names from tokens and logit effects
"""

from kestrel.core.concepts.dictionary import (
    Concept,
    delete_concept,
    export_dictionary,
    get_concept,
    import_dictionary,
    parse_dictionary,
    read_dictionary,
    update_concepts,
)
from kestrel.core.concepts.discovery import DiscoveryConfig, DiscoveryProgress, discover
from kestrel.core.concepts.features import feature_page, list_features
from kestrel.core.concepts.labels import label_features
from kestrel.core.concepts.store import read_manifest

__all__ = [
    "Concept",
    "DiscoveryConfig",
    "DiscoveryProgress",
    "delete_concept",
    "discover",
    "export_dictionary",
    "feature_page",
    "get_concept",
    "import_dictionary",
    "label_features",
    "list_features",
    "parse_dictionary",
    "read_dictionary",
    "read_manifest",
    "update_concepts",
]
