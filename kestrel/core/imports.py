"""Import activations computed elsewhere (a safetensors file) as a run in the standard run format.

A user who already has activations (from their own training loop, another library, a colleague)
should be able to train SAEs and run analyses on them without a capture. ``import_activations``
turns a safetensors file of ``[n_rows, d]`` tensors into ``activations/<run_id>/`` exactly as a
capture writes it (docs/store-format.md), through ``RunWriter`` and so through the Store protocol:
staged, manifest last, published whole or not at all.

Everything that the header can tell is checked before a byte of data is read (``plan_import``):
the named tensors exist, are 2-D and floating point, have the same number of rows, and the row
metadata tensors are 1-D integers of that length. Values are checked while they stream through in
chunks (finite, within the storage dtype's range; metadata non-negative and within int32), so a
bad file fails with a message naming the tensor and what is wrong, and publishes nothing.

Rows without metadata get stand-ins that keep the readers' filters meaningful: without
``doc_index`` each row is its own document (so the held-out split still holds back ~10 % of the
rows), without ``position`` a row's position is its offset within its document's consecutive rows
(or 1 when every row is its own document, so the attention-sink filter, which drops position 0,
does not drop every row), and without ``token_id`` the id is -1 (unknown). The manifest's
``import.synthetic_row_fields`` lists what was made up.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from kestrel.core.activations import RUN_FILE_NAMES, RunWriter
from kestrel.core.catalog import DType
from kestrel.core.clientdata import TensorInfo
from kestrel.core.errors import InvalidInputError, close_matches
from kestrel.core.models import TORCH_DTYPES
from kestrel.core.runs import RunManifest
from kestrel.core.store import Store, new_id, validate_id

ROW_FIELDS = ("token_id", "doc_index", "position")
StorageDType = DType  # the storage dtype of a run
# safetensors dtype names: the floating-point ones and what they are stored as by default.
FLOAT_DTYPES: dict[str, StorageDType] = {"F16": "fp16", "BF16": "bf16", "F32": "fp32", "F64": "fp32"}
INT_DTYPES = frozenset({"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"})
INT32_MAX = 2**31 - 1
# Layer names become directory names inside the run: module paths ("model.layers.3") and the like.
LAYER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}$")
RESERVED_LAYER_NAMES = RUN_FILE_NAMES
READ_CHUNK_BYTES = 32 << 20  # rows are read, checked and written this many bytes (per layer) at a time


@dataclass(frozen=True)
class ImportPlan:
    """What an import will write, decided from the header alone."""

    layers: dict[str, str]  # layer name in the run -> tensor name in the file
    row_fields: dict[str, str]  # metadata field -> tensor name in the file (only those present)
    n_rows: int
    widths: dict[str, int]  # layer name -> d
    dtype: StorageDType

    @property
    def synthetic_row_fields(self) -> list[str]:
        return [name for name in ROW_FIELDS if name not in self.row_fields]


# ---------------------------------------------------------------------------------------------
# Planning: every check the header allows


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes of the file's tensors, without reading their data."""
    try:
        with safe_open(str(path), "pt") as f:
            return {name: _tensor_info(name, f.get_slice(name)) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise InvalidInputError(f"not a readable safetensors file: {exc}") from None


def _tensor_info(name: str, piece: Any) -> TensorInfo:
    return TensorInfo(name, str(piece.get_dtype()), tuple(piece.get_shape()))


def plan_import(
    header: Mapping[str, TensorInfo],
    *,
    tensors: Mapping[str, str] | None = None,
    row_fields: Mapping[str, str] | None = None,
    dtype: StorageDType | None = None,
) -> ImportPlan:
    """Check the requested tensors against the header; what the import will write.

    ``tensors`` maps tensor names in the file to layer names in the run (default: every 2-D
    floating-point tensor, under its own name); ``row_fields`` maps ``token_id``, ``doc_index`` and
    ``position`` to tensor names (default: tensors with exactly those names, where present).
    ``dtype`` is the storage dtype (default: the file's, with F64 stored as fp32).
    """
    fields = _plan_row_fields(header, row_fields)
    layers = _plan_layers(header, tensors, exclude=set(fields.values()))
    n_rows = _common_rows(header, layers)
    for field, name in fields.items():
        _check_row_field(header[name], field, n_rows)
    return ImportPlan(
        layers=layers,
        row_fields=fields,
        n_rows=n_rows,
        widths={layer: header[name].shape[1] for layer, name in layers.items()},
        dtype=dtype or _default_dtype(header, layers),
    )


def _plan_row_fields(
    header: Mapping[str, TensorInfo], row_fields: Mapping[str, str] | None
) -> dict[str, str]:
    if row_fields is None:
        return {field: field for field in ROW_FIELDS if field in header}
    unknown = sorted(set(row_fields) - set(ROW_FIELDS))
    if unknown:
        raise InvalidInputError(
            f"unknown row field(s) {unknown}: use {', '.join(ROW_FIELDS)}", details={"row_fields": unknown}
        )
    for field, name in row_fields.items():
        _require_tensor(header, name, f"row field {field!r}: tensor")
    return {field: row_fields[field] for field in ROW_FIELDS if field in row_fields}


def _plan_layers(
    header: Mapping[str, TensorInfo], tensors: Mapping[str, str] | None, exclude: set[str]
) -> dict[str, str]:
    if tensors is None:
        candidates = [info for name, info in header.items() if name not in exclude and len(info.shape) == 2]
        tensors = {info.name: info.name for info in candidates if info.dtype in FLOAT_DTYPES}
        if not tensors:
            raise InvalidInputError(
                "the file has no 2-D floating-point tensor to import as a layer "
                f"(tensors: {_describe(header)})",
                details={"tensors": list(header)},
            )
    if not tensors:
        raise InvalidInputError("tensors is empty: name at least one tensor to import as a layer")
    layers: dict[str, str] = {}
    for name, layer in tensors.items():
        info = _require_tensor(header, name, "tensor")
        _check_layer_tensor(info)
        _check_layer_name(layer, name)
        if layer in layers:
            raise InvalidInputError(
                f"layer name {layer!r} is given to both tensor {layers[layer]!r} and tensor {name!r}",
                details={"layer": layer, "tensors": [layers[layer], name]},
            )
        layers[layer] = name
    return layers


def _require_tensor(header: Mapping[str, TensorInfo], name: str, what: str) -> TensorInfo:
    if name in header:
        return header[name]
    suggestions = close_matches(name, header)
    hint = f"; did you mean {', '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    raise InvalidInputError(
        f"{what} {name!r} is not in the file{hint} (tensors: {_describe(header)})",
        details={"tensor": name, "suggestions": suggestions, "tensors": list(header)},
    )


