"""Read a stored run's rows back: batches of one layer with the metadata that traces each row to
its text, filtered, split into train and held-out documents, optionally shuffled.

Reading streams shard by shard through an optional shuffle buffer, so memory is bounded by (shard +
buffer) whatever the run's size. The filters matter: in SmolLM2 the first token is an attention
sink whose residual norm is ~140x the others', so any statistic over all rows measures mostly
that token. Capture (writing runs) is ``kestrel.core.activations``.

With ``target_layer`` a reader pairs two layers of one run row by row (a transcoder's input and
target: every layer of a run holds the same rows in the same shards), yielding ``[x | y]`` rows;
the norm filter then holds each layer to its own median.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open

from kestrel.core.errors import InvalidInputError
from kestrel.core.runs import KIND, ROW_META_FIELDS, RowFilter, RunManifest, Split, get_manifest
from kestrel.core.store import LocalStore, validate_id


@dataclass
class RowBatch:
    """Rows of one layer with the metadata that traces each back to its document."""

    acts_ND: torch.Tensor
    token_id_N: torch.Tensor
    doc_index_N: torch.Tensor
    position_N: torch.Tensor

    def __len__(self) -> int:
        return len(self.acts_ND)

    def select(self, index: torch.Tensor) -> RowBatch:
        return RowBatch(
            self.acts_ND[index], self.token_id_N[index], self.doc_index_N[index], self.position_N[index]
        )

    @staticmethod
    def cat(batches: Sequence[RowBatch]) -> RowBatch:
        return RowBatch(*(torch.cat([getattr(b, f) for b in batches]) for f in RowBatch.__dataclass_fields__))


def heldout_mask(doc_index_N: torch.Tensor, fraction: float) -> torch.Tensor:
    """A fixed pseudo-random choice of documents, so train and held-out rows never share a text."""
    hashed = (doc_index_N.to(torch.int64) * 2654435761) % 4294967296
    return hashed < int(fraction * 4294967296)


def iter_row_batches(
    store: LocalStore,
    run_id: str,
    layer: str,
    *,
    batch_size: int = 4096,
    filters: RowFilter | None = None,
    split: Split = "all",
    heldout_fraction: float = 0.1,
    shuffle_buffer: int = 0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    drop_last: bool = False,
    shuffle_shards: bool = True,
    norm_median: float | None = None,
    target_layer: str | None = None,
    target_norm_median: float | None = None,
) -> Iterator[RowBatch]:
    """Stream a run's rows for ``layer`` in batches, shard by shard.

    With ``shuffle_buffer`` > 0, shards are visited in a seeded random order (in stored order when
    ``shuffle_shards`` is False: what a stream trainer saw while spilling the run) and rows pass
    through a buffer of that many rows, so memory stays at one shard plus the buffer. The same
    seed gives the same order, which is what lets a trainer resume mid-epoch. ``norm_median``
    replaces the manifest's as the reference of ``filters.max_norm_multiple``. ``target_layer``
    appends that layer's row to each row of ``layer`` (the same token), as a transcoder trains;
    ``target_norm_median`` then replaces that layer's median (a stream's replay gives both).
    """
    manifest = get_manifest(store, run_id)
    manifest.layer(layer)  # NotFoundError naming the run's layers
    layers = [layer] if target_layer is None else [layer, target_layer]
    if target_layer is not None:
        manifest.layer(target_layer)
        if (norm_median is None) != (target_norm_median is None):
            raise InvalidInputError("a paired read overrides both layers' norm medians or neither")
    elif target_norm_median is not None:
        raise InvalidInputError("target_norm_median needs target_layer")
    medians = [norm_median] if target_layer is None else [norm_median, target_norm_median]
    if batch_size <= 0:
        raise InvalidInputError(f"batch_size must be > 0, got {batch_size}")
    if not 0.0 < heldout_fraction < 1.0 and split != "all":
        raise InvalidInputError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    filters = filters or RowFilter()
    generator = torch.Generator().manual_seed(seed)
    shards = [s.name for s in manifest.shards]
    if shuffle_buffer > 0 and shuffle_shards:
        shards = [shards[i] for i in torch.randperm(len(shards), generator=generator).tolist()]
    chunks = (
        _filtered(
            _read_shard(store, run_id, layers, name, dtype),
            manifest,
            layers,
            filters,
            split,
            heldout_fraction,
            medians if norm_median is not None else None,
        )
        for name in shards
    )
    if shuffle_buffer > 0:
        chunks = _shuffled(chunks, shuffle_buffer, generator)
    yield from _rebatch(chunks, batch_size, drop_last)


def iter_batches(store: LocalStore, run_id: str, layer: str, **kwargs: Any) -> Iterator[torch.Tensor]:
    """Activation rows only, ``[B, d]`` float tensors: what an SAE trainer consumes."""
    for batch in iter_row_batches(store, run_id, layer, **kwargs):
        yield batch.acts_ND


def _read_shard(
    store: LocalStore, run_id: str, layers: Sequence[str], shard: str, dtype: torch.dtype
) -> RowBatch:
    """One shard's rows of ``layers``, side by side, with their metadata."""
    parts = []
    for layer in layers:
        with safe_open(store.local_path(KIND, run_id, f"{layer}/{shard}.safetensors"), "pt") as f:
            parts.append(f.get_tensor("acts").to(dtype))
    if len({len(part) for part in parts}) > 1:
        raise InvalidInputError(
            f"run {run_id!r} shard {shard} holds different row counts for {list(layers)}: "
            "the layers were not captured together",
            details={"layers": list(layers), "rows": [len(part) for part in parts]},
        )
    acts_ND = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    with safe_open(store.local_path(KIND, run_id, f"tokens/{shard}.safetensors"), "pt") as f:
        meta = {name: f.get_tensor(name) for name in ROW_META_FIELDS}
    return RowBatch(acts_ND, meta["token_id"], meta["doc_index"], meta["position"])


