"""SAEs as the store holds them, read without loading one: summaries (`SAEManifest`, with which
model and layer an SAE reads), training history, deletion, and the check of a training's configs
against its run (`training_configs`, shared by the API and the engine).

Training, loading and running SAEs is `kestrel.core.sae.artifacts`; this module is torch-free, so
the API process lists, reads and deletes SAEs and checks a request against them without torch.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from kestrel.core.errors import InvalidInputError, NotFoundError
from kestrel.core.runs import RunManifest, get_manifest
from kestrel.core.sae.config import TRANSCODER_TRAINABLE, SAEConfig, TrainConfig
from kestrel.core.store import Store, StoredManifest, read_typed_manifests, validate_id

KIND = "saes"
HISTORY_FILE = "history.jsonl"


class SAEManifest(StoredManifest):
    """An SAE's manifest.json: written when a training publishes it (`train_from_run`), by an
    import (`import_saelens`), and rewritten when an evaluation adds model-in-the-loop metrics."""

    id: str
    status: str = Field("complete", description="complete (trained here) or imported")
    created: str | None = None
    model: str | None = Field(None, description="the model it reads (None for an import that names none)")
    run_id: str | None = Field(None, description="the activation run it was trained on")
    layer: str | None = Field(None, description="the layer (module path) it reads")
    target_layer: str | None = Field(
        None, description="a transcoder: the layer its decoder predicts (None: an SAE of `layer`)"
    )
    kind: Literal["sae", "transcoder", "skip_transcoder"] = Field(
        "sae", description="sae, transcoder (predicts target_layer) or skip_transcoder (plus W_skip·x)"
    )
    config: dict[str, Any] = Field(description="its SAEConfig, as saved (SAEConfig.from_dict reads it)")
    train_config: dict[str, Any] | None = Field(None, description="its TrainConfig, as trained")
    metrics: dict[str, Any] = Field(
        default_factory=dict, description="held-out evaluation; model_in_the_loop once evaluated"
    )
    steps: int | None = Field(None, description="optimiser steps trained")
    tokens: int | None = Field(None, description="rows trained on")
    train_seconds: float | None = None
    warnings: list[str] = Field(default_factory=list, description="what training warned about")

    @property
    def n_latents(self) -> int:
        return int(self.config["n_latents"])

    @property
    def model_name(self) -> str | None:
        """The model it reads: the summary's own field, else its config's (older summaries)."""
        return self.model or self.config.get("model")

    @property
    def layer_name(self) -> str | None:
        """The layer it reads: the summary's own field, else its config's."""
        return self.layer or self.config.get("layer")

    def require_sae(self, action: str) -> None:
        """InvalidInputError when ``action`` would treat a transcoder as an SAE of its layer:
        its latents read ``layer`` but its decoder writes ``target_layer``, so reconstructing
        or steering ``layer`` with it would be wrong."""
        if self.kind != "sae":
            raise InvalidInputError(
                f"sae {self.id!r} is a {self.kind} ({self.layer_name} -> {self.target_layer}): "
                f"{action} is only defined for an SAE that reconstructs the layer it reads",
                details={"sae_id": self.id, "kind": self.kind, "target_layer": self.target_layer},
            )

    def mlp_block(self) -> int:
        """The block whose MLP this transcoder replaces (an attribution graph's node layer):
        it must read that MLP's input (``model.layers.<i>.mlp:input``, or the norm output that
        feeds it) and predict its output (``model.layers.<i>.mlp``); InvalidInputError otherwise."""
        target = re.fullmatch(r"model\.layers\.(\d+)\.mlp", self.target_layer or "")
        if self.kind == "sae" or target is None:
            raise InvalidInputError(
                f"sae {self.id!r} is not a transcoder of a block's MLP (target_layer "
                f"{self.target_layer!r}); attribution graphs need transcoders trained from "
                "model.layers.<i>.mlp:input to model.layers.<i>.mlp",
                details={"sae_id": self.id, "target_layer": self.target_layer},
            )
        block = target.group(1)
        inputs = (f"model.layers.{block}.mlp:input", f"model.layers.{block}.post_attention_layernorm")
        if self.layer_name not in inputs:
            raise InvalidInputError(
                f"transcoder {self.id!r} reads {self.layer_name!r}, not the input of the MLP it predicts "
                f"({inputs[0]!r}); its features would encode other activations",
                details={"sae_id": self.id, "layer": self.layer_name, "target_layer": self.target_layer},
            )
        return int(block)

    def model_and_layer(self) -> tuple[str, str]:
        """The model and layer it reads; InvalidInputError for one imported without them."""
        model, layer = self.model_name, self.layer_name
        if not model or not layer:
            missing = " and ".join(what for what, value in (("model", model), ("layer", layer)) if not value)
            raise InvalidInputError(
                f"sae {self.id!r} does not record the {missing} it reads (an import whose cfg.json "
                "names none): import it again with the model and layer form fields to run it on text",
                details={"sae_id": self.id, "missing": missing.split(" and ")},
            )
        return model, layer


class TrainingStopped(BaseModel):
    """What a training stopped before the end leaves: no SAE, a checkpoint to resume from."""

    id: str
    status: str = "stopped"
    step: int
    tokens: int
    checkpoint: str | None = Field(None, description="relative to the store's local root")
    warnings: list[str] = Field(default_factory=list)


def checkpoint_dir(store: Store, sae_id: str) -> Path:
    """Checkpoints are this machine's scratch (never uploaded until the SAE is published)."""
    return store.local_root / "checkpoints" / sae_id


