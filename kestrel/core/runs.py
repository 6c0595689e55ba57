"""Activation runs as the store holds them: the capture options, the row filters, and the manifest
reads that need no tensor (docs/store-format.md).

Capturing and reading rows is `kestrel.core.activations`; this module is torch-free, so the API
process lists runs, reads manifests and validates capture requests without loading the engine.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kestrel.core.catalog import DType
from kestrel.core.errors import InvalidInputError, not_found
from kestrel.core.store import LocalStore, StoredManifest, read_typed_manifests, validate_id

FORMAT_VERSION = 1
KIND = "activations"
ROW_META_FIELDS = ("token_id", "doc_index", "position")
RUN_FILE_NAMES = frozenset({"tokens", "manifest.json", "docs.jsonl"})  # a layer may not take these names
#: A layer spec ``<module>:input`` captures what the module reads (its first input) rather than
#: what it returns, in the same pass: ``model.layers.10.mlp:input`` and ``model.layers.10.mlp``
#: are a transcoder's input and target. The run stores it as a layer of that name.
INPUT_SUFFIX = ":input"
HookPoint = Literal["output", "input"]


def parse_layer_spec(spec: str) -> tuple[str, HookPoint]:
    """(module path, which side of it) of a capture's layer spec."""
    if spec.endswith(INPUT_SUFFIX):
        return spec[: -len(INPUT_SUFFIX)], "input"
    if ":" in spec:
        raise InvalidInputError(
            f"layer {spec!r}: a module path takes at most the suffix {INPUT_SUFFIX!r} (its input)",
            details={"layer": spec},
        )
    return spec, "output"


class CaptureOptions(BaseModel):
    """How to capture: one object for the CLI, the API request and the manifest."""

    max_length: int = Field(512, description="tokens per document; longer documents are truncated")
    token_budget: int = Field(8192, description="padded tokens per forward batch")
    max_batch_size: int | None = Field(None, description="documents per batch at most")
    dtype: DType = Field("fp16", description="storage dtype of the activations")
    drop_bos: bool = Field(False, description="leave out BOS tokens at position 0")
    drop_special: bool = Field(False, description="leave out every special token (BOS, EOS, chat markers)")
    shard_mb: float = Field(64.0, description="upper bound on one shard file's size (per layer)")

    def check(self) -> None:
        """Fail before any work, naming the argument."""
        if self.max_length <= 0:
            raise InvalidInputError(f"max_length must be > 0, got {self.max_length}")
        if self.token_budget <= 0:
            raise InvalidInputError(f"token_budget must be > 0, got {self.token_budget}")
        if self.max_batch_size is not None and self.max_batch_size <= 0:
            raise InvalidInputError(f"max_batch_size must be > 0, got {self.max_batch_size}")
        if self.shard_mb <= 0:
            raise InvalidInputError(f"shard_mb must be > 0, got {self.shard_mb}")


class RowFilter(BaseModel):
    """Which rows a reader yields. Training and statistics should use ``RowFilter.recommended()``."""

    skip_position_0: bool = Field(False, description="leave out each document's first token")
    skip_special: bool = Field(False, description="leave out special tokens (BOS, EOS, chat markers)")
    max_norm_multiple: float | None = Field(
        None, description="leave out rows whose norm exceeds this multiple of the layer's median norm"
    )

    @classmethod
    def recommended(cls) -> RowFilter:
        """Skip the attention-sink rows that otherwise dominate every statistic."""
        return cls(skip_position_0=True, skip_special=True, max_norm_multiple=10.0)


Split = Literal["all", "train", "heldout"]


# ---------------------------------------------------------------------------------------------
# The manifest (docs/store-format.md)


class _Record(BaseModel):
    """A part of a manifest: typed where known, other fields passed through."""

    model_config = ConfigDict(extra="allow")


class RunModel(_Record):
    """The model the activations came from, as the run records it."""

    name: str = Field(description="bundled name, hub id, local name, or the user's name for it")
    source: str | None = Field(
        None, description="bundled, local, hub; training (a user's own loop); external (an import)"
    )
    architecture: str | None = Field(None, description="the model's class")
    model_type: str | None = None
    d_model: int | None = None
    n_blocks: int | None = None
    dtype: str | None = None
    device: str | None = None
    loadable: bool = Field(True, description="false: the service has no such model (no CE-loss, no forward)")
    note: str | None = None


def _fields_unlisted(schema: dict[str, Any]) -> None:
    """Show `RunLayer` in the OpenAPI document as a plain object, as it always was: a component
    with a property named "d" breaks the generated Python SDK (openapi-python-client 0.29 names
    its own local variable "d" in ``from_dict``). Python code still reads the fields typed."""
    schema.pop("properties", None)
    schema.pop("required", None)


