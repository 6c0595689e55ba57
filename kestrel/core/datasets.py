"""Text sources and token batches: the two ends of "feed a dataset through a model".

A source is a small pydantic object (an inline list, a local file or directory, a Hugging Face
dataset) so the same value can be an API request field, a job argument and a line in the capture
manifest. `iter_texts` turns it into a stream of documents; `token_batches` turns any stream of
documents into right-padded token batches sized by a token budget.

Everything streams: files are read line by line or by parquet batch, and batching holds one
sorting window of documents at a time, so a dataset larger than memory can still be captured.
Problems surface as `InvalidInputError` / `NotFoundError` with a message naming the file, line or
field, and as early as they can be known (before the first document when possible), because a
capture job that fails an hour in on a typo in `text_field` is the expensive way to find out.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import IO, Any

import torch

from kestrel.core.errors import InvalidInputError, NotFoundError, close_matches
from kestrel.core.sources import (
    SUFFIX_FORMATS,
    DatasetSpec,
    FileFormat,
    FileSource,
    HFSource,
    TextsSource,
    describe_source,
)

__all__ = [
    "DatasetSpec",
    "FileSource",
    "HFSource",
    "TextsSource",
    "TokenBatch",
    "check_nonempty",
    "describe_source",
    "encode_texts",
    "iter_texts",
    "prepare_tokenizer",
    "token_batches",
]

# How many parquet rows to materialise as Python strings at once: big enough to amortise the
# Arrow→Python conversion, small enough that a column of long documents stays bounded.
PARQUET_BATCH_ROWS = 1024

# How many available field names an error message lists before saying "…and N more".
MAX_LISTED_FIELDS = 40


def iter_texts(spec: TextsSource | FileSource | HFSource) -> Iterator[str]:
    """Stream a source's non-blank documents in order, at most `spec.limit` of them.

    Reading starts at call time, up to the first document, so a missing file, a wrong text
    field, a malformed first record or an empty dataset raise here rather than at some later
    `next()`: a job can validate its dataset before it spends time loading a model.
    """
    docs: Iterator[str] = _skip_blank(_source_docs(spec))
    if spec.limit is not None:
        docs = islice(docs, spec.limit)
    return check_nonempty(docs, source=describe_source(spec))


def check_nonempty(texts: Iterable[str], *, source: str = "dataset") -> Iterator[str]:
    """The non-blank texts of `texts`; raises at once if there are none.

    The first document is read eagerly, because an empty dataset silently producing an empty
    capture is worse than an error, and the error is most useful before any work has started.
    """
    docs = _skip_blank(texts)
    first = next(docs, None)
    if first is None:
        raise InvalidInputError(
            f"dataset is empty: {source} has no non-blank documents", details={"source": source}
        )
    return chain([first], docs)


def _is_blank(text: str) -> bool:
    return not text or text.isspace()


def _skip_blank(texts: Iterable[str]) -> Iterator[str]:
    return (text for text in texts if not _is_blank(text))


def _source_docs(spec: TextsSource | FileSource | HFSource) -> Iterator[str]:
    if isinstance(spec, TextsSource):
        return iter(spec.texts)
    if isinstance(spec, FileSource):
        return _file_source_docs(spec)
    return _hf_docs(spec)


# ---- local files -----------------------------------------------------------------------------


def _file_source_docs(spec: FileSource) -> Iterator[str]:
    """Resolve the path and format up front (cheap checks), then stream file after file."""
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise _missing_path_error(path)
    if path.is_dir():
        fmt: FileFormat = "txt" if spec.format == "auto" else spec.format
        files = _files_in_directory(path, fmt)
    else:
        fmt = _infer_format(path) if spec.format == "auto" else spec.format
        files = [path]
    return chain.from_iterable(_file_docs(file, fmt, spec) for file in files)


def _missing_path_error(path: Path) -> NotFoundError:
    """Name the path, and suggest siblings: a typo in a file name is the usual cause."""
    siblings = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
    suggestions = close_matches(path.name, siblings)
    hint = f"; did you mean {', '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    return NotFoundError(
        f"file not found: {str(path)!r}{hint}", details={"path": str(path), "suggestions": suggestions}
    )


def _supported_suffixes() -> str:
    return ", ".join(SUFFIX_FORMATS)


def _infer_format(path: Path) -> FileFormat:
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InvalidInputError(
            f"cannot infer the format of {str(path)!r} from its suffix {path.suffix!r}; supported "
            f"suffixes: {_supported_suffixes()} (or set format explicitly)",
            details={"path": str(path), "supported": list(SUFFIX_FORMATS)},
        )
    return fmt


def _files_in_directory(directory: Path, fmt: FileFormat) -> list[Path]:
    """Files of one format, sorted by name so the document order (and doc indices) is stable."""
    suffixes = {suffix for suffix, f in SUFFIX_FORMATS.items() if f == fmt}
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise InvalidInputError(
            f"directory {str(directory)!r} has no {fmt} files (looked for {', '.join(sorted(suffixes))})",
            details={"path": str(directory), "format": fmt},
        )
    return files


def _file_docs(path: Path, fmt: FileFormat, spec: FileSource) -> Iterator[str]:
    if fmt == "txt":
        return _txt_whole_file(path) if spec.txt_mode == "file" else _txt_lines(path)
    if fmt == "jsonl":
        return _jsonl_docs(path, spec.text_field)
    if fmt == "csv":
        return _csv_docs(path, spec.text_field)
    return _parquet_docs(path, spec.text_field)


@contextmanager
def _open_text(path: Path, newline: str | None = None) -> Iterator[IO[str]]:
    """Open as UTF-8 (a leading BOM is dropped, so a csv header from Excel still matches)."""
    try:
        with open(path, encoding="utf-8-sig", newline=newline) as handle:
            yield handle
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            f"{str(path)!r} is not valid UTF-8 text (byte offset {exc.start})", details={"path": str(path)}
        ) from exc


def _txt_lines(path: Path) -> Iterator[str]:
    with _open_text(path) as handle:
        for line in handle:
            yield line.rstrip("\r\n")


def _txt_whole_file(path: Path) -> Iterator[str]:
    with _open_text(path) as handle:
        yield handle.read()


def _jsonl_docs(path: Path, field: str) -> Iterator[str]:
    with _open_text(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if _is_blank(line):
                continue
            where = f"{str(path)!r} line {line_number}"
            record = _parse_json_record(line, where)
            if field not in record:
                raise _missing_field_error(field, list(record), where)
            yield _as_text(record[field], field, where)


def _parse_json_record(line: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{where} is not valid JSON: {exc.msg} (column {exc.colno})") from exc
    except RecursionError:
        raise InvalidInputError(f"{where} is nested too deeply") from None
    except ValueError as exc:  # an integer of more than 4,300 digits
        raise InvalidInputError(f"{where} holds a value out of range: {exc}") from None
    if not isinstance(record, dict):
        raise InvalidInputError(f"{where} is a JSON {type(record).__name__}, expected an object")
    return record


def _csv_docs(path: Path, field: str) -> Iterator[str]:
    # Documents are often longer than csv's default 128 KiB field limit; the limit is process-wide,
    # and raising it only ever admits more input.
    csv.field_size_limit(max(csv.field_size_limit(), min(sys.maxsize, 2**31 - 1)))
    with _open_text(path, newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None:
                return
            if field not in header:
                raise _missing_field_error(field, header, f"the header of {str(path)!r}")
            column = header.index(field)
            for row in reader:
                if not row:
                    continue
                if column >= len(row):
                    raise InvalidInputError(
                        f"{str(path)!r} line {reader.line_num} has {len(row)} columns, "
                        f"the header has {len(header)}; column {field!r} is missing"
                    )
                yield row[column]
        except csv.Error as exc:
            raise InvalidInputError(f"{str(path)!r} line {reader.line_num} is not valid csv: {exc}") from exc


def _parquet_docs(path: Path, field: str) -> Iterator[str]:
    """Read one column batch by batch, so only `PARQUET_BATCH_ROWS` rows live as Python strings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InvalidInputError(f"{str(path)!r} is not a readable parquet file: {exc}") from exc
    with parquet:
        schema = parquet.schema_arrow
        if field not in schema.names:
            raise _missing_field_error(field, schema.names, f"the columns of {str(path)!r}")
        column_type = schema.field(field).type
        if not (
            pa.types.is_string(column_type)
            or pa.types.is_large_string(column_type)
            or pa.types.is_string_view(column_type)
        ):
            raise InvalidInputError(
                f"column {field!r} of {str(path)!r} has type {column_type}, expected a string column"
            )
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
            for value in batch.column(0).to_pylist():
                yield value if value is not None else ""


