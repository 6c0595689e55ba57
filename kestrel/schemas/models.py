"""Models: listing, loading, unloading, layer tables, and models embedded from a client."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

# Torch-free modules only: the API process imports this one (tests/unit/test_torch_free.py).
from kestrel.core.catalog import DEVICE_FIELD_PATTERN
from kestrel.core.catalog import DType as ModelDType
from kestrel.core.config import StrictModel
from kestrel.schemas.common import Page

# ---------------------------------------------------------------------------------------------
# Models


class ModelLoadedBy(BaseModel):
    worker: str
    queue: str
    device: str
    dtype: str


class ModelInfo(BaseModel):
    name: str
    source: Literal["bundled", "local", "hub"]
    description: str = ""
    installed: bool = Field(description="its weights are available without a download")
    cached: bool = Field(description="bundled: converted to safetensors already")
    loaded_by: list[ModelLoadedBy] = Field(default_factory=list, description="workers holding it in memory")


class ModelPage(Page[ModelInfo]):
    pass


class ModelLoadRequest(StrictModel):
    device: str | None = Field(
        None,
        pattern=DEVICE_FIELD_PATTERN,
        description="cpu, cuda, cuda:N or auto; default: the worker's setting",
    )
    dtype: ModelDType = "fp32"
    queue: Literal["generate", "interactive"] = Field(
        "generate",
        description="which workers to warm: generate (generation) or interactive (encode, layer "
        "tables, previews); each loads a model it lacks on first use anyway",
    )


class ModelLoadResult(BaseModel):
    name: str
    worker: str
    device: str
    dtype: str
    load_seconds: float
    d_model: int
    n_blocks: int


class ModelUnloadResult(BaseModel):
    name: str
    requested_at: float = Field(description="unix time; workers drop the model within a heartbeat")


class LayerRow(BaseModel):
    name: str = Field(description="module path: the name captures and SAEs take")
    kind: str
    index: int | None
    width: int
    module_type: str


class LayerTable(BaseModel):
    model: str
    layers: list[LayerRow]


class EmbeddedModelInfo(ModelInfo):
    """A model as an app embedding Kestrel lists it: Kestrel's own, or one of the host app's."""

    source: Literal["bundled", "local", "hub", "app"] = Field(  # type: ignore[assignment]
        description="app: a model the host application serves in its own process"
    )


class EmbeddedModelPage(Page[EmbeddedModelInfo]):
    pass
