"""Steering: change what a model computes at a layer through SAE latents or raw directions.

A `SteeringConfig` lists **latent edits** at an SAE's layer (``{latent, op, value}`` with op
``scale`` f·v, ``clamp`` f := v, ``add`` f + v) and **direction edits** at any layer (add
``alpha`` times a given vector, or times an SAE latent's decoder row, without running the SAE),
and says which positions they act on: ``all``, ``prompt`` (the prompt pass, ``HookContext.call
== 0``) or ``generated`` (each new token's pass, ``call > 0``).

The SAE path keeps the reconstruction error: h' = decode(edit(encode(h))) + (h − decode(encode(h))).
Decoding is linear, so that equals h + Σ_e (f'_e − f_e)·W_dec[e]: only the edited latents'
change is added to h. The controller computes it in that form (one encode, a [E, d] product) and
an empty edit is exactly the identity; `reference_edit` is the formula written out densely, and
the tests hold the two equal. ``keep_error=False`` replaces h by the edited reconstruction
instead, which shows how much the SAE alone changes the model.

**Strength.** A latent's activations live on its own scale (one latent peaks at 3, another at
40), so a raw ``clamp 40`` is gentle on one and wrecks the text on the other. An edit's ``unit``
says what ``value`` counts: ``absolute`` (activation units, the default, what older configs
mean) or ``max_activation`` (multiples of the largest activation discovery observed for that
latent, a scale that carries over from one latent to the next: ``clamp 2`` = twice its strongest
firing). Relative edits are resolved to absolute ones when a plan is compiled
(`resolve_edits`), from the SAE's current discovery result; without one they are refused with a
message saying to run discovery or use ``absolute``. `edit_warnings` flags absolute edits far
beyond a latent's observed range (preview and generate return them).

Configs are validated when built (ops, finite values, each problem named by its edit index),
against the SAE when compiled (latent range, layer, widths), and saved under
``<root>/steering/<config_id>/`` like any artifact.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kestrel.core.devices import layer_device
from kestrel.core.errors import InvalidInputError
from kestrel.core.hooks import Controller, Detector, HookContext
from kestrel.core.models import ForwardResult, LoadedModel, forward, generate
from kestrel.core.sae.base import SAE
from kestrel.core.sae.records import SAEManifest

# Re-exported: defined in the torch-free module, still importable from here.
from kestrel.core.steering_config import KIND as KIND
from kestrel.core.steering_config import MAX_MAGNITUDE as MAX_MAGNITUDE
from kestrel.core.steering_config import WARN_TIMES_MAX as WARN_TIMES_MAX
from kestrel.core.steering_config import (
    DirectionEdit,
    LatentEdit,
    Positions,
    SteeringConfig,
    _check_latent,
    _latent_stats,
    check_config,
    edit_warnings,
    resolve_edits,
)
from kestrel.core.steering_config import EditOp as EditOp
from kestrel.core.steering_config import EditUnit as EditUnit
from kestrel.core.steering_config import delete_config as delete_config
from kestrel.core.steering_config import get_config_record as get_config_record
from kestrel.core.steering_config import list_configs as list_configs
from kestrel.core.steering_config import load_config as load_config
from kestrel.core.steering_config import save_config as save_config
from kestrel.core.store import Store

OP_CODES = {"scale": 0, "clamp": 1, "add": 2}


# ---------------------------------------------------------------------------------------------
# Controllers


def acts_on(positions: Positions, call: int) -> bool:
    """Whether a hook call is one the config edits: call 0 is the prompt pass under generate."""
    return positions == "all" or (positions == "prompt") == (call == 0)


def _latent_values(acts: Tensor, indices: Tensor, latents_E: Tensor) -> Tensor:
    """[..., E] activation of each edited latent (0 when it is not among the active ones)."""
    hits = indices.unsqueeze(-2) == latents_E.unsqueeze(-1)  # [..., E, K]
    return (acts.unsqueeze(-2) * hits).sum(-1)


def apply_ops(current_E: Tensor, ops_E: Tensor, values_E: Tensor) -> Tensor:
    scaled = current_E * values_E
    added = current_E + values_E
    clamped = values_E.expand_as(current_E)
    return torch.where(ops_E == 0, scaled, torch.where(ops_E == 1, clamped, added))


def sae_edit_controller(
    layer: str,
    sae: SAE,
    edits: Sequence[LatentEdit],
    *,
    positions: Positions = "all",
    keep_error: bool = True,
) -> Controller:
    """The SAE path as a controller: h' = h + Σ_e (f'_e − f_e)·W_dec[e] (see module docstring)."""
    device = sae.W_dec.device
    latents_E = torch.tensor([e.latent for e in edits], dtype=torch.int64, device=device)
    ops_E = torch.tensor([OP_CODES[e.op] for e in edits], dtype=torch.int64, device=device)
    values_E = torch.tensor([e.value for e in edits], dtype=sae.W_dec.dtype, device=device)
    directions_ED = sae.W_dec.detach()[latents_E]

    def edit(x: Tensor, ctx: HookContext) -> Tensor | None:
        if not acts_on(positions, ctx.call):
            return None
        # Computed where the SAE lives (a split model's layer may run elsewhere); the hook
        # manager moves the result back to the layer's device and dtype.
        x_f = x.to(device=device, dtype=sae.W_dec.dtype)
        encoded = sae.encode(x_f)
        current_E = _latent_values(encoded.acts, encoded.indices, latents_E)
        delta_D = (apply_ops(current_E, ops_E, values_E) - current_E) @ directions_ED
        base = x_f if keep_error else sae.decode(encoded.acts, encoded.indices)
        return base + delta_D

    return Controller(layer, edit)


def reference_edit(sae: SAE, h: Tensor, edits: Sequence[LatentEdit], keep_error: bool = True) -> Tensor:
    """The formula written out: dense latents, edited, decoded, plus the reconstruction error."""
    encoded = sae.encode(h)
    latents = sae.dense(encoded.acts, encoded.indices)
    edited = latents.clone()
    for e in edits:
        f = edited[..., e.latent]
        edited[..., e.latent] = {
            "scale": f * e.value,
            "clamp": torch.full_like(f, e.value),
            "add": f + e.value,
        }[e.op]
    out = sae.decode_latents(edited)
    return out + (h - sae.decode_latents(latents)) if keep_error else out


def direction_controller(
    layer: str, vector_D: Tensor, alpha: float, positions: Positions = "all"
) -> Controller:
    """Add ``alpha · vector`` at every position the config acts on."""

    def add(x: Tensor, ctx: HookContext) -> Tensor | None:
        if not acts_on(positions, ctx.call):
            return None
        if vector_D.shape[-1] != x.shape[-1]:
            raise InvalidInputError(
                f"direction for layer {layer!r} has width {vector_D.shape[-1]}, the layer {x.shape[-1]}"
            )
        return x + alpha * vector_D.to(device=x.device, dtype=x.dtype)

    return Controller(layer, add)


# ---------------------------------------------------------------------------------------------
# Plans: a config resolved against a model and its SAEs


@dataclass
class SteeringPlan:
    """A checked config with its SAE loaded and its controllers built, ready to hook."""

    config: SteeringConfig
    sae: SAE | None
    hooks: list[Controller] = field(default_factory=list)

    @property
    def layer(self) -> str | None:
        return self.config.layer


SAELoader = Callable[[str], tuple[SAE, SAEManifest]]


def compile_plan(
    config: SteeringConfig, lm: LoadedModel, *, load_sae: SAELoader, sae: SAE | None = None
) -> SteeringPlan:
    """Resolve ``config`` against the model and its SAEs (``load_sae(id) -> (sae, summary)``)."""
    sae_layers: dict[str, str | None] = {}  # each SAE's layer, as its summary records it
    loaded: dict[str, SAE] = {}

    def get(sae_id: str) -> SAE:
        if sae_id not in loaded:
            loaded[sae_id], summary = load_sae(sae_id)
            sae_layers[sae_id] = summary.layer
        return loaded[sae_id]

    unresolved = [i for i, e in enumerate(config.edits) if e.unit != "absolute"]
    if unresolved:
        raise InvalidInputError(
            f"edits[{unresolved[0]}]: a max_activation edit must be resolved against the SAE's "
            "discovery result first (resolve_edits)"
        )
    if config.sae_id and sae is not None:
        loaded[config.sae_id], sae_layers[config.sae_id] = sae, sae.config.layer
    main = get(config.sae_id) if config.sae_id else None
    layer = config.layer
    if main is not None:
        layer = layer or sae_layers[config.sae_id] or main.config.layer
        if not layer:
            raise InvalidInputError(f"sae {config.sae_id!r} does not record its layer; give layer")
        _check_width(lm, layer, main.d_in, f"sae {config.sae_id!r}")
        for i, edit in enumerate(config.edits):
            _check_latent(f"edits[{i}]", edit.latent, main.n_latents, config.sae_id)
        config = config.model_copy(update={"layer": layer})
    hooks: list[Controller] = []
    if main is not None:
        hooks.append(
            sae_edit_controller(
                layer, main, config.edits, positions=config.positions, keep_error=config.keep_error
            )
        )
    for i, direction in enumerate(config.directions):
        vector = _direction_vector(direction, i, lm, get, config.sae_id)
        hooks.append(direction_controller(direction.layer, vector, direction.alpha, config.positions))
    return SteeringPlan(config, main, hooks)


def _check_width(lm: LoadedModel, layer: str, width: int, what: str) -> None:
    info = lm.layer(layer)  # NotFoundError with close names
    if info.width not in (-1, width):
        raise InvalidInputError(
            f"{what} reads width {width}, but layer {layer!r} of {lm.name!r} has width {info.width}"
        )


def _direction_vector(
    direction: DirectionEdit, index: int, lm: LoadedModel, get: Callable[[str], SAE], default_sae: str | None
) -> Tensor:
    where = f"directions[{index}]"
    info = lm.layer(direction.layer)
    if direction.vector is not None:
        vector = torch.tensor(direction.vector, dtype=torch.float32)
    else:
        sae_id = direction.sae_id or default_sae
        sae = get(sae_id)
        _check_latent(where, direction.latent, sae.n_latents, sae_id)
        vector = sae.W_dec.detach()[direction.latent].float().cpu()
    if info.width not in (-1, len(vector)):
        raise InvalidInputError(
            f"{where}: the direction has width {len(vector)}, layer {direction.layer!r} has {info.width}",
            details={"where": where},
        )
    if direction.normalize:
        vector = vector / vector.norm().clamp_min(1e-12)
    return vector.to(layer_device(lm, direction.layer))


def plan_from_store(
    store: Store, lm: LoadedModel, config: SteeringConfig, sae: SAE | None = None
) -> SteeringPlan:
    """`compile_plan` with relative edits resolved and SAEs loaded from the store onto the
    device of the layer they edit (``sae_on_layer_device``)."""
    from kestrel.core.sae.artifacts import load_sae

    return compile_plan(
        resolve_edits(store, config),
        lm,
        load_sae=lambda sae_id: sae_on_layer_device(
            lm, *load_sae(store, sae_id), config.layer if sae_id == config.sae_id else None
        ),
        sae=sae,
    )


def sae_on_layer_device(
    lm: LoadedModel, sae: SAE, summary: SAEManifest, layer: str | None = None
) -> tuple[SAE, SAEManifest]:
    """The SAE moved to where ``layer`` (default: the one it was trained on) runs: on a model split
    across devices its controller then edits without copying activations between devices."""
    where = layer or summary.layer_name
    return sae.to(layer_device(lm, where) if where else lm.device), summary


# ---------------------------------------------------------------------------------------------
# Forward and generate with a plan


def steered_forward(
    lm: LoadedModel, texts: Sequence[str], plan: SteeringPlan, **kwargs: Any
) -> ForwardResult:
    """A forward pass with the plan's edits (a forward is one prompt pass: call 0)."""
    return forward(lm, texts, hooks=plan.hooks, **kwargs)