def _filtered(
    rows: RowBatch,
    manifest: RunManifest,
    layers: Sequence[str],
    filters: RowFilter,
    split: Split,
    fraction: float,
    norm_medians: Sequence[float | None] | None = None,
) -> RowBatch:
    """``norm_medians`` (one per layer) replace the manifest's medians when given."""
    special = manifest.special_token_ids
    medians = norm_medians if norm_medians is not None else [manifest.layers[n].norm_median for n in layers]
    if len(layers) > 1:
        groups = [(manifest.layers[name].d, m) for name, m in zip(layers, medians, strict=True)]
        return filter_rows(rows, filters, special, None, split, fraction, column_medians=groups)
    return filter_rows(rows, filters, special, medians[0], split, fraction)


def filter_rows(
    rows: RowBatch,
    filters: RowFilter,
    special_token_ids: Sequence[int],
    median: float | None,
    split: Split,
    fraction: float,
    *,
    column_medians: Sequence[tuple[int, float | None]] | None = None,
) -> RowBatch:
    """The rows ``filters`` and ``split`` keep; ``median`` is the layer's median row norm (the
    reference of ``max_norm_multiple``). Row by row, so chunking never changes the result.
    ``column_medians`` (width, median) instead holds each group of columns (the layers of a
    paired read) to its own median: a row is kept when every part of it passes."""
    keep_N = torch.ones(len(rows), dtype=torch.bool)
    if filters.skip_position_0:
        keep_N &= rows.position_N > 0
    if filters.skip_special and special_token_ids:
        keep_N &= ~torch.isin(rows.token_id_N, torch.tensor(list(special_token_ids), dtype=torch.int32))
    groups = [(rows.acts_ND.shape[-1], median)] if column_medians is None else column_medians
    if filters.max_norm_multiple is not None:
        widths = [width for width, _ in groups]
        for part_ND, (_, part_median) in zip(rows.acts_ND.split(widths, dim=-1), groups, strict=True):
            if part_median:
                keep_N &= part_ND.norm(dim=-1) <= filters.max_norm_multiple * part_median
    if split != "all":
        held = heldout_mask(rows.doc_index_N, fraction)
        keep_N &= held if split == "heldout" else ~held
    return rows if bool(keep_N.all()) else rows.select(keep_N)


def _shuffled(chunks: Iterable[RowBatch], buffer_rows: int, generator: torch.Generator) -> Iterator[RowBatch]:
    buffer = ShuffleBuffer(buffer_rows, generator)
    for chunk in chunks:
        yield from buffer.push(chunk)
    yield from buffer.flush()


class ShuffleBuffer:
    """Mixes rows across chunks: each time it holds exactly ``buffer_rows`` rows it emits a random
    half of them and keeps the rest; ``flush`` emits what is left, shuffled.

    The output depends only on the sequence of rows and the generator, never on how the rows were
    chunked: a stream trainer pushing one forward batch at a time and a reader pushing the spilled
    run's shards in stored order get the same rows in the same order.
    """

    def __init__(self, buffer_rows: int, generator: torch.Generator) -> None:
        if buffer_rows <= 0:
            raise InvalidInputError(f"shuffle buffer_rows must be > 0, got {buffer_rows}")
        self.buffer_rows = buffer_rows
        self.generator = generator
        self.parts: list[RowBatch] = []
        self.held = 0

    def push(self, chunk: RowBatch) -> list[RowBatch]:
        out: list[RowBatch] = []
        while len(chunk):
            take = min(self.buffer_rows - self.held, len(chunk))
            self.parts.append(chunk.select(slice(0, take)))
            self.held += take
            chunk = chunk.select(slice(take, None))
            if self.held == self.buffer_rows:
                joined = RowBatch.cat(self.parts)
                order = torch.randperm(len(joined), generator=self.generator)
                n_out = len(joined) - self.buffer_rows // 2
                out.append(joined.select(order[:n_out]))
                rest = joined.select(order[n_out:])
                self.parts, self.held = [rest], len(rest)
        return out

    def flush(self) -> list[RowBatch]:
        if not self.held:
            return []
        joined = RowBatch.cat(self.parts)
        self.parts, self.held = [], 0
        return [joined.select(torch.randperm(len(joined), generator=self.generator))]


def _rebatch(chunks: Iterable[RowBatch], batch_size: int, drop_last: bool) -> Iterator[RowBatch]:
    pending: list[RowBatch] = []
    held = 0
    for chunk in chunks:
        if not len(chunk):
            continue
        pending.append(chunk)
        held += len(chunk)
        if held < batch_size:
            continue
        joined = RowBatch.cat(pending) if len(pending) > 1 else pending[0]
        n_full = len(joined) // batch_size * batch_size
        for start in range(0, n_full, batch_size):
            yield joined.select(slice(start, start + batch_size))
        rest = joined.select(slice(n_full, None))
        pending, held = ([rest], len(rest)) if len(rest) else ([], 0)
    if held and not drop_last:
        yield RowBatch.cat(pending)


def read_docs(store: LocalStore, run_id: str) -> list[str]:
    """The run's documents, by doc_index. For large runs, prefer streaming ``docs.jsonl``."""
    path = store.local_path(KIND, validate_id(run_id, "run id"), "docs.jsonl")
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh]
