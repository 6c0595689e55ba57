"""SAEs as store artifacts: train from a capture run, evaluate, list, export, import, encode.

This is where the trainer meets the store. Capture and training stay separate stages: the trainer
reads a run through the activation reader (row filters, train/held-out split by document, seeded
shuffle buffer, bounded memory) and knows nothing of models. An SAE is published as
``saes/<sae_id>/`` (config.json, weights.safetensors, metrics.json, history.jsonl, checkpoints/,
manifest.json) in one rename when training finishes; a stopped run publishes nothing and keeps its
checkpoints under ``checkpoints/<sae_id>/`` so ``resume=True`` can finish it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from kestrel.core.activations import record_spec
from kestrel.core.errors import ConflictError, InvalidInputError, NotFoundError
from kestrel.core.hooks import HookManager, run_until_stopped
from kestrel.core.limits import Caps
from kestrel.core.models import LoadedModel
from kestrel.core.run_reader import heldout_mask as _heldout_mask
from kestrel.core.run_reader import iter_batches, read_docs
from kestrel.core.runs import RowFilter, get_manifest, parse_layer_spec
from kestrel.core.sae import exchange
from kestrel.core.sae import io as sae_io
from kestrel.core.sae.base import SAE
from kestrel.core.sae.checkpoint import latest_checkpoint
from kestrel.core.sae.config import DEFAULT_BATCH_SIZE, SAEConfig, TrainConfig
from kestrel.core.sae.metrics import evaluate
from kestrel.core.sae.model_eval import ce_loss_metrics
from kestrel.core.sae.progress import TrainingPoint
from kestrel.core.sae.records import (
    KIND,
    SAEManifest,
    TrainingStopped,
    get_sae,
    require_loadable_model,
    training_configs,
)
from kestrel.core.sae.records import checkpoint_dir as _checkpoint_dir

# Re-exported: defined in the torch-free module, still importable from here.
from kestrel.core.sae.records import delete_sae as delete_sae
from kestrel.core.sae.records import list_saes as list_saes
from kestrel.core.sae.records import training_history as training_history
from kestrel.core.sae.trainer import TrainResult, train_sae
from kestrel.core.store import Store, new_id, validate_id

HELDOUT_FRACTION = 0.1
SHUFFLE_BUFFER_ROWS = 1 << 16
READ_CHUNK_ROWS = 8192
EVAL_MAX_ROWS = 200_000
EVAL_MAX_TEXTS = 200
# Small runs: an SAE needs a few hundred optimiser steps to organise its dictionary (at 8 steps
# of 4,096 rows, FVU stays near 0.66). An unset batch_size is halved until training takes at
# least TARGET_STEPS steps, down to MIN_AUTO_BATCH_SIZE (smaller batches make TopK's statistics,
# and the step time per row, worse); fewer than FEW_STEPS steps draws a warning either way.
TARGET_STEPS = 500
MIN_AUTO_BATCH_SIZE = 128
FEW_STEPS = 200


def choose_batch_size(train_cfg: TrainConfig, train_rows: int) -> tuple[TrainConfig, list[str]]:
    """Fill an unset ``batch_size`` from the rows training will see, and warn when training will
    take fewer than `FEW_STEPS` optimiser steps (whoever chose the batch size).

    ``train_rows`` is the run's training rows per epoch (tokens less the held-out share; the
    attention-sink filter takes a few more, so the step count is an estimate). Rows seen overall
    are ``token_budget`` or ``epochs`` × ``train_rows``. A chosen size is recorded in the SAE's
    ``train_config``, so a resume continues with the same one. Below `MIN_AUTO_BATCH_SIZE` rows
    per epoch the batch shrinks to fit them, so even a toy run trains (and is warned about).
    """
    rows_seen = train_cfg.token_budget or train_rows * train_cfg.epochs
    batch = train_cfg.batch_size
    if batch is None:
        batch = DEFAULT_BATCH_SIZE
        while batch > MIN_AUTO_BATCH_SIZE and rows_seen // batch < TARGET_STEPS:
            batch //= 2
        while batch > 1 and batch > train_rows:  # a toy run: at least one step per epoch
            batch //= 2
        train_cfg = train_cfg.model_copy(update={"batch_size": batch})
    steps = rows_seen // batch
    if steps >= FEW_STEPS:
        return train_cfg, []
    return train_cfg, [
        f"only about {steps} optimiser steps ({rows_seen:,} rows in batches of {batch:,}): the SAE will "
        f"be undertrained (expect a high FVU); capture more text, raise epochs, or lower batch_size "
        f"(at least {FEW_STEPS} steps are advisable)"
    ]


@dataclass(frozen=True)
class StreamReplay:
    """Read a run the way the stream trainer that spilled it saw its rows (`kestrel.core.sae.
    stream`): shards in stored order, the norm filter against the stream's calibration median
    (an SAE's ``config.data["norm_median"]``). Same seed and configs: same weights."""

    norm_median: float | None
    shuffle_buffer: int = SHUFFLE_BUFFER_ROWS
    target_norm_median: float | None = None
    """A transcoder's: its target layer's calibration median (``config.data["target_norm_median"]``)."""


def _run_rows(
    store: Store,
    run_id: str,
    layer: str,
    filters: RowFilter | None,
    split: str,
    seed: int | None = None,
    replay: StreamReplay | None = None,
    target_layer: str | None = None,
):
    """``data(epoch)`` over one split of a run's layer, in READ_CHUNK_ROWS chunks; training and
    evaluation split off the same HELDOUT_FRACTION. With a seed (training) the rows are shuffled,
    the same way for the same epoch; ``replay`` reads them as the stream that spilled the run did.
    ``target_layer`` pairs each row with that layer's (a transcoder's ``[x | y]`` rows)."""

    def data(epoch: int = 0) -> Iterator[torch.Tensor]:
        order: dict[str, Any] = {}
        if seed is not None:
            buffer = SHUFFLE_BUFFER_ROWS if replay is None else replay.shuffle_buffer
            order = {"shuffle_buffer": buffer, "seed": seed * 1000 + epoch, "shuffle_shards": replay is None}
        return iter_batches(
            store,
            run_id,
            layer,
            batch_size=READ_CHUNK_ROWS,
            filters=filters,
            split=split,  # type: ignore[arg-type]
            heldout_fraction=HELDOUT_FRACTION,
            norm_median=None if replay is None else replay.norm_median,
            target_layer=target_layer,
            target_norm_median=None if replay is None else replay.target_norm_median,
            **order,
        )

    return data


def _data_record(filters: RowFilter) -> dict[str, Any]:
    """Which rows train the SAE, as its config records them."""
    return {
        "filters": filters.model_dump(),
        "split": "train",
        "heldout_fraction": HELDOUT_FRACTION,
        "heldout_by": "document",
    }


def checkpoint_batch_size(checkpoint: Path) -> int | None:
    """The batch size a stopped run was training with (an old run's default may differ from
    what `choose_batch_size` picks now; a resume must keep it)."""
    state = json.loads((checkpoint / "state.json").read_text())
    return state.get("train_config", {}).get("batch_size")


def train_from_run(
    store: Store,
    run_id: str,
    layer: str,
    sae_config: dict[str, Any] | SAEConfig,
    train_config: dict[str, Any] | TrainConfig,
    *,
    sae_id: str | None = None,
    filters: RowFilter | None = None,
    on_progress: Callable[[TrainingPoint], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = False,
    on_warning: Callable[[str], None] | None = None,
    replay: StreamReplay | None = None,
    target_layer: str | None = None,
) -> SAEManifest | TrainingStopped:
    """Train an SAE on ``layer`` of a stored run; publish it and return its manifest, or keep a
    checkpoint if stopped and return `TrainingStopped` (nothing is published then).

    An unset ``batch_size`` is chosen from the run's size (`choose_batch_size`); its warnings go
    to ``on_warning`` before training starts and into the summary (``warnings``). ``replay``
    reads a spilled run in the order its stream trainer saw it. ``target_layer`` trains a
    transcoder: it reads ``layer`` and predicts ``target_layer`` of the same run (its FVU is the
    target's); ``skip`` in the SAE config makes it a skip-transcoder.
    """
    filters = filters or RowFilter.recommended()
    # every check that needs no training, the API's own (the run, the layers, d, valid configs)
    sae_cfg, train_cfg, manifest = training_configs(
        store, run_id, layer, sae_config, train_config, data=_data_record(filters), target_layer=target_layer
    )
    if replay is not None and (target_layer is None) != (replay.target_norm_median is None):
        raise InvalidInputError("a transcoder's stream replay gives target_norm_median; an SAE's does not")
    if replay is not None:
        data = {**sae_cfg.data, "order": "stream", "norm_median": replay.norm_median}
        if target_layer is not None:
            data["target_norm_median"] = replay.target_norm_median
        data["shuffle_buffer"] = replay.shuffle_buffer
        sae_cfg = sae_cfg.model_copy(update={"data": data})
    sae_id = validate_id(sae_id, "sae id") if sae_id else new_id("sae")
    if store.exists(KIND, sae_id):
        raise ConflictError(f"sae id {sae_id!r} already exists", details={"id": sae_id})
    checkpoints = _checkpoint_dir(store, sae_id)
    resume_from = None
    if resume:
        resume_from = latest_checkpoint(checkpoints) if checkpoints.is_dir() else None
        if resume_from is None:
            raise NotFoundError(f"no checkpoint to resume for sae {sae_id!r}", details={"id": sae_id})
    elif checkpoints.exists():
        shutil.rmtree(checkpoints)  # an abandoned earlier attempt under this id
    if resume_from is not None and train_cfg.batch_size is None:
        train_cfg = train_cfg.model_copy(update={"batch_size": checkpoint_batch_size(resume_from)})
    train_rows = int(manifest.n_tokens * (1 - HELDOUT_FRACTION))
    train_cfg, warnings = choose_batch_size(train_cfg, train_rows)
    if on_warning is not None:
        for warning in warnings:
            on_warning(warning)
    started = time.perf_counter()
    result = train_sae(
        sae_cfg,
        train_cfg,
        _run_rows(store, run_id, layer, filters, "train", train_cfg.seed, replay, target_layer),
        on_progress=on_progress,
        should_stop=should_stop,
        checkpoint_dir=checkpoints,
        resume_from=resume_from,
        eval_data=_run_rows(
            store, run_id, layer, filters, "heldout", replay=replay, target_layer=target_layer
        ),
    )
    if result.stopped:
        return TrainingStopped(
            id=sae_id,
            step=result.step,
            tokens=result.tokens,
            checkpoint=str(result.checkpoint.relative_to(store.local_root)) if result.checkpoint else None,
            warnings=warnings,
        )
    metrics = dict(result.metrics)
    metrics["all_rows"] = evaluate(
        result.sae,
        _run_rows(store, run_id, layer, None, "all", target_layer=target_layer)(),
        max_rows=EVAL_MAX_ROWS,
    )
    metrics["all_rows"]["note"] = (
        "every row of the run, attention sinks included: not what the SAE was trained on"
    )
    skipped = manifest.unloadable_model_reason()
    if skipped is not None:
        metrics["model_in_the_loop"] = {"skipped": True, "reason": skipped}
    summary = SAEManifest(
        id=sae_id,
        status="complete",
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        model=manifest.model.name,
        run_id=run_id,
        layer=layer,
        target_layer=target_layer,
        kind=result.sae.config.kind,
        config=result.sae.config.model_dump(mode="json"),
        train_config=train_cfg.model_dump(mode="json"),
        metrics=metrics,
        steps=result.step,
        tokens=result.tokens,
        train_seconds=round(time.perf_counter() - started, 2),
        warnings=warnings,
    )
    return publish_sae(store, sae_id, result, summary)


def publish_sae(store: Store, sae_id: str, result: TrainResult, summary: SAEManifest) -> SAEManifest:
    """Publish a trained SAE in one rename (weights, metrics, history, its checkpoints, the
    summary as manifest last): it appears whole or not at all."""
    checkpoints = _checkpoint_dir(store, sae_id)
    with store.writer(KIND, sae_id) as writer:
        sae_io.save_sae(result.sae, writer.directory, metrics=summary.metrics, history=result.history)
        if checkpoints.is_dir():
            os.rename(checkpoints, writer.directory / "checkpoints")
        writer.commit(summary.to_json())
    return summary


def load_sae(store: Store, sae_id: str, *, device: str | torch.device = "cpu") -> tuple[SAE, SAEManifest]:
    summary = get_sae(store, sae_id)
    directory = store.local_dir(KIND, sae_id, [sae_io.CONFIG_FILE, sae_io.WEIGHTS_FILE])
    return sae_io.load_sae(directory, device=device), summary


def heldout_texts(store: Store, run_id: str, limit: int = EVAL_MAX_TEXTS) -> list[str]:
    """The run's held-out documents: texts no training row came from."""
    docs = read_docs(store, run_id)
    held = _heldout_mask(torch.arange(len(docs)), HELDOUT_FRACTION)
    return [docs[i] for i in torch.nonzero(held).flatten().tolist()[:limit]]


def evaluate_sae(
    store: Store,
    sae_id: str,
    lm: LoadedModel,
    texts: list[str] | None = None,
    *,
    on_progress: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Model-in-the-loop metrics (CE-loss recovered, KL) on held-out texts, stored with the SAE."""
    sae, summary = load_sae(store, sae_id, device=lm.device)
    summary.require_sae("model-in-the-loop evaluation")  # it would splice the target in as `layer`
    require_loadable_model(store, summary)
    run = get_manifest(store, summary.run_id) if summary.run_id else None
    layer = summary.layer_name
    if layer is None:
        raise InvalidInputError(f"sae {sae_id!r} does not record the layer it reads")
    lm.layer(layer)
    if texts is None:
        if run is None:
            raise InvalidInputError(f"sae {sae_id!r} has no capture run; give texts to evaluate on")
        texts = heldout_texts(store, run.id)
    if not texts:
        raise InvalidInputError("no texts to evaluate on")
    filters = RowFilter(**summary.config.get("data", {}).get("filters", RowFilter.recommended().model_dump()))
    norm_median = run.layers[layer].norm_median if run and layer in run.layers else None
    metrics = ce_loss_metrics(
        lm, sae, layer, texts, filters=filters, norm_median=norm_median, on_progress=on_progress
    )
    try:
        stored = store.read_json(KIND, sae_id, sae_io.METRICS_FILE) or {}
    except NotFoundError:
        stored = {}
    stored["model_in_the_loop"] = metrics
    store.put_json(KIND, sae_id, sae_io.METRICS_FILE, stored)
    summary.metrics = {**summary.metrics, "model_in_the_loop": metrics}
    store.put_json(KIND, sae_id, "manifest.json", summary.to_json())  # the summary last, as at publishing
    return metrics


def export_sae_zip(store: Store, sae_id: str, fmt: Literal["kestrel", "saelens", "sparsify"]) -> bytes:
    """The SAE's files as a zip: Kestrel's own layout, SAELens's (``cfg.json`` + weights, with
    6.x metadata naming the model's Hugging Face id) or sparsify's (a topk SAE)."""
    sae_id = validate_id(sae_id, "sae id")
    top_level = [f.rel for f in store.list_files(KIND, sae_id) if "/" not in f.rel]
    if fmt not in ("kestrel", *exchange.EXPORT_FORMATS):
        raise InvalidInputError(
            f"unknown export format {fmt!r}; use 'kestrel', 'saelens' or 'sparsify'",
            details={"format": fmt, "supported": ["kestrel", *exchange.EXPORT_FORMATS]},
        )
    directory = store.local_dir(KIND, sae_id, top_level)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        if fmt == "kestrel":
            for rel in top_level:
                archive.write(directory / rel, rel)
        else:
            sae = sae_io.load_sae(directory)
            metadata = (
                exchange.model_metadata(sae.config.model, store.local_root) if fmt == "saelens" else None
            )
            for name, payload in exchange.export_files(sae, fmt, metadata=metadata).items():
                archive.writestr(name, payload)
    return buffer.getvalue()


def import_saelens(
    store: Store,
    cfg_json: bytes,
    weights: bytes,
    *,
    sae_id: str | None = None,
    model: str | None = None,
    layer: str | None = None,
    caps: Caps | None = None,
    norm_scaling_factor: float | None = None,
) -> SAEManifest:
    """Publish an SAE from SAELens files (``cfg.json`` + ``sae_weights.safetensors``)."""
    files = {sae_io.SAELENS_CONFIG_FILE: cfg_json, sae_io.SAELENS_WEIGHTS_FILE: weights}
    return import_sae_files(
        store,
        files,
        sae_id=sae_id,
        model=model,
        layer=layer,
        caps=caps,
        norm_scaling_factor=norm_scaling_factor,
    )


def import_sae_files(
    store: Store,
    files: dict[str, bytes],
    *,
    sae_id: str | None = None,
    model: str | None = None,
    layer: str | None = None,
    caps: Caps | None = None,
    norm_scaling_factor: float | None = None,
) -> SAEManifest:
    """Publish an SAE from a file set in any layout `exchange.detect_layout` knows.

    Everything is checked (layout, shapes from the header against the config and ``caps``,
    finite weights, what the config means) before the store is touched: a bad file publishes
    nothing, and the store's writer publishes in one rename, so a crash leaves nothing visible.
    """
    sae_id = validate_id(sae_id, "sae id") if sae_id else new_id("sae")
    if store.exists(KIND, sae_id):
        raise ConflictError(f"sae id {sae_id!r} already exists", details={"id": sae_id})
    sae, layout = exchange.sae_from_files(files, caps=caps, norm_scaling_factor=norm_scaling_factor)
    updates = {key: value for key, value in (("model", model), ("layer", layer)) if value}
    if updates:
        sae.config = sae.config.model_copy(update=updates)
    summary = SAEManifest(
        id=sae_id,
        status="imported",
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        model=sae.config.model,
        run_id=sae.config.run_id,
        layer=sae.config.layer,
        target_layer=sae.config.target_layer,
        kind=sae.config.kind,
        config=sae.config.model_dump(mode="json"),
        metrics={},
        imported_from=layout,
    )
    with store.writer(KIND, sae_id) as writer:
        sae_io.save_sae(sae, writer.directory, metrics={})
        writer.commit(summary.to_json())
    return summary


def encode_prompt(
    lm: LoadedModel, sae: SAE, layer: str, text: str, *, top_k: int = 8
) -> list[dict[str, Any]]:
    """The strongest latents at each token of ``text``.

    ``layer`` is the layer spec the SAE reads: a module's output, or its input
    (``MODULE:input``, a transcoder's), hooked as capture hooks it, so the values are those
    discovery computed from the run's rows. Only the encoder runs: a transcoder's latents are
    defined by its input alone (its decoder writes another layer, which is not read here).
    """
    if top_k <= 0:
        raise InvalidInputError(f"top_k must be > 0, got {top_k}")
    lm.layer(parse_layer_spec(layer)[0])  # NotFoundError naming close matches
    encoded = lm.tokenizer([text], return_tensors="pt").to(lm.device)
    if encoded["input_ids"].shape[1] == 0:
        raise InvalidInputError("the text has no tokens")
    seen: dict[str, torch.Tensor] = {}
    with HookManager(lm.model, record_spec(layer, seen)), torch.inference_mode():
        run_until_stopped(lambda: lm.model(**encoded, use_cache=False))
        h_TD = seen["h"][0].float()
        out = sae.to(h_TD.device).encode(h_TD)  # where the layer ran (a split model's own device)
    values_TK, order_TK = out.acts.topk(min(top_k, out.acts.shape[-1]), dim=-1)
    indices_TK = out.indices.gather(-1, order_TK)
    ids = encoded["input_ids"][0].tolist()
    tokens = lm.tokenizer.convert_ids_to_tokens(ids)
    return [
        {
            "position": t,
            "token": tokens[t],
            "token_id": ids[t],
            "latents": [
                {"index": int(i), "value": float(v)}
                for v, i in zip(values_TK[t].tolist(), indices_TK[t].tolist(), strict=True)
                if v > 0
            ],
        }
        for t in range(len(ids))
    ]