def _check_layer_tensor(info: TensorInfo) -> None:
    if len(info.shape) != 2:
        raise InvalidInputError(
            f"tensor {info.name!r} has shape {list(info.shape)}: activations must be 2-D [n_rows, d]",
            details={"tensor": info.name, "shape": list(info.shape)},
        )
    if info.dtype not in FLOAT_DTYPES:
        raise InvalidInputError(
            f"tensor {info.name!r} is {info.dtype}: activations must be floating point "
            f"({', '.join(FLOAT_DTYPES)})",
            details={"tensor": info.name, "dtype": info.dtype},
        )
    if info.shape[1] == 0:
        raise InvalidInputError(
            f"tensor {info.name!r} has shape {list(info.shape)}: its width d is 0",
            details={"tensor": info.name, "shape": list(info.shape)},
        )


def _check_layer_name(layer: str, tensor: str) -> None:
    """Layer names are directory names in the run: no separators, nothing hidden, not ``tokens``."""
    if not isinstance(layer, str) or not LAYER_NAME.fullmatch(layer) or layer in RESERVED_LAYER_NAMES:
        raise InvalidInputError(
            f"layer name {layer!r} (for tensor {tensor!r}) is not usable: use up to 200 letters, digits, "
            "'_', '.', ':' or '-' (a module path like 'model.layers.3'), not 'tokens', 'manifest.json' "
            "or 'docs.jsonl'; "
            "name it with tensors={tensor_name: layer_name}",
            details={"layer": layer, "tensor": tensor},
        )


def _common_rows(header: Mapping[str, TensorInfo], layers: Mapping[str, str]) -> int:
    rows = {name: header[name].shape[0] for name in layers.values()}
    first = next(iter(rows))
    for name, n in rows.items():
        if n != rows[first]:
            raise InvalidInputError(
                f"tensor {name!r} has {n} rows but tensor {first!r} has {rows[first]}: "
                "every layer of a run must have the same rows",
                details={"rows": rows},
            )
    if rows[first] == 0:
        raise InvalidInputError(f"tensor {first!r} has no rows", details={"tensor": first})
    return rows[first]


