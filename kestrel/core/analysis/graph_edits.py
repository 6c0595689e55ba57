"""Edits of an attribution graph's feature nodes (issue #15): the request, and its check against
a stored ``graph`` analysis, without torch.

A researcher pins nodes of a graph and tests them on the real model (`graph_intervention`): each
edit names a feature node (``<layer>_<latent>_<position>``) and either a ``scale`` of its
activation at its position (0 ablates, 2 doubles, -1 flips) or an absolute ``value``. The API
checks a request here before queueing it (the analysis is a graph, each node is one of its
feature nodes, each block's transcoder is still stored), and the worker checks it again with the
same functions before it loads anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field, model_validator

from kestrel.core.analysis.records import AnalysisManifest, get_analysis, get_results
from kestrel.core.config import StrictModel
from kestrel.core.errors import ConflictError, InvalidInputError, NotFoundError, close_matches
from kestrel.core.sae.records import get_sae, transcoder_blocks
from kestrel.core.store import Store

MAX_EDITS = 64
MAX_TOP_K = 50
MAX_NEW_TOKENS = 64
MAX_MAGNITUDE = 1e4


class NodeEdit(StrictModel):
    """One feature node's activation at its position: ``scale`` × what it is, or ``value``."""

    node: str = Field(
        min_length=1, max_length=64, description="a feature node id: <layer>_<latent>_<position>"
    )
    scale: float | None = Field(
        None,
        ge=-MAX_MAGNITUDE,
        le=MAX_MAGNITUDE,
        description="multiply the activation (0 ablates, 2 doubles, -1 flips)",
    )
    value: float | None = Field(
        None, ge=-MAX_MAGNITUDE, le=MAX_MAGNITUDE, description="set the activation to this value"
    )

    @model_validator(mode="after")
    def _one_of(self) -> NodeEdit:
        if (self.scale is None) == (self.value is None):  # NaN and ±inf: StrictModel refuses them
            raise ValueError(f"edit of node {self.node!r}: give exactly one of scale and value")
        return self


class GraphInterventionRequest(StrictModel):
    """Edits of a graph's feature nodes, run on the real model; what to report."""

    edits: list[NodeEdit] = Field(min_length=1, max_length=MAX_EDITS)
    top_k: int = Field(10, ge=1, le=MAX_TOP_K, description="next tokens listed before and after")
    max_new_tokens: int = Field(
        0, ge=0, le=MAX_NEW_TOKENS, description="greedy tokens generated before and after (0: none)"
    )

    @model_validator(mode="after")
    def _distinct(self) -> GraphInterventionRequest:
        nodes = [edit.node for edit in self.edits]
        repeated = sorted({node for node in nodes if nodes.count(node) > 1})
        if repeated:
            raise ValueError(f"nodes {repeated} are edited more than once: give one edit per node")
        return self


@dataclass(frozen=True)
class FeatureEdit:
    """An edit resolved against the graph: which transcoder latent, at which block and position."""

    node: str
    sae_id: str
    layer: int
    position: int
    latent: int
    scale: float | None
    value: float | None


@dataclass(frozen=True)
class CheckedIntervention:
    """What the worker needs: the graph's results and manifest, its transcoders, the edits."""

    manifest: AnalysisManifest
    results: dict[str, Any]
    transcoders: dict[int, str]
    edits: list[FeatureEdit]

    @property
    def model(self) -> str:
        return str(self.manifest.config.get("model") or self.manifest.source["model"])

    @property
    def model_dtype(self) -> str | None:
        return self.manifest.config.get("model_dtype")


def transcoder_ids(store: Store, sae_ids: Sequence[str], model: str | None) -> dict[int, str]:
    """Block index → transcoder SAE id, read from the summaries and checked by `transcoder_blocks`."""
    return transcoder_blocks([get_sae(store, sae_id) for sae_id in sae_ids], model)


