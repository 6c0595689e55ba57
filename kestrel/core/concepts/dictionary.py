"""The concept dictionary of an SAE: a name, description and tags per latent, with their source.

Stored as ``saes/<sae_id>/features/dictionary.json`` beside (not inside) the discovery versions,
so naming survives a re-run of discovery and can start before any. Every write is a locked
read-modify-write published with an atomic rename, so two concurrent edits both land and a
reader never sees half a file.

Import accepts JSON (``{"n_latents": N, "concepts": [...]}`` or a bare list of concepts) and CSV
(a header naming ``latent`` and ``name``, optionally ``description``, ``tags`` separated by ``;``
and ``source``). A file is validated whole before anything is written, against the SAE's latent
count; every problem names the line (CSV) or the key (JSON), so the fix is obvious.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, get_args

from pydantic import Field, field_validator

from kestrel.core.concepts.store import FEATURES_DIR, SAE_KIND
from kestrel.core.config import EngineConfig
from kestrel.core.errors import InvalidInputError, NotFoundError
from kestrel.core.sae.records import get_sae
from kestrel.core.store import Store, validate_id

DICTIONARY_FILE = "dictionary.json"
LOCK_FILE = ".dictionary.lock"
#: How a name can be made automatically (`kestrel.core.concepts.labels`).
LabelMethod = Literal["heuristic", "model"]
#: Who made a name: a person, or one of the label methods.
LabelSource = Literal["manual", "heuristic", "model"]
LABEL_SOURCES: tuple[str, ...] = get_args(LabelSource)
CSV_COLUMNS = ("latent", "name", "description", "tags", "source")
TAG_SEPARATOR = ";"
MAX_NAME_CHARS = 200
MAX_DESCRIPTION_CHARS = 4000


class ScoredExample(EngineConfig):
    """One test example of a label's detection score, as the scorer saw it."""

    tokens: list[str] = Field(max_length=256, description="the example's tokens, as text")
    activations: list[float] = Field(max_length=256, description="the latent's activation at each token")
    activating: bool = Field(description="the latent fires in it (the truth)")
    quantile: int | None = Field(None, description="activation quantile it was sampled from (0: the top)")
    score: float = Field(
        description="the scorer's value (nats): the label's PMI with the example, or in the channel form "
        "the log-likelihood ratio of the example with and without the label"
    )
    predicted: bool = Field(description="the scorer's answer: score above the calibrated threshold")


class LabelScores(EngineConfig):
    """How well a name predicts its latent's activations (`kestrel.core.concepts.scoring`).

    Balanced accuracies and the AUROC are 0.5 by chance, 1.0 at best; a score is None when the
    latent had too few examples to score (``note`` says why).
    """

    label: str = Field(max_length=MAX_NAME_CHARS, description="the name these scores are for")
    scorer: str = Field(max_length=400, description="the model that scored it")
    detection: float | None = Field(None, description="balanced accuracy: activating vs random contexts")
    fuzz: float | None = Field(None, description="balanced accuracy: right vs random tokens marked")
    embedding: float | None = Field(None, description="AUROC of cos(label, context): no generation")
    threshold: float | None = Field(None, description="detection threshold, fitted on a calibration split")
    n_activating: int = Field(0, ge=0, description="activating test examples")
    n_non_activating: int = Field(0, ge=0, description="non-activating test examples")
    examples: list[ScoredExample] = Field(default_factory=list, max_length=64)
    key: str = Field("", max_length=64, description="scorer, settings and run these scores depend on")
    scored: str | None = Field(None, description="when (UTC)")
    note: str = Field("", max_length=400)