def list_saes(store: Store) -> list[SAEManifest]:
    return read_typed_manifests(store, KIND, SAEManifest)


def get_sae(store: Store, sae_id: str) -> SAEManifest:
    return SAEManifest.model_validate(store.read_json(KIND, validate_id(sae_id, "sae id")))


def training_history(store: Store, sae_id: str) -> list[dict[str, Any]]:
    """The trainer's progress lines (history.jsonl), for curves; empty for an imported SAE."""
    store.read_json(KIND, validate_id(sae_id, "sae id"))  # NotFoundError for an unknown id, not []
    try:
        path = store.local_path(KIND, sae_id, HISTORY_FILE)
    except NotFoundError:
        return []
    return read_history(path.parent)


def delete_sae(store: Store, sae_id: str) -> None:
    store.delete(KIND, validate_id(sae_id, "sae id"))
    checkpoints = checkpoint_dir(store, sae_id)
    shutil.rmtree(checkpoints, ignore_errors=True)
    checkpoints.with_name(f"{sae_id}.lock").unlink(missing_ok=True)  # see checkpoint.writer_lock


def require_loadable_model(store: Store, summary: SAEManifest) -> None:
    """InvalidInputError before a job loads a model for an SAE whose run's model is not loadable."""
    run_id = summary.run_id
    if run_id and store.exists("activations", run_id):
        reason = get_manifest(store, run_id).unloadable_model_reason()
        if reason is not None:
            raise InvalidInputError(reason, details={"sae_id": summary.id, "run_id": run_id})


