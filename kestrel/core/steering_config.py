"""A steering config: latent edits at an SAE's layer, direction edits anywhere, and the positions
they act on (see `kestrel.core.steering` for what they do to a forward); its checks against the
SAEs' summaries and discovery statistics; and saved configs (``<root>/steering/<config_id>/``).

Torch-free, so the API process validates, saves and lists configs without loading the engine. The
edits are plain `StrictModel`s (a part of the config), so a bad value's error names its field as
``edits.2.value``; the config itself is an engine config (`InvalidInputError`).
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from kestrel.core.clientdata import read_float_vectors
from kestrel.core.config import EngineConfig, StrictModel
from kestrel.core.errors import InvalidInputError, NotFoundError
from kestrel.core.sae.records import get_sae
from kestrel.core.store import Store, new_id, read_manifests, validate_id

KIND = "steering"

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

    # non-finite values reach `_finite`, whose message also gives the magnitude bound
    model_config = ConfigDict(allow_inf_nan=True)

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

    model_config = ConfigDict(allow_inf_nan=True)  # as LatentEdit: `_finite` says it

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


# ---------------------------------------------------------------------------------------------
# Checking a config against its SAEs, without loading weights


def check_config(store: Store, config: SteeringConfig) -> SteeringConfig:
    """Validate latent ranges, layers and widths from the SAEs' summaries; fill in ``layer``."""
    if config.sae_id:
        summary = get_sae(store, config.sae_id)
        summary.require_sae("steering")  # a transcoder's decoder writes another layer
        n_latents, sae_layer = summary.n_latents, summary.layer
        if config.layer and sae_layer and config.layer != sae_layer:
            raise InvalidInputError(
                f"layer: sae {config.sae_id!r} reads {sae_layer!r}, not {config.layer!r}",
                details={"field": "layer"},
            )
        for i, edit in enumerate(config.edits):
            _check_latent(f"edits[{i}]", edit.latent, n_latents, config.sae_id)
        resolve_edits(store, config)  # a relative edit needs discovery's max activations: say so now
        config = config.model_copy(update={"layer": config.layer or sae_layer})
    for i, direction in enumerate(config.directions):
        if direction.latent is None:
            continue  # a raw vector's width is checked against the model's layer when compiled
        sae_id = direction.sae_id or config.sae_id
        summary = get_sae(store, sae_id)
        summary.require_sae("steering")
        _check_latent(f"directions[{i}]", direction.latent, summary.n_latents, sae_id)
    return config


def resolve_edits(store: Store, config: SteeringConfig) -> SteeringConfig:
    """``config`` with every ``max_activation`` edit turned into an absolute one (value × the
    latent's observed max activation); absolute configs come back unchanged.

    Raises `InvalidInputError` naming the edit when the SAE has no discovery result, or when the
    latent never fired in it (its max is 0, so no multiple of it moves anything).
    """
    relative = [(i, e) for i, e in enumerate(config.edits) if e.unit == "max_activation"]
    if not relative:
        return config
    stats = _latent_stats(store, config.sae_id, [e.latent for _, e in relative])
    edits = list(config.edits)
    for i, edit in relative:
        where = f"edits[{i}]"
        if not stats:
            raise InvalidInputError(
                f"{where}: unit max_activation needs the latents' observed max activations, and sae "
                f"{config.sae_id!r} has no discovery result: run discovery first (kestrel discover "
                f"{config.sae_id}, or POST /v1/saes/{config.sae_id}/features/discover), "
                "or give unit absolute",
                details={"where": where, "sae_id": config.sae_id},
            )
        peak = stats.get(edit.latent, {}).get("max_activation", 0.0)
        if peak <= 0:
            raise InvalidInputError(
                f"{where}: latent {edit.latent} never fired during discovery (max activation 0), so a "
                "multiple of its max activation is 0: give unit absolute",
                details={"where": where, "latent": edit.latent},
            )
        edits[i] = edit.model_copy(update={"value": edit.value * peak, "unit": "absolute"})
    return config.model_copy(update={"edits": edits})


