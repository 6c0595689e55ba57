"""Stream training: one pass of the model over a dataset feeds N SAEs at once, optionally spilling
the activations as a standard run so later sweeps replay the store instead of the model.

Each forward stops after the deepest requested layer (`use_cache=False`, no LM head). Its rows go
through the same row filters and document-level train/held-out split as a stored run's
(`run_reader.filter_rows`), then through one shuffle buffer per (layer, seed), then to each SAE's
own `Rebatcher` and `TrainingRun.feed`. Rows are rounded to the storage dtype first, so the SAEs
train on exactly what the spill stores.

Same seed, same weights: replaying the spilled run with ``train_from_run(..., order="stream",
norm_median=<the SAE's data.norm_median>)`` reads its shards in stored order through the same
`ShuffleBuffer` (whose output never depends on chunk boundaries), so it gives the same batches.
The reference norm of ``max_norm_multiple`` is the median row norm (position > 0) of the first
forward batch, recorded in each SAE's ``config.data``; a stored run uses its manifest's instead.

The learning-rate schedule needs the rows of the pass before the first step: unless a
``token_budget`` fixes it, a tokenizer-only pre-pass counts the training rows (position, special
token and split filters; rows the norm filter drops are not known before the forward, so the
count may run a few rows over). A stream is one epoch; more epochs replay the spilled run.

A transcoder (``target_layer`` on its entry) reads one layer and predicts another of the same pass,
e.g. ``model.layers.10.mlp:input`` → ``model.layers.10.mlp``: both are captured in the one forward,
and its rows are the two layers' rows side by side (``[x | y]``, as a stored run's paired read
gives them), each half held to its own layer's norm median. So one pass can train a transcoder for
every block's MLP; ``StreamReplay(norm_median, target_norm_median)`` replays its spill the same way.

Faults: should_stop(sae_id) stops that SAE at once with a checkpoint (the others go on; when all
have stopped the pass ends and the spill is not published; without a spill the pass also ends
once every SAE is stopped or through its token budget). ``resume=True`` re-streams from the
start and each SAE skips the rows its checkpoint consumed, reaching the uninterrupted weights. An
exception or a kill publishes nothing beyond the SAEs already published (spill and SAEs appear
whole or not at all: each is one rename).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from kestrel.core.activations import (
    RunWriter,
    _as_spec,
    _CaptureResult,
    _check_layers,
    _describe_dataset,
    _dropped_token_ids,
    _manifest,
    capture_batches,
    rows_mask_and_meta,
    spec_detector,
)
from kestrel.core.datasets import DatasetSpec, iter_texts
from kestrel.core.errors import ConflictError, InvalidInputError, NotFoundError
from kestrel.core.hooks import HookContext, HookManager, run_until_stopped, stop_after
from kestrel.core.models import TORCH_DTYPES, LoadedModel
from kestrel.core.run_reader import RowBatch, ShuffleBuffer, filter_rows
from kestrel.core.runs import CaptureOptions, RowFilter, parse_layer_spec
from kestrel.core.sae.artifacts import (
    HELDOUT_FRACTION,
    SHUFFLE_BUFFER_ROWS,
    checkpoint_batch_size,
    choose_batch_size,
    publish_sae,
)
from kestrel.core.sae.batches import Rebatcher
from kestrel.core.sae.checkpoint import latest_checkpoint
from kestrel.core.sae.config import DEFAULT_BATCH_SIZE, SAEConfig, TrainConfig
from kestrel.core.sae.progress import TrainingPoint
from kestrel.core.sae.records import KIND, SAEManifest, TrainingStopped, check_transcoder_request
from kestrel.core.sae.records import checkpoint_dir as _checkpoint_dir
from kestrel.core.sae.trainer import TrainingRun, open_run, resolve_plan
from kestrel.core.store import Store, new_id, validate_id

#: Held-out rows kept per layer for the final evaluation (the first ones the pass meets).
EVAL_MAX_ROWS = 65_536
#: What the shuffle buffers (float32 rows) and the held-out rows may hold together: a stream of
#: thirty transcoders would otherwise keep 30 × 64k rows of [x | y] in each (~13 GB at d 576).
BUFFER_BYTES = 2 << 30
HELDOUT_BYTES = 1 << 30
#: Listed layer kinds whose input is the residual stream (or its normalised copy): d_model wide.
RESIDUAL_READERS = frozenset({"block", "attention", "mlp", "norm", "head"})
#: Fewer rows than this per buffer, or per source held out, would mix or measure too little.
MIN_STREAM_ROWS = 4096


class StreamSAE(BaseModel):
    """One SAE of a stream job: which layer it reads and how it is built and trained."""

    layer: str
    sae: SAEConfig | dict[str, Any] = Field(default_factory=dict)
    train: TrainConfig | dict[str, Any] = Field(default_factory=dict)
    sae_id: str | None = None
    target_layer: str | None = None
    """A transcoder's: the layer it predicts from ``layer`` (None: an SAE of ``layer``)."""