def _check_row_field(info: TensorInfo, field: str, n_rows: int) -> None:
    if info.dtype not in INT_DTYPES:
        raise InvalidInputError(
            f"row field {field!r} (tensor {info.name!r}) is {info.dtype}: it must be an integer tensor",
            details={"tensor": info.name, "field": field, "dtype": info.dtype},
        )
    if info.shape != (n_rows,):
        raise InvalidInputError(
            f"row field {field!r} (tensor {info.name!r}) has shape {list(info.shape)}: "
            f"it must be 1-D with one value per row, [{n_rows}]",
            details={"tensor": info.name, "field": field, "shape": list(info.shape), "n_rows": n_rows},
        )


def _default_dtype(header: Mapping[str, TensorInfo], layers: Mapping[str, str]) -> StorageDType:
    """The file's own dtype when every layer shares one; fp32 when they differ (nothing is lost)."""
    stored = {FLOAT_DTYPES[header[name].dtype] for name in layers.values()}
    return stored.pop() if len(stored) == 1 else "fp32"


def _describe(header: Mapping[str, TensorInfo], limit: int = 12) -> str:
    shown = [f"{i.name} {i.dtype} {list(i.shape)}" for i in list(header.values())[:limit]]
    more = f", … {len(header) - limit} more" if len(header) > limit else ""
    return ", ".join(shown) + more if shown else "none"


# ---------------------------------------------------------------------------------------------
# Row metadata: read and checked, or made up where the file has none


def row_metadata(path: Path, plan: ImportPlan) -> dict[str, torch.Tensor]:
    """``token_id``, ``doc_index``, ``position`` as int32 ``[n_rows]``: from the file, or stand-ins."""
    given: dict[str, torch.Tensor] = {}
    with safe_open(str(path), "pt") as f:
        for field, name in plan.row_fields.items():
            given[field] = _checked_field(f.get_tensor(name), field, name)
    n = plan.n_rows
    doc_index = given.get("doc_index")
    position = given.get("position")
    if doc_index is None:
        doc_index = (
            _docs_from_positions(position) if position is not None else torch.arange(n, dtype=torch.int32)
        )
    if position is None:
        own_docs = "doc_index" not in given
        position = torch.ones(n, dtype=torch.int32) if own_docs else _positions_in_docs(doc_index)
    token_id = given.get("token_id", torch.full((n,), -1, dtype=torch.int32))
    return {"token_id": token_id, "doc_index": doc_index, "position": position}


def _checked_field(values: torch.Tensor, field: str, name: str) -> torch.Tensor:
    values = values.to(torch.int64)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > INT32_MAX:
        raise InvalidInputError(
            f"row field {field!r} (tensor {name!r}) has values in [{low}, {high}]: "
            f"they must be in [0, {INT32_MAX}]",
            details={"tensor": name, "field": field, "min": low, "max": high},
        )
    return values.to(torch.int32)


def _positions_in_docs(doc_index: torch.Tensor) -> torch.Tensor:
    """Offset of each row within its run of consecutive rows of the same document."""
    n = len(doc_index)
    starts = torch.ones(n, dtype=torch.bool)
    starts[1:] = doc_index[1:] != doc_index[:-1]
    index = torch.arange(n, dtype=torch.int64)
    run_start = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=0).values
    return (index - run_start).to(torch.int32)


