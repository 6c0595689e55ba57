"""An SAE's evaluation ledger as the store holds it, read without torch: options, the labelled
probing dataset (inline, an upload, a local jsonl/csv), its checks, reading a ledger, and the
rows of a comparison with the L0-vs-FVU Pareto front.

The ledger itself is computed by `kestrel.core.sae.ledger` (torch, a model, scikit-learn); the API
process uses only this module, so it checks a request and answers reads without loading torch.
A ledger is one file, ``saes/<id>/ledger.json``, replaced atomically (`Store.put_json` writes a
temporary file and renames it): a reader sees the previous ledger or the new one, never half.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from kestrel.core.config import StrictModel
from kestrel.core.errors import InvalidInputError, NotFoundError
from kestrel.core.sae.records import KIND, SAEManifest, get_sae
from kestrel.core.store import Store, validate_id

LEDGER_FILE = "ledger.json"
LEDGER_VERSION = 1
#: The fewest texts a class may have; the held-out split may ask for more (`split_sizes`).
MIN_PER_CLASS = 4
MAX_CLASSES = 64
MAX_LABEL_CHARS = 200
#: The most SAEs one comparison lays side by side.
MAX_COMPARE = 32


class LedgerOptions(StrictModel):
    """How a ledger is computed; every entry records the options it used."""

    ks: list[PositiveInt] = Field(
        default_factory=lambda: [1, 2, 5, 20],
        min_length=1,
        max_length=8,
        description="k-sparse probing: the numbers of latents a probe may read",
    )
    test_fraction: float = Field(0.2, ge=0.1, le=0.5, description="held-out share of the labelled texts")
    seed: int = Field(0, ge=0, description="splits, sampling and the synthetic dictionary")
    max_length: int = Field(128, gt=0, le=2048, description="tokens kept per probing text")
    model_in_the_loop: bool = Field(True, description="CE-loss recovered and KL (model forwards)")
    eval_texts: int = Field(16, gt=0, le=1000, description="held-out texts for CE loss and KL")
    absorption: bool = Field(True, description="feature absorption on the first-letter task")
    absorption_words: int = Field(
        1000, ge=200, le=20000, description="single-token words of the first-letter task"
    )
    absorption_max_k: int = Field(10, ge=1, le=20, description="most main latents per letter")
    synthetic: bool = Field(True, description="ground-truth recovery on a known sparse dictionary")
    synthetic_rows: int = Field(
        32768, ge=1024, le=2_000_000, description="rows the synthetic-data SAE is trained on"
    )
    synthetic_l0: int | None = Field(
        None, gt=0, le=1024, description="active true features per row; default the SAE's k, else 16"
    )

    @field_validator("ks")
    @classmethod
    def _sorted_unique(cls, ks: list[int]) -> list[int]:
        return sorted(set(ks))


class LabelledTexts(StrictModel):
    """Texts with one label each, inline."""

    kind: Literal["texts"] = "texts"
    texts: list[str] = Field(min_length=2 * MIN_PER_CLASS, description="one text per example")
    labels: list[str | int] = Field(description="a class per text (topic, sentiment, ...)")

    @model_validator(mode="after")
    def _same_length(self) -> LabelledTexts:
        if len(self.texts) != len(self.labels):
            raise ValueError(
                f"{len(self.texts)} texts but {len(self.labels)} labels: give one label per text"
            )
        return self


class LabelledUpload(StrictModel):
    """A jsonl or csv file uploaded with ``POST /v1/uploads``: a text column and a label column."""

    kind: Literal["upload"] = "upload"
    upload_id: str = Field(min_length=1, max_length=64)
    text_field: str = Field("text", min_length=1)
    label_field: str = Field("label", min_length=1)
    limit: PositiveInt | None = Field(None, description="read at most this many rows")


LabelledDataset = Annotated[LabelledTexts | LabelledUpload, Field(discriminator="kind")]


# ---------------------------------------------------------------------------------------------
# Labelled data


def read_labelled_file(
    path: Path,
    *,
    text_field: str = "text",
    label_field: str = "label",
    limit: int | None = None,
    fmt: str | None = None,
) -> tuple[list[str], list[str]]:
    """Texts and labels of a .jsonl or .csv file (``fmt``, else its suffix); InvalidInputError
    naming the line at fault."""
    fmt = fmt or path.suffix.lower().lstrip(".")
    if fmt not in ("jsonl", "csv"):
        raise InvalidInputError(
            f"a labelled dataset is a .jsonl or .csv file, not {path.name!r}", details={"file": path.name}
        )
    if not path.is_file():
        raise NotFoundError(f"no file {str(path)!r}", details={"path": str(path)})
    rows = _jsonl_rows(path) if fmt == "jsonl" else _csv_rows(path)
    texts: list[str] = []
    labels: list[str] = []
    for line, row in rows:
        for field in (text_field, label_field):
            if row.get(field) is None:
                raise InvalidInputError(
                    f"line {line} has no field {field!r} (it has {sorted(row)[:20]})",
                    details={"line": line, "field": field},
                )
        texts.append(str(row[text_field]))
        labels.append(str(row[label_field]))
        if limit is not None and len(texts) >= limit:
            break
    return texts, labels


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    # An upload's first MiB only was checked as UTF-8: a bad byte later is the caller's error too.
    # utf-8-sig drops a leading BOM (files saved by Excel or Notepad).
    line = 0
    try:
        with path.open(encoding="utf-8-sig") as handle:
            for line, raw in enumerate(handle, start=1):
                if raw.strip():
                    yield line, _json_object(raw, line)
    except UnicodeDecodeError as exc:
        raise _not_utf8(line + 1, exc) from None


def _json_object(raw: str, line: int) -> dict[str, Any]:
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"line {line} is not JSON: {exc.msg}", details={"line": line}) from None
    except (RecursionError, ValueError) as exc:  # nested too deeply; an integer of 4,300+ digits
        raise InvalidInputError(f"line {line} is not usable JSON: {exc}", details={"line": line}) from None
    if not isinstance(row, dict):
        raise InvalidInputError(f"line {line} is not a JSON object", details={"line": line})
    return row


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    # Texts may be longer than csv's default 128 KiB field limit; the limit is process-wide, and
    # raising it only ever admits more input (as `kestrel.core.datasets` does).
    csv.field_size_limit(max(csv.field_size_limit(), min(sys.maxsize, 2**31 - 1)))
    reader = None
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            for row in reader:
                yield reader.line_num, row
    except UnicodeDecodeError as exc:
        raise _not_utf8((reader.line_num if reader else 0) + 1, exc) from None
    except csv.Error as exc:
        line = reader.line_num if reader else 1
        raise InvalidInputError(f"line {line} is not valid csv: {exc}", details={"line": line}) from None


def _not_utf8(line: int, exc: UnicodeDecodeError) -> InvalidInputError:
    return InvalidInputError(
        f"the file is not valid UTF-8 text at or after line {line} ({exc.reason})", details={"line": line}
    )


def labelled_upload_texts(store: Store, spec: LabelledUpload) -> tuple[list[str], list[str]]:
    """The texts and labels of an uploaded labelled dataset (jsonl or csv)."""
    from kestrel.core import uploads  # torch-free

    manifest = uploads.require_dataset_upload(store, validate_id(spec.upload_id, "upload id"))
    if manifest["format"] not in ("jsonl", "csv"):
        raise InvalidInputError(
            f"upload {spec.upload_id!r} is {manifest['format']}; a labelled dataset is jsonl or csv",
            details={"upload_id": spec.upload_id, "format": manifest["format"]},
        )
    path = store.local_path("uploads", spec.upload_id, manifest["file"])
    return read_labelled_file(
        path,
        text_field=spec.text_field,
        label_field=spec.label_field,
        limit=spec.limit,
        fmt=manifest["format"],
    )


def resolve_labelled(
    store: Store, dataset: LabelledTexts | LabelledUpload, test_fraction: float
) -> tuple[list[str], list[str]]:
    """The texts and string labels a request names, checked (`check_labelled`)."""
    if isinstance(dataset, LabelledTexts):
        texts, labels = list(dataset.texts), [str(label) for label in dataset.labels]
    else:
        texts, labels = labelled_upload_texts(store, dataset)
    check_labelled(texts, labels, test_fraction)
    return texts, labels


def split_sizes(n: int, test_fraction: float) -> tuple[int, int]:
    """(train, test) rows of scikit-learn's split of ``n`` rows: the test side is ⌈n·f⌉."""
    n_test = math.ceil(test_fraction * n)  # the same float expression as train_test_split
    return n - n_test, n_test