#: The rows one trainee reads: (layer, target layer or None). A transcoder's are paired.
Source = tuple[str, str | None]


@dataclass
class _Trainee:
    """One SAE's place in the stream: its configs, id, run (once open) and batcher."""

    layer: str
    target_layer: str | None
    sae_config: SAEConfig
    train_config: TrainConfig
    sae_id: str
    resume_from: Path | None
    checkpoints: Path
    rows: int | None = None
    """Training rows of the pass (the plan's epoch), when no token budget fixes the plan."""
    run: TrainingRun | None = None
    batcher: Rebatcher | None = None
    stopped: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def source(self) -> Source:
        return (self.layer, self.target_layer)


def train_stream(
    lm: LoadedModel,
    dataset: DatasetSpec | Sequence[str],
    saes: Sequence[StreamSAE | dict[str, Any]],
    store: Store,
    *,
    options: CaptureOptions | None = None,
    filters: RowFilter | None = None,
    spill_run_id: str | None = None,
    shuffle_buffer: int = SHUFFLE_BUFFER_ROWS,
    resume: bool | Literal["auto"] = False,
    on_progress: Callable[[str, TrainingPoint], None] | None = None,
    should_stop: Callable[[str], bool] | None = None,
    dataset_record: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Train every SAE in ``saes`` from one pass of ``lm`` over ``dataset``; one summary each
    (``status`` "complete" and published, or "stopped" with its checkpoint).

    ``resume=True`` continues each SAE from its newest checkpoint (NotFoundError without one);
    ``"auto"`` continues those that have one and starts the others afresh (a requeued job).
    ``shuffle_buffer`` rows are held per (layer, seed) before the first step: the stored-run
    default mixes rows of hundreds of documents."""
    if shuffle_buffer <= 0:
        raise InvalidInputError(f"shuffle_buffer must be > 0, got {shuffle_buffer}")
    options = options or CaptureOptions()
    options.check()
    filters = filters or RowFilter.recommended()
    spec = _as_spec(dataset)
    record = dataset_record if dataset_record is not None else _describe_dataset(spec)
    if spill_run_id is not None:
        spill_run_id = validate_id(spill_run_id, "run id")
        if store.exists("activations", spill_run_id):
            raise ConflictError(f"run id {spill_run_id!r} already exists", details={"id": spill_run_id})
    trainees = _trainees(lm, saes, store, resume)
    read = {t.layer for t in trainees} | {t.target_layer for t in trainees if t.target_layer is not None}
    layers = _check_layers(lm, sorted(read))
    _plan(lm, spec, trainees, options, filters)  # every check that needs no forward, first
    recorded = _recorded_sizes(trainees)  # a resume reads its rows as its checkpoint did
    shuffle_buffer = recorded.get("shuffle_buffer") or _fit_buffers(trainees, shuffle_buffer)
    heldout_max = recorded.get("heldout_max_rows") or _fit_heldout(trainees, TORCH_DTYPES[options.dtype])
    stream = _Stream(lm, layers, trainees, options, filters, shuffle_buffer, spill_run_id, record)
    stream.heldout_max = heldout_max
    stream.on_progress, stream.should_stop = on_progress, should_stop  # per-SAE callbacks
    if spill_run_id is None:
        stream.run(iter_texts(spec), None)
    else:
        with RunWriter(store, spill_run_id, layers, dtype=options.dtype, shard_mb=options.shard_mb) as spill:
            stream.run(spill.tee_docs(iter_texts(spec)), spill)
            if not stream.all_stopped():
                spill.close_rows()
                result = _CaptureResult(stream.n_docs, time.perf_counter() - stream.started)
                spill.commit(
                    _manifest(lm, spec, spill, options, result).model_copy(update={"dataset": record})
                )
    return [stream.finish(t, store) for t in trainees]


def _trainees(
    lm: LoadedModel, saes: Sequence[StreamSAE | dict[str, Any]], store: Store, resume: bool | Literal["auto"]
) -> list[_Trainee]:
    if not saes:
        raise InvalidInputError("no SAEs given; a stream job trains at least one")
    trainees: list[_Trainee] = []
    for i, item in enumerate(saes):
        entry = item if isinstance(item, StreamSAE) else StreamSAE.model_validate(item)
        width = stream_width(lm, entry.layer, i)
        raw = entry.sae.model_dump() if isinstance(entry.sae, SAEConfig) else dict(entry.sae)
        if raw.get("d_in") not in (None, width):
            raise InvalidInputError(
                f"saes[{i}]: d_in {raw['d_in']} does not match layer {entry.layer!r} (width {width})",
                details={"index": i, "d_in": raw["d_in"], "layer_width": width},
            )
        check_transcoder_request(entry.layer, entry.target_layer, raw, f"saes[{i}]")
        from_model = {"d_in": width, "model": lm.name, "layer": entry.layer, **_target_fields(lm, entry, i)}
        sae_cfg = SAEConfig.from_dict({**raw, **from_model})
        train = entry.train
        train_cfg = train if isinstance(train, TrainConfig) else TrainConfig.from_dict(dict(train))
        train_cfg.check_one_pass(i)
        sae_id = validate_id(entry.sae_id, "sae id") if entry.sae_id else new_id("sae")
        resume_from = _resume_point(store, sae_id, resume)
        checkpoints = _checkpoint_dir(store, sae_id)
        trainees.append(
            _Trainee(entry.layer, entry.target_layer, sae_cfg, train_cfg, sae_id, resume_from, checkpoints)
        )
    ids = [t.sae_id for t in trainees]
    if len(set(ids)) != len(ids):
        raise InvalidInputError("sae ids repeated", details={"ids": ids})
    return trainees


def stream_width(lm: LoadedModel, spec: str, index: int = 0) -> int:
    """A stream layer's width before any forward (it sizes the SAE): the layer table's, and for a
    module's input (``MODULE:input``) the residual stream's, for the listed kinds that read it
    (`RESIDUAL_READERS`); any other input's width is only known at the forward: refused here."""
    module, side = parse_layer_spec(spec)
    info = lm.layer(module)  # NotFoundError with close names
    reads_residual = info.kind in RESIDUAL_READERS  # an unlisted module ("other") may read anything
    width = info.width if side == "output" else (lm.d_model if reads_residual else -1)
    if width <= 0:
        raise InvalidInputError(
            f"saes[{index}]: layer {spec!r} has no known width before the forward; stream training "
            "needs a listed layer (or a listed layer's :input) since its width sizes the SAE",
            details={"index": index, "layer": spec},
        )
    return width


def _target_fields(lm: LoadedModel, entry: StreamSAE, index: int) -> dict[str, Any]:
    """``target_layer`` and ``d_out`` of a transcoder entry (none for an SAE)."""
    if entry.target_layer is None:
        return {}
    return {"target_layer": entry.target_layer, "d_out": stream_width(lm, entry.target_layer, index)}


def _recorded_sizes(trainees: list[_Trainee]) -> dict[str, int]:
    """The shuffle buffer and held-out sizes the resuming trainees' checkpoints were trained with
    (their ``config.data``). The budget fit depends on which SAEs share the pass, and one resumed
    alone must see its rows in the order it was stopped in, or its weights would differ."""
    seen: dict[str, set[int]] = {}
    for t in trainees:
        if t.resume_from is None:
            continue
        state = json.loads((t.resume_from / "state.json").read_text())
        data = (state.get("sae_config") or {}).get("data") or {}
        for key in ("shuffle_buffer", "heldout_max_rows"):
            if data.get(key):
                seen.setdefault(key, set()).add(int(data[key]))
    mixed = {key: sorted(values) for key, values in seen.items() if len(values) > 1}
    if mixed:
        raise InvalidInputError(
            f"the SAEs to resume were trained with different stream sizes {mixed}: resume them in "
            "separate jobs",
            details=mixed,
        )
    return {key: values.pop() for key, values in seen.items()}


def _fit_buffers(trainees: list[_Trainee], shuffle_buffer: int) -> int:
    """Rows per (source, seed) shuffle buffer: ``shuffle_buffer``, or fewer (each trainee warned)
    when the buffers together would hold more than `BUFFER_BYTES`. The size is recorded in each
    SAE's ``config.data``, which is what a replay of the spill reads."""
    widths = {(t.source, t.train_config.seed): t.sae_config.row_width for t in trainees}
    fitted = max(MIN_STREAM_ROWS, BUFFER_BYTES // (4 * sum(widths.values())))
    if fitted >= shuffle_buffer:
        return shuffle_buffer
    for t in trainees:
        t.warnings.append(
            f"shuffle buffer {fitted} rows, not {shuffle_buffer}: {len(widths)} buffers of this stream "
            f"share {BUFFER_BYTES >> 20} MiB; rows mix across fewer documents"
        )
    return fitted


def _fit_heldout(trainees: list[_Trainee], storage_dtype: torch.dtype) -> int:
    """Held-out rows kept per source for the final evaluation: `EVAL_MAX_ROWS`, or fewer when the
    sources together would hold more than `HELDOUT_BYTES` (never under `MIN_STREAM_ROWS`)."""
    widths = {t.source: t.sae_config.row_width for t in trainees}
    row_bytes = storage_dtype.itemsize * sum(widths.values())
    return min(EVAL_MAX_ROWS, max(MIN_STREAM_ROWS, HELDOUT_BYTES // row_bytes))


def _resume_point(store: Store, sae_id: str, resume: bool | Literal["auto"]) -> Path | None:
    if store.exists(KIND, sae_id):
        raise ConflictError(f"sae id {sae_id!r} already exists", details={"id": sae_id})
    checkpoints = _checkpoint_dir(store, sae_id)
    found = latest_checkpoint(checkpoints) if resume and checkpoints.is_dir() else None
    if found is None and resume != True:  # noqa: E712 (False or "auto")
        if checkpoints.exists():
            shutil.rmtree(checkpoints)  # an abandoned earlier attempt under this id
        return None
    if found is None:
        raise NotFoundError(f"no checkpoint to resume for sae {sae_id!r}", details={"id": sae_id})
    return found


def _plan(
    lm: LoadedModel, spec: DatasetSpec, trainees: list[_Trainee], options: CaptureOptions, filters: RowFilter
) -> None:
    """Batch sizes and plans; counts the training rows with a tokenizer-only pass if needed.

    An unset batch size is chosen from the rows the SAE will see, as for a stored run
    (`choose_batch_size`, which also warns when training will take too few steps); a resumed SAE
    keeps the batch size its checkpoint was trained with."""
    rows: int | None = None
    for t in trainees:
        if t.train_config.batch_size is None and t.resume_from is not None:
            kept = checkpoint_batch_size(t.resume_from)
            t.train_config = t.train_config.model_copy(update={"batch_size": kept})
        if t.train_config.token_budget is None and rows is None:
            rows = count_train_rows(lm, spec, options, filters)
        t.rows = None if t.train_config.token_budget is not None else rows
        seen = t.rows if t.rows is not None else t.train_config.token_budget
        assert seen is not None
        t.train_config, warnings = choose_batch_size(t.train_config, seen)
        t.warnings.extend(warnings)
        resolve_plan(t.sae_config, t.train_config, t.rows)  # InvalidInputError: too few rows


def count_train_rows(lm: LoadedModel, spec: DatasetSpec, options: CaptureOptions, filters: RowFilter) -> int:
    """Training rows of one pass, from tokens alone (the norm filter needs the forward)."""
    drop_ids = _dropped_token_ids(lm.tokenizer, options)
    special = sorted(int(i) for i in lm.tokenizer.all_special_ids)
    total = 0
    for batch in capture_batches(lm, iter_texts(spec), options):
        meta = rows_mask_and_meta(batch, drop_ids, torch.device("cpu"))[1]
        rows = RowBatch(
            torch.empty(len(meta["token_id"]), 0), meta["token_id"], meta["doc_index"], meta["position"]
        )
        total += len(filter_rows(rows, filters, special, None, "train", HELDOUT_FRACTION))
    return total


class _Stream:
    """The pass itself: forwards, filters, shuffles and feeds; then evaluation and publishing."""

    def __init__(
        self,
        lm: LoadedModel,
        layers: list[str],
        trainees: list[_Trainee],
        options: CaptureOptions,
        filters: RowFilter,
        shuffle_buffer: int,
        spill_run_id: str | None,
        dataset_record: dict[str, Any],
    ) -> None:
        self.lm, self.layers, self.trainees = lm, layers, trainees
        self.options, self.filters, self.shuffle_buffer = options, filters, shuffle_buffer
        self.on_progress: Callable[[str, TrainingPoint], None] | None = None
        self.should_stop: Callable[[str], bool] | None = None
        self.spill_run_id, self.dataset_record = spill_run_id, dataset_record
        self.storage_dtype = TORCH_DTYPES[options.dtype]
        self.special = sorted(int(i) for i in lm.tokenizer.all_special_ids)
        self.medians: dict[str, float | None] | None = None
        self.widths: dict[str, int] = {}
        self.sources: list[Source] = list(dict.fromkeys(t.source for t in trainees))
        self.buffers: dict[tuple[Source, int], ShuffleBuffer] = {}
        self.heldout: dict[Source, list[torch.Tensor]] = {source: [] for source in self.sources}
        self.heldout_rows = dict.fromkeys(self.sources, 0)
        self.heldout_max = EVAL_MAX_ROWS  # held-out rows kept per source (`_fit_heldout`)
        self.n_docs = 0
        self.started = time.perf_counter()

    def all_stopped(self) -> bool:
        return all(t.stopped for t in self.trainees)

    def all_done(self, spill: RunWriter | None) -> bool:
        """Every SAE stopped or through its token budget: the rest of the pass would feed nobody
        (unless it is being spilled, which needs the whole dataset)."""
        if spill is not None:
            return self.all_stopped()
        return all(t.stopped or (t.run is not None and t.run.budget_spent()) for t in self.trainees)

    def run(self, texts: Iterator[str], spill: RunWriter | None) -> None:
        drop_ids = _dropped_token_ids(self.lm.tokenizer, self.options)
        rows: dict[str, torch.Tensor] = {}
        keep: dict[str, torch.Tensor] = {}

        def record(name: str, acts_BTD: torch.Tensor, ctx: HookContext) -> None:
            # A split model runs this layer on its own device; the mask was built beside the inputs.
            acts_ND = acts_BTD.detach()[keep["mask_BT"].to(acts_BTD.device)]
            rows[name] = acts_ND.to("cpu", self.storage_dtype)

        hooks = [spec_detector(name, partial(record, name)) for name in self.layers]
        hooks.append(stop_after(parse_layer_spec(self.layers[-1])[0]))
        device = self.lm.device
        with HookManager(self.lm.model, hooks):
            for batch in capture_batches(self.lm, texts, self.options):
                with torch.no_grad():  # not inference_mode: the rows go on into autograd
                    keep["mask_BT"], meta = rows_mask_and_meta(batch, drop_ids, device)
                    ids_BT, attn_BT = batch.input_ids_BT.to(device), batch.attention_mask_BT.to(device)
                    forward = partial(
                        self.lm.model, input_ids=ids_BT, attention_mask=attn_BT, use_cache=False
                    )
                    run_until_stopped(forward)
                if spill is not None:
                    spill.add(dict(rows), meta)
                self.n_docs = max(self.n_docs, int(batch.doc_index_B.max()) + 1)
                self._feed_batch(rows, meta)
                if self.all_done(spill):
                    return
        if self.medians is None:
            raise InvalidInputError("the dataset produced no tokens (empty texts, or every token dropped)")
        self._drain()

    def _feed_batch(self, rows: dict[str, torch.Tensor], meta: dict[str, torch.Tensor]) -> None:
        if self.medians is None:
            self._open(rows, meta)
        for source in self.sources:
            batch = self._source_rows(source, rows, meta)
            self._keep_heldout(source, batch)
            train = self._filter(source, batch, "train")
            for seed in sorted({t.train_config.seed for t in self.trainees if t.source == source}):
                for chunk in self._buffer(source, seed).push(train):
                    self._feed_chunk(source, seed, chunk.acts_ND)

    @staticmethod
    def _source_rows(
        source: Source, rows: dict[str, torch.Tensor], meta: dict[str, torch.Tensor]
    ) -> RowBatch:
        """One source's rows: a layer's, or a transcoder's input and target side by side."""
        layer, target = source
        acts_ND = rows[layer] if target is None else torch.cat([rows[layer], rows[target]], dim=1)
        return RowBatch(acts_ND.float(), meta["token_id"], meta["doc_index"], meta["position"])

    def _filter(self, source: Source, batch: RowBatch, split: Literal["train", "heldout"]) -> RowBatch:
        """The rows a stored run's read keeps: a paired row is kept when each half passes the norm
        filter against its own layer's median (`run_reader.filter_rows`'s ``column_medians``)."""
        assert self.medians is not None
        layer, target = source
        if target is None:
            return filter_rows(
                batch, self.filters, self.special, self.medians[layer], split, HELDOUT_FRACTION
            )
        d_in = batch.acts_ND.shape[1] - self.widths[target]
        groups = [(d_in, self.medians[layer]), (self.widths[target], self.medians[target])]
        return filter_rows(
            batch, self.filters, self.special, None, split, HELDOUT_FRACTION, column_medians=groups
        )

    def _open(self, rows: dict[str, torch.Tensor], meta: dict[str, torch.Tensor]) -> None:
        """Calibrate the norm filter on the first batch, then open every SAE's run."""
        not_first_N = meta["position"] > 0
        self.widths = {name: int(rows[name].shape[1]) for name in self.layers}
        self._check_widths()
        self.medians = {
            name: float(rows[name][not_first_N].float().norm(dim=-1).median())
            if bool(not_first_N.any())
            else None
            for name in self.layers
        }
        for t in self.trainees:
            data = {
                "source": "stream",
                "dataset": self.dataset_record,
                "filters": self.filters.model_dump(),
                "split": "train",
                "heldout_fraction": HELDOUT_FRACTION,
                "heldout_by": "document",
                "order": "stream",
                "norm_median": self.medians[t.layer],
                **({"target_norm_median": self.medians[t.target_layer]} if t.target_layer else {}),
                "shuffle_buffer": self.shuffle_buffer,
                "heldout_max_rows": self.heldout_max,
                "storage_dtype": self.options.dtype,
                "capture_options": self.options.model_dump(),
            }
            t.sae_config = t.sae_config.model_copy(update={"run_id": self.spill_run_id, "data": data})
            on_progress = None if self.on_progress is None else partial(self.on_progress, t.sae_id)
            t.run = open_run(
                t.sae_config,
                t.train_config,
                t.rows,
                on_progress=on_progress,
                checkpoint_dir=t.checkpoints,
                resume_from=t.resume_from,
            )
            t.batcher = Rebatcher(
                t.train_config.batch_size or DEFAULT_BATCH_SIZE, t.sae_config, t.run.state.rows_in_epoch
            )
            t.run.start()

    def _check_widths(self) -> None:
        """The first forward's widths against the SAEs' (an ``:input`` width was inferred)."""
        for t in self.trainees:
            expected = {t.layer: t.sae_config.d_in}
            if t.target_layer is not None:
                expected[t.target_layer] = t.sae_config.output_width
            for name, width in expected.items():
                if self.widths[name] != width:
                    raise InvalidInputError(
                        f"layer {name!r} gives rows of width {self.widths[name]}, but SAE {t.sae_id!r} "
                        f"was sized for {width}",
                        details={"layer": name, "width": self.widths[name], "expected": width},
                    )

    def _buffer(self, source: Source, seed: int) -> ShuffleBuffer:
        key = (source, seed)
        if key not in self.buffers:  # the generator a stored run's epoch 0 would use
            self.buffers[key] = ShuffleBuffer(self.shuffle_buffer, torch.Generator().manual_seed(seed * 1000))
        return self.buffers[key]

    def _feed_chunk(self, source: Source, seed: int, acts_ND: torch.Tensor) -> None:
        for t in self.trainees:
            if t.source != source or t.train_config.seed != seed or t.stopped:
                continue
            assert t.run is not None and t.batcher is not None
            for consumed, x_BD in t.batcher.push(acts_ND):
                self._step(t, consumed, x_BD)

    def _step(self, t: _Trainee, consumed: int, x_BD: torch.Tensor) -> None:
        assert t.run is not None
        if t.stopped or t.run.budget_spent():
            return
        if self.should_stop is not None and self.should_stop(t.sae_id):
            t.run.stop()
            t.stopped = True
            return
        t.run.feed(0, consumed, x_BD)

    def _drain(self) -> None:
        """End of data: the buffers' last rows, then each batcher's remainder."""
        for (source, seed), buffer in self.buffers.items():
            for chunk in buffer.flush():
                self._feed_chunk(source, seed, chunk.acts_ND)
        for t in self.trainees:
            if t.stopped or t.batcher is None:
                continue
            last = t.batcher.finish()
            if last is not None:
                self._step(t, *last)

    def _keep_heldout(self, source: Source, batch: RowBatch) -> None:
        room = self.heldout_max - self.heldout_rows[source]
        if room <= 0:
            return
        held = self._filter(source, batch, "heldout")
        acts_ND = held.acts_ND[:room].to(self.storage_dtype)
        self.heldout[source].append(acts_ND)
        self.heldout_rows[source] += len(acts_ND)

    def finish(self, t: _Trainee, store: Store) -> SAEManifest | TrainingStopped:
        """Publish one SAE (evaluated on the held-out documents' rows), or report it stopped."""
        assert t.run is not None
        if t.stopped:
            result = t.run.result(True, None)
            checkpoint = result.checkpoint
            return TrainingStopped(
                id=t.sae_id,
                step=result.step,
                tokens=result.tokens,
                checkpoint=str(checkpoint.relative_to(store.local_root)) if checkpoint else None,
                warnings=t.warnings,
            )
        t.run.finish()
        heldout = self.heldout[t.source]
        result = t.run.result(False, (lambda: iter(heldout)) if heldout else None)
        summary = SAEManifest(
            id=t.sae_id,
            status="complete",
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            model=self.lm.name,
            run_id=self.spill_run_id,
            layer=t.layer,
            target_layer=t.target_layer,
            kind=result.sae.config.kind,
            dataset=self.dataset_record,
            config=result.sae.config.model_dump(mode="json"),
            train_config=t.train_config.model_dump(mode="json"),
            metrics=dict(result.metrics),
            steps=result.step,
            tokens=result.tokens,
            train_seconds=round(time.perf_counter() - self.started, 2),
            warnings=t.warnings,
        )
        return publish_sae(store, t.sae_id, result, summary)
