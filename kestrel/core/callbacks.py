"""Capture activations during a user's own training: plain hooks for a manual loop, a Lightning callback.

A training run is the same run format as a capture (docs/store-format.md, "Runs written during
training"), so the service trains SAEs and runs analyses on it like on any other run. What differs:

* **Steps, not documents.** Rows are sampled only on capture steps (``step % every_n_steps == 0``).
  Each captured step ends its shard, so a shard never mixes steps; the manifest gives each shard's
  ``step`` and lists the ``steps`` captured.
* **Documents are batch rows.** On a captured step, row ``b`` of the batch is document
  ``doc_index`` (counting on from the previous steps) and ``position`` is the token's index in it;
  ``docs.jsonl`` records the ``step`` and ``batch_row`` of each document (and its text when a
  tokenizer is given). For an output without a sequence axis (``[B, D]``) the whole batch is one
  document and ``position`` is the row in the batch. Token ids come from the batch's
  ``input_ids`` when it has them, otherwise they are -1.
* **The model is the user's.** The manifest describes it (name given by the user, class,
  ``d_model``) and marks it ``loadable: false``: the service cannot load it, so model-in-the-loop
  evaluations (CE-loss recovered) are skipped, while FVU, L0 and dead latents on held-out rows
  still work.

Hooks go through ``kestrel.core.hooks`` and are registered only for the forward of a captured
step (entered in ``begin_step``, removed in ``end_step``), so the other steps run the user's model
untouched, and no hook outlives the capture. Rows are detached, moved to the CPU and cast to the
storage dtype inside the hook, so a capture holds no autograd graph and no accelerator memory.

If the training fails, what was captured is still worth keeping (a crash at step 9,000 should not
throw away 90 complete steps): ``close(status="interrupted")`` publishes every completed step with
``source.status = "interrupted"`` and the error, and drops the step in flight. Only a capture with
no completed step publishes nothing.

Lightning is an optional extra: ``import kestrel.core.callbacks`` never imports it; the name
``KestrelCaptureCallback`` (defined in ``kestrel.core.lightning_capture``) builds the callback class
on first use, subclassing the ``Callback`` of ``lightning.pytorch`` and/or ``pytorch_lightning``,
whichever are installed.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch
from torch import nn

from kestrel.core.activations import KIND, ROW_META_FIELDS, RUN_FILE_NAMES, RunWriter
from kestrel.core.catalog import DType
from kestrel.core.errors import ConflictError, InvalidInputError
from kestrel.core.hooks import Detector, HookContext, HookManager
from kestrel.core.models import TORCH_DTYPES, _candidate_layers
from kestrel.core.runs import RunManifest
from kestrel.core.store import Store, new_id, validate_id

__all__ = ["StoreLocation", "TrainingCapture", "describe_user_model", "open_capture_store"]

StoreLocation = Store | str | Path | Sequence[str | Path]
CaptureStatus = Literal["complete", "interrupted"]
NOT_LOADABLE_NOTE = (
    "captured from the user's own model during training; the service cannot load it, so "
    "model-in-the-loop evaluations are skipped"
)


# ---------------------------------------------------------------------------------------------
# Where the run goes, and what the manifest says about the model


def open_capture_store(
    location: StoreLocation, *, endpoint_url: str | None = None, local_root: str | Path | None = None
) -> Store:
    """A Store from what a user passes: a Store, a directory, ``s3://bucket/prefix``, or both.

    Both is a pair ``(local directory, s3 URL)``: the run is written to the directory and mirrored
    to S3, as the service's ``both`` backend does. ``endpoint_url`` is for S3-compatible servers;
    ``local_root`` is where an S3 store stages and caches files (default ``./.kestrel``).
    """
    from kestrel.core.store import open_store

    if isinstance(location, Store):
        return location
    if isinstance(location, (str, Path)):
        return open_store(location, endpoint_url=endpoint_url, local_root=local_root)
    locations = [str(item) for item in location]
    remote = [item for item in locations if item.startswith("s3://")]
    local = [item for item in locations if not item.startswith("s3://")]
    if len(locations) != 2 or len(remote) != 1:
        raise InvalidInputError(
            f"store {locations!r}: give one location (a directory or s3://bucket/prefix), or a pair "
            "(a directory, an s3:// URL) to write both"
        )
    choice = SimpleNamespace(
        store_backend="both",
        store_root=Path(local[0]),
        s3_url=remote[0],
        s3_endpoint_url=endpoint_url,
        s3_cache_dir=None,
    )
    return open_store(choice)


def describe_user_model(
    model: nn.Module, name: str, widths: Mapping[str, int], d_model: int | None = None
) -> dict[str, Any]:
    """The manifest's ``model`` for a model the service did not load and cannot load."""
    config = getattr(model, "config", None)
    param = next(model.parameters(), None)
    n_blocks = sum(1 for kind in layer_kinds(model).values() if kind == "block")
    return {
        "name": name,
        "source": "training",
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "d_model": d_model or getattr(config, "hidden_size", None) or max(widths.values()),
        "n_blocks": n_blocks or None,
        "dtype": _dtype_name(param.dtype) if param is not None else None,
        "device": str(param.device) if param is not None else "cpu",
        "loadable": False,
        "note": NOT_LOADABLE_NOTE,
    }