def _docs_from_positions(position: torch.Tensor) -> torch.Tensor:
    """A new document wherever the position does not increase (0 after 57, or a repeat)."""
    new_doc = torch.zeros(len(position), dtype=torch.int32)
    new_doc[1:] = (position[1:] <= position[:-1]).to(torch.int32)
    return torch.cumsum(new_doc, dim=0, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# Import


def import_activations(
    store: Store,
    path: str | Path,
    *,
    tensors: Mapping[str, str] | None = None,
    row_fields: Mapping[str, str] | None = None,
    dtype: StorageDType | None = None,
    model: str | None = None,
    model_source: str | None = None,
    run_id: str | None = None,
    shard_mb: float = 64.0,
    source: dict[str, Any] | None = None,
) -> RunManifest:
    """Write the activations in the safetensors file at ``path`` as a new run; return its manifest.

    ``model`` names the model the activations came from; ``model_source`` says how a worker can
    load it (``bundled``, ``local``, ``hub``) and, when None, the run records the name only and is
    marked ``loadable: false`` (no CE-loss evaluation, no forward-based discovery on it).
    ``source`` describes the origin in the manifest's ``dataset`` (the service records the upload
    id, never a server path). Fails with InvalidInputError naming the tensor and the problem;
    publishes nothing then.
    """
    started = time.perf_counter()
    path = Path(path)
    if dtype is not None and dtype not in TORCH_DTYPES:
        raise InvalidInputError(f"unknown storage dtype {dtype!r}; use one of {', '.join(TORCH_DTYPES)}")
    if shard_mb <= 0:
        raise InvalidInputError(f"shard_mb must be > 0, got {shard_mb}")
    plan = plan_import(read_header(path), tensors=tensors, row_fields=row_fields, dtype=dtype)
    meta = row_metadata(path, plan)
    run_id = validate_id(run_id, "run id") if run_id else new_id("run")
    with RunWriter(store, run_id, list(plan.layers), dtype=plan.dtype, shard_mb=shard_mb) as run:
        for rows, meta_chunk in _chunks(path, plan, meta):
            run.add(rows, meta_chunk)
        run.close_rows()
        manifest = _manifest(run, plan, meta, model, model_source, source, shard_mb, started)
        run.commit(manifest)
    return manifest


def _chunks(
    path: Path, plan: ImportPlan, meta: dict[str, torch.Tensor]
) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Rows in the storage dtype, a bounded number at a time, each chunk checked before it is kept."""
    storage = TORCH_DTYPES[plan.dtype]
    row_bytes = max(plan.widths.values()) * 8
    step = max(1, READ_CHUNK_BYTES // row_bytes)
    with safe_open(str(path), "pt") as f:
        slices = {layer: f.get_slice(name) for layer, name in plan.layers.items()}
        for start in range(0, plan.n_rows, step):
            stop = min(start + step, plan.n_rows)
            rows = {
                layer: _checked_rows(piece[start:stop], plan.layers[layer], start, storage, plan.dtype)
                for layer, piece in slices.items()
            }
            yield rows, {field: values[start:stop] for field, values in meta.items()}


def _checked_rows(
    rows: torch.Tensor, name: str, offset: int, storage: torch.dtype, dtype_name: str
) -> torch.Tensor:
    """The rows converted to the storage dtype; InvalidInputError if any value is not finite there."""
    bad_N = ~torch.isfinite(rows).all(dim=-1)
    if bool(bad_N.any()):
        first = offset + int(bad_N.nonzero()[0])
        raise InvalidInputError(
            f"tensor {name!r} has non-finite values (NaN or inf), first at row {first}",
            details={"tensor": name, "row": first},
        )
    converted = rows.to(storage).contiguous()
    bad_N = ~torch.isfinite(converted).all(dim=-1)
    if bool(bad_N.any()):
        first = offset + int(bad_N.nonzero()[0])
        raise InvalidInputError(
            f"tensor {name!r} has values beyond the range of {dtype_name} (first at row {first}); "
            "import with dtype 'fp32' or 'bf16'",
            details={"tensor": name, "row": first, "dtype": dtype_name},
        )
    return converted


def _manifest(
    run: RunWriter,
    plan: ImportPlan,
    meta: dict[str, torch.Tensor],
    model: str | None,
    model_source: str | None,
    source: dict[str, Any] | None,
    shard_mb: float,
    started: float,
) -> RunManifest:
    d_model = max(plan.widths.values())
    record = {
        **run.identity(),
        "model": {
            "name": model or "unknown",
            "source": model_source or "external",
            "loadable": model is not None and model_source is not None,
            "d_model": d_model,
        },
        "layers": run.layer_records({}),
        "d_model": d_model,
        "dtype": plan.dtype,
        "n_tokens": run.n_tokens,
        "n_docs": int(torch.unique(meta["doc_index"]).numel()),
        "shards": run.shards,
        "row_fields": {name: "int32" for name in ROW_FIELDS},
        "special_token_ids": [],
        "bos_token_id": None,
        "dataset": source or {"kind": "import"},
        "options": {"dtype": plan.dtype, "shard_mb": shard_mb},
        "import": {
            "tensors": {name: layer for layer, name in plan.layers.items()},
            "row_fields": dict(plan.row_fields),
            "synthetic_row_fields": plan.synthetic_row_fields,
        },
        "capture_seconds": round(time.perf_counter() - started, 3),
    }
    return RunManifest.model_validate(record)
