"""Analyses: requests (one per kind) and stored results."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

# Torch-free modules only: the API process imports this one (tests/unit/test_torch_free.py).
from kestrel.core.analysis.config import CausalConfig, CircuitConfig, FeatureConfig, NeuronConfig
from kestrel.schemas.common import Page
from kestrel.schemas.runs import CaptureDataset

# ---------------------------------------------------------------------------------------------
# Analyses


class CausalAnalysisRequest(CausalConfig):
    """``CausalConfig`` with the datasets a client may name (inline texts, an upload, a hub id)."""

    dataset: CaptureDataset = Field(description="the texts the losses are measured on")


AnalysisRequest = Annotated[
    NeuronConfig | FeatureConfig | CausalAnalysisRequest | CircuitConfig, Field(discriminator="kind")
]
_ANALYSIS_REQUEST: TypeAdapter = TypeAdapter(AnalysisRequest)


def parse_analysis_request(data: Any) -> NeuronConfig | FeatureConfig | CausalAnalysisRequest | CircuitConfig:
    """A stored job's request parsed again by the worker (the API validated it already)."""
    return _ANALYSIS_REQUEST.validate_python(data)


class AnalysisSummary(BaseModel):
    """An analysis's manifest.json (docs/store-format.md); fields beyond these are passed through."""

    model_config = ConfigDict(extra="allow")

    id: str
    kind: Literal["neuron", "feature", "causal", "circuit"]
    title: str
    created: str
    source: dict[str, Any] = Field(description="what was analysed: run, model, layer(s), SAE, dataset")
    config: dict[str, Any]
    key_numbers: dict[str, Any] = Field(description="the headline figures of the report")
    plots: list[str] = Field(description="names for GET /v1/analyses/{id}/plots/{name}")


class AnalysisPage(Page[AnalysisSummary]):
    pass


class AnalysisDetail(AnalysisSummary):
    results: dict[str, Any] = Field(description="everything measured: results.json")