# ---- Hugging Face datasets -------------------------------------------------------------------


def _hf_docs(spec: HFSource) -> Iterator[str]:
    dataset = _load_hf(spec)
    where = describe_source(spec)
    columns = getattr(dataset, "column_names", None)  # None for some streaming datasets
    if columns is not None and spec.text_field not in columns:
        raise _missing_field_error(spec.text_field, list(columns), where)
    return _hf_rows(dataset, spec.text_field, where)


def _hf_rows(dataset: Iterable[dict[str, Any]], field: str, where: str) -> Iterator[str]:
    for row_number, row in enumerate(dataset):
        if field not in row:
            raise _missing_field_error(field, list(row), f"{where} row {row_number}")
        yield _as_text(row[field], field, f"{where} row {row_number}")


def _load_hf(spec: HFSource) -> Any:
    """Call `datasets.load_dataset`, translating its failures into the engine's error classes.

    Imported here, not at module level: `datasets` is slow to import and only this branch needs it.
    """
    import datasets
    from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError

    try:
        return datasets.load_dataset(
            spec.name,
            spec.config,
            split=spec.split,
            streaming=spec.streaming,
            data_files=spec.data_files,
        )
    except (DatasetNotFoundError, DataFilesNotFoundError, FileNotFoundError) as exc:
        raise NotFoundError(
            f"{describe_source(spec)} could not be found: {exc}", details={"dataset": spec.name}
        ) from exc
    except ValueError as exc:  # unknown split or config, bad data_files, …
        raise InvalidInputError(
            f"{describe_source(spec)} could not be loaded: {exc}", details={"dataset": spec.name}
        ) from exc