def edit_warnings(store: Store, config: SteeringConfig) -> list[str]:
    """Plain-language warnings about edits far outside what the latents do on real text.

    An edit that drives a latent beyond `WARN_TIMES_MAX` times its largest observed activation
    (clamp or add to such a value, scale by more than that factor) usually yields degenerate
    text; without a discovery result strengths cannot be judged, which is said once.
    """
    if not config.sae_id or not config.edits:
        return []
    stats = _latent_stats(store, config.sae_id, [e.latent for e in config.edits])
    if not stats:
        return [
            f"sae {config.sae_id!r} has no discovery result, so edit strengths cannot be compared with "
            "what its latents do on real text: run discovery and use unit max_activation"
        ]
    warnings = []
    for i, edit in enumerate(config.edits):
        peak = stats.get(edit.latent, {}).get("max_activation", 0.0)
        if edit.unit != "absolute":
            if abs(edit.value) > WARN_TIMES_MAX:
                warnings.append(
                    f"edits[{i}]: {edit.op} {edit.value:g} × max activation on latent {edit.latent} is far "
                    f"beyond its observed range (more than {WARN_TIMES_MAX:g}×); expect degenerate text"
                )
            continue
        reach = abs(edit.value) if edit.op != "scale" else abs(edit.value) * peak
        if peak <= 0:
            if edit.op != "scale" and edit.value != 0:
                warnings.append(
                    f"edits[{i}]: latent {edit.latent} never fired during discovery; "
                    f"{edit.op} {edit.value:g} forces a direction the SAE never used on real text"
                )
            continue
        if reach > WARN_TIMES_MAX * peak:
            warnings.append(
                f"edits[{i}]: {edit.op} {edit.value:g} on latent {edit.latent} drives it to "
                f"{reach / peak:.0f}× its largest observed activation ({peak:.3g}); expect degenerate "
                f"text. Try unit max_activation with a value of 1-4"
            )
    return warnings


def check_steered_model(sae_id: str, sae_model: str | None, model: str | None) -> None:
    """InvalidInputError when a config's SAE reads another model than the one asked to generate:
    its latents and decoder rows mean nothing in that model's activations. An unknown side (an SAE
    that records no model, no model named) is not a mismatch."""
    if sae_model and model and model != sae_model:
        raise InvalidInputError(
            f"sae {sae_id!r} reads {sae_model!r}; it cannot steer {model!r}",
            details={"model": model, "sae_model": sae_model},
        )


def _check_latent(where: str, latent: int, n_latents: int, sae_id: str | None) -> None:
    if latent >= n_latents:
        raise InvalidInputError(
            f"{where}: latent {latent} is out of range; sae {sae_id!r} has {n_latents} latents "
            f"(0..{n_latents - 1})",
            details={"where": where, "latent": latent, "n_latents": n_latents},
        )


# ---------------------------------------------------------------------------------------------
# Saved configs


def save_config(store: Store, config: SteeringConfig, *, config_id: str | None = None) -> dict[str, Any]:
    """Check ``config`` against its SAEs and save it; the record returned carries its new id."""
    config = check_config(store, config)
    config_id = validate_id(config_id, "steering id") if config_id else new_id("steer")
    record = {
        "id": config_id,
        "kind": KIND,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config.model_dump(mode="json"),
    }
    with store.writer(KIND, config_id) as writer:
        writer.commit(record)
    return record


def get_config_record(store: Store, config_id: str) -> dict[str, Any]:
    validate_id(config_id, "steering id")
    if not store.exists(KIND, config_id):
        raise NotFoundError(f"no steering config {config_id!r}", details={"id": config_id})
    return store.read_json(KIND, config_id)


def load_config(store: Store, config_id: str) -> SteeringConfig:
    return SteeringConfig.from_dict(get_config_record(store, config_id)["config"])


def list_configs(store: Store) -> list[dict[str, Any]]:
    return read_manifests(store, KIND)


def delete_config(store: Store, config_id: str) -> None:
    get_config_record(store, config_id)
    store.delete(KIND, config_id)


def _latent_stats(store: Store, sae_id: str, latents: list[int]) -> dict[int, dict[str, float]]:
    """Density and max activation from discovery, when it has run."""
    from kestrel.core.concepts.store import TENSORS_FILE, FeatureReader

    try:
        reader = FeatureReader(store, sae_id)
    except NotFoundError:
        return {}
    # plain floats, read without torch: the API checks configs with these
    stats = read_float_vectors(reader.directory / TENSORS_FILE, ["density", "max_activation"])
    return {
        latent: {
            "density": float(stats["density"][latent]),
            "max_activation": float(stats["max_activation"][latent]),
        }
        for latent in latents
        if latent < reader.n_latents
    }
