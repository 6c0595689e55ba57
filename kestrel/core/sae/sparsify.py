"""EleutherAI sparsify's file layout (``cfg.json`` + ``sae.safetensors``), both ways.

sparsify's ``SparseCoder.save_to_disk`` writes its config (``SparseCoderConfig`` fields plus
``d_in``) and the module's state dict: ``encoder.weight`` [num_latents, d_in] and
``encoder.bias`` (an nn.Linear, so already Kestrel's [n, d] layout), ``W_dec`` [num_latents, d_in],
``b_dec`` [d_in], and ``W_skip`` [d_in, d_in] when it has a skip connection. Its encoder reads
x − b_dec, takes ReLU, then the k largest: the same activations as Kestrel's topk. Only that
SAE is exchanged: a transcoder, a skip connection or the groupmax activation compute something
else, and are refused by name.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor

from kestrel.core.clientdata import loads_object, safetensors_header
from kestrel.core.errors import InvalidInputError
from kestrel.core.limits import Caps, check_sae_size
from kestrel.core.sae.base import SAE
from kestrel.core.sae.config import SAEConfig
from kestrel.core.sae.io import _build, _check_finite, _load_tensors, _safetensors_bytes

SPARSIFY_CONFIG_FILE = "cfg.json"
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"
_TENSORS = {"encoder.weight": 2, "encoder.bias": 1, "W_dec": 2, "b_dec": 1}
_FLOATS = ("F16", "BF16", "F32", "F64")
_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float32"}


def sparsify_files(sae: SAE) -> dict[str, bytes]:
    """``{file name: bytes}`` that ``SparseCoder.load_from_disk`` reads (a topk SAE only)."""
    config = sae.config
    if config.architecture != "topk":
        raise InvalidInputError(
            f"sparsify runs TopK SAEs only; architecture {config.architecture!r} cannot be exported to it",
            details={"architecture": config.architecture, "exportable": ["topk"]},
        )
    cfg = {
        "activation": "topk",
        "expansion_factor": max(config.n_latents // config.d_in, 1),  # unused: num_latents is set
        "normalize_decoder": True,
        "num_latents": config.n_latents,
        "k": config.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": config.d_in,
    }
    with torch.no_grad():
        tensors = {
            "encoder.weight": sae.W_enc.detach(),
            "encoder.bias": sae.b_enc.detach(),
            "W_dec": sae.W_dec.detach(),
            "b_dec": sae.b_dec.detach(),
        }
    tensors = {name: tensor.cpu().contiguous() for name, tensor in tensors.items()}
    return {
        SPARSIFY_WEIGHTS_FILE: _safetensors_bytes(tensors, None),
        SPARSIFY_CONFIG_FILE: json.dumps(cfg, indent=2).encode(),
    }


def sparsify_from_bytes(
    cfg_json: bytes,
    weights: bytes,
    *,
    device: str | torch.device = "cpu",
    caps: Caps | None = None,
) -> SAE:
    """An SAE from sparsify's ``cfg.json`` and ``sae.safetensors`` (checked before any allocation)."""
    cfg = loads_object(cfg_json, SPARSIFY_CONFIG_FILE)
    _check_semantics(cfg)
    header = safetensors_header(weights)
    d_in, n_latents, dtype = _shape(header)
    _check_claims(cfg, d_in, n_latents)
    check_sae_size(d_in, n_latents, caps or Caps())
    tensors = _load_tensors(weights)
    _check_finite(tensors)
    config = SAEConfig(
        architecture="topk",
        k=cfg["k"],
        d_in=d_in,
        n_latents=n_latents,
        dtype=dtype,
        normalize_input=None,
        data={"imported_from": "sparsify", "sparsify_config": cfg},
    )
    ours: dict[str, Tensor] = {
        "W_enc": tensors["encoder.weight"],
        "b_enc": tensors["encoder.bias"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
    }
    return _build(config, ours, device, source=SPARSIFY_WEIGHTS_FILE)


def _check_semantics(cfg: dict[str, Any]) -> None:
    refused = {
        "transcode": "a transcoder predicts another module's output",
        "skip_connection": "a skip connection adds a dense linear term",
        "multi_topk": None,  # a training loss only: the SAE it saves is a plain TopK
    }
    for key, reason in refused.items():
        if reason is not None and cfg.get(key):
            raise InvalidInputError(
                f"sparsify {key}=true is not supported: {reason}", details={key: cfg[key]}
            )
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise InvalidInputError(
            f"sparsify activation {activation!r} is not supported (Kestrel reads topk)",
            details={"activation": activation},
        )
    k = cfg.get("k")
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise InvalidInputError(f"sparsify cfg.json must give k as a positive integer, got {k!r}")


def _shape(header: dict[str, Any]) -> tuple[int, int, str]:
    missing = sorted(set(_TENSORS) - set(header))
    if missing:
        raise InvalidInputError(f"sparsify weights lack {missing}", details={"missing": missing})
    unexpected = sorted(set(header) - set(_TENSORS))
    if unexpected:
        raise InvalidInputError(
            f"sparsify weights hold tensors a TopK SAE does not use: {unexpected}",
            details={"unexpected": unexpected},
        )
    encoder = header["encoder.weight"].shape
    if len(encoder) != 2:
        raise InvalidInputError(
            f"sparsify encoder.weight has shape {list(encoder)}: it must be [num_latents, d_in]"
        )
    n_latents, d_in = encoder
    expected = {"encoder.weight": (n_latents, d_in), "encoder.bias": (n_latents,)}
    expected |= {"W_dec": (n_latents, d_in), "b_dec": (d_in,)}
    for name, shape in expected.items():
        info = header[name]
        if info.shape != shape or 0 in shape:
            raise InvalidInputError(
                f"sparsify tensor {name} has shape {list(info.shape)}; it must be {list(shape)} (non-empty)",
                details={"tensor": name, "shape": list(info.shape), "expected": list(shape)},
            )
        if info.dtype not in _FLOATS:
            raise InvalidInputError(f"sparsify tensor {name} is {info.dtype}: it must be floating point")
    return d_in, n_latents, _DTYPES[header["encoder.weight"].dtype]


def _check_claims(cfg: dict[str, Any], d_in: int, n_latents: int) -> None:
    if cfg.get("d_in") != d_in or isinstance(cfg.get("d_in"), bool):
        raise InvalidInputError(
            f"sparsify cfg.json says d_in={cfg.get('d_in')!r} but the weights have {d_in}",
            details={"field": "d_in", "weights": d_in},
        )
    claimed = cfg.get("num_latents") or 0
    factor = cfg.get("expansion_factor")
    if not claimed and isinstance(factor, int) and not isinstance(factor, bool):
        claimed = d_in * factor
    if claimed != n_latents:
        raise InvalidInputError(
            f"sparsify cfg.json describes {claimed!r} latents but the weights have {n_latents}",
            details={"field": "num_latents", "weights": n_latents},
        )
    if cfg["k"] > n_latents:
        raise InvalidInputError(f"sparsify k ({cfg['k']}) exceeds the number of latents ({n_latents})")
