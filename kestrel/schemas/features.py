"""Features, concepts, steering and generation."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

# Torch-free modules only: the API process imports this one (tests/unit/test_torch_free.py).
from kestrel.core.concepts.config import DiscoveryConfig, ScoringConfig
from kestrel.core.concepts.dictionary import LabelMethod, LabelScores
from kestrel.core.config import StrictModel
from kestrel.core.steering_config import SteeringConfig
from kestrel.schemas.common import Page
from kestrel.schemas.runs import CaptureDataset
from kestrel.schemas.steering import ContinuationEffect, ResolvedEdit, SteeringEffect

# ---------------------------------------------------------------------------------------------
# Features, concepts and steering


class DiscoverRequest(StrictModel):
    """Discover what each latent of the SAE means, over a stored run or a dataset.

    With neither, the SAE's own training run is read (no forward needed). A dataset goes through
    the SAE's model up to its layer.
    """

    run_id: str | None = Field(None, description="a stored run with the SAE's layer")
    dataset: CaptureDataset | None = Field(None, description="inline texts, an upload or a hub dataset")
    config: DiscoveryConfig = Field(default_factory=DiscoveryConfig)


class FeatureConcept(BaseModel):
    latent: int
    name: str
    description: str = ""
    tags: list[str] = Field(default_factory=list)
    source: Literal["manual", "heuristic", "model"]
    updated: str | None = None
    scores: LabelScores | None = Field(
        None, description="how well the name predicts activations (detection, fuzzing, embedding)"
    )


class FeatureSummary(BaseModel):
    latent: int
    fire_count: int
    density: float = Field(description="fraction of rows (attention sinks excluded) it fires on")
    max_activation: float
    mean_activation: float = Field(description="mean over the rows it fires on")
    top_tokens: list[str] = Field(description="most frequent tokens at its top contexts")
    promoted_tokens: list[str] = Field(description="tokens its decoder direction most promotes")
    concept: FeatureConcept | None = Field(
        None, description="its name; the scores' examples are left out here (see the feature's page)"
    )


class FeaturePage(Page[FeatureSummary]):
    sae_id: str
    n_latents: int
    version: str = Field(description="the discovery result these come from")


class FeatureContext(BaseModel):
    doc_index: int
    position: int
    activation: float
    tokens: list[str] = Field(description="the window of tokens around the firing token")
    target: int = Field(description="index of the firing token in `tokens`")


class FeatureBin(BaseModel):
    lower: float
    upper: float
    contexts: list[FeatureContext]


class FeatureHistogram(BaseModel):
    edges: list[float] = Field(description="log-spaced; the first and last bins are open-ended")
    counts: list[int]


class TokenCount(BaseModel):
    token: str
    count: int


class LogitEffect(BaseModel):
    token: str
    token_id: int
    value: float


class LogitEffects(BaseModel):
    positive: list[LogitEffect]
    negative: list[LogitEffect]
    note: str | None = Field(
        None,
        description="what the lists are (`direct: ...`, the decoder rows' direct path), or why they are "
        "empty (`none: ...`: the decoder writes no part of the residual stream); null for results "
        "discovered before the note existed",
    )


class FeatureDetail(BaseModel):
    """Everything a feature's page shows."""

    sae_id: str
    latent: int
    version: str
    fire_count: int
    density: float
    max_activation: float
    mean_activation: float
    histogram: FeatureHistogram
    top_contexts: list[FeatureContext]
    bins: list[FeatureBin] = Field(description="samples from equal-width bins below the top value")
    top_tokens: list[TokenCount]
    logits: LogitEffects
    concept: FeatureConcept | None = None


class ConceptInput(StrictModel):
    """A person's name for a latent (recorded with source ``manual``)."""

    name: str = Field(min_length=1, max_length=200)
    description: str = Field("", max_length=4000)
    tags: list[str] = Field(default_factory=list, max_length=32)


class ConceptPage(Page[FeatureConcept]):
    sae_id: str
    n_latents: int


class ConceptImportResult(BaseModel):
    sae_id: str
    imported: int
    replaced: bool