# ---- shared field handling -------------------------------------------------------------------


def _missing_field_error(field: str, available: list[str], where: str) -> NotFoundError:
    """List what *is* there: the fix for a wrong text field is nearly always one of these names."""
    suggestions = close_matches(field, available)
    listed = ", ".join(repr(name) for name in available[:MAX_LISTED_FIELDS]) or "none"
    if len(available) > MAX_LISTED_FIELDS:
        listed += f", … and {len(available) - MAX_LISTED_FIELDS} more"
    hint = f"; did you mean {', '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    return NotFoundError(
        f"text field {field!r} not found in {where}; available fields: {listed}{hint}",
        details={"text_field": field, "available": available, "suggestions": suggestions},
    )


def _as_text(value: Any, field: str, where: str) -> str:
    """A null text counts as an empty document (skipped); any other non-string is a mistake."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidInputError(f"{where}: field {field!r} holds a {type(value).__name__}, expected text")
    return value


# --------------------------------------------------------------------------------------------
# Token batches
# --------------------------------------------------------------------------------------------


@dataclass
class TokenBatch:
    """Documents tokenised for one forward pass."""

    input_ids_BT: torch.LongTensor
    """Token ids, right-padded: row b holds its real tokens in positions [0, length_b)."""
    attention_mask_BT: torch.LongTensor
    """1 for real tokens, 0 for padding; what keeps padding out of stores and statistics."""
    doc_index_B: torch.LongTensor
    """Each row's position (0-based) in the text stream that was batched, i.e. its document id."""

    @property
    def n_tokens(self) -> int:
        """Real (non-pad) tokens in the batch: the rows a capture writes."""
        return int(self.attention_mask_BT.sum())


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give the tokenizer a pad token (eos, else unk) and return it.

    Reusing an existing token keeps the vocabulary, and so the model's embedding matrix, as it is;
    the pad id's value never matters because padded positions are masked. `padding_side` is left
    alone: generation wants left padding, and `token_batches` pads on the right by itself.
    """
    if tokenizer.pad_token is not None:
        return tokenizer
    for fallback in (tokenizer.eos_token, tokenizer.unk_token):
        if fallback is not None:
            tokenizer.pad_token = fallback
            return tokenizer
    raise InvalidInputError(
        "the tokenizer has no pad, eos or unk token to pad with; set tokenizer.pad_token first"
    )


def token_batches(
    texts: Iterable[str],
    tokenizer: Any,
    *,
    max_length: int = 512,
    token_budget: int = 8192,
    max_batch_size: int | None = None,
    sort_window: int = 512,
    add_special_tokens: bool = True,
) -> Iterator[TokenBatch]:
    """Tokenise a text stream into right-padded batches of at most `token_budget` padded tokens.

    Each text keeps its first `max_length` tokens. Texts are read `sort_window` at a time and
    sorted by length within the window (longest first, ties in stream order), which keeps padding
    small while bounding memory; batches are then cut so that rows × longest row ≤ token_budget
    and rows ≤ max_batch_size. A single text longer than the budget still forms a batch of one.
    Texts with no tokens at all are dropped, but still count for `doc_index_B`.

    Padding is always on the right, whatever `tokenizer.padding_side` says: decoder models number
    positions 0, 1, 2, … along the row, so left padding would shift every real token's position
    (and, with absolute or rotary embeddings, its activations) by the amount of padding — the
    captured activations would depend on which other texts shared the batch.

    Arguments are checked at call time, before any text is read.
    """
    _require_positive("max_length", max_length)
    _require_positive("token_budget", token_budget)
    _require_positive("sort_window", sort_window)
    if max_batch_size is not None:
        _require_positive("max_batch_size", max_batch_size)
    return _token_batches(
        texts,
        tokenizer,
        max_length=max_length,
        token_budget=token_budget,
        max_batch_size=max_batch_size,
        sort_window=sort_window,
        add_special_tokens=add_special_tokens,
    )


def encode_texts(tokenizer: Any, texts: list[str], *, max_length: int = 512) -> list[list[int]]:
    """Each text's token ids exactly as `token_batches` makes them (same truncation, specials).

    What lets a reader rebuild a stored row's context from `docs.jsonl`: a row's `position` is
    an index into this list for its document.
    """
    _require_positive("max_length", max_length)
    return _encode_window(tokenizer, texts, max_length, True) if texts else []


def _require_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidInputError(
            f"{name} must be a positive integer, got {value!r}", details={name: repr(value)}
        )


def _token_batches(
    texts: Iterable[str],
    tokenizer: Any,
    *,
    max_length: int,
    token_budget: int,
    max_batch_size: int | None,
    sort_window: int,
    add_special_tokens: bool,
) -> Iterator[TokenBatch]:
    pad_id = _pad_id(tokenizer)
    first_index = 0
    for window in _windows(texts, sort_window):
        ids_per_text = _encode_window(tokenizer, window, max_length, add_special_tokens)
        rows = [(first_index + i, ids) for i, ids in enumerate(ids_per_text) if ids]
        first_index += len(window)
        rows.sort(key=lambda row: (-len(row[1]), row[0]))
        for start, stop in _cut_points([len(ids) for _, ids in rows], token_budget, max_batch_size):
            yield _pack(rows[start:stop], pad_id)


def _windows(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(texts)
    while window := list(islice(iterator, size)):
        yield window


def _encode_window(
    tokenizer: Any, texts: list[str], max_length: int, add_special_tokens: bool
) -> list[list[int]]:
    """Token ids of the first `max_length` tokens of each text, in one batched tokenizer call.

    The tokenizer's own truncation is used when it keeps the start of a text (the usual setting,
    and it never tokenises past the cut); a tokenizer configured to truncate on the left is
    tokenised in full and cut here, so a capture always sees the beginning of each document.
    """
    keeps_start = getattr(tokenizer, "truncation_side", "right") == "right"
    encoded = tokenizer(
        texts,
        add_special_tokens=add_special_tokens,
        truncation=keeps_start,
        max_length=max_length if keeps_start else None,
        padding=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )
    ids_per_text: list[list[int]] = encoded["input_ids"]
    return ids_per_text if keeps_start else [ids[:max_length] for ids in ids_per_text]


def _cut_points(
    lengths_desc: list[int], token_budget: int, max_batch_size: int | None
) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges over rows sorted longest first; the first row of a range sets its width."""
    start = 0
    while start < len(lengths_desc):
        rows = max(1, token_budget // lengths_desc[start])
        if max_batch_size is not None:
            rows = min(rows, max_batch_size)
        stop = min(start + rows, len(lengths_desc))
        yield start, stop
        start = stop


def _pack(rows: list[tuple[int, list[int]]], pad_id: int) -> TokenBatch:
    lengths_B = torch.tensor([len(ids) for _, ids in rows], dtype=torch.long)
    width = int(lengths_B.max())
    input_ids_BT = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for b, (_, ids) in enumerate(rows):
        input_ids_BT[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    attention_mask_BT = (torch.arange(width)[None, :] < lengths_B[:, None]).long()
    doc_index_B = torch.tensor([doc for doc, _ in rows], dtype=torch.long)
    return TokenBatch(input_ids_BT, attention_mask_BT, doc_index_B)


def _pad_id(tokenizer: Any) -> int:
    """The id to fill padding with, without mutating the tokenizer; masked, so any valid id works."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if isinstance(token_id, int):
            return token_id
    return 0