def training_configs(
    store: Store,
    run_id: str,
    layer: str,
    sae_config: dict[str, Any] | SAEConfig,
    train_config: dict[str, Any] | TrainConfig,
    *,
    data: dict[str, Any] | None = None,
    target_layer: str | None = None,
) -> tuple[SAEConfig, TrainConfig, RunManifest]:
    """The configs of a training on ``layer`` of a run, checked against it (no torch, no rows).

    The one check the API (before queueing) and the engine (before training) share: the run and
    its layer exist (NotFoundError naming the layers), a given ``d_in`` is the layer's width, and
    both configs are valid (InvalidInputError). The SAE config gets ``d_in``, ``model``, ``layer``
    and ``run_id`` from the run, and ``data`` (which rows train it) when given. A transcoder
    (``target_layer``) predicts another layer of the same run: it gets ``target_layer`` and
    ``d_out`` (that layer's width, which may differ from ``d_in``) from the run.
    """
    manifest = get_manifest(store, validate_id(run_id, "run id"))
    d_in = manifest.layer_width(layer)
    raw = sae_config.model_dump() if isinstance(sae_config, SAEConfig) else dict(sae_config)
    check_transcoder_request(layer, target_layer, raw)
    transcoder = _transcoder_fields(manifest, layer, target_layer)
    if raw.get("d_in") not in (None, d_in):
        raise InvalidInputError(
            f"d_in {raw['d_in']} does not match the run: layer {layer!r} of run {run_id!r} has width {d_in}",
            details={"d_in": raw["d_in"], "run_width": d_in},
        )
    from_run = {"d_in": d_in, "model": manifest.model.name, "layer": layer, "run_id": run_id, **transcoder}
    sae_cfg = SAEConfig.from_dict({**raw, **from_run, **({"data": data} if data is not None else {})})
    train_cfg = (
        train_config if isinstance(train_config, TrainConfig) else TrainConfig.from_dict(dict(train_config))
    )
    return sae_cfg, train_cfg, manifest


def _transcoder_fields(manifest: RunManifest, layer: str, target_layer: str | None) -> dict[str, Any]:
    """``target_layer`` and ``d_out`` of a transcoder on ``manifest``'s run (none for an SAE).

    Every layer of a run holds the same rows in the same order (one capture pass wrote them), so
    any other layer of it can be a target; the widths may differ."""
    if target_layer is None:
        return {}
    return {"target_layer": target_layer, "d_out": manifest.layer_width(target_layer)}


def check_transcoder_request(
    layer: str, target_layer: str | None, sae: Mapping[str, Any], where: str = ""
) -> None:
    """What a training request says of a transcoder, checked before any run or model is read: its
    target is another layer, ``skip`` comes with a target, and it names a trainable architecture.
    One check for stored-run training (`training_configs`), stream training's API check and its
    engine; ``where`` (``saes[2]``) names the entry of a stream request."""
    prefix, field = (f"{where}: ", f"{where}.target_layer") if where else ("", "target_layer")
    details = {"layer": layer, "target_layer": target_layer, **({"where": where} if where else {})}
    if target_layer is not None and target_layer == layer:
        raise InvalidInputError(
            f"{prefix}target_layer is the input layer {layer!r}: a transcoder predicts another layer "
            "(for an SAE of this layer, leave target_layer out)",
            details=details,
        )
    if sae.get("skip") and target_layer is None:
        raise InvalidInputError(f"{prefix}skip makes a skip-transcoder: give {field}, the layer it predicts")
    architecture = sae.get("architecture")
    if target_layer is not None and architecture is not None and architecture not in TRANSCODER_TRAINABLE:
        raise InvalidInputError(
            f"{prefix}a transcoder trains with architecture {' or '.join(TRANSCODER_TRAINABLE)}, "
            f"not {architecture!r}",
            details={**details, "architecture": architecture},
        )


def read_history(directory: Path) -> list[dict[str, Any]]:
    """The lines of an SAE directory's history.jsonl; empty when it has none (an import)."""
    path = Path(directory) / HISTORY_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def transcoder_blocks(summaries: list[SAEManifest], model: str | None) -> dict[int, str]:
    """Block index → transcoder id, each checked to be a transcoder of that block's MLP (see
    `SAEManifest.mlp_block`), one per block, of ``model`` when given. Torch-free: the API checks
    a request with it before queueing, the worker again before the graph."""
    blocks: dict[int, str] = {}
    for summary in summaries:
        block = summary.mlp_block()
        if block in blocks:
            raise InvalidInputError(
                f"transcoders {blocks[block]!r} and {summary.id!r} both replace block {block}'s MLP: "
                "give one",
                details={"block": block},
            )
        if model is not None and summary.model_name not in (None, model):
            raise InvalidInputError(
                f"sae {summary.id!r} reads {summary.model_name!r}, not {model!r}",
                details={"sae_id": summary.id, "model": summary.model_name},
            )
        blocks[block] = summary.id
    return blocks
