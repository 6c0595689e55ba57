"""A steering config: latent edits at an SAE's layer, direction edits anywhere, and the positions
they act on (see `kestrel.core.steering` for what they do to a forward).

Torch-free, so the API process validates a config in a request without loading the engine. The
edits are plain `StrictModel`s (a part of the config), so a bad value's error names its field as
``edits.2.value``; the config itself is an engine config (`InvalidInputError`).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from kestrel.core.config import EngineConfig, StrictModel

EditOp = Literal["scale", "clamp", "add"]
EditUnit = Literal["absolute", "max_activation"]
Positions = Literal["all", "prompt", "generated"]


MAX_MAGNITUDE = 1e6  # far beyond any useful edit; keeps activations, and so logits, finite
# An edit driving a latent past this many times its largest observed activation gets a warning:
# on SmolLM2, clamping a latent at ~12x its max already collapses the text into one repeated token.
WARN_TIMES_MAX = 10.0


def _finite(value: float) -> float:
    if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise ValueError(f"must be a finite number of magnitude at most {MAX_MAGNITUDE:g}, got {value}")
    return value


class LatentEdit(StrictModel):
    """One edit of one SAE latent's activation f."""

    latent: int = Field(ge=0, description="latent index in the config's SAE")
    op: EditOp = Field(description="scale: f·value; clamp: f := value; add: f + value")
    value: float
    unit: EditUnit = Field(
        "absolute",
        description="what value counts for clamp and add: absolute (activation units) or "
        "max_activation (multiples of the latent's largest activation found by discovery; "
        "1-4 is a useful range). scale is always a plain factor",
    )

    _check_value = field_validator("value")(_finite)

    @model_validator(mode="after")
    def _unit_fits_op(self) -> LatentEdit:
        if self.op == "scale" and self.unit != "absolute":
            raise ValueError("scale multiplies the activation by value: unit applies only to clamp and add")
        return self


class DirectionEdit(StrictModel):
    """Add ``alpha`` times a direction at a layer's output, without any SAE in the loop."""

    layer: str = Field(min_length=1, description="module path, e.g. model.layers.10")
    alpha: float
    vector: list[float] | None = Field(None, description="the direction (width of the layer)")
    latent: int | None = Field(None, ge=0, description="or this SAE latent's decoder row")
    sae_id: str | None = Field(None, description="the SAE of `latent` [default: the config's SAE]")
    normalize: bool = Field(False, description="scale the direction to unit norm first")

    _check_alpha = field_validator("alpha")(_finite)

    @field_validator("vector")
    @classmethod
    def _finite_vector(cls, vector: list[float] | None) -> list[float] | None:
        if vector is not None:
            if not vector:
                raise ValueError("vector is empty")
            bad = next(
                (i for i, v in enumerate(vector) if not math.isfinite(v) or abs(v) > MAX_MAGNITUDE), None
            )
            if bad is not None:
                raise ValueError(
                    f"vector[{bad}] is not a finite number of magnitude at most {MAX_MAGNITUDE:g}"
                )
        return vector

    @model_validator(mode="after")
    def _one_direction(self) -> DirectionEdit:
        if (self.vector is None) == (self.latent is None):
            raise ValueError("give exactly one of vector or latent")
        return self


class SteeringConfig(EngineConfig):
    """Edits at an SAE's layer, direction edits anywhere, and where in the sequence they act."""

    name: str | None = Field(None, max_length=200)
    description: str = Field("", max_length=4000)
    sae_id: str | None = Field(None, description="the SAE whose latents `edits` name")
    layer: str | None = Field(None, description="the SAE's layer; filled in from the SAE when omitted")
    edits: list[LatentEdit] = Field(default_factory=list)
    directions: list[DirectionEdit] = Field(default_factory=list)
    positions: Positions = Field("all", description="all, prompt (prompt pass) or generated (new tokens)")
    keep_error: bool = Field(True, description="add back the SAE's reconstruction error (leave on)")

    @model_validator(mode="after")
    def _check_edits(self) -> SteeringConfig:
        if self.edits and not self.sae_id:
            raise ValueError("edits name SAE latents: give sae_id")
        seen: dict[int, int] = {}
        for i, edit in enumerate(self.edits):
            if edit.latent in seen:
                raise ValueError(
                    f"edits[{i}]: latent {edit.latent} is already edited by edits[{seen[edit.latent]}]"
                )
            seen[edit.latent] = i
        for i, direction in enumerate(self.directions):
            if direction.latent is not None and not (direction.sae_id or self.sae_id):
                raise ValueError(f"directions[{i}]: a latent direction needs sae_id (here or on the config)")
        return self
