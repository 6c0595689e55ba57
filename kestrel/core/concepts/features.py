"""Reading discovered features: a searchable list, and one latent's page."""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch

from kestrel.core.concepts.contexts import PAD_TOKEN
from kestrel.core.concepts.dictionary import (
    Concept,
    ScoreName,
    read_dictionary,
    score_of,
    scores_at_least,
)
from kestrel.core.concepts.store import FeatureReader
from kestrel.core.errors import InvalidInputError
from kestrel.core.store import LocalStore

FeatureSort = Literal["latent", "density", "max_activation", "detection", "fuzz", "embedding"]
#: Sorts by a label score (highest first; unscored latents last).
SCORE_SORTS: tuple[str, ...] = get_args(ScoreName)
LIST_TENSORS = (
    "fire_count",
    "density",
    "max_activation",
    "mean_activation",
    "top_token_ids",
    "logit_pos_ids",
)
LIST_LOGITS = 5


def list_features(
    store: LocalStore,
    sae_id: str,
    *,
    search: str | None = None,
    source: str | None = None,
    include_dead: bool = True,
    sort: FeatureSort = "latent",
    min_score: dict[str, float] | None = None,
    offset: int = 0,
    limit: int = 50,
) -> dict[str, Any]:
    """A page of latents with their statistics, top tokens and names.

    ``search`` matches (case-insensitively) the name, description and tags, and the top tokens and
    promoted tokens, so "bake" finds a latent named "baking" and one that fires on " bake".
    ``source`` keeps latents whose concept came from there (manual, heuristic, model);
    ``min_score`` ({"detection": 0.7, ...}) keeps latents whose label scored at least that.
    A list item's scores leave out their examples (the feature page has them).
    """
    if offset < 0 or limit <= 0:
        raise InvalidInputError(f"offset must be >= 0 and limit > 0, got offset={offset}, limit={limit}")
    if sort not in get_args(FeatureSort):
        raise InvalidInputError(f"unknown sort {sort!r}; use one of {', '.join(get_args(FeatureSort))}")
    unknown = sorted(set(min_score or {}) - set(SCORE_SORTS))
    if unknown:
        raise InvalidInputError(f"unknown score(s) {unknown}; use {', '.join(SCORE_SORTS)}")
    reader = FeatureReader(store, sae_id)
    stats = reader.full(*LIST_TENSORS)
    concepts = read_dictionary(store, sae_id)
    order = _order(stats, sort, concepts)
    needle = search.strip().lower() if search else None
    matches: list[dict[str, Any]] = []
    total = 0
    for latent in order.tolist():
        if not include_dead and int(stats["fire_count"][latent]) == 0:
            continue
        concept = concepts.get(latent)
        if source is not None and (concept is None or concept.source != source):
            continue
        if min_score and not scores_at_least(concept, min_score):
            continue
        item = None
        if needle is not None:
            item = _list_item(reader, stats, latent, concept)
            if not _matches(item, needle):
                continue
        total += 1
        if offset < total <= offset + limit:
            matches.append(item or _list_item(reader, stats, latent, concept))
    return {
        "sae_id": sae_id,
        "total": total,
        "offset": offset,
        "limit": limit,
        "n_latents": reader.n_latents,
        "version": reader.manifest["version"],
        "items": matches,
    }


def _order(stats: dict[str, torch.Tensor], sort: FeatureSort, concepts: dict[int, Concept]) -> torch.Tensor:
    if sort == "latent":
        return torch.arange(len(stats["density"]))
    if sort in SCORE_SORTS:
        values = torch.full((len(stats["density"]),), -1.0, dtype=torch.float64)
        for latent, concept in concepts.items():
            value = score_of(concept, sort)
            if value is not None and latent < len(values):
                values[latent] = value
        return torch.argsort(values, descending=True, stable=True)
    return torch.argsort(stats[sort], descending=True, stable=True)


def concept_json(concept: Concept | None, *, examples: bool = True) -> dict[str, Any] | None:
    """A concept as JSON; without ``examples``, its scores leave their examples out."""
    if concept is None:
        return None
    data = concept.model_dump(mode="json")
    if not examples and data.get("scores"):
        data["scores"]["examples"] = []
    return data


