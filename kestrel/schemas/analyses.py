"""Analyses: requests (one per kind) and stored results."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, TypeAdapter

# Torch-free modules only: the API process imports this one (tests/unit/test_torch_free.py).
from kestrel.core.analysis.config import CausalConfig, CircuitConfig, FeatureConfig, GraphConfig, NeuronConfig
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
