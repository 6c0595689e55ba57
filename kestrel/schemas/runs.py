"""Datasets and activation runs: uploads, capture requests, run listings, imported runs."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic.json_schema import SkipJsonSchema

# Torch-free modules only: the API process imports this one (tests/unit/test_torch_free.py).
from kestrel.core.catalog import DEFAULT_MODEL
from kestrel.core.catalog import DType as ModelDType
from kestrel.core.config import StrictModel
from kestrel.core.hub import validate_hub_id
from kestrel.core.runs import CaptureOptions
from kestrel.core.runs import RunManifest as RunManifest  # the engine's manifest, returned as it is
from kestrel.core.sources import FileReading, HFSource, TextsSource
from kestrel.schemas.common import PACKAGED_BUILDERS, Page

# ---------------------------------------------------------------------------------------------
# Uploads


UploadKind = Literal["dataset", "activations"]
UploadFormat = Literal["txt", "jsonl", "csv", "parquet", "safetensors"]


class UploadInfo(BaseModel):
    id: str
    kind: UploadKind
    format: UploadFormat
    filename: str = Field(description="the client's name for the file, recorded only; never used as a path")
    size_bytes: int
    sha256: str
    created: str


class UploadPage(Page[UploadInfo]):
    pass


# ---------------------------------------------------------------------------------------------
# Activations


class UploadSource(FileReading):
    """A dataset file uploaded earlier with ``POST /v1/uploads``, named by its id."""

    kind: Literal["upload"] = "upload"
    upload_id: str = Field(min_length=1, max_length=64)


class HubDatasetSource(HFSource):
    """A Hugging Face hub dataset by id: ``HFSource`` without local builders or data files (paths)."""

    data_files: SkipJsonSchema[None] = Field(default=None, exclude=True)

    @field_validator("name")
    @classmethod
    def _hub_id_only(cls, name: str) -> str:
        validate_hub_id(name, "dataset")
        if name.lower() in PACKAGED_BUILDERS:
            raise ValueError(f"dataset {name!r} is a local-file builder; upload the file instead")
        return name


CaptureDataset = Annotated[TextsSource | UploadSource | HubDatasetSource, Field(discriminator="kind")]


class CaptureRequest(StrictModel):
    """Capture ``layers`` of ``model`` over a dataset into a new activation run.

    Sample limit: ``dataset.limit``; batch size: ``options.max_batch_size`` (and the token budget);
    storage dtype: ``options.dtype``.
    """

    model: str = Field(DEFAULT_MODEL, description="bundled name, hub id or configured local model name")
    layers: list[str] = Field(
        min_length=1,
        max_length=64,
        description="module paths from the layer table; `<module>:input` captures what the module reads "
        "(a transcoder's input, beside `<module>`, its output, in the same pass)",
    )
    dataset: CaptureDataset
    options: CaptureOptions = Field(default_factory=CaptureOptions)
    model_dtype: ModelDType = "fp32"


class RunSummary(BaseModel):
    id: str
    model: str
    layers: list[str]
    d_model: int
    dtype: str
    n_tokens: int
    n_docs: int
    created: str


class RunPage(Page[RunSummary]):
    pass


# ---------------------------------------------------------------------------------------------
# Imported activation runs


RowField = Literal["token_id", "doc_index", "position"]


class RunImportRequest(StrictModel):
    """Turn an uploaded safetensors file of activations into a run (``POST /v1/uploads`` first).

    Each imported tensor is ``[n_rows, d]``, floating point, finite, with the same rows as the
    others; row metadata tensors are 1-D integers with one value per row. Without metadata each row
    is its own document (token id -1, position 1), so the held-out split and the row filters still
    work; the manifest's ``import.synthetic_row_fields`` says what was made up.
    """

    upload_id: str = Field(min_length=1, max_length=64, description="a .safetensors upload")
    tensors: dict[str, str] | None = Field(
        None,
        max_length=256,
        description="tensor name in the file → layer name in the run; "
        "default: every 2-D floating-point tensor under its own name",
    )
    row_fields: dict[RowField, str] | None = Field(
        None,
        description="token_id / doc_index / position → tensor name in the file; "
        "default: tensors with exactly those names, where present",
    )
    model: str | None = Field(
        None,
        max_length=200,
        description="the model the activations came from; a model the service can load (bundled, "
        "configured local, or held by a worker) makes the run loadable (CE-loss evaluation); "
        "any other name is recorded only",
    )
    dtype: ModelDType | None = Field(
        None, description="storage dtype; default: the file's (F64 is stored as fp32)"
    )
    shard_mb: float = Field(64.0, gt=0, le=1024, description="upper bound on one shard file (per layer)")