def layer_kinds(model: nn.Module) -> dict[str, str]:
    """Kestrel's layer kinds (block, mlp, attention, ...) by module path; read from the module
    tree alone, because ``layer_table``'s probe forward would draw from the user's RNG (dropout)."""
    return {name: kind for name, kind, _, _ in _candidate_layers(model)}


def _dtype_name(dtype: torch.dtype) -> str:
    names = {value: key for key, value in TORCH_DTYPES.items()}
    return names.get(dtype, str(dtype).removeprefix("torch."))


# ---------------------------------------------------------------------------------------------
# One captured step


@dataclass
class _StepRows:
    """What the hooks collect during one captured step's forward."""

    step: int
    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    leading: torch.Size | None = None  # the activations' shape without the last axis
    index_N: torch.Tensor | None = None  # flat rows kept (after the mask and the sampling)
    meta: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    docs: list[dict[str, Any]] = field(default_factory=list)


class TrainingCapture:
    """Sample layer activations every ``every_n_steps`` steps of a manual training loop into a run.

    Use ``with capture.step(step, input_ids=..., attention_mask=...):`` around the forward of each
    step (or ``begin_step`` / ``end_step``), then ``close()`` to publish the run. As a context
    manager, leaving the block closes it (an exception: see the module docstring).

    ``layers`` are module paths in ``model`` (``model.named_modules()``), which for a Hugging Face
    model are Kestrel's layer names (``model.layers.3``). ``max_rows_per_step`` caps the rows kept
    per step (a seeded uniform sample, the same rows for every layer); ``rows_per_shard`` caps a
    shard. ``tokenizer`` (optional) decodes each document's tokens into ``docs.jsonl``.
    ``store`` is a Store, a directory, ``s3://bucket/prefix`` (with ``endpoint_url`` and
    ``local_root`` for S3), or a pair (directory, s3 URL) to write both.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        store: StoreLocation,
        *,
        every_n_steps: int = 100,
        rows_per_shard: int = 65_536,
        max_rows_per_step: int | None = 4096,
        dtype: DType = "fp16",
        model_name: str | None = None,
        run_id: str | None = None,
        tokenizer: Any = None,
        d_model: int | None = None,
        seed: int = 0,
        framework: str = "manual",
        endpoint_url: str | None = None,
        local_root: str | Path | None = None,
    ) -> None:
        _check_schedule(every_n_steps, rows_per_shard, max_rows_per_step, dtype)
        self.layers = _check_layer_names(layers)
        self.model = model
        self.hooks = HookManager(model, [Detector(name, self._record) for name in self.layers])
        self.store = open_capture_store(store, endpoint_url=endpoint_url, local_root=local_root)
        self.run_id = validate_id(run_id, "run id") if run_id else new_id("run")
        if self.store.exists(KIND, self.run_id):
            raise ConflictError(f"run id {self.run_id!r} already exists; choose another or delete it")
        self.every_n_steps = every_n_steps
        self.rows_per_shard = rows_per_shard
        self.max_rows_per_step = max_rows_per_step
        self.dtype = dtype
        self.model_name = model_name or type(model).__name__
        self.tokenizer = tokenizer
        self.d_model = d_model
        self.seed = seed
        self.framework = framework
        self.steps: list[int] = []
        self.manifest: RunManifest | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self._run: RunWriter | None = None
        self._pending: _StepRows | None = None
        self._begun: set[int] = set()
        self._last_step: int | None = None
        self._n_docs = 0
        self._seconds = 0.0
        self._closed = False

    # --- the loop's side -----------------------------------------------------------------------

    def is_capture_step(self, step: int) -> bool:
        """Whether ``step`` is sampled: a multiple of ``every_n_steps`` not captured yet (with
        gradient accumulation several batches share a step; only the first is captured)."""
        return step >= 0 and step % self.every_n_steps == 0 and step not in self._begun

    def begin_step(
        self,
        step: int,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> bool:
        """Arm the hooks for this step's forward if it is a capture step; whether it is."""
        self._require_open()
        if self._pending is not None:
            raise InvalidInputError(
                f"step {self._pending.step} began but never ended; call end_step() after its forward"
            )
        self._last_step = step
        if not self.is_capture_step(step):
            return False
        self._begun.add(step)
        self._pending = _StepRows(step, _cpu_or_none(input_ids), _cpu_or_none(attention_mask))
        self.hooks.__enter__()  # registered for this step's forward only; end_step removes them
        return True

    def end_step(self) -> int:
        """Remove the hooks and write the step's rows; the number of rows stored (0 off-step)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return 0
        self.hooks.remove()
        missing = [name for name in self.layers if name not in pending.rows]
        if missing:
            raise InvalidInputError(
                f"step {pending.step}: layers {missing} produced nothing; run the model's forward "
                "between begin_step() and end_step() (inside `with capture.step(...)`)"
            )
        started = time.perf_counter()
        n_rows = self._write_step(pending)
        self._seconds += time.perf_counter() - started
        return n_rows

    def discard_step(self) -> None:
        """Drop the step in flight (its forward failed) and remove the hooks."""
        self._pending = None
        self.hooks.remove()

    @contextmanager
    def step(
        self,
        step: int,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> Iterator[bool]:
        """Around one step's forward; yields whether the step is captured."""
        captured = self.begin_step(step, input_ids, attention_mask)
        try:
            yield captured
        except BaseException:
            self.discard_step()
            raise
        self.end_step()

    # --- publishing --------------------------------------------------------------------------

    def close(self, status: CaptureStatus = "complete", error: str | None = None) -> RunManifest | None:
        """Publish the run (its manifest), or None when no step was captured (nothing is kept).

        ``status="interrupted"`` (training failed) keeps the completed steps and records ``error``.
        """
        if self._closed:
            return self.manifest
        self.discard_step()
        self._closed = True
        run, self._run = self._run, None
        if run is None or not self.steps:
            if run is not None:
                run.abort()
            warnings.warn(
                f"training capture {self.run_id}: no step was captured (every_n_steps="
                f"{self.every_n_steps}, last step seen {self._last_step}); nothing was stored",
                stacklevel=2,
            )
            return None
        try:
            run.close_rows()
            self.manifest = run.commit(self._manifest(run, status, error))
        except BaseException:
            run.abort()
            raise
        return self.manifest

    def abort(self) -> None:
        """Remove the hooks and publish nothing."""
        self.discard_step()
        self._closed = True
        if self._run is not None:
            self._run.abort()
            self._run = None

    def __enter__(self) -> TrainingCapture:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.close("interrupted", f"{exc_type.__name__}: {exc}")

    # --- inside the hooks --------------------------------------------------------------------

    def _record(self, acts: torch.Tensor, ctx: HookContext) -> None:
        """Keep this step's sampled rows of one layer: detached, on the CPU, in the storage dtype.

        Only the layer's first call in the step counts, so a module run twice (weight sharing,
        a second forward) cannot misalign the rows with their metadata.
        """
        pending = self._pending
        if pending is None or ctx.call > 0:
            return
        if acts.ndim < 2:
            raise InvalidInputError(
                f"layer {ctx.layer!r} produced a tensor of shape {tuple(acts.shape)}; "
                "capture needs [batch, ..., width]"
            )
        leading = acts.shape[:-1]
        if pending.leading is None:
            pending.leading = leading
            pending.index_N, pending.meta, pending.docs = self._select_rows(pending, leading)
        elif leading != pending.leading:
            raise InvalidInputError(
                f"step {pending.step}: layer {ctx.layer!r} has leading shape {tuple(leading)}, "
                f"another captured layer {tuple(pending.leading)}; a run's layers must share their rows"
            )
        acts_ND = acts.detach().reshape(-1, acts.shape[-1])[pending.index_N.to(acts.device)]
        pending.rows[ctx.layer] = acts_ND.to(device="cpu", dtype=TORCH_DTYPES[self.dtype])

    def _select_rows(
        self, pending: _StepRows, leading: torch.Size
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[dict[str, Any]]]:
        """Which flat rows to keep (real tokens, at most ``max_rows_per_step``) and their metadata."""
        doc_N, position_N, n_docs = _row_coordinates(leading)
        keep_N = _flat_field(pending.attention_mask, leading, "attention_mask", pending.step)
        keep_N = torch.ones(len(doc_N), dtype=torch.bool) if keep_N is None else keep_N.bool()
        token_N = _flat_field(pending.input_ids, leading, "input_ids", pending.step)
        token_N = torch.full((len(doc_N),), -1) if token_N is None else token_N
        index_N = torch.nonzero(keep_N).flatten()
        if self.max_rows_per_step is not None and len(index_N) > self.max_rows_per_step:
            pick = torch.randperm(len(index_N), generator=self._generator)[: self.max_rows_per_step]
            index_N = index_N[pick.sort().values]
        meta = {
            "token_id": token_N[index_N].to(torch.int32),
            "doc_index": (doc_N[index_N] + self._n_docs).to(torch.int32),
            "position": position_N[index_N].to(torch.int32),
        }
        docs = [self._doc_record(pending, leading, row, n_docs) for row in range(n_docs)]
        return index_N, meta, docs

    def _doc_record(self, pending: _StepRows, leading: torch.Size, row: int, n_docs: int) -> dict[str, Any]:
        """One docs.jsonl line: where the document came from, and its text when it can be decoded."""
        batch_row = row if len(leading) > 1 else None
        text = ""
        ids = pending.input_ids
        if self.tokenizer is not None and ids is not None and batch_row is not None and ids.ndim == 2:
            mask = pending.attention_mask
            tokens = ids[batch_row] if mask is None else ids[batch_row][mask[batch_row].bool()]
            text = self.tokenizer.decode(tokens.tolist())
        return {"doc_index": self._n_docs + row, "text": text, "step": pending.step, "batch_row": batch_row}

    # --- writing -----------------------------------------------------------------------------

    def _write_step(self, pending: _StepRows) -> int:
        if self._run is None:
            self._run = RunWriter(
                self.store, self.run_id, self.layers, dtype=self.dtype, shard_rows=self.rows_per_shard
            )
        for doc in pending.docs:
            self._run.write_doc(**doc)
        self._n_docs += len(pending.docs)
        n_rows = len(pending.meta["token_id"])
        if n_rows:
            self._run.add(pending.rows, pending.meta)
            self._run.end_shard(step=pending.step)
            self.steps.append(pending.step)
        return n_rows

    def _manifest(self, run: RunWriter, status: CaptureStatus, error: str | None) -> RunManifest:
        model = describe_user_model(self.model, self.model_name, run.widths, self.d_model)
        special, bos = _special_tokens(self.tokenizer)
        options = {
            "every_n_steps": self.every_n_steps,
            "rows_per_shard": self.rows_per_shard,
            "max_rows_per_step": self.max_rows_per_step,
            "dtype": self.dtype,
            "seed": self.seed,
        }
        record = {
            **run.identity(),
            "model": model,
            "layers": run.layer_records(layer_kinds(self.model)),
            "d_model": model["d_model"],
            "dtype": self.dtype,
            "n_tokens": run.n_tokens,
            "n_docs": self._n_docs,
            "shards": run.shards,
            "row_fields": {name: "int32" for name in ROW_META_FIELDS},
            "special_token_ids": special,
            "bos_token_id": bos,
            "dataset": {"kind": "training", "note": "batches of a training loop; see docs.jsonl"},
            "options": options,
            "capture_seconds": round(self._seconds, 3),
            "source": {
                "kind": "training",
                "framework": self.framework,
                "status": status,
                "error": error,
                "every_n_steps": self.every_n_steps,
                "last_step_seen": self._last_step,
            },
            "steps": list(self.steps),
        }
        return RunManifest.model_validate(record)

    def _require_open(self) -> None:
        if self._closed:
            raise InvalidInputError(
                f"this training capture is closed (run {self.run_id}); create a new one to capture again"
            )