class Concept(EngineConfig):
    """What one latent means, and who said so (and, once scored, how well the name predicts it)."""

    latent: int = Field(ge=0, description="latent index")
    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS, description="a short name")
    description: str = Field("", max_length=MAX_DESCRIPTION_CHARS)
    tags: list[str] = Field(default_factory=list, max_length=32)
    source: LabelSource = Field("manual", description="manual, heuristic (top tokens) or model (the LM)")
    updated: str | None = Field(None, description="when it was last written (UTC)")
    scores: LabelScores | None = Field(None, description="how well the name predicts activations")

    @field_validator("name")
    @classmethod
    def _strip_name(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("name is blank")
        return value

    @field_validator("tags")
    @classmethod
    def _clean_tags(cls, tags: list[str]) -> list[str]:
        return list(dict.fromkeys(tag.strip() for tag in tags if tag.strip()))


DICTIONARY_REL = f"{FEATURES_DIR}/{DICTIONARY_FILE}"
#: The label scores a concept can carry (`LabelScores`), by which lists sort and filter.
ScoreName = Literal["detection", "fuzz", "embedding"]


def score_of(concept: Concept | None, name: ScoreName | str) -> float | None:
    """One of a concept's label scores (None: not scored, or no score of that kind)."""
    if concept is None or concept.scores is None:
        return None
    return getattr(concept.scores, name)


def score_key(concept: Concept | None, name: ScoreName | str) -> float:
    """A score to sort by, best first: an unscored concept gets -1 (below every score; 0.0 is a score)."""
    value = score_of(concept, name)
    return -1.0 if value is None else value


def scores_at_least(concept: Concept | None, minimum: dict[str, float]) -> bool:
    """Every score named in ``minimum`` is present and at least its value (0.0 passes a minimum of
    0; an unscored concept passes none). The one filter of /concepts, /features and the CLI."""
    for name, value in minimum.items():
        score = score_of(concept, name)
        if score is None or score < value:
            return False
    return True


def sae_latent_count(store: Store, sae_id: str) -> int:
    """The SAE's latent count, from its summary (no weights loaded)."""
    return get_sae(store, sae_id).n_latents


def read_dictionary(store: Store, sae_id: str) -> dict[int, Concept]:
    """Every named latent of the SAE, by index (empty when nothing is named yet)."""
    sae_id = validate_id(sae_id, "sae id")
    try:
        data = store.read_json(SAE_KIND, sae_id, DICTIONARY_REL)
    except NotFoundError:
        if not store.exists(SAE_KIND, sae_id):
            raise
        return {}
    return {int(c["latent"]): Concept(**c) for c in data.get("concepts", [])}


def get_concept(store: Store, sae_id: str, latent: int) -> Concept:
    concept = read_dictionary(store, sae_id).get(latent)
    if concept is None:
        raise NotFoundError(
            f"latent {latent} of sae {sae_id!r} has no concept yet", details={"latent": latent}
        )
    return concept


@contextmanager
def _locked(store: Store, sae_id: str) -> Iterator[None]:
    """Serialise read-modify-writes on this machine (a lock file in the SAE's scratch directory:
    ``features/`` itself for a local store). Writers on different machines sharing an S3 store
    are not serialised: the last write wins."""
    scratch = store.scratch_dir(SAE_KIND, validate_id(sae_id, "sae id"), FEATURES_DIR)
    with (scratch / LOCK_FILE).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write(store: Store, sae_id: str, n_latents: int, concepts: dict[int, Concept]) -> None:
    store.put_json(
        SAE_KIND,
        sae_id,
        DICTIONARY_REL,
        {
            "sae_id": sae_id,
            "n_latents": n_latents,
            "concepts": [concepts[i].model_dump(mode="json") for i in sorted(concepts)],
        },
    )


def update_concepts(
    store: Store,
    sae_id: str,
    concepts: Sequence[Concept],
    *,
    replace: bool = False,
    keep_manual: bool = False,
) -> dict[int, Concept]:
    """Write ``concepts`` (validated against the SAE first); return the whole dictionary.

    ``replace`` drops every entry not in ``concepts``; ``keep_manual`` leaves manual entries as
    they are (what automatic labelling uses, so it never overwrites a person's name). Scores
    belong to a name: an entry rewritten with the same name and no scores of its own keeps the
    stored ones (so a requeued label job resumes its scoring); a new name drops them.
    """
    n_latents = sae_latent_count(store, sae_id)
    check_concepts(concepts, n_latents)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with _locked(store, sae_id):
        current = {} if replace else read_dictionary(store, sae_id)
        for concept in concepts:
            existing = current.get(concept.latent)
            if keep_manual and existing is not None and existing.source == "manual":
                continue
            update: dict[str, Any] = {"updated": stamp}
            if concept.scores is None and existing is not None and existing.name == concept.name:
                update["scores"] = existing.scores
            current[concept.latent] = concept.model_copy(update=update)
        _write(store, sae_id, n_latents, current)
    return current


def set_scores(store: Store, sae_id: str, scores: Sequence[LabelScores], latents: Sequence[int]) -> int:
    """Attach scores to the concepts they were computed for, in one atomic write; a concept
    renamed meanwhile (its name is not the scored label) is left alone. Returns how many landed."""
    written = 0
    with _locked(store, sae_id):
        current = read_dictionary(store, sae_id)
        for latent, score in zip(latents, scores, strict=True):
            concept = current.get(latent)
            if concept is not None and concept.name == score.label:
                current[latent] = concept.model_copy(update={"scores": score})
                written += 1
        _write(store, sae_id, sae_latent_count(store, sae_id), current)
    return written


def delete_concept(store: Store, sae_id: str, latent: int) -> None:
    with _locked(store, sae_id):
        current = read_dictionary(store, sae_id)
        if latent not in current:
            raise NotFoundError(
                f"latent {latent} of sae {sae_id!r} has no concept", details={"latent": latent}
            )
        del current[latent]
        _write(store, sae_id, sae_latent_count(store, sae_id), current)


def check_concepts(concepts: Sequence[Concept], n_latents: int, where: Sequence[str] | None = None) -> None:
    """Indices in range and not repeated; ``where`` names each entry's place in its file."""
    places = list(where) if where is not None else [f"concepts[{i}]" for i in range(len(concepts))]
    first_place: dict[int, str] = {}
    for concept, place in zip(concepts, places, strict=True):
        if concept.latent >= n_latents:
            raise InvalidInputError(
                f"{place}: latent {concept.latent} is out of range; this SAE has {n_latents} latents "
                f"(0..{n_latents - 1})",
                details={"where": place, "latent": concept.latent, "n_latents": n_latents},
            )
        if concept.latent in first_place:
            raise InvalidInputError(
                f"{place}: latent {concept.latent} appears twice (also {first_place[concept.latent]})",
                details={"where": place, "latent": concept.latent},
            )
        first_place[concept.latent] = place


# ---------------------------------------------------------------------------------------------
# Import and export

DictionaryFormat = Literal["json", "csv"]


def import_dictionary(
    store: Store, sae_id: str, data: bytes | str, fmt: DictionaryFormat, *, replace: bool = False
) -> dict[str, Any]:
    """Validate a whole file against the SAE, then merge it in (or replace the dictionary)."""
    n_latents = sae_latent_count(store, sae_id)
    concepts = parse_dictionary(data, fmt, n_latents)
    update_concepts(store, sae_id, concepts, replace=replace)
    return {"sae_id": sae_id, "imported": len(concepts), "replaced": replace}


def parse_dictionary(data: bytes | str, fmt: DictionaryFormat, n_latents: int) -> list[Concept]:
    text = _as_text(data)
    if fmt == "json":
        return _parse_json(text, n_latents)
    if fmt == "csv":
        return _parse_csv(text, n_latents)
    raise InvalidInputError(f"unknown dictionary format {fmt!r}; use 'json' or 'csv'")


def export_dictionary(store: Store, sae_id: str, fmt: DictionaryFormat) -> str:
    concepts = read_dictionary(store, sae_id)
    n_latents = sae_latent_count(store, sae_id)
    rows = [concepts[i] for i in sorted(concepts)]
    if fmt == "json":
        payload = {
            "sae_id": sae_id,
            "n_latents": n_latents,
            "concepts": [c.model_dump(mode="json") for c in rows],
        }
        return json.dumps(payload, indent=2, ensure_ascii=False) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for c in rows:
            texts = (c.name, c.description, TAG_SEPARATOR.join(c.tags))
            writer.writerow([c.latent, *(csv_escape(text) for text in texts), c.source])
        return buffer.getvalue()
    raise InvalidInputError(f"unknown dictionary format {fmt!r}; use 'json' or 'csv'")


#: A spreadsheet reads a cell starting with one of these as a formula (OWASP "CSV injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _reads_as_formula(cell: str) -> bool:
    """The cell would be a formula, or is one already escaped (so escaping stays reversible)."""
    return cell.startswith(FORMULA_STARTS) or (cell.startswith("'") and _reads_as_formula(cell[1:]))


def csv_escape(cell: str) -> str:
    """A text cell a spreadsheet shows as text: ``=HYPERLINK(...)`` is written ``'=HYPERLINK(...)``."""
    return "'" + cell if _reads_as_formula(cell) else cell


def csv_unescape(cell: str) -> str:
    """The inverse of ``csv_escape``: an exported dictionary imports back unchanged."""
    return cell[1:] if cell.startswith("'") and _reads_as_formula(cell[1:]) else cell


def _as_text(data: bytes | str) -> str:
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"the file is not UTF-8 text (byte {exc.start} is invalid)") from None