def check_labelled(texts: list[str], labels: list[str], test_fraction: float) -> None:
    """Probing needs two or more classes, each with `MIN_PER_CLASS` texts and enough that the
    stratified split leaves it a text on each side, and no blank text.

    scikit-learn gives a class of ``c`` texts at least ⌊c·n_train/n⌋ train and ⌊c·n_test/n⌋ test
    rows, so ``c·n_train ≥ n`` and ``c·n_test ≥ n`` make both at least one; summed over the
    classes they also give its own rule (each side at least as many rows as classes)."""
    if len(texts) != len(labels):
        raise InvalidInputError(f"{len(texts)} texts but {len(labels)} labels")
    blank = [i for i, text in enumerate(texts) if not text.strip()]
    if blank:
        raise InvalidInputError(f"text {blank[0]} is blank", details={"blank_texts": blank[:20]})
    long_labels = [label for label in labels if len(label) > MAX_LABEL_CHARS]
    if long_labels:
        raise InvalidInputError(
            f"labels are at most {MAX_LABEL_CHARS} characters (is the label column right?)"
        )
    counts = Counter(labels)
    if len(counts) < 2:
        raise InvalidInputError(
            "probing needs at least two classes; every text has the same label",
            details={"classes": sorted(counts)},
        )
    if len(counts) > MAX_CLASSES:
        raise InvalidInputError(
            f"{len(counts)} classes; at most {MAX_CLASSES} (is the label column right?)",
            details={"classes": len(counts)},
        )
    n_train, n_test = split_sizes(len(labels), test_fraction)
    need = max(MIN_PER_CLASS, -(-len(labels) // max(n_test, 1)), -(-len(labels) // max(n_train, 1)))
    small = {label: n for label, n in counts.items() if n < need}
    if small:
        raise InvalidInputError(
            f"every class needs at least {need} texts; too few for {sorted(small)[:10]} "
            f"(test_fraction {test_fraction} holds out {n_test} of {len(labels)} texts, and each "
            "class needs a text on each side of the stratified split: at least "
            f"{MIN_PER_CLASS}, ⌈texts / held out⌉ and ⌈texts / kept⌉)",
            details={"too_small": small, "min_per_class": need, "n_train": n_train, "n_test": n_test},
        )


# ---------------------------------------------------------------------------------------------
# Reading ledgers, comparing SAEs


def read_ledger(store: Store, sae_id: str) -> dict[str, Any] | None:
    """The SAE's ledger, or None when none was computed (NotFoundError for an unknown SAE)."""
    get_sae(store, sae_id)
    try:
        return store.read_json(KIND, sae_id, LEDGER_FILE)
    except NotFoundError:
        return None


def _value(ledger: dict[str, Any] | None, name: str) -> float | None:
    entry = (ledger or {}).get("entries", {}).get(name)
    return None if entry is None else entry.get("value")


def comparison_row(summary: SAEManifest, ledger: dict[str, Any] | None) -> dict[str, Any]:
    """One SAE's line in a comparison: the ledger's values, else its stored held-out metrics."""
    metrics = summary.metrics
    fvu = _value(ledger, "fvu")
    l0 = _value(ledger, "l0")
    values = {
        name: _value(ledger, name)
        for name in (
            "dead_fraction",
            "ce_loss_recovered",
            "kl_divergence",
            "absorption_fraction",
            "full_absorption_rate",
            "synthetic_recovery",
        )
    }
    probing = {
        name.removeprefix("sparse_probing_"): entry["value"]
        for name, entry in ((ledger or {}).get("entries") or {}).items()
        if name.startswith("sparse_probing_")
    }
    return {
        "id": summary.id,
        "architecture": summary.config.get("architecture"),
        "n_latents": summary.n_latents,
        "k": summary.config.get("k"),
        "model": summary.model_name,
        "layer": summary.layer_name,
        "fvu": fvu if fvu is not None else metrics.get("fvu"),
        "l0": l0 if l0 is not None else metrics.get("l0"),
        **{name: v if v is not None else metrics.get(name) for name, v in values.items()},
        "sparse_probing": probing,
        "has_ledger": ledger is not None,
        "ledger_computed_at": (ledger or {}).get("computed_at"),
        "pareto": False,
    }


def mark_pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set ``pareto`` on the rows no other row beats on both L0 and FVU (lower is better in both)."""
    scored = [row for row in rows if row["fvu"] is not None and row["l0"] is not None]
    for row in scored:
        row["pareto"] = not any(
            other is not row
            and other["l0"] <= row["l0"]
            and other["fvu"] <= row["fvu"]
            and (other["l0"] < row["l0"] or other["fvu"] < row["fvu"])
            for other in scored
        )
    return rows


def compare_saes(store: Store, sae_ids: list[str]) -> list[dict[str, Any]]:
    """Comparison rows of ``sae_ids`` in the order given, Pareto front marked."""
    if not sae_ids:
        raise InvalidInputError("name at least one SAE to compare (ids=a,b,c)")
    if len(sae_ids) > MAX_COMPARE:
        raise InvalidInputError(
            f"at most {MAX_COMPARE} SAEs per comparison, got {len(sae_ids)}",
            details={"max": MAX_COMPARE, "given": len(sae_ids)},
        )
    if len(set(sae_ids)) != len(sae_ids):
        raise InvalidInputError("an SAE is named twice", details={"ids": sae_ids})
    rows = [comparison_row(get_sae(store, sae_id), read_ledger(store, sae_id)) for sae_id in sae_ids]
    return mark_pareto(rows)
