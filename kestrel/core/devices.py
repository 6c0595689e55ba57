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

import tempfile
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


def dispatch_kwargs(config: LoadConfig, device: torch.device, torch_dtype: torch.dtype) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for a split or quantized load (none for a plain one).

    A quantized model without a device map goes whole onto ``device`` (bitsandbytes places its
    weights at load time; ``.to()`` afterwards is refused). A map with ``disk`` entries gets an
    offload folder that lives as long as the returned ``TemporaryDirectory`` (kept on the
    LoadedModel).
    """
    if not config.split:
        return {}
    require_packages(config)
    device_map: Any = config.device_map if config.device_map is not None else {"": str(device)}
    kwargs: dict[str, Any] = {"device_map": device_map}
    if device_map == "auto" or "disk" in device_map.values():  # "auto" may spill to disk too
        offload = tempfile.TemporaryDirectory(prefix="kestrel-offload-")
        kwargs["offload_folder"] = offload.name
        kwargs["_offload"] = offload  # popped by the caller; keeps the folder alive
    if config.quantization != "none":
        from transformers import BitsAndBytesConfig

        if config.quantization == "8bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_compute_dtype=torch_dtype, bnb_4bit_quant_type="nf4"
            )
    return kwargs