def _check_schedule(
    every_n_steps: int, rows_per_shard: int, max_rows_per_step: int | None, dtype: str
) -> None:
    """Fail when the capture is built, not at step 5,000 of someone's training."""
    if every_n_steps <= 0:
        raise InvalidInputError(f"every_n_steps must be > 0, got {every_n_steps}")
    if rows_per_shard <= 0:
        raise InvalidInputError(f"rows_per_shard must be > 0, got {rows_per_shard}")
    if max_rows_per_step is not None and max_rows_per_step <= 0:
        raise InvalidInputError(f"max_rows_per_step must be > 0 or None, got {max_rows_per_step}")
    if dtype not in TORCH_DTYPES:
        raise InvalidInputError(f"unknown dtype {dtype!r}; use one of {', '.join(TORCH_DTYPES)}")


def _check_layer_names(layers: Sequence[str]) -> list[str]:
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise InvalidInputError("no layers given; name at least one module path of the model")
    if len(set(layers)) != len(layers):
        raise InvalidInputError(f"layers repeated: {sorted({x for x in layers if layers.count(x) > 1})}")
    clashing = sorted(RUN_FILE_NAMES.intersection(layers))
    if clashing:
        raise InvalidInputError(f"layers {clashing}: a layer may not take a name of the run's own files")
    return layers


