"""One pydantic config per analysis: the CLI options, the API request and the stored config.

Each carries ``kind`` so a list of them is a discriminated union (``AnalysisConfig``). Fields a
client may not send as-is (a dataset that names a file) are narrowed in ``kestrel.schemas``;
everything else is validated here once, with limits that keep one analysis a bounded job.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, TypeAdapter, ValidationError, model_validator

from kestrel.core.analysis.records import AnalysisKind as AnalysisKind  # one definition, re-exported
from kestrel.core.catalog import DEFAULT_MODEL, DType
from kestrel.core.config import StrictModel
from kestrel.core.errors import InvalidInputError
from kestrel.core.runs import RowFilter
from kestrel.core.sources import DatasetSpec

MAX_LAYERS = 64
MAX_LATENTS = 256
MAX_PAIRS = 64
MAX_PROMPT_CHARS = 2000
MAX_PATCH_FORWARDS = 8192  # layers × positions: one forward (of all pairs) each
MAX_CONFIRM = 256  # atp: real patches per component


class _AnalysisBase(StrictModel):
    """What every analysis config has; unknown fields are errors (a misspelt option is a 422)."""

    title: str | None = Field(None, max_length=200, description="report title [default: from the kind]")


class NeuronConfig(_AnalysisBase):
    """Per-dimension statistics of one layer of a stored run, in one streaming pass."""

    kind: Literal["neuron"] = "neuron"
    run_id: str = Field(min_length=1, max_length=64, description="a stored activation run")
    layer: str = Field(min_length=1, max_length=200, description="a layer the run captured")
    filters: RowFilter = Field(
        default_factory=lambda: RowFilter(skip_position_0=True, skip_special=True),
        description=(
            "rows left out (default: position 0 and special tokens, the attention sinks; no norm "
            "filter, since rows of unusual norm are what outlier dimensions show up in)"
        ),
    )
    max_rows: int | None = Field(None, gt=0, description="stop after this many rows [default: all]")
    outlier_factor: float = Field(
        10.0,
        gt=1.0,
        le=1e6,
        description="outlier: |mean| above this × the median std, or max |x| above this × its median",
    )
    top_n: int = Field(20, ge=1, le=1000, description="dimensions listed per ranking")


class FeatureConfig(_AnalysisBase):
    """PCA and k-means clusters of one layer of a stored run, on a bounded uniform sample."""

    kind: Literal["feature"] = "feature"
    run_id: str = Field(min_length=1, max_length=64, description="a stored activation run")
    layer: str = Field(min_length=1, max_length=200, description="a layer the run captured")
    filters: RowFilter = Field(default_factory=RowFilter.recommended)
    sample_rows: int = Field(20_000, ge=16, le=500_000, description="uniform sample size for PCA and k-means")
    n_components: int = Field(64, ge=1, le=4096, description="principal components kept (capped by d)")
    n_clusters: int = Field(8, ge=2, le=256, description="k-means clusters")
    texts_per_cluster: int = Field(5, ge=1, le=50, description="contexts shown nearest each centre")
    window: int = Field(8, ge=0, le=64, description="tokens shown either side of a context's token")
    seed: int = Field(0, ge=0, le=2**32 - 1)


class CausalConfig(_AnalysisBase):
    """Zero and mean ablation of layers, or of SAE latents on one layer, over a dataset."""

    kind: Literal["causal"] = "causal"
    model: str = Field(DEFAULT_MODEL, min_length=1, description="bundled name, hub id or local model")
    dataset: DatasetSpec = Field(description="the texts the losses are measured on")
    layers: list[str] | None = Field(
        None, max_length=MAX_LAYERS, description="module paths to ablate, each on its own"
    )
    sae_id: str | None = Field(None, description="ablate latents of this SAE (on its layer) instead")
    latents: list[int] | None = Field(None, max_length=MAX_LATENTS, description="the SAE latents to ablate")
    methods: list[Literal["zero", "mean"]] = Field(
        default_factory=lambda: ["zero", "mean"], min_length=1, max_length=2
    )
    rank_by: Literal["delta_loss", "kl"] = Field(
        "delta_loss", description="rank targets by the larger of their methods' Δloss (or KL)"
    )
    max_texts: int = Field(64, ge=1, le=4096, description="texts read from the dataset at most")
    max_length: int = Field(128, ge=2, le=4096, description="tokens per text")
    batch_size: int = Field(8, ge=1, le=256, description="texts per forward")
    model_dtype: DType = "fp32"

    @model_validator(mode="after")
    def _targets(self) -> CausalConfig:
        if (self.layers is None) == (self.sae_id is None):
            raise ValueError("give layers to ablate, or sae_id and latents (exactly one of the two)")
        if self.layers is not None and not self.layers:
            raise ValueError("layers must name at least one module path")
        if self.sae_id is not None and not self.latents:
            raise ValueError("sae_id needs latents: the SAE latents to ablate, e.g. [3, 17]")
        if self.latents is not None and self.sae_id is None:
            raise ValueError("latents need sae_id: the SAE they belong to")
        if self.latents is not None and any(latent < 0 for latent in self.latents):
            raise ValueError("latents must be >= 0")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError("layers must not repeat")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("methods must not repeat")
        return self


class PromptPair(StrictModel):
    """A clean prompt, its corruption (same number of tokens) and the two answers compared."""

    clean: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    corrupted: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    correct: str = Field(min_length=1, max_length=100, description="the clean prompt's answer: one token")
    wrong: str = Field(min_length=1, max_length=100, description="the corrupted prompt's answer: one token")

    @model_validator(mode="after")
    def _different(self) -> PromptPair:
        if self.correct == self.wrong:
            raise ValueError("correct and wrong must be different tokens")
        return self


CircuitComponent = Literal["resid", "heads", "latents"]


class CircuitConfig(_AnalysisBase):
    """Clean into corrupted, per (layer, position), per head, per SAE latent: estimated or patched.

    ``atp`` estimates every cell from gradients (one forward + backward) and confirms the top
    candidates by real patching; ``patching`` patches every cell for real (and still reports how
    well the estimate agreed, over all cells).
    """

    kind: Literal["circuit"] = "circuit"
    model: str = Field(DEFAULT_MODEL, min_length=1, description="bundled name, hub id or local model")
    pairs: list[PromptPair] = Field(min_length=1, max_length=MAX_PAIRS)
    layers: list[str] | None = Field(
        None, max_length=MAX_LAYERS, description="module paths to patch [default: every block]"
    )
    model_dtype: DType = "fp32"
    method: Literal["atp", "patching"] = Field(
        "atp", description="atp: gradient estimates, top candidates confirmed; patching: every cell patched"
    )
    components: list[CircuitComponent] = Field(
        default_factory=lambda: ["resid"],
        min_length=1,
        max_length=3,
        description="resid: layers × positions; heads: per block; latents: the SAE's (sae_id)",
    )
    confirm_top: int = Field(
        10, ge=0, le=MAX_CONFIRM, description="atp: candidates per component confirmed by real patching"
    )
    sae_id: str | None = Field(None, max_length=64, description="the SAE whose latents are attributed")
    qk_fix: bool = Field(True, description="AtP*: the next block's attention softmax computed exactly")
    grad_drop: bool = Field(
        False, description="AtP*: rank candidates by GradDrop too (one extra backward per block)"
    )

    @model_validator(mode="after")
    def _unique_layers(self) -> CircuitConfig:
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
            raise ValueError("layers must name at least one module path, without repeats")
        if len(set(self.components)) != len(self.components):
            raise ValueError("components must not repeat")
        if ("latents" in self.components) != (self.sae_id is not None):
            raise ValueError("the latents component needs sae_id, and sae_id needs 'latents' in components")
        return self


MAX_TRANSCODERS = 128
MAX_GRAPH_FEATURES = 50_000


class GraphConfig(_AnalysisBase):
    """An attribution graph of one prompt's next-token logit over stored transcoders."""

    kind: Literal["graph"] = "graph"
    model: str = Field(DEFAULT_MODEL, min_length=1, description="bundled name, hub id or local model")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    target: str | None = Field(
        None,
        min_length=1,
        max_length=100,
        description="the next token to explain [default: the top one]",
    )
    transcoders: list[str] = Field(
        min_length=1, max_length=MAX_TRANSCODERS, description="SAE ids of transcoders, one per block's MLP"
    )
    node_keep: float = Field(0.8, gt=0, le=1, description="influence on the logit the kept nodes carry")
    edge_keep: float = Field(0.98, gt=0, le=1, description="kept nodes' influence the kept edges carry")
    max_features: int = Field(
        20_000,
        ge=1,
        le=MAX_GRAPH_FEATURES,
        description="refuse more active features (a backward each)",
    )
    model_dtype: DType = "fp32"

    @model_validator(mode="after")
    def _unique_transcoders(self) -> GraphConfig:
        if len(set(self.transcoders)) != len(self.transcoders):
            raise ValueError("transcoders must not repeat")
        return self


AnalysisConfig = Annotated[
    NeuronConfig | FeatureConfig | CausalConfig | CircuitConfig | GraphConfig, Field(discriminator="kind")
]
_ADAPTER: TypeAdapter = TypeAdapter(AnalysisConfig)


def parse_config(data: object) -> NeuronConfig | FeatureConfig | CausalConfig | CircuitConfig | GraphConfig:
    """A config from a dict (or a config), with pydantic's errors as one readable InvalidInputError."""
    if isinstance(data, (NeuronConfig, FeatureConfig, CausalConfig, CircuitConfig, GraphConfig)):
        return data
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in error.errors()
        )
        raise InvalidInputError(f"invalid analysis config: {problems}") from None
