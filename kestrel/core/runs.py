"""Activation runs as the store holds them: the capture options, the row filters, and the manifest
reads that need no tensor (docs/store-format.md).

Capturing and reading rows is `kestrel.core.activations`; this module is torch-free, so the API
process lists runs, reads manifests and validates capture requests without loading the engine.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from kestrel.core.catalog import DType
from kestrel.core.errors import InvalidInputError
from kestrel.core.store import LocalStore, read_manifests, validate_id

FORMAT_VERSION = 1
KIND = "activations"
ROW_META_FIELDS = ("token_id", "doc_index", "position")
RUN_FILE_NAMES = frozenset({"tokens", "manifest.json", "docs.jsonl"})  # a layer may not take these names


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


def list_runs(store: LocalStore) -> list[dict[str, Any]]:
    """Manifests of every complete run, oldest id first."""
    return read_manifests(store, KIND)


def get_manifest(store: LocalStore, run_id: str) -> dict[str, Any]:
    return store.read_json(KIND, validate_id(run_id, "run id"))


def delete_run(store: LocalStore, run_id: str) -> None:
    store.delete(KIND, validate_id(run_id, "run id"))
