"""Capture layer activations over a dataset into a store run, and read them back.

A run is ``activations/<run_id>/`` (docs/store-format.md):

- ``<layer>/<shard>.safetensors``: ``acts`` ``[n_rows, d]`` in fp16/bf16/fp32, padding rows left out;
- ``tokens/<shard>.safetensors``: ``token_id``, ``doc_index``, ``position`` (int32) for the same rows,
  so every row traces back to its text (12 bytes a row);
- ``docs.jsonl``: the documents, one JSON object a line, in ``doc_index`` order;
- ``manifest.json``: written last; the run is published by one rename, so it appears whole or not
  at all.

``RunWriter`` writes that layout for any producer of rows: ``capture`` below, and the capture during
a user's own training (``kestrel.core.callbacks``). Capture does one forward per batch, with
detectors on the requested layers and a stop right after the deepest of them, so layers past it
cost nothing. A layer spec ``<module>:input`` records what the module reads instead of what it
returns (a transcoder's input beside its target ``<module>``): same pass, same rows, a layer of
its own whose manifest record says ``hook: input``. Reading rows back is
``kestrel.core.run_reader`` (re-exported here).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from safetensors.torch import save_file
from tqdm.auto import tqdm

from kestrel.core.datasets import DatasetSpec, TextsSource, TokenBatch, iter_texts, token_batches
from kestrel.core.errors import CancelledError, InvalidInputError
from kestrel.core.hooks import Detector, HookContext, HookManager, run_until_stopped, stop_after
from kestrel.core.models import TORCH_DTYPES, LoadedModel
from kestrel.core.run_reader import RowBatch as RowBatch
from kestrel.core.run_reader import heldout_mask as heldout_mask
from kestrel.core.run_reader import iter_batches as iter_batches
from kestrel.core.run_reader import iter_row_batches as iter_row_batches
from kestrel.core.run_reader import read_docs as read_docs
from kestrel.core.runs import (
    FORMAT_VERSION,
    KIND,
    ROW_META_FIELDS,
    RUN_FILE_NAMES,
    CaptureOptions,
    RunLayer,
    RunManifest,
    RunShard,
    parse_layer_spec,
)

# Re-exported: defined in the torch-free module and the reader, still importable from here.
from kestrel.core.runs import delete_run as delete_run
from kestrel.core.runs import list_runs as list_runs
from kestrel.core.store import LocalStore, Store, new_id, validate_id

NORM_SAMPLE_SIZE = 1 << 18


@dataclass
class CaptureProgress:
    docs: int
    """Documents read: the highest document index so far, plus one (what the run's n_docs counts)."""
    tokens: int
    """Rows stored so far: the run's n_tokens at the end."""
    batches: int
    elapsed_s: float
    forwarded: int = 0
    """Documents through the model so far. Batches are sorted by length within a window, so the
    highest index runs ahead; this count grows steadily (use it for a fraction of a known total)."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Capture


def execution_order(model: torch.nn.Module, layers: Sequence[str]) -> list[str]:
    """Layers sorted by when their forward finishes: a parent finishes after its children.

    The last one is where the forward can stop.
    """
    finish: dict[str, int] = {}

    def visit(module: torch.nn.Module, name: str) -> None:
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)
        finish[name] = len(finish)

    visit(model, "")
    return sorted(layers, key=lambda layer: finish[layer])


class _BottomKSample:
    """A uniform sample of at most ``size`` values from a stream (keep the smallest random keys)."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)
        self.keys = torch.empty(0)
        self.values = torch.empty(0)

    def add(self, values: torch.Tensor) -> None:
        keys = torch.cat([self.keys, torch.rand(len(values), generator=self.generator)])
        values = torch.cat([self.values, values.float()])
        if len(keys) > self.size:
            keep = torch.topk(keys, self.size, largest=False).indices
            keys, values = keys[keep], values[keep]
        self.keys, self.values = keys, values

    def median(self) -> float | None:
        return float(self.values.median()) if len(self.values) else None


class _ShardWriter:
    """Buffers rows per layer and writes shards of exactly ``shard_rows`` rows (the last one shorter).

    Every shard index covers the same rows in every layer and in ``tokens/``, so a reader can pair
    them by name.
    """

    def __init__(self, directory: Path, layers: Sequence[str], shard_rows: int) -> None:
        self.directory = directory
        self.layers = list(layers)
        self.shard_rows = shard_rows
        self.pending: dict[str, list[torch.Tensor]] = {name: [] for name in [*self.layers, *ROW_META_FIELDS]}
        self.pending_rows = 0
        self.shards: list[RunShard] = []
        for name in [*self.layers, "tokens"]:
            (directory / name).mkdir(parents=True, exist_ok=True)

    def add(self, acts: dict[str, torch.Tensor], meta: dict[str, torch.Tensor]) -> None:
        for name, tensor in [*acts.items(), *meta.items()]:
            self.pending[name].append(tensor)
        self.pending_rows += len(meta["token_id"])
        while self.pending_rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def close(self) -> None:
        if self.pending_rows:
            self._flush(self.pending_rows)

    def _flush(self, n_rows: int) -> None:
        shard = f"{len(self.shards):05d}"
        heads = {name: self._take(name, n_rows) for name in [*self.layers, *ROW_META_FIELDS]}
        for name in self.layers:
            save_file({"acts": heads[name]}, str(self.directory / name / f"{shard}.safetensors"))
        meta = {name: heads[name] for name in ROW_META_FIELDS}
        save_file(meta, str(self.directory / "tokens" / f"{shard}.safetensors"))
        self.pending_rows -= n_rows
        self.shards.append(RunShard(name=shard, n_tokens=n_rows))

    def _take(self, name: str, n_rows: int) -> torch.Tensor:
        """The first ``n_rows`` pending rows of ``name``; the rest stay pending."""
        parts = self.pending[name]
        joined = torch.cat(parts) if len(parts) > 1 else parts[0]
        head, tail = joined[:n_rows], joined[n_rows:]
        self.pending[name] = [tail] if len(tail) else []
        return head.contiguous()


class RunWriter:
    """Writes one run in the run format, whoever produces the rows (a capture, a training loop).

    Stages the run through ``store.writer`` (so any Store backend works), appends row batches per
    layer with their token metadata, rolls shards every ``shard_rows`` rows (derived from
    ``shard_mb`` and the widest layer when not given), keeps a uniform sample of row norms per
    layer for ``norm_median``, writes ``docs.jsonl`` as documents arrive and the manifest last.
    Leaving the ``with`` block by an exception (or calling ``abort``) publishes nothing.
    """

    def __init__(
        self,
        store: Store,
        run_id: str,
        layers: Sequence[str],
        *,
        dtype: str = "fp16",
        shard_mb: float = 64.0,
        shard_rows: int | None = None,
    ) -> None:
        if dtype not in TORCH_DTYPES:
            raise InvalidInputError(f"unknown storage dtype {dtype!r}; use one of {', '.join(TORCH_DTYPES)}")
        if shard_rows is not None and shard_rows <= 0:
            raise InvalidInputError(f"shard_rows must be > 0, got {shard_rows}")
        clashing = sorted(RUN_FILE_NAMES.intersection(layers))
        if clashing:
            raise InvalidInputError(
                f"layers {clashing} would overwrite the run's own files; "
                f"a layer may not be named {', '.join(sorted(RUN_FILE_NAMES))}"
            )
        self.run_id = run_id
        self.layers = list(layers)
        self.dtype = dtype
        self.storage_dtype = TORCH_DTYPES[dtype]
        self.shard_mb = shard_mb
        self.shard_rows = shard_rows
        self.widths: dict[str, int] = {}
        self.n_tokens = 0
        self._samples = {name: _BottomKSample(NORM_SAMPLE_SIZE, seed=i) for i, name in enumerate(self.layers)}
        self._staged = store.writer(KIND, run_id)
        self.directory = self._staged.directory
        self._docs = (self.directory / "docs.jsonl").open("w", encoding="utf-8")
        self._shards: _ShardWriter | None = None
        self._untagged = 0  # shards written since the last end_shard
        self._committed = False

    @property
    def shards(self) -> list[RunShard]:
        return self._shards.shards if self._shards is not None else []

    def write_doc(self, doc_index: int, text: str, **extra: Any) -> None:
        """One line of docs.jsonl; documents must arrive in ``doc_index`` order."""
        record = {"doc_index": doc_index, "text": text, **extra}
        self._docs.write(json.dumps(record, ensure_ascii=False) + "\n")

    def tee_docs(self, texts: Iterable[str]) -> Iterator[str]:
        """Write each document as a consumer reads it, so ``doc_index`` is its line number."""
        for i, text in enumerate(texts):
            self.write_doc(i, text)
            yield text

    def add(self, rows: dict[str, torch.Tensor], meta: dict[str, torch.Tensor]) -> None:
        """Append rows (``[n, d]`` per layer, in the storage dtype) and their int32 metadata."""
        missing = [name for name in self.layers if name not in rows]
        if missing:
            raise InvalidInputError(f"rows missing for layers {missing}")
        for name in self.layers:
            self.widths.setdefault(name, int(rows[name].shape[-1]))
        if self._shards is None:
            self._shards = _ShardWriter(self.directory, self.layers, self._rows_per_shard())
        not_first_N = meta["position"] > 0
        for name in self.layers:
            self._samples[name].add(rows[name][not_first_N].float().norm(dim=-1))
        self._shards.add({name: rows[name] for name in self.layers}, meta)
        self.n_tokens += len(meta["token_id"])

    def end_shard(self, **fields: Any) -> list[RunShard]:
        """Close the current shard early and tag every shard since the last call with ``fields``.

        A training capture ends a shard at each captured step, so a shard never mixes steps.
        """
        if self._shards is None:
            return []
        self._shards.close()
        new = self.shards[self._untagged :]
        for shard in new:
            for name, value in fields.items():
                setattr(shard, name, value)
        self._untagged = len(self.shards)
        return new

    def norm_medians(self) -> dict[str, float | None]:
        return {name: sample.median() for name, sample in self._samples.items()}

    def identity(self) -> dict[str, Any]:
        """The manifest's first fields."""
        return {
            "format_version": FORMAT_VERSION,
            "id": self.run_id,
            "kind": KIND,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def layer_records(self, kinds: dict[str, str]) -> dict[str, RunLayer]:
        """The manifest's ``layers``: width, kind and median row norm of each layer, in order."""
        medians = self.norm_medians()
        return {
            name: RunLayer(d=self.widths[name], kind=kinds.get(name, "other"), norm_median=medians[name])
            for name in self.layers
        }

    def close_rows(self) -> None:
        """Write the last partial shard and close docs.jsonl (before the manifest is built)."""
        if self._shards is not None:
            self._shards.close()
        if not self._docs.closed:
            self._docs.close()

    def commit(self, manifest: RunManifest) -> RunManifest:
        """Publish the run, manifest last; nothing is visible to readers before this."""
        self.close_rows()
        self._staged.commit(manifest.to_json())
        self._committed = True
        return manifest

    def abort(self) -> None:
        if not self._docs.closed:
            self._docs.close()
        self._staged.abort()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.abort()

    def _rows_per_shard(self) -> int:
        if self.shard_rows is not None:
            return self.shard_rows
        bytes_per_row = max(self.widths.values()) * torch.finfo(self.storage_dtype).bits // 8
        return max(1, int(self.shard_mb * (1 << 20)) // bytes_per_row)


def _as_spec(dataset: DatasetSpec | Sequence[str]) -> DatasetSpec:
    if isinstance(dataset, BaseModel):
        return dataset  # type: ignore[return-value]
    if isinstance(dataset, str):
        raise InvalidInputError("dataset must be a list of texts or a dataset spec, not a single string")
    return TextsSource(texts=list(dataset))


def capture(
    lm: LoadedModel,
    dataset: DatasetSpec | Sequence[str],
    layers: Sequence[str],
    store: LocalStore,
    *,
    run_id: str | None = None,
    options: CaptureOptions | None = None,
    on_progress: Callable[[CaptureProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress_bar: bool = False,
    dataset_record: dict[str, Any] | None = None,
) -> RunManifest:
    """Capture ``layers`` of ``lm`` over ``dataset`` into a new run; return its manifest.

    ``dataset_record`` replaces the dataset's description in the manifest: the service records
    the request (an upload id) rather than the server-side path the worker resolved it to.

    Everything that can be checked is checked before the first forward: the id is free, the layers
    exist, the options are sane, the dataset is not empty.
    """
    options = options or CaptureOptions()
    options.check()
    spec = _as_spec(dataset)
    run_id = validate_id(run_id, "run id") if run_id else new_id("run")
    layers = _check_layers(lm, layers)
    texts = iter_texts(spec)
    with RunWriter(store, run_id, layers, dtype=options.dtype, shard_mb=options.shard_mb) as run:
        result = _capture_rows(
            lm, run.tee_docs(texts), layers, run, options, on_progress, should_stop, progress_bar
        )
        run.close_rows()
        manifest = _manifest(lm, spec, run, options, result)
        if dataset_record is not None:
            manifest.dataset = dataset_record
        run.commit(manifest)
    return manifest


def _check_layers(lm: LoadedModel, layers: Sequence[str]) -> list[str]:
    if isinstance(layers, str):
        layers = [layers]
    if not layers:
        raise InvalidInputError("no layers given; name at least one (see `kestrel layers MODEL`)")
    if len(set(layers)) != len(layers):
        raise InvalidInputError(
            f"layers repeated: {sorted({x for x in layers if list(layers).count(x) > 1})}"
        )
    specs = {name: parse_layer_spec(name) for name in layers}
    for module, _ in specs.values():
        lm.layer(module)  # raises NotFoundError with close matches
    finish = execution_order(lm.model, list(dict.fromkeys(module for module, _ in specs.values())))
    # by when each is seen; a module's input ("input" < "output") before its output
    return sorted(layers, key=lambda name: (finish.index(specs[name][0]), specs[name][1]))


@dataclass
class _CaptureResult:
    n_docs: int
    seconds: float


def _capture_rows(
    lm: LoadedModel,
    texts: Iterator[str],
    layers: list[str],
    run: RunWriter,
    options: CaptureOptions,
    on_progress: Callable[[CaptureProgress], None] | None,
    should_stop: Callable[[], bool] | None,
    progress_bar: bool,
) -> _CaptureResult:
    storage_dtype = TORCH_DTYPES[options.dtype]
    drop_ids = _dropped_token_ids(lm.tokenizer, options)
    batches = capture_batches(lm, texts, options)
    keep: dict[str, torch.Tensor] = {}  # the current batch's row mask, read by the detectors
    rows: dict[str, torch.Tensor] = {}

    def record(name: str, acts_BTD: torch.Tensor, ctx: HookContext) -> None:
        # A split model runs this layer on its own device; the mask was built beside the inputs.
        acts_ND = acts_BTD.detach()[keep["mask_BT"].to(acts_BTD.device)]
        rows[name] = acts_ND.to(device="cpu", dtype=storage_dtype, non_blocking=True)

    hooks = [spec_detector(name, partial(record, name)) for name in layers]
    hooks.append(stop_after(parse_layer_spec(layers[-1])[0]))
    started, n_docs, n_batches, forwarded = time.perf_counter(), 0, 0, 0
    bar = tqdm(desc="capture", unit="tok", unit_scale=True, disable=not progress_bar)
    with HookManager(lm.model, hooks), torch.inference_mode():
        for batch in batches:
            if should_stop is not None and should_stop():
                raise CancelledError("capture cancelled; nothing was stored")
            keep["mask_BT"], meta = rows_mask_and_meta(batch, drop_ids, lm.device)
            ids_BT, attn_BT = batch.input_ids_BT.to(lm.device), batch.attention_mask_BT.to(lm.device)
            run_until_stopped(partial(lm.model, input_ids=ids_BT, attention_mask=attn_BT, use_cache=False))
            run.add(dict(rows), meta)
            n_batches += 1
            n_docs = max(n_docs, int(batch.doc_index_B.max()) + 1)
            forwarded += len(batch.doc_index_B)
            bar.update(len(meta["token_id"]))
            if on_progress is not None:
                elapsed = time.perf_counter() - started
                on_progress(CaptureProgress(n_docs, run.n_tokens, n_batches, elapsed, forwarded))
    bar.close()
    if run.n_tokens == 0:
        raise InvalidInputError(
            "the dataset produced no tokens to capture (empty texts, or every token dropped)"
        )
    return _CaptureResult(n_docs, time.perf_counter() - started)


def spec_detector(spec: str, fn: Callable[[torch.Tensor, HookContext], None]) -> Detector:
    """A detector on the module a layer spec names: its output, or its first input."""
    module, hook = parse_layer_spec(spec)
    return Detector(module, fn, when="pre" if hook == "input" else "forward")


def record_spec(spec: str, seen: dict[str, torch.Tensor], key: str = "h") -> list[Detector]:
    """Hooks that put ``spec``'s value (a module's output, or its input for ``MODULE:input``) of
    each forward in ``seen[key]`` and end the forward at that module: what reading one layer of a
    text needs, the same hook points capture records (encode, discovery over a dataset, exports)."""

    def record(value: torch.Tensor, _: HookContext) -> None:
        seen[key] = value.detach()

    return [spec_detector(spec, record), stop_after(parse_layer_spec(spec)[0])]


def _layer_records(lm: LoadedModel, run: RunWriter) -> dict[str, RunLayer]:
    """The manifest's layers: a module's input is recorded as such (``hook``, ``module``)."""
    records = run.layer_records({name: lm.layer(parse_layer_spec(name)[0]).kind for name in run.layers})
    for name, record in records.items():
        module, record.hook = parse_layer_spec(name)
        if record.hook == "input":
            record.module = module
    return records


def capture_batches(lm: LoadedModel, texts: Iterator[str], options: CaptureOptions) -> Iterator[TokenBatch]:
    """The token batches a capture forwards (also a stream training's: same rows, same order)."""
    return token_batches(
        texts,
        lm.tokenizer,
        max_length=options.max_length,
        token_budget=options.token_budget,
        max_batch_size=options.max_batch_size,
    )


def rows_mask_and_meta(
    batch: TokenBatch, drop_ids: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The rows a batch keeps (its real tokens less the dropped ids; attention still sees every
    real token) and their int32 metadata as a run stores it."""
    ids_BT = batch.input_ids_BT.to(device)
    mask_BT = batch.attention_mask_BT.to(device).bool()
    if drop_ids is not None:
        mask_BT &= ~torch.isin(ids_BT, drop_ids.to(device))
    positions_BT = torch.arange(ids_BT.shape[1], device=device).expand_as(ids_BT)
    docs_BT = batch.doc_index_B.to(device)[:, None].expand_as(ids_BT)
    meta = {
        "token_id": ids_BT[mask_BT].to("cpu", torch.int32),
        "doc_index": docs_BT[mask_BT].to("cpu", torch.int32),
        "position": positions_BT[mask_BT].to("cpu", torch.int32),
    }
    return mask_BT, meta


def _dropped_token_ids(tokenizer: Any, options: CaptureOptions) -> torch.Tensor | None:
    if options.drop_special:
        ids = set(tokenizer.all_special_ids)
    elif options.drop_bos and tokenizer.bos_token_id is not None:
        ids = {tokenizer.bos_token_id}
    else:
        return None
    return torch.tensor(sorted(ids), dtype=torch.long)


def _manifest(
    lm: LoadedModel,
    spec: DatasetSpec,
    run: RunWriter,
    options: CaptureOptions,
    result: _CaptureResult,
) -> RunManifest:
    tokenizer = lm.tokenizer
    record = {
        **run.identity(),
        "model": lm.describe(),
        "layers": _layer_records(lm, run),
        "d_model": lm.d_model,
        "dtype": options.dtype,
        "n_tokens": run.n_tokens,
        "n_docs": result.n_docs,
        "shards": run.shards,
        "row_fields": {name: "int32" for name in ROW_META_FIELDS},
        "special_token_ids": sorted(int(i) for i in tokenizer.all_special_ids),
        "bos_token_id": tokenizer.bos_token_id,
        "dataset": _describe_dataset(spec),
        "options": options.model_dump(),
        "capture_seconds": round(result.seconds, 3),
    }
    return RunManifest.model_validate(record)


def _describe_dataset(spec: DatasetSpec) -> dict[str, Any]:
    """The dataset as the manifest records it: inline texts are in docs.jsonl, not repeated here."""
    described = spec.model_dump()
    if "texts" in described:
        described["texts"] = f"<{len(described['texts'])} inline texts, see docs.jsonl>"
    return described