def _list_item(
    reader: FeatureReader, stats: dict[str, torch.Tensor], latent: int, concept: Concept | None
) -> dict[str, Any]:
    return {
        "latent": latent,
        "fire_count": int(stats["fire_count"][latent]),
        "density": float(stats["density"][latent]),
        "max_activation": float(stats["max_activation"][latent]),
        "mean_activation": float(stats["mean_activation"][latent]),
        "top_tokens": [reader.token(t) for t in stats["top_token_ids"][latent].tolist() if t != PAD_TOKEN],
        "promoted_tokens": [reader.token(t) for t in stats["logit_pos_ids"][latent][:LIST_LOGITS].tolist()],
        "concept": concept_json(concept, examples=False),
    }


def _matches(item: dict[str, Any], needle: str) -> bool:
    concept = item["concept"] or {}
    haystack = [
        concept.get("name", ""),
        concept.get("description", ""),
        *concept.get("tags", []),
        *item["top_tokens"],
        *item["promoted_tokens"],
    ]
    return any(needle in text.lower() for text in haystack)


#: What one latent's page reads (a slice of each per-latent tensor).
PAGE_TENSORS = (
    "fire_count",
    "density",
    "max_activation",
    "mean_activation",
    "hist_counts",
    "top_values",
    "top_rows",
    "top_windows",
    "bin_values",
    "bin_rows",
    "bin_windows",
    "top_token_ids",
    "top_token_counts",
    "logit_pos_ids",
    "logit_pos_values",
    "logit_neg_ids",
    "logit_neg_values",
)


def feature_page(store: LocalStore, sae_id: str, latent: int) -> dict[str, Any]:
    """Everything a feature's page shows: statistics, histogram, contexts, bins, logit effects, name."""
    reader = FeatureReader(store, sae_id)
    t = reader.latent(latent, *PAGE_TENSORS)
    edges = reader.full("hist_edges")["hist_edges"]
    center = int(reader.manifest["window_center"])
    max_activation = float(t["max_activation"])
    n_bins = t["bin_values"].shape[0]
    concept = read_dictionary(store, sae_id).get(latent)
    return {
        "sae_id": sae_id,
        "latent": latent,
        "version": reader.manifest["version"],
        "fire_count": int(t["fire_count"]),
        "density": float(t["density"]),
        "max_activation": max_activation,
        "mean_activation": float(t["mean_activation"]),
        "histogram": {"edges": [float(e) for e in edges.tolist()], "counts": t["hist_counts"].tolist()},
        "top_contexts": _contexts(reader, t["top_values"], t["top_rows"], t["top_windows"], center),
        "bins": [
            {
                "lower": max_activation * b / n_bins,
                "upper": max_activation * (b + 1) / n_bins,
                "contexts": _contexts(
                    reader, t["bin_values"][b], t["bin_rows"][b], t["bin_windows"][b], center
                ),
            }
            for b in range(n_bins)
        ],
        "top_tokens": [
            {"token": reader.token(i), "count": int(c)}
            for i, c in zip(t["top_token_ids"].tolist(), t["top_token_counts"].tolist(), strict=True)
            if i != PAD_TOKEN
        ],
        "logits": {
            "positive": _logits(reader, t["logit_pos_ids"], t["logit_pos_values"]),
            "negative": _logits(reader, t["logit_neg_ids"], t["logit_neg_values"]),
            "note": reader.manifest.get("logit_effects"),
        },
        "concept": concept.model_dump(mode="json") if concept is not None else None,
    }


def _contexts(
    reader: FeatureReader, values: torch.Tensor, rows: torch.Tensor, windows: torch.Tensor, center: int
) -> list[dict[str, Any]]:
    out = []
    for value, row, window in zip(values.tolist(), rows.tolist(), windows.tolist(), strict=True):
        if row < 0:
            continue
        leading = next((i for i, tok in enumerate(window) if tok != PAD_TOKEN), len(window))
        tokens = [reader.token(tok) for tok in window if tok != PAD_TOKEN]
        out.append(
            {
                "doc_index": row >> 24,
                "position": row & ((1 << 24) - 1),
                "activation": value,
                "tokens": tokens,
                "target": center - leading,
            }
        )
    return out


def _logits(reader: FeatureReader, ids: torch.Tensor, values: torch.Tensor) -> list[dict[str, Any]]:
    return [
        {"token": reader.token(i), "token_id": int(i), "value": float(v)}
        for i, v in zip(ids.tolist(), values.tolist(), strict=True)
    ]
