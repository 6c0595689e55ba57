"""Steering sweeps (continuations at several strengths, with fluency and keyword effect) and the
measured logit effect of a latent (issue #14). Saved configs, preview and generation keep their
models in `kestrel.schemas.features`."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from kestrel.core.config import StrictModel
from kestrel.core.errors import InvalidInputError
from kestrel.core.steering_config import EditUnit

# Bounds of one sweep: it runs on the interactive queue, so it has to stay around a minute on a CPU.
SWEEP_MAX_STRENGTHS = 12
SWEEP_MAX_PROMPTS = 8
SWEEP_MAX_NEW_TOKENS = 64
SWEEP_MAX_TOKENS = 2048  # prompts × (strengths + 1) × max_new_tokens: tokens generated in all
SWEEP_MAX_STRENGTH = 1000.0
DEFAULT_STRENGTHS = [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]


class SteeringSweepRequest(StrictModel):
    """One latent edited at several strengths (``add`` by default, all positions), greedy."""

    sae_id: str = Field(min_length=1)
    latent: int = Field(ge=0)
    op: Literal["add", "clamp"] = Field("add", description="add strength to the latent, or clamp it there")
    unit: EditUnit = Field(
        "max_activation", description="strengths in multiples of the latent's max activation"
    )
    strengths: list[float] = Field(
        default_factory=lambda: list(DEFAULT_STRENGTHS), min_length=1, max_length=SWEEP_MAX_STRENGTHS
    )
    prompts: list[str] = Field(min_length=1, max_length=SWEEP_MAX_PROMPTS)
    keywords: list[str] = Field(
        default_factory=list, max_length=16, description="a topic's words: their count and log-prob change"
    )
    max_new_tokens: int = Field(24, gt=0, le=SWEEP_MAX_NEW_TOKENS)
    seed: int | None = Field(0, ge=0, le=2**32 - 1)
    fluency_ratio: float = Field(2.0, gt=1, le=100, description="fluent: perplexity ≤ this × unsteered")
    model: str | None = Field(None, description="[default: the SAE's model]")

    @field_validator("strengths")
    @classmethod
    def _finite(cls, strengths: list[float]) -> list[float]:
        for i, s in enumerate(strengths):
            if not math.isfinite(s) or abs(s) > SWEEP_MAX_STRENGTH:
                raise ValueError(
                    f"strengths[{i}] must be finite and at most {SWEEP_MAX_STRENGTH:g} in magnitude"
                )
        if len(set(strengths)) != len(strengths):
            raise ValueError("strengths repeat a value")
        return strengths

    @field_validator("prompts", "keywords")
    @classmethod
    def _non_empty(cls, words: list[str]) -> list[str]:
        for i, word in enumerate(words):
            if not word.strip() or len(word) > 2000:
                raise ValueError(f"item {i} must be non-blank text of at most 2000 characters")
        return words

    def generated_tokens(self) -> int:
        return len(self.prompts) * (len(self.strengths) + 1) * self.max_new_tokens

    def check_size(self) -> SteeringSweepRequest:
        """InvalidInputError when the sweep would generate more than `SWEEP_MAX_TOKENS` tokens."""
        if self.generated_tokens() > SWEEP_MAX_TOKENS:
            raise InvalidInputError(
                f"a sweep generates prompts × (strengths + 1) × max_new_tokens = {self.generated_tokens()} "
                f"tokens, more than {SWEEP_MAX_TOKENS}: use fewer prompts or strengths, or fewer new tokens",
                details={"generated_tokens": self.generated_tokens(), "limit": SWEEP_MAX_TOKENS},
            )
        return self


class ContinuationEffect(BaseModel):
    """A steered continuation against the unsteered one (see `kestrel.core.steering_sweep`)."""

    default_perplexity: float | None = Field(
        description="the unsteered continuation under the unsteered model"
    )
    steered_perplexity: float | None = Field(description="the steered continuation under the unsteered model")
    default_keyword_hits: int | None = None
    steered_keyword_hits: int | None = None
    keyword_logprob_delta: float | None = Field(
        None,
        description="mean change of the keywords' log-probability on the unsteered text (nats); "
        "None without keywords or for edits on prompt or generated positions only",
    )
    changed_fraction: float = Field(
        description="share of generated tokens that differ from the unsteered text"
    )


class SteeringEffect(ContinuationEffect):
    """Pooled over the prompts (hits summed, perplexity over all tokens, log-prob change averaged)."""

    perplexity_ratio: float | None = Field(description="steered / unsteered perplexity; fluent: ≤ 2")


class ResolvedEdit(BaseModel):
    """A latent edit as given and as applied."""

    latent: int
    op: str
    value: float
    unit: str
    absolute_value: float = Field(description="value in activation units (scale: the factor itself)")


class SweepText(BaseModel):
    prompt: str
    text: str
    token_ids: list[int]
    perplexity: float | None = Field(description="under the unsteered model; None for an empty continuation")


class SweepBaseline(BaseModel):
    perplexity: float | None
    keyword_hits: int | None = None
    items: list[SweepText]


class SweepPoint(SteeringEffect):
    strength: float
    absolute_value: float | None = Field(description="the edit's value in activation units")
    fluent: bool
    effect: bool
    items: list[SweepText]


class SteeringSweepResponse(BaseModel):
    model: str
    sae_id: str
    latent: int
    op: str
    unit: str
    max_activation: float | None = Field(description="the latent's observed max activation, when discovered")
    name: str | None = None
    keywords: list[str]
    fluency_ratio: float
    baseline: SweepBaseline
    points: list[SweepPoint]
    fluent_up_to: float | None = Field(
        description="the largest strength (from 0 up) whose output stays fluent"
    )
    effect_from: float | None = Field(description="the smallest non-zero strength with an effect")
    steers: bool = Field(description="an effect appears within the fluent window")
    verdict: str
    job_id: str


class LogitCheckRequest(StrictModel):
    """Measure a latent's effect on the logits: its decoder row × ``scale`` (default: its max
    activation) added at the SAE's layer on real contexts, through the rest of the model."""

    texts: list[str] | None = Field(
        None, max_length=32, description="contexts [default: the latent's top discovery contexts]"
    )
    n_contexts: int = Field(16, gt=0, le=32)
    scale: float | None = Field(None, gt=0, le=1e4, description="[default: the latent's max activation]")
    k: int = Field(10, gt=0, le=50)
    model: str | None = None

    @field_validator("texts")
    @classmethod
    def _texts(cls, texts: list[str] | None) -> list[str] | None:
        if texts is not None:
            if not texts:
                raise ValueError("give at least one text, or leave texts out for the top contexts")
            for i, text in enumerate(texts):
                if not text.strip() or len(text) > 4000:
                    raise ValueError(f"texts[{i}] must be non-blank text of at most 4000 characters")
        return texts


class TokenValue(BaseModel):
    token: str
    token_id: int
    value: float


class TokenEffects(BaseModel):
    positive: list[TokenValue]
    negative: list[TokenValue]


class LogitAgreement(BaseModel):
    promoted_overlap: float = Field(
        description="share of the measured top-k promoted tokens in the direct top-k"
    )
    suppressed_overlap: float
    spearman: float = Field(description="rank correlation of the two over the whole vocabulary")


class LogitCheckResponse(BaseModel):
    model: str
    sae_id: str
    latent: int
    layer: str
    scale: float
    n_contexts: int
    direct: TokenEffects = Field(description="W_dec · diag(final-norm gain) · W_Uᵀ: the feature page's list")
    measured: TokenEffects = Field(description="mean change in log-probabilities through the model")
    measured_probability: TokenEffects = Field(
        description="mean change in probability: what the model says more (less) often"
    )
    agreement: LogitAgreement
    job_id: str
