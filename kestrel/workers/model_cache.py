"""Which models a client may name, and the per-worker cache that keeps them loaded between jobs.

A client names a model three ways: a bundled name (``smollm2-135m``), a Hugging Face hub id
(``org/name``), or the name of a local checkpoint the operator listed in ``KESTREL_MODEL_DIRS``.
A filesystem path is never accepted over HTTP: the engine's ``load_model`` would happily read
any directory, so the name is checked here before it ever reaches it.

The cache is why the worker runs jobs in its own process: an encode after a load answers in one
forward pass instead of a second of loading.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kestrel.core import hub
from kestrel.core.catalog import validate_model_name
from kestrel.core.errors import InvalidInputError
from kestrel.core.loading import DeviceMap, LoadConfig, Quantization
from kestrel.core.models import BUNDLED, LoadedModel, load_model, load_tokenizer, resolve_device


def load_target(name: str, local_models: dict[str, Path], allowed: Sequence[str] = ()) -> str:
    """What ``load_model`` should be given for a checked name: the local directory or the name."""
    validate_model_name(name, local_models, allowed)
    if name in BUNDLED:
        return name
    if name in local_models:
        return str(local_models[name])
    if Path(name).expanduser().exists():
        # load_model prefers a local directory over the hub: a hub id that is also a path relative
        # to the worker's directory would read that directory instead.
        raise InvalidInputError(f"model {name!r} names a path on the worker; refusing to read it")
    return name


@dataclass
class CachedModel:
    lm: LoadedModel
    device: str  # what the worker record shows: "cuda:0", or a split model's "cuda:0+cuda:1"
    dtype: str
    loaded_at: float


class ModelCache:
    """Loaded models keyed by (name, placement, dtype), least recently used evicted past ``max_models``.

    The placement is the device of an unsplit model (``cuda:0``) or the worker's device map and
    quantization (``LoadConfig.key``): a model loaded split is never handed to a job that asked
    for it on one device, and the other way round.
    """

    def __init__(
        self,
        store_root: Path,
        *,
        max_models: int = 2,
        default_device: str = "auto",
        default_dtype: str = "fp32",
        device_map: DeviceMap | None = None,
        quantization: Quantization = "none",
        local_models: Callable[[], dict[str, Path]] = dict,
        allowed_models: Sequence[str] = (),
        hub_timeout_s: float = hub.DEFAULT_PROBE_TIMEOUT_S,
    ) -> None:
        self.store_root = store_root
        self.allowed_models = tuple(allowed_models)
        self.hub_timeout_s = hub_timeout_s
        self.max_models = max_models
        self.default_device = default_device
        self.default_dtype = default_dtype
        self.device_map = device_map
        self.quantization: Quantization = quantization
        self.local_models = local_models
        self._models: OrderedDict[tuple[str, str, str], CachedModel] = OrderedDict()
        self._lock = threading.RLock()  # guards the dict only; held for microseconds
        self._loading: dict[tuple[str, str, str], threading.Lock] = {}

    def get(self, name: str, *, device: str | None = None, dtype: str | None = None) -> LoadedModel:
        """The model, loaded now if this worker does not hold it yet.

        ``device``/``dtype`` of None mean "whichever copy is loaded" (so an encode uses the copy a
        load request made), else the worker's defaults: its device map if it has one (a job that
        names no device gets the split model), else its device; its dtype.
        """
        if device is None or dtype is None:
            with self._lock:
                for (cached_name, cached_device, cached_dtype), cached in reversed(self._models.items()):
                    if (
                        cached_name == name
                        and device in (None, cached_device)
                        and dtype in (None, cached_dtype)
                    ):
                        self._models.move_to_end((cached_name, cached_device, cached_dtype))
                        return cached.lm
        return self._load(name, device, dtype or self.default_dtype)

    def tokenizer(self, name: str) -> Any:
        """The model's tokenizer: a loaded copy's, else the tokenizer alone (no weights)."""
        with self._lock:
            for (cached_name, _, _), cached in reversed(self._models.items()):
                if cached_name == name:
                    return cached.lm.tokenizer
        target = load_target(name, self.local_models(), self.allowed_models)
        return load_tokenizer(target, store_root=self.store_root, hub_timeout_s=self.hub_timeout_s)

    def placement(self, device: str | None, dtype: str) -> LoadConfig:
        """How a load asked for with ``device`` (None: the worker's default) is placed."""
        if device is None and self.device_map is not None:
            return LoadConfig(
                device=self.default_device,
                device_map=self.device_map,
                dtype=dtype,
                quantization=self.quantization,
            )
        concrete = str(resolve_device(device or self.default_device))
        return LoadConfig(device=concrete, dtype=dtype, quantization=self.quantization)

    def _load(self, name: str, device: str | None, dtype: str) -> LoadedModel:
        """Load under a lock of its own key, never under the cache's lock.

        A load can take minutes (a first conversion, a hub checkpoint); the heartbeat thread reads
        the cache (``describe``) every few seconds, and a worker whose heartbeat waited on a load
        would be declared dead and its job failed while it was working.
        """
        placement = self.placement(device, dtype)
        key = (name, placement.key(), dtype)
        with self._lock:
            cached = self._hit(key)
            if cached is not None:
                return cached
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # two jobs asking for one model load it once
            with self._lock:
                cached = self._hit(key)
                if cached is not None:
                    return cached
            target = load_target(name, self.local_models(), self.allowed_models)
            lm = load_model(
                target,
                device=placement.device,
                dtype=dtype,
                store_root=self.store_root,
                hub_timeout_s=self.hub_timeout_s,
                device_map=placement.device_map,
                quantization=placement.quantization,
            )
            lm.name = name  # manifests and SAE configs record the public name, never a local path
            shown = lm.placement_label if placement.split else placement.device
            with self._lock:
                self._models[key] = CachedModel(lm, shown, dtype, time.time())
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
                self._loading.pop(key, None)
            return lm

    def _hit(self, key: tuple[str, str, str]) -> LoadedModel | None:
        cached = self._models.get(key)
        if cached is None:
            return None
        self._models.move_to_end(key)
        return cached.lm

    def drop(self, name: str, *, loaded_before: float | None = None) -> int:
        """Forget every copy of ``name`` (loaded before ``loaded_before``, if given); how many."""
        with self._lock:
            keys = [
                k
                for k, v in self._models.items()
                if k[0] == name and (loaded_before is None or v.loaded_at < loaded_before)
            ]
            for key in keys:
                del self._models[key]
            return len(keys)

    def apply_unload_requests(self, requests: dict[str, float]) -> None:
        """Drop models whose unload was requested after they were loaded."""
        for name, requested_at in requests.items():
            self.drop(name, loaded_before=requested_at)

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {"name": k[0], "device": v.device, "dtype": v.dtype, "loaded_at": v.loaded_at}
                for k, v in self._models.items()
            ]