def next_token_probs(lm: LoadedModel, texts: Sequence[str], plan: SteeringPlan | None = None) -> Tensor:
    """[B, vocab] next-token probabilities after each text, with or without the plan."""
    result = forward(lm, texts, hooks=plan.hooks if plan is not None else ())
    last_B = result.attention_mask_BT.sum(dim=1) - 1
    logits_BV = result.logits_BTV[torch.arange(len(texts)), last_B]
    return logits_BV.float().softmax(dim=-1)


class _LatentTrace:
    """Top latents at the last position of every pass: pass j is where generated token j was chosen."""

    def __init__(self, sae: SAE, layer: str, top_k: int) -> None:
        self.sae, self.layer, self.top_k = sae, layer, top_k
        self.steps: list[tuple[Tensor, Tensor]] = []

    def detector(self) -> Detector:
        def record(x: Tensor, _: HookContext) -> None:
            encoded = self.sae.encode(x[:, -1].to(device=self.sae.W_dec.device, dtype=self.sae.W_dec.dtype))
            k = min(self.top_k, encoded.acts.shape[-1])
            values_BK, order_BK = encoded.acts.topk(k, dim=-1)
            self.steps.append((values_BK.cpu(), encoded.indices.gather(-1, order_BK).cpu()))

        return Detector(self.layer, record)

    def per_token(self, row: int, n_tokens: int, names: dict[int, str]) -> list[list[dict[str, Any]]]:
        out = []
        for values_BK, indices_BK in self.steps[:n_tokens]:
            out.append(
                [
                    {"latent": int(i), "value": round(float(v), 4), "name": names.get(int(i))}
                    for v, i in zip(values_BK[row].tolist(), indices_BK[row].tolist(), strict=True)
                    if v > 0
                ]
            )
        return out


