"""Parsing what clients send (JSON documents, safetensors headers) without ever answering a 500.

Python's ``json`` raises ``RecursionError`` on deeply nested input and ``ValueError`` on an integer
of more than 4,300 digits; both are the client's mistake, so ``loads`` turns every failure into an
InvalidInputError that names the document. ``safetensors_header`` checks a header completely
(types, dtypes, shapes, offsets within the file, sizes consistent with shapes) before anything
is allocated from it, so a caller can trust a shape it reads there: an SAE import validates its
size against the operator's caps from the header alone.
"""

from __future__ import annotations

import io
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kestrel.core.errors import InvalidInputError

MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
MAX_TENSOR_RANK = 8
#: bytes per element of each dtype safetensors knows
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def loads(data: bytes | str, what: str) -> Any:
    """The JSON value in ``data``; InvalidInputError naming ``what`` for anything unparseable
    (bad syntax, bad UTF-8, nesting too deep, integers too long)."""
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{what} is not valid JSON: {exc}", details={"file": what}) from None
    except UnicodeDecodeError:
        raise InvalidInputError(f"{what} is not UTF-8 text", details={"file": what}) from None
    except RecursionError:
        raise InvalidInputError(f"{what} is nested too deeply", details={"file": what}) from None
    except ValueError as exc:  # an int of more than sys.get_int_max_str_digits() digits
        raise InvalidInputError(f"{what} holds a value out of range: {exc}", details={"file": what}) from None


def loads_object(data: bytes | str, what: str) -> dict[str, Any]:
    """Like ``loads``, for documents that must be a JSON object."""
    value = loads(data, what)
    if not isinstance(value, dict):
        raise InvalidInputError(f"{what} must hold a JSON object, not {type(value).__name__}")
    return value


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int] | None = field(default=None, compare=False)
    """Where its data lies, in bytes from the end of the header (what the header says)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def safetensors_header(source: Path | bytes) -> dict[str, TensorInfo]:
    """Every tensor a safetensors file (a path or its bytes) declares, checked; InvalidInputError
    naming the tensor when the header is malformed or does not fit the file."""
    if isinstance(source, bytes | bytearray | memoryview):
        size, opened = len(source), io.BytesIO(source)
    else:
        size, opened = source.stat().st_size, source.open("rb")
    with opened as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise InvalidInputError("not a safetensors file: shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        if length <= 1 or length > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise InvalidInputError("not a safetensors file: implausible header length")
        raw = fh.read(length)
    header = loads(raw, "the safetensors header")
    if not isinstance(header, dict):
        raise InvalidInputError("not a safetensors file: the header is not a JSON object")
    data_size = size - 8 - length
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            _check_metadata(entry)
            continue
        tensors[name] = _tensor_entry(name, entry, data_size)
    return tensors


def _check_metadata(entry: Any) -> None:
    if not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
        raise InvalidInputError("not a valid safetensors file: __metadata__ must map strings to strings")


def _tensor_entry(name: str, entry: Any, data_size: int) -> TensorInfo:
    def bad(reason: str) -> InvalidInputError:
        return InvalidInputError(
            f"not a valid safetensors file: tensor {name!r} {reason}", details={"tensor": name}
        )

    if not isinstance(entry, dict):
        raise bad("is not described by an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise bad(f"has an unknown dtype {dtype!r}")
    if not (
        isinstance(shape, list)
        and len(shape) <= MAX_TENSOR_RANK
        and all(_is_int(n) and n >= 0 for n in shape)
    ):
        raise bad(f"has an invalid shape (a list of at most {MAX_TENSOR_RANK} non-negative integers)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise bad("has invalid data_offsets (two integers)")
    start, stop = offsets
    if not 0 <= start <= stop <= data_size:
        raise bad("lies outside the file")
    if math.prod(shape) * DTYPE_BYTES[dtype] != stop - start:
        raise bad(f"has {stop - start} bytes of data, not what shape {shape} of {dtype} needs")
    return TensorInfo(name, dtype, tuple(shape), (start, stop))


_FLOAT_FORMATS = {"F64": "d", "F32": "f", "F16": "e"}


def read_float_vectors(path: Path, names: list[str]) -> dict[str, list[float]]:
    """1-D floating-point tensors of a safetensors file, as Python floats, without torch or numpy
    (the API reads a few statistics per latent this way). BF16 is widened to float32 bit-exactly."""
    header = safetensors_header(path)
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        vectors: dict[str, list[float]] = {}
        for name in names:
            info = header.get(name)
            if info is None or len(info.shape) != 1 or info.offsets is None:
                raise InvalidInputError(f"no 1-D tensor {name!r} in {path.name}", details={"tensor": name})
            fh.seek(8 + length + info.offsets[0])
            data = fh.read(info.offsets[1] - info.offsets[0])
            vectors[name] = _floats(data, info.dtype, info.shape[0], name)
    return vectors


def _floats(data: bytes, dtype: str, n: int, name: str) -> list[float]:
    if dtype == "BF16":  # the high half of a float32
        halves = struct.unpack(f"<{n}H", data)
        return list(struct.unpack(f"<{n}f", struct.pack(f"<{n}I", *(h << 16 for h in halves))))
    if dtype not in _FLOAT_FORMATS:
        raise InvalidInputError(f"tensor {name!r} is {dtype}, not floating point", details={"tensor": name})
    return list(struct.unpack(f"<{n}{_FLOAT_FORMATS[dtype]}", data))
