"""Text sources: where the documents of a capture, a discovery or an analysis come from.

A source is a small pydantic object (an inline list, a local file or directory, a Hugging Face
dataset) so the same value can be an API request field, a job argument and a line in the capture
manifest. Reading them is `kestrel.core.datasets`; this module is torch-free, so the API process
validates requests with it without loading the engine.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PositiveInt

from kestrel.core.config import StrictModel

__all__ = [
    "SUFFIX_FORMATS",
    "DatasetSpec",
    "FileFormat",
    "FileReading",
    "FileSource",
    "HFSource",
    "TextsSource",
    "TxtMode",
    "describe_source",
]

FileFormat = Literal["txt", "jsonl", "csv", "parquet"]
#: How a .txt file splits into documents: one per non-empty line, or the whole file.
TxtMode = Literal["line", "file"]

SUFFIX_FORMATS: dict[str, FileFormat] = {
    ".txt": "txt",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
}

# Every source is a StrictModel: unknown keys are rejected so a misspelt option in a request
# ("text_feild") is a 422, not a silently ignored field and a capture over the wrong column.


class TextsSource(StrictModel):
    """Documents given inline, for small requests and tests."""

    kind: Literal["texts"] = "texts"
    texts: list[str] = Field(min_length=1, description="The documents, in order.")
    limit: PositiveInt | None = Field(default=None, description="Use at most this many documents.")


class FileReading(StrictModel):
    """How a file's documents are read: one definition for a local file (`FileSource`) and for an
    uploaded one (`kestrel.schemas.UploadSource`, which names the file by its upload id)."""

    format: Literal["auto", "txt", "jsonl", "csv", "parquet"] = Field(
        default="auto", description="'auto' infers from the suffix; a directory with 'auto' means *.txt."
    )
    text_field: str = Field(default="text", min_length=1, description="jsonl key / csv or parquet column.")
    txt_mode: TxtMode = Field(
        default="line", description="txt only: one document per non-empty line, or per file."
    )
    limit: PositiveInt | None = None


class FileSource(FileReading):
    """A local file, or a directory of files of one format."""

    kind: Literal["file"] = "file"
    path: str = Field(min_length=1, description="A file, or a directory whose files are read sorted.")


class HFSource(StrictModel):
    """A dataset loaded with `datasets.load_dataset`: a hub id, or a local builder such as 'json'."""

    kind: Literal["hf"] = "hf"
    name: str = Field(min_length=1, description="Hub id, or a packaged builder ('json', 'csv', 'parquet').")
    config: str | None = Field(default=None, description="Dataset configuration (load_dataset's `name`).")
    split: str = Field(default="train", min_length=1)
    text_field: str = Field(default="text", min_length=1)
    streaming: bool = Field(default=True, description="Stream rows instead of downloading the split first.")
    data_files: list[str] | None = Field(default=None, description="Files for a packaged builder.")
    limit: PositiveInt | None = None


DatasetSpec = Annotated[TextsSource | FileSource | HFSource, Field(discriminator="kind")]


def describe_source(spec: TextsSource | FileSource | HFSource) -> str:
    """A short human name for a source, used in error messages and logs."""
    if isinstance(spec, TextsSource):
        return f"inline texts ({len(spec.texts)} given)"
    if isinstance(spec, FileSource):
        return f"file {spec.path!r}"
    config = f", config {spec.config!r}" if spec.config else ""
    return f"hf dataset {spec.name!r} (split {spec.split!r}{config})"