def generate_side_by_side(
    lm: LoadedModel,
    prompts: Sequence[str],
    plan: SteeringPlan,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = 0,
    top_latents: int = 0,
    names: dict[int, str] | None = None,
    compare: bool = True,
) -> dict[str, Any]:
    """Default and steered continuations of each prompt, with the same seed; and each run's time.

    With ``top_latents`` > 0 (and an SAE in the plan), each generated token comes with the SAE's
    strongest latents at the position that chose it, in both runs: the steered ones show the edit.
    ``compare=False`` makes the steered run only (``default`` is then None).
    """
    if top_latents and plan.sae is None:
        raise InvalidInputError("top_latents needs an SAE in the steering config (sae_id)")
    common = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
    }
    traces = {}
    outputs = {}
    timings = {}
    runs = [("default", []), ("steered", list(plan.hooks))] if compare else [("steered", list(plan.hooks))]
    for run, hooks in runs:
        extra: list[Controller | Detector] = []
        if top_latents:
            traces[run] = _LatentTrace(plan.sae, plan.layer, top_latents)
            extra.append(traces[run].detector())
        started = time.perf_counter()
        outputs[run] = generate(lm, prompts, hooks=[*hooks, *extra], **common)
        timings[run] = time.perf_counter() - started
    results = []
    for row, prompt in enumerate(prompts):
        item: dict[str, Any] = {"prompt": prompt}
        item["default"] = None
        for run in outputs:
            generation = outputs[run][row]
            side: dict[str, Any] = {"text": generation.text, "token_ids": generation.token_ids}
            if top_latents:
                tokens = lm.tokenizer.convert_ids_to_tokens(generation.token_ids)
                latents = traces[run].per_token(row, len(tokens), names or {})
                side["tokens"] = [
                    {"token": tok, "token_id": tid, "latents": lat}
                    for tok, tid, lat in zip(tokens, generation.token_ids, latents, strict=True)
                ]
            item[run] = side
        results.append(item)
    return {"items": results, "seconds": {run: round(t, 4) for run, t in timings.items()}}