def _cpu_or_none(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return tensor.detach().to("cpu") if isinstance(tensor, torch.Tensor) else None


def _row_coordinates(leading: torch.Size) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(doc_N, position_N, n_docs)`` of the flat rows of an activation with this leading shape.

    ``[B, T, ...]``: row b is a document and the later axes, flattened, are positions in it.
    ``[B]`` (no sequence axis): the batch is one document, the row its position.
    """
    if len(leading) == 1:
        n = leading[0]
        return torch.zeros(n, dtype=torch.long), torch.arange(n), 1
    n_docs, per_doc = leading[0], math.prod(leading[1:])
    doc_BP = torch.arange(n_docs)[:, None].expand(n_docs, per_doc)
    position_BP = torch.arange(per_doc)[None, :].expand(n_docs, per_doc)
    return doc_BP.reshape(-1), position_BP.reshape(-1), n_docs


def _flat_field(value: torch.Tensor | None, leading: torch.Size, what: str, step: int) -> torch.Tensor | None:
    """A per-row batch field (input_ids, attention_mask) flattened like the activations' rows.

    A field whose shape does not match the rows (a pooled layer of a token model) is left out with
    a warning rather than raised: failing inside the user's forward would stop their training.
    """
    if value is None:
        return None
    if tuple(value.shape) != tuple(leading):
        warnings.warn(
            f"step {step}: {what} has shape {tuple(value.shape)} but the captured layers' rows have "
            f"{tuple(leading)}; it is not used for these rows",
            stacklevel=2,
        )
        return None
    return value.reshape(-1)


def _special_tokens(tokenizer: Any) -> tuple[list[int], int | None]:
    if tokenizer is None:
        return [], None
    special = sorted(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    return special, getattr(tokenizer, "bos_token_id", None)


def __getattr__(name: str) -> Any:
    """``KestrelCaptureCallback`` (``kestrel.core.lightning_capture``) is built on first access, so
    importing this module needs no Lightning."""
    if name in ("KestrelCaptureCallback", "batch_tokens"):
        from kestrel.core import lightning_capture

        return getattr(lightning_capture, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