def check_intervention(
    store: Store, analysis_id: str, request: GraphInterventionRequest
) -> CheckedIntervention:
    """The request checked against the stored analysis: NotFoundError for an unknown analysis,
    InvalidInputError when it is not a graph or a node is not one of its feature nodes,
    ConflictError when a transcoder the edits need was deleted since."""
    manifest = get_analysis(store, analysis_id)
    if manifest.kind != "graph":
        raise InvalidInputError(
            f"analysis {analysis_id!r} is a {manifest.kind} analysis: only the nodes of a graph analysis "
            "can be edited",
            details={"analysis_id": analysis_id, "kind": manifest.kind},
        )
    results = get_results(store, analysis_id)
    transcoders = graph_transcoders(store, manifest, results)
    edits = feature_edits(results, request.edits, transcoders)
    transcoders = {**transcoders, **{edit.layer: edit.sae_id for edit in edits}}  # what the nodes name
    for block in sorted({edit.layer for edit in edits}):
        _require_stored(store, analysis_id, transcoders[block], block)
    return CheckedIntervention(manifest, results, transcoders, edits)


def graph_transcoders(store: Store, manifest: AnalysisManifest, results: Mapping[str, Any]) -> dict[int, str]:
    """Block → SAE id of the graph's transcoders: results.json's ``transcoders`` map, or, for a graph
    made before it was written, the config's list mapped by each SAE's own block (its target
    layer names it, so the mapping is unambiguous while the SAEs are stored)."""
    recorded = results.get("transcoders")
    if isinstance(recorded, Mapping) and recorded:
        return {int(block): str(sae_id) for block, sae_id in recorded.items()}
    sae_ids = list(manifest.config.get("transcoders") or manifest.source.get("transcoders") or [])
    try:
        return transcoder_ids(store, sae_ids, None)
    except NotFoundError as exc:
        raise ConflictError(
            f"graph {manifest.id!r} predates the transcoder map and one of its transcoders {sae_ids} is no "
            "longer stored, so its feature nodes cannot be matched to transcoders: run the graph again",
            details={"analysis_id": manifest.id, "transcoders": sae_ids},
        ) from exc


def feature_edits(
    results: Mapping[str, Any], edits: Sequence[NodeEdit], transcoders: Mapping[int, str]
) -> list[FeatureEdit]:
    """Each edit's node looked up among the graph's nodes: InvalidInputError naming an unknown node
    (with close feature ids) or one that is not a feature node."""
    nodes = {node["id"]: node for node in results.get("nodes", [])}
    features = [node_id for node_id, node in nodes.items() if node["kind"] == "feature"]
    resolved = []
    for i, edit in enumerate(edits):
        node = nodes.get(edit.node)
        if node is None:
            hint = close_matches(edit.node, features)
            raise InvalidInputError(
                f"edits[{i}]: the graph has no node {edit.node!r}"
                + (f"; did you mean {', '.join(repr(h) for h in hint)}?" if hint else "")
                + " (feature node ids are <layer>_<latent>_<position>, among the graph's kept nodes)",
                details={"where": f"edits[{i}]", "node": edit.node, "suggestions": hint},
            )
        if node["kind"] != "feature":
            raise InvalidInputError(
                f"edits[{i}]: node {edit.node!r} is a {node['kind']} node; only feature nodes (a "
                "transcoder latent at a position) can be scaled or set",
                details={"where": f"edits[{i}]", "node": edit.node, "kind": node["kind"]},
            )
        layer = int(node["layer"])
        sae_id = node.get("sae_id") or transcoders.get(layer)
        if sae_id is None:
            raise InvalidInputError(
                f"edits[{i}]: the graph names no transcoder for block {layer} of node {edit.node!r}",
                details={"where": f"edits[{i}]", "node": edit.node, "layer": layer},
            )
        resolved.append(
            FeatureEdit(
                edit.node,
                str(sae_id),
                layer,
                int(node["position"]),
                int(node["latent"]),
                edit.scale,
                edit.value,
            )
        )
    return resolved


def _require_stored(store: Store, analysis_id: str, sae_id: str, block: int) -> None:
    try:
        get_sae(store, sae_id)
    except NotFoundError as exc:
        raise ConflictError(
            f"transcoder {sae_id!r} (block {block}) of graph {analysis_id!r} is no longer stored: its "
            "features cannot be edited; run the graph again over stored transcoders",
            details={"analysis_id": analysis_id, "sae_id": sae_id, "block": block},
        ) from exc