def _parse_json(text: str, n_latents: int) -> list[Concept]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(
            f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
            details={"line": exc.lineno, "column": exc.colno},
        ) from None
    except RecursionError:
        raise InvalidInputError("the dictionary file is nested too deeply to be a dictionary") from None
    except ValueError as exc:  # an integer of more than 4,300 digits
        raise InvalidInputError(f"the dictionary file holds a value out of range: {exc}") from None
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"sae_id", "n_latents", "concepts"})
        if unknown:
            raise InvalidInputError(
                f"unknown top-level key(s) {unknown}; expected n_latents, concepts (and sae_id)"
            )
        declared = data.get("n_latents")
        if declared is not None and declared != n_latents:
            raise InvalidInputError(
                f"n_latents: the file is for an SAE with {declared!r} latents, this SAE has {n_latents}",
                details={"key": "n_latents", "file": declared, "sae": n_latents},
            )
        if "concepts" not in data:
            raise InvalidInputError("concepts: key missing; expected a list of {latent, name, ...}")
        entries, prefix = data["concepts"], "concepts"
    else:
        entries, prefix = data, ""
    if not isinstance(entries, list):
        raise InvalidInputError(
            f"{prefix or 'the file'}: expected a list of concepts, got {type(entries).__name__}"
        )
    places = [f"{prefix}[{i}]" for i in range(len(entries))]
    concepts = [_concept(entry, place) for entry, place in zip(entries, places, strict=True)]
    check_concepts(concepts, n_latents, places)
    return concepts


