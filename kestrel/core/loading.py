"""How a model is placed when it loads: one device, or split across several; its precision; and
optionally 8-bit or 4-bit weights.

A model too large for one GPU loads with a *device map*: ``"auto"`` lets accelerate fill the GPUs
this worker sees (then CPU memory, then disk), or a dict names the device of each module path
(``{"model.layers.0": 0, ..., "lm_head": 1}``; ``"cpu"``, ``"disk"``, ``N``, ``"cuda:N"``).
accelerate then moves each block's inputs to the block's device as the forward goes, and
brings the model's outputs back to the device the inputs came from. What Kestrel adds on top
is in ``kestrel.core.devices``: a hook that reads or edits a layer does its arithmetic where
that layer runs (``layer_device``).

``quantization`` (``8bit``/``4bit``) stores the linear weights with bitsandbytes, which must be
installed (``pip install 'kestrel[gpu]'``); activations stay in ``dtype``.

This module is torch-free: the settings and the API check a placement without importing torch.
"""

from __future__ import annotations

import importlib.util
import json
import re
from typing import Literal

from pydantic import Field, field_validator

from kestrel.core.catalog import DEVICE_PATTERN, DType
from kestrel.core.config import EngineConfig
from kestrel.core.errors import InvalidInputError

Quantization = Literal["none", "8bit", "4bit"]
#: Where one module of a split model goes: a device name, ``disk`` (offloaded, read back for each
#: forward) or a CUDA index.
Placement = str | int
DeviceMap = Literal["auto"] | dict[str, Placement]

#: The optional extra that installs what split and quantized loads need beyond the engine's
#: dependencies (pyproject ``[project.optional-dependencies] gpu``).
GPU_EXTRA = "gpu"

_MODULE_PATH = re.compile(r"^([A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*)?$")
_PLACEMENT = re.compile(rf"^(disk|{DEVICE_PATTERN})$")
_GPU_IDS = re.compile(r"^[A-Za-z0-9-]+(,[A-Za-z0-9-]+)*$")


class LoadConfig(EngineConfig):
    """Everything that decides how one model is loaded: a model cache keys on it (``key``).

    A bad field is an InvalidInputError naming it (a 422 over HTTP, a line at worker start).
    """

    device: str = Field(
        "auto",
        pattern=rf"^({DEVICE_PATTERN})$",
        description="the one device of an unsplit model: cpu, cuda, cuda:N or auto",
    )
    device_map: DeviceMap | None = Field(
        None,
        description="split the model: 'auto' (accelerate fills the visible GPUs, then CPU) or "
        "{module path: device}; None: the whole model on `device`",
    )
    dtype: DType = Field("fp32", description="compute dtype (and of the unquantized weights)")
    quantization: Quantization = Field(
        "none", description="8bit or 4bit weights through bitsandbytes (a CUDA host); none: dtype"
    )

    @field_validator("device_map")
    @classmethod
    def _check_device_map(cls, value: DeviceMap | None) -> DeviceMap | None:
        if not isinstance(value, dict):
            return value
        if not value:
            raise ValueError("device_map is empty; give 'auto' or at least one module: device")
        for module, placement in value.items():
            if not _MODULE_PATH.fullmatch(module):
                raise ValueError(f"device_map key {module!r} is not a module path (model.layers.0)")
            if isinstance(placement, bool) or (isinstance(placement, int) and placement < 0):
                raise ValueError(f"device_map[{module!r}] = {placement!r}: a CUDA index is >= 0")
            if isinstance(placement, str) and not _PLACEMENT.fullmatch(placement):
                raise ValueError(
                    f"device_map[{module!r}] = {placement!r}: use cpu, disk, cuda, cuda:N or an index N"
                )
        return value

    @property
    def split(self) -> bool:
        """Loaded through accelerate's dispatch (a device map or quantized weights)."""
        return self.device_map is not None or self.quantization != "none"

    def key(self) -> str:
        """A canonical string of the placement, for cache keys and logs (dicts sorted by module)."""
        if self.device_map is None:
            placement = self.device
        elif self.device_map == "auto":
            placement = "map:auto"
        else:
            placement = "map:" + json.dumps(self.device_map, sort_keys=True, separators=(",", ":"))
        return placement if self.quantization == "none" else f"{placement}+{self.quantization}"


def parse_device_map(text: str | dict | None) -> DeviceMap | None:
    """A device map as an operator writes it in an env var: empty or ``none`` (no split),
    ``auto``, or a JSON object ``{"model.layers.0": 0, ...}``."""
    if text is None:
        return None
    if isinstance(text, dict):
        return LoadConfig(device_map=text).device_map
    stripped = text.strip()
    if stripped.lower() in ("", "none"):
        return None
    if stripped == "auto":
        return "auto"
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"device map {text!r} is neither 'auto' nor a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"device map {text!r} is neither 'auto' nor a JSON object")
    return LoadConfig(device_map=value).device_map


def parse_gpu_ids(text: str | None) -> str | None:
    """``KESTREL_WORKER_GPUS``: comma-separated CUDA indices or GPU UUIDs (``0,1``), ``none`` for
    no GPU at all, empty for every GPU the host shows. Returns CUDA_VISIBLE_DEVICES's value."""
    if text is None or not text.strip():
        return None
    stripped = text.replace(" ", "")
    if stripped.lower() == "none":
        return ""
    if not _GPU_IDS.fullmatch(stripped):
        raise InvalidInputError(f"worker GPUs {text!r}: give comma-separated indices or UUIDs (0,1), or none")
    return stripped


def require_packages(config: LoadConfig) -> None:
    """The packages a split or quantized load needs, checked before anything is read: a missing
    one is the operator's to install, said in one line (InvalidInputError), not an ImportError
    from deep inside transformers."""
    needed = []
    if config.split:
        needed.append("accelerate")
    if config.quantization != "none":
        needed.append("bitsandbytes")
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        what = f"quantization={config.quantization!r}" if "bitsandbytes" in missing else "device_map"
        raise InvalidInputError(
            f"{what} needs {' and '.join(missing)}, which this worker does not have; install it "
            f"with: pip install 'kestrel[{GPU_EXTRA}]'",
            details={"missing": missing, "extra": GPU_EXTRA},
        )