# ---------------------------------------------------------------------------------------------
# Saved configs and preview


def preview(store: Store, config: SteeringConfig) -> dict[str, Any]:
    """Validate ``config`` and list what it touches, with the latents' names and statistics, each
    edit's value in activation units (``absolute_value``) and `edit_warnings`."""
    from kestrel.core.concepts.dictionary import read_dictionary

    config = check_config(store, config)
    resolved = resolve_edits(store, config)
    touches = []
    if config.sae_id:
        concepts = read_dictionary(store, config.sae_id)
        stats = _latent_stats(store, config.sae_id, [e.latent for e in config.edits])
        for i, edit in enumerate(config.edits):
            concept = concepts.get(edit.latent)
            touches.append(
                {
                    "edit": i,
                    "latent": edit.latent,
                    "op": edit.op,
                    "value": edit.value,
                    "unit": edit.unit,
                    "absolute_value": resolved.edits[i].value,
                    "name": concept.name if concept else None,
                    "source": concept.source if concept else None,
                    **stats.get(edit.latent, {}),
                }
            )
    directions = []
    for i, direction in enumerate(config.directions):
        sae_id = direction.sae_id or config.sae_id if direction.latent is not None else None
        name = None
        if sae_id is not None:
            concept = read_dictionary(store, sae_id).get(direction.latent)
            name = concept.name if concept else None
        directions.append(
            {
                "direction": i,
                "layer": direction.layer,
                "alpha": direction.alpha,
                "kind": "vector" if direction.vector is not None else "latent",
                "latent": direction.latent,
                "sae_id": sae_id,
                "name": name,
                "normalize": direction.normalize,
            }
        )
    return {
        "valid": True,
        "sae_id": config.sae_id,
        "layer": config.layer,
        "positions": config.positions,
        "keep_error": config.keep_error,
        "touches": touches,
        "directions": directions,
        "warnings": edit_warnings(store, config),
        "config": config.model_dump(mode="json"),
    }
