"""Where each part of a loaded model runs, for models split across devices.

An unsplit model runs on one device, and every hook's tensors are there. A model loaded with a
device map (``kestrel.core.loading``) runs block by block on different devices: accelerate puts
an ``AlignDevicesHook`` on each module that moves the module's inputs to its *execution
device* (its weights may even sit on the ``meta`` device between forwards, when offloaded to
CPU or disk). So a hook's tensor lives on its layer's execution device, not on ``lm.device``
(the device inputs go to: the first block's), and a consumer brings it where it needs it:

- the capture writer: to the CPU (it always did);
- an SAE reading or editing a layer: it is loaded on ``layer_device(lm, layer)``, so no copy;
- a mask or index built beside the input ids: moved to the tensor's device before indexing.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kestrel.core.loading import LoadConfig, require_packages

if TYPE_CHECKING:
    from kestrel.core.models import LoadedModel


def _hook_device(module: nn.Module) -> torch.device | None:
    """The execution device of accelerate's hook on ``module`` (one hook, or a SequentialHook)."""
    hook = getattr(module, "_hf_hook", None)
    for candidate in (hook, *getattr(hook, "hooks", ())):
        device = getattr(candidate, "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    return None


def module_device(module: nn.Module) -> torch.device | None:
    """Where ``module`` computes: accelerate's execution device if it has one, else the device of
    its first weight that is not on ``meta``; None for a module with neither (a bare container)."""
    for sub in module.modules():  # the module itself first, then its children in order
        device = _hook_device(sub)
        if device is not None:
            return device
        for tensor in (*sub.parameters(recurse=False), *sub.buffers(recurse=False)):
            if tensor.device.type != "meta":
                return tensor.device
    return None


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the device accelerate runs the whole model from (the top-level hook's
    execution device), else the first block's. An unsplit model: its one device."""
    device = _hook_device(model) or module_device(model)
    return device if device is not None else torch.device("cpu")


def layer_device(lm: LoadedModel, layer: str) -> torch.device:
    """Where the hooks on ``layer`` see their tensors (and where an SAE on it should live)."""
    module = dict(lm.model.named_modules()).get(layer)
    device = module_device(module) if module is not None else None
    return device if device is not None else lm.device


@contextmanager
def onloaded(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with its own weights on its execution device for the duration.

    A split model may keep an offloaded module's weights on ``meta`` between forwards (accelerate
    reads them back for each forward); code that reads weights rather than running the module
    (the unembedding and final norm behind logit effects) reads them inside this. A tensor taken
    inside stays valid after: offloading swaps the module's parameter, not the tensor's data.
    """
    if not hasattr(module, "_hf_hook"):
        yield module
        return
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield module


def model_devices(model: nn.Module) -> list[str]:
    """The distinct devices a model computes on, in module order (``["cuda:0", "cuda:1"]``)."""
    found: dict[str, None] = {}
    for module in model.modules():
        device = _hook_device(module)
        if device is None:
            device = next(
                (p.device for p in module.parameters(recurse=False) if p.device.type != "meta"), None
            )
        if device is not None:
            found.setdefault(str(device))
    return list(found)


def dispatch_kwargs(
    config: LoadConfig, device: torch.device, torch_dtype: torch.dtype, scratch: Path
) -> tuple[dict[str, Any], tempfile.TemporaryDirectory | None]:
    """``from_pretrained`` keyword arguments for a split or quantized load (none for a plain one),
    and the disk offload folder they name, if any.

    A quantized model without a device map goes whole onto ``device`` (bitsandbytes places its
    weights at load time; ``.to()`` afterwards is refused). A map that may offload to disk gets a
    folder under ``scratch`` (``offload_folder``) that lives as long as the model holds it.
    """
    if not config.split:
        return {}, None
    require_packages(config)
    device_map: Any = config.device_map if config.device_map is not None else {"": str(device)}
    kwargs: dict[str, Any] = {"device_map": device_map}
    offload = None
    if device_map == "auto" or "disk" in device_map.values():  # "auto" may spill to disk too
        offload = offload_folder(scratch)
        kwargs["offload_folder"] = offload.name
    if config.quantization != "none":
        from transformers import BitsAndBytesConfig

        if config.quantization == "8bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_compute_dtype=torch_dtype, bnb_4bit_quant_type="nf4"
            )
    return kwargs, offload


def offload_folder(scratch: Path) -> tempfile.TemporaryDirectory:
    """A fresh folder for one model's disk-offloaded weights, removed when the model is dropped.

    A worker that was killed never removed its folders (they hold whole blocks of weights), so
    each new one first removes this host's folders whose process is gone. The name carries host
    and pid, so a store root shared by several hosts never loses another host's live folder.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().replace("-", "_")
    for stale in scratch.glob(f"{host}-*-*"):
        pid = stale.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"{host}-{os.getpid()}-", dir=scratch)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
