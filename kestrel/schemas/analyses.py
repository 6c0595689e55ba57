"""Analyses: requests (one per kind) and stored results."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, TypeAdapter

# Torch-free modules only: the API process imports this one (tests/unit/test_torch_free.py).
from kestrel.core.analysis.config import CausalConfig, CircuitConfig, FeatureConfig, GraphConfig, NeuronConfig
from kestrel.core.analysis.graph_edits import GraphInterventionRequest as GraphInterventionRequest
from kestrel.core.analysis.graph_edits import NodeEdit as NodeEdit
from kestrel.core.analysis.records import AnalysisManifest
from kestrel.schemas.common import Page
from kestrel.schemas.runs import CaptureDataset

# ---------------------------------------------------------------------------------------------
# Analyses


class CausalAnalysisRequest(CausalConfig):
    """``CausalConfig`` with the datasets a client may name (inline texts, an upload, a hub id)."""

    dataset: CaptureDataset = Field(description="the texts the losses are measured on")


AnalysisRequest = Annotated[
    NeuronConfig | FeatureConfig | CausalAnalysisRequest | CircuitConfig | GraphConfig,
    Field(discriminator="kind"),
]
_ANALYSIS_REQUEST: TypeAdapter = TypeAdapter(AnalysisRequest)


def parse_analysis_request(
    data: Any,
) -> NeuronConfig | FeatureConfig | CausalAnalysisRequest | CircuitConfig | GraphConfig:
    """A stored job's request parsed again by the worker (the API validated it already)."""
    return _ANALYSIS_REQUEST.validate_python(data)


#: An analysis as the store holds and lists it: the engine's manifest model, returned as it is.
AnalysisSummary = AnalysisManifest


class AnalysisPage(Page[AnalysisManifest]):
    pass


class AnalysisDetail(AnalysisManifest):
    results: dict[str, Any] = Field(description="everything measured: results.json")


# ---------------------------------------------------------------------------------------------
# Interventions on a graph's feature nodes (POST /v1/analyses/{id}/graph/interventions). The
# request models are the engine's (`kestrel.core.analysis.graph_edits`), re-exported above.


class InterventionTarget(BaseModel):
    token: str = Field(description="the graph's target token")
    logit_before: float = Field(description="its raw logit at the last position, unedited")
    logit_after: float = Field(description="with the edits")
    prob_before: float
    prob_after: float


class TokenLogit(BaseModel):
    token: str
    logit: float
    prob: float


class EditedFeature(BaseModel):
    node: str
    sae_id: str = Field(description="the transcoder whose latent was edited")
    layer: int
    position: int
    latent: int
    activation_before: float = Field(description="at its position in the unedited run of the real model")
    activation_after: float = Field(description="what the edit set it to (in the edited run)")


class GraphInterventionResponse(BaseModel):
    analysis_id: str
    job_id: str
    target: InterventionTarget
    top_before: list[TokenLogit] = Field(description="top_k next tokens at the last position, unedited")
    top_after: list[TokenLogit] = Field(description="top_k next tokens with the edits")
    continuation_before: str | None = Field(description="greedy continuation (null when max_new_tokens is 0)")
    continuation_after: str | None = Field(description="with the edits held at their prompt positions")
    edits: list[EditedFeature]