def _concept(entry: Any, place: str) -> Concept:
    if not isinstance(entry, dict):
        raise InvalidInputError(
            f"{place}: expected an object with latent and name, got {type(entry).__name__}"
        )
    fields = {key: value for key, value in entry.items() if key != "updated"}
    try:
        return Concept(**fields)
    except InvalidInputError as exc:
        problems = exc.details.get("errors", [])
        text = (
            "; ".join(
                f"{place}.{p['field']}: {p['reason']}" if p["field"] else f"{place}: {p['reason']}"
                for p in problems
            )
            or f"{place}: {exc.message}"
        )
        raise InvalidInputError(text, details={"where": place, "errors": problems}) from None


def _parse_csv(text: str, n_latents: int) -> list[Concept]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise InvalidInputError(f"line 1: malformed CSV: {exc}") from None
    if header is None:
        raise InvalidInputError("the file is empty; expected a header row naming latent,name,...")
    columns = [h.strip().lower() for h in header]
    missing = [c for c in ("latent", "name") if c not in columns]
    unknown = [c for c in columns if c not in CSV_COLUMNS]
    if missing or unknown or len(set(columns)) != len(columns):
        raise InvalidInputError(
            f"line 1: the header must name the columns latent and name (optional: description, tags, "
            f"source), each once; found {header}",
            details={"line": 1, "missing": missing, "unknown": unknown},
        )
    concepts: list[Concept] = []
    places: list[str] = []
    try:
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(columns):
                raise InvalidInputError(
                    f"line {line}: expected {len(columns)} fields ({', '.join(columns)}), found {len(row)}",
                    details={"line": line},
                )
            concepts.append(_csv_concept(dict(zip(columns, row, strict=True)), line))
            places.append(f"line {line}")
    except csv.Error as exc:
        raise InvalidInputError(f"line {reader.line_num}: malformed CSV: {exc}") from None
    check_concepts(concepts, n_latents, places)
    return concepts


def _csv_concept(cells: dict[str, str], line: int) -> Concept:
    raw_latent = cells["latent"].strip()
    try:
        latent = int(raw_latent)
    except ValueError:
        raise InvalidInputError(
            f"line {line}: latent {raw_latent!r} is not an integer", details={"line": line}
        ) from None
    if latent < 0:
        raise InvalidInputError(f"line {line}: latent {latent} is negative", details={"line": line})
    source = cells.get("source", "").strip() or "manual"
    if source not in LABEL_SOURCES:
        raise InvalidInputError(
            f"line {line}: source {source!r} is not one of {', '.join(LABEL_SOURCES)}", details={"line": line}
        )
    tags = [t for t in csv_unescape(cells.get("tags", "")).split(TAG_SEPARATOR) if t.strip()]
    return _concept(
        {
            "latent": latent,
            "name": csv_unescape(cells["name"]),
            "description": csv_unescape(cells.get("description", "")),
            "tags": tags,
            "source": source,
        },
        f"line {line}",
    )