class LabelRequest(StrictModel):
    """Automatic names: ``heuristic`` from tokens and logit effects, ``model`` by the SAE's model."""

    method: LabelMethod = "heuristic"
    latents: list[int] | None = Field(
        None, max_length=4096, description="default: every latent that fired (model or score: the first 512)"
    )
    overwrite: bool = Field(False, description="replace manual names too")
    score: bool = Field(
        False,
        description="then score each latent's name (detection, fuzzing, embedding) on held-out examples",
    )
    scorer: str | None = Field(
        None,
        max_length=400,
        description="the scoring model: a name the service may load [default: the SAE's]",
    )
    run_id: str | None = Field(None, description="the run examples come from [default: the SAE's own]")
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)

    @model_validator(mode="after")
    def _scoring_fields_need_score(self) -> LabelRequest:
        """``run_id``, ``scorer`` and ``scoring`` only say how to score: given without ``score``
        they would be silently ignored, so they are refused (by value, so a dumped request reloads)."""
        unused = [
            name
            for name, value in (("run_id", self.run_id), ("scorer", self.scorer), ("scoring", self.scoring))
            if not self.score and value not in (None, ScoringConfig())
        ]
        if unused:
            raise ValueError(f"{', '.join(unused)} only apply with score: true (nothing would be scored)")
        return self


class SteeringRecord(BaseModel):
    id: str
    created: str
    config: SteeringConfig


class SteeringPage(Page[SteeringRecord]):
    pass


class SteeringPreviewRequest(StrictModel):
    """Preview a saved config (``config_id``) or an inline one (``config``)."""

    config_id: str | None = None
    config: SteeringConfig | None = None
    model: str | None = Field(None, description="check against this model [default: the SAE's]")


class SteeringTouch(BaseModel):
    edit: int
    latent: int
    op: str
    value: float
    unit: str = Field("absolute", description="what value counts: absolute or max_activation")
    absolute_value: float = Field(description="value in activation units (scale: the factor itself)")
    name: str | None = None
    source: str | None = None
    density: float | None = None
    max_activation: float | None = None


class SteeringDirection(BaseModel):
    direction: int
    layer: str
    alpha: float
    kind: Literal["vector", "latent"]
    latent: int | None = None
    sae_id: str | None = None
    name: str | None = None
    normalize: bool = False


class SteeringPreview(BaseModel):
    valid: bool
    model: str
    sae_id: str | None
    layer: str | None
    positions: str
    keep_error: bool
    touches: list[SteeringTouch]
    directions: list[SteeringDirection]
    warnings: list[str] = Field(
        default_factory=list, description="edits far beyond their latents' observed activations, and the like"
    )
    config: SteeringConfig
    job_id: str


class GenerateRequest(StrictModel):
    """Generate from ``prompts``; with a steering config (saved id or inline), default and steered."""

    prompts: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, max_length=64)
    steering_id: str | None = Field(None, description="a saved steering config")
    steering: SteeringConfig | None = Field(None, description="or an inline one")
    max_new_tokens: int = Field(20, gt=0)
    do_sample: bool = False
    temperature: float = Field(1.0, ge=0.01, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(0, ge=0, le=2**32 - 1, description="the same seed for both runs")
    top_latents: int = Field(0, ge=0, description="SAE latents reported per generated token")
    compare: bool = Field(True, description="with steering: also generate without it, side by side")
    keywords: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list,
        max_length=16,
        description="with steering and compare: words whose effect to report",
    )


class GeneratedToken(BaseModel):
    token: str
    token_id: int
    latents: list[dict[str, Any]] = Field(description="[{latent, value, name}] at the position that chose it")


class GeneratedText(BaseModel):
    text: str
    token_ids: list[int]
    tokens: list[GeneratedToken] | None = None


class GenerationPair(BaseModel):
    prompt: str
    default: GeneratedText | None = Field(None, description="without steering (unless compare is false)")
    steered: GeneratedText | None = Field(None, description="with the steering config, if one was given")
    effect: ContinuationEffect | None = Field(
        None, description="fluency and keyword effect (steering, compare)"
    )


class GenerateResponse(BaseModel):
    model: str
    steering_id: str | None = None
    items: list[GenerationPair]
    seconds: dict[str, float] = Field(description="wall time of each run, default and steered")
    warnings: list[str] = Field(
        default_factory=list, description="the steering config's warnings (see steering preview)"
    )
    edits: list[ResolvedEdit] = Field(
        default_factory=list, description="latent edits as given and as applied"
    )
    effect: SteeringEffect | None = Field(None, description="pooled over the prompts (steering, compare)")
    job_id: str