class RunLayer(_Record):
    """One captured layer: d (width of its rows), kind (block, mlp, attention, ...), norm_median
    (median row norm, position 0 excluded, from a uniform sample of rows; null if none)."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_fields_unlisted)

    d: int = Field(description="width of its rows")
    kind: str = Field("other", description="block, mlp, attention, ...")
    norm_median: float | None = Field(
        None, description="median row norm, position 0 excluded, from a uniform sample of rows"
    )
    module: str | None = Field(None, description="the module path it was read at (None: its name)")
    hook: HookPoint = Field(
        "output", description="output: what the module returned; input: what it read (its first input)"
    )


class RunShard(_Record):
    """One shard: the same rows in every layer directory and in tokens/."""

    name: str
    n_tokens: int
    step: int | None = Field(None, description="the training step its rows come from (a training capture)")


class RunOptions(_Record):
    """How the run was written: `CaptureOptions` for a capture; the schedule for a training
    capture; dtype and shard size for an import."""

    max_length: int | None = None
    token_budget: int | None = None
    max_batch_size: int | None = None
    dtype: str | None = None
    drop_bos: bool | None = None
    drop_special: bool | None = None
    shard_mb: float | None = None
    every_n_steps: int | None = None
    rows_per_shard: int | None = None
    max_rows_per_step: int | None = None
    seed: int | None = None


class TrainingSource(_Record):
    """Where a run written during a user's own training came from, and how the training ended."""

    kind: str = "training"
    framework: str = Field(description="manual or lightning")
    status: Literal["complete", "interrupted"] = "complete"
    error: str | None = None
    every_n_steps: int | None = None
    last_step_seen: int | None = None


class RunImport(_Record):
    """How an uploaded safetensors file became the run."""

    tensors: dict[str, str] = Field(default_factory=dict, description="tensor in the file -> layer")
    row_fields: dict[str, str] = Field(default_factory=dict, description="row field -> tensor in the file")
    synthetic_row_fields: list[str] = Field(default_factory=list, description="row fields made up")


class RunManifest(StoredManifest):
    """A run's manifest.json (docs/store-format.md): written by `RunWriter`'s producers (capture,
    a training capture, an import), read by everything that uses the run."""

    format_version: int = FORMAT_VERSION
    id: str
    kind: str = KIND
    created: str
    model: RunModel
    layers: dict[str, RunLayer] = Field(description="per layer, in capture order")
    d_model: int
    dtype: str = Field(description="storage dtype of the activations")
    n_tokens: int = Field(description="rows stored")
    n_docs: int = Field(description="documents read")
    shards: list[RunShard]
    row_fields: dict[str, str] = Field(default_factory=dict, description="row metadata tensors and dtypes")
    special_token_ids: list[int] = Field(default_factory=list)
    bos_token_id: int | None = None
    dataset: dict[str, Any] = Field(description="the dataset as requested (inline texts summarised)")
    options: RunOptions
    capture_seconds: float | None = None
    source: TrainingSource | None = Field(None, description="a run written during training")
    steps: list[int] | None = Field(None, description="a training capture's steps, in order")
    import_: RunImport | None = Field(None, alias="import", description="an imported run")

    def layer(self, name: str) -> RunLayer:
        """The layer's record; NotFoundError naming the run's layers (close matches first)."""
        if name not in self.layers:
            raise not_found("layer", name, self.layers)
        return self.layers[name]

    def layer_width(self, name: str) -> int:
        """Width ``d`` of a captured layer; NotFoundError for a layer the run did not capture."""
        return self.layer(name).d

    def unloadable_model_reason(self) -> str | None:
        """Why the service cannot load the model this run came from (None when it can).

        A run written during a user's own training (``kestrel.core.callbacks``) or imported from a
        file without a model the service knows marks its model ``loadable: false``: nothing that
        needs it in the loop (CE-loss recovered, KL) can be computed, and loading a model by its
        name could even pick an unrelated one.
        """
        if self.model.loadable:
            return None
        if self.import_ is not None:
            origin = "imported from a file of"
        elif self.source is not None and self.source.kind == "training":
            origin = "captured during training from"
        else:
            origin = "recorded from"
        return (
            f"run {self.id!r} was {origin} the model {self.model.name!r}, which the service "
            "cannot load; model-in-the-loop work (CE-loss recovered, encode, discovery, steering) needs it"
        )


def list_runs(store: LocalStore) -> list[RunManifest]:
    """Manifests of every complete run, oldest id first."""
    return read_typed_manifests(store, KIND, RunManifest)


def get_manifest(store: LocalStore, run_id: str) -> RunManifest:
    return RunManifest.model_validate(store.read_json(KIND, validate_id(run_id, "run id")))


def delete_run(store: LocalStore, run_id: str) -> None:
    store.delete(KIND, validate_id(run_id, "run id"))
