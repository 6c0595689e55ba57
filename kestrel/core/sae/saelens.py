"""SAELens's file layout (``cfg.json`` + ``sae_weights.safetensors``), both ways, exactly.

Export writes the 6.x format that ``SAE.load_from_disk`` reads without its pre-6.0 conversion:
``metadata.sae_lens_version`` is set, and the metadata says which model (its Hugging Face id),
through which class (``AutoModelForCausalLM``: Kestrel's layers are Hugging Face module paths,
which SAELens's ``HookedProxyLM`` hooks by the same names) and whether the tokenizer prepends BOS.
topk exports as "topk", relu_l1 as "standard", jumprelu as "jumprelu", and batchtopk as
"jumprelu" with its one threshold repeated per latent (how SAELens runs a BatchTopK SAE at
inference). The full Kestrel config rides along under a "kestrel" key that SAELens ignores, so
export then import gives back the same config and bit-identical weights.

Import reads what SAELens means, not just its tensors: W_enc is [d_in, d_sae]; a topk SAE with
``rescale_acts_by_decoder_norm`` has its decoder norms folded into the encoder (the same function,
unit-norm decoder rows, the same activations SAELens's ``encode`` returns);
``normalize_activations: expected_average_only_in`` needs its scaling factor (given, or from the
``activation_scaler.json`` SAELens's trainer writes beside a checkpoint), which is folded in as
SAELens's ``fold_activation_norm_scaling_factor`` does; ``apply_b_dec_to_input: false`` moves
b_dec's share into b_enc. Anything whose meaning would be lost (another normalisation, hook_z
reshaping, a tensor Kestrel would not read, a finetuning scaling factor) is refused by name.
The config records only what the files say (see `SAEConfig`). Transcoders (SAELens's
``transcoder`` family) are `kestrel.core.sae.saelens_transcoder`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from packaging.version import InvalidVersion, Version
from torch import Tensor

from kestrel.core.clientdata import TensorInfo, loads_object, safetensors_header
from kestrel.core.errors import ConflictError, InvalidInputError
from kestrel.core.limits import Caps, check_sae_size
from kestrel.core.sae import saelens_transcoder as transcoder
from kestrel.core.sae.base import SAE
from kestrel.core.sae.config import SAEConfig
from kestrel.core.sae.io import (
    _build,
    _check_finite,
    _load_tensors,
    _read_bytes,
    _safetensors_bytes,
    _write_files,
)

SAELENS_CONFIG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_SCALER_FILE = "activation_scaler.json"

#: The sae-lens release whose loader the round-trip test checks these files against
#: (tests/unit/test_saelens_roundtrip.py); any version >= 6.0 selects the 6.x config format.
SAELENS_FORMAT_VERSION = "6.54.12"

#: Kestrel's layers are Hugging Face module paths: SAELens hooks them through HookedProxyLM.
MODEL_CLASS_NAME = "AutoModelForCausalLM"

_TO_SAELENS = {"topk": "topk", "relu_l1": "standard", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}
_FROM_SAELENS = {"topk": "topk", "standard": "relu_l1", "jumprelu": "jumprelu"}
_SAELENS_FLOATS = ("F16", "BF16", "F32", "F64")
_CORE_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")
#: Tensors an SAELens file may hold besides the core four (their meaning is handled below).
_OPTIONAL_TENSORS = ("threshold", "log_threshold", "scaling_factor")


# -- export --------------------------------------------------------------------------------------


def saelens_config(config: SAEConfig, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The 6.x ``cfg.json`` of an SAE; ``metadata`` adds to (or overrides) the model's entries."""
    if config.architecture not in _TO_SAELENS:
        raise InvalidInputError(
            f"architecture {config.architecture!r} has no SAELens equivalent",
            details={"exportable": sorted(_TO_SAELENS)},
        )
    meta: dict[str, Any] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,  # not trained by SAELens
        "model_name": config.model,
        "model_class_name": MODEL_CLASS_NAME,
        "hook_name": config.layer,
        "hf_hook_name": config.layer,
        "hook_head_index": None,
        "model_from_pretrained_kwargs": {},
        "training_architecture": config.architecture,
        **(metadata or {}),
    }
    cfg: dict[str, Any] = {
        "architecture": _TO_SAELENS[config.architecture],
        "d_in": config.d_in,
        "d_sae": config.n_latents,
        "dtype": config.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # any training-time scale is folded into the weights
        "reshape_activations": "none",
        "metadata": meta,
    }
    if config.architecture == "topk":
        cfg["k"] = config.k
        cfg["rescale_acts_by_decoder_norm"] = False
    if config.architecture == "batchtopk":
        meta["training_architecture_details"] = {"k": config.k}
    if config.is_transcoder:
        cfg = transcoder.adapt_config(cfg, config)
    cfg["kestrel"] = config.model_dump(mode="json")
    return cfg


def saelens_files(sae: SAE, metadata: dict[str, Any] | None = None) -> dict[str, bytes]:
    """``{file name: bytes}`` of the SAELens layout (the config file last)."""
    config = sae.config
    cfg = saelens_config(config, metadata)
    with torch.no_grad():
        weights = {
            "W_enc": sae.W_enc.detach().t().contiguous(),
            "b_enc": sae.b_enc.detach(),
            "W_dec": sae.W_dec.detach(),
            "b_dec": sae.b_dec.detach(),
        }
        if config.architecture == "batchtopk":
            weights["threshold"] = sae.threshold.detach().expand(config.n_latents).to(sae.W_dec.dtype)
        elif config.architecture == "jumprelu":
            weights["threshold"] = sae.threshold.detach()
        weights.update(transcoder.skip_weights(sae))
    tensors = {name: tensor.cpu().contiguous() for name, tensor in weights.items()}
    return {
        SAELENS_WEIGHTS_FILE: _safetensors_bytes(tensors, None),
        SAELENS_CONFIG_FILE: json.dumps(cfg, indent=2).encode(),
    }


def export_saelens(
    sae: SAE, directory: Path, *, overwrite: bool = False, metadata: dict[str, Any] | None = None
) -> Path:
    """Write `cfg.json` + `sae_weights.safetensors` that SAELens's `SAE.load_from_disk` reads."""
    directory = Path(directory)
    if (directory / SAELENS_CONFIG_FILE).exists() and not overwrite:
        raise ConflictError(
            f"an SAE is already exported at {directory}", details={"directory": str(directory)}
        )
    _write_files(directory, saelens_files(sae, metadata), manifest=SAELENS_CONFIG_FILE)
    return directory


# -- import --------------------------------------------------------------------------------------


def import_saelens(
    directory: Path,
    *,
    device: str | torch.device = "cpu",
    d_in: int | None = None,
    caps: Caps | None = None,
    norm_scaling_factor: float | None = None,
) -> SAE:
    """Read an SAELens SAE directory (an ``activation_scaler.json`` beside it is read too)."""
    directory = Path(directory)
    scaler = directory / SAELENS_SCALER_FILE
    return saelens_from_bytes(
        _read_bytes(directory / SAELENS_CONFIG_FILE),
        _read_bytes(directory / SAELENS_WEIGHTS_FILE),
        device=device,
        d_in=d_in,
        caps=caps,
        norm_scaling_factor=norm_scaling_factor,
        scaler_json=scaler.read_bytes() if scaler.is_file() else None,
    )


def saelens_from_bytes(
    cfg_json: bytes,
    weights: bytes,
    *,
    device: str | torch.device = "cpu",
    d_in: int | None = None,
    caps: Caps | None = None,
    norm_scaling_factor: float | None = None,
    scaler_json: bytes | None = None,
) -> SAE:
    """An SAE from the bytes of SAELens's ``cfg.json`` and ``sae_weights.safetensors``.

    Every check that needs no allocation comes first: the config parses and means something
    Kestrel can run, the safetensors header is well formed, holds the tensors SAELens writes and
    nothing else, with consistent shapes that cfg.json agrees with, within ``caps``. Only then
    are the weights read (their size is the file's), checked finite, transformed, and placed in
    a module built on the meta device.
    """
    cfg = loads_object(cfg_json, SAELENS_CONFIG_FILE)
    cfg = _as_6x(cfg)
    if transcoder.is_transcoder_cfg(cfg):
        if norm_scaling_factor is not None or scaler_json is not None:
            raise InvalidInputError(
                "a transcoder's weights must read raw activations: no norm scaling factor"
            )
        return _transcoder_from_bytes(cfg, weights, device=device, d_in=d_in, caps=caps)
    architecture = _architecture(cfg)
    scale = _input_scale(cfg, norm_scaling_factor, scaler_json)
    rescale = _rescale(cfg, architecture)
    _check_reshape(cfg)
    d_model, d_sae = _saelens_shape(safetensors_header(weights), architecture)
    _check_claimed_shape(cfg, d_model, d_sae)
    check_sae_size(d_model, d_sae, caps or Caps())
    config = _config(cfg, architecture, d_model, d_sae, scale=scale, rescale=rescale)
    if d_in is not None:
        config.validate_against(d_in)
    tensors = _load_tensors(weights)
    _check_finite(tensors)
    ours = _kestrel_weights(cfg, tensors, architecture, scale=scale, rescale=rescale)
    if config.architecture == "batchtopk":
        ours["threshold"] = ours["threshold"].reshape(-1)[0].to(torch.float32)
    return _build(config, ours, device, source=SAELENS_WEIGHTS_FILE)


def _transcoder_from_bytes(
    cfg: dict[str, Any], weights: bytes, *, device: str | torch.device, d_in: int | None, caps: Caps | None
) -> SAE:
    """A transcoder from SAELens files: header and config checked before the weights are read."""
    architecture, skip, d_model, d_sae, d_out = transcoder.check_header(
        cfg, safetensors_header(weights), caps
    )
    config = transcoder.transcoder_config(cfg, architecture, skip, d_model, d_sae, d_out)
    if (config.d_in, config.n_latents, config.output_width, config.skip) != (d_model, d_sae, d_out, skip):
        raise InvalidInputError("cfg.json's kestrel config does not describe these weights")
    if d_in is not None:
        config.validate_against(d_in)
    tensors = _load_tensors(weights)
    _check_finite(tensors)
    return _build(
        config, transcoder.kestrel_weights(tensors, config.architecture), device, source=SAELENS_WEIGHTS_FILE
    )


def _version(cfg: dict[str, Any]) -> Version | None:
    metadata = cfg.get("metadata")
    raw = cfg.get("sae_lens_version") or (
        metadata.get("sae_lens_version") if isinstance(metadata, dict) else None
    )
    try:
        return Version(str(raw)) if raw else None
    except InvalidVersion:
        return None


def _as_6x(cfg: dict[str, Any]) -> dict[str, Any]:
    """A pre-6.0 config in 6.x terms, as SAELens's own loader converts it."""
    metadata = cfg.get("metadata", {})
    if not isinstance(metadata, dict):
        raise InvalidInputError("cfg.json's metadata must be an object")
    version = _version(cfg)
    if version is not None and version >= Version("6.0.0rc0"):
        return cfg
    renamed = {
        {"hook_point": "hook_name", "activation_fn_str": "activation_fn"}.get(k, k): v for k, v in cfg.items()
    }
    renamed.setdefault("architecture", "standard")
    activation = renamed.get("activation_fn", "relu")
    kwargs = renamed.get("activation_fn_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise InvalidInputError("cfg.json's activation_fn_kwargs must be an object")
    if activation == "topk" and kwargs.get("k") is not None:
        renamed["architecture"], renamed["k"] = "topk", kwargs["k"]
    elif activation == "topk":
        raise InvalidInputError("cfg.json names a topk activation but gives no activation_fn_kwargs.k")
    elif activation not in ("relu", None):
        raise InvalidInputError(
            f"SAELens activation_fn {activation!r} is not supported (Kestrel reads relu and topk)",
            details={"activation_fn": activation},
        )
    if isinstance(renamed.get("normalize_activations"), bool):
        renamed["normalize_activations"] = (
            "expected_average_only_in" if renamed["normalize_activations"] else "none"
        )
    keys = ("model_name", "hook_name", "hook_head_index", "prepend_bos", "context_size", "neuronpedia_id")
    renamed["metadata"] = {**{k: renamed[k] for k in keys if k in renamed}, **metadata}
    return renamed


def _architecture(cfg: dict[str, Any]) -> str:
    architecture = cfg.get("architecture", "standard")
    if architecture not in _FROM_SAELENS:
        raise InvalidInputError(
            f"SAELens architecture {architecture!r} is not supported",
            details={"architecture": architecture, "supported": sorted(_FROM_SAELENS)},
        )
    ours = _FROM_SAELENS[architecture]
    kestrel = cfg.get("kestrel")
    if isinstance(kestrel, dict) and kestrel.get("architecture") == "batchtopk" and ours == "jumprelu":
        return "batchtopk"  # Kestrel's own export: one threshold, repeated per latent
    return ours


def _input_scale(cfg: dict[str, Any], given: float | None, scaler_json: bytes | None) -> float | None:
    """The factor the SAE's inputs were multiplied by in training, or None when there was none."""
    mode = cfg.get("normalize_activations") or "none"
    from_file = _scaler_factor(scaler_json) if scaler_json is not None else None
    if given is not None and (isinstance(given, bool) or not math.isfinite(given) or given <= 0):
        raise InvalidInputError(f"norm_scaling_factor must be a positive number, got {given}")
    if mode == "none":
        if given is not None:
            raise InvalidInputError(
                "a norm_scaling_factor was given but cfg.json says normalize_activations='none' "
                "(any scaling factor is already folded into the weights)"
            )
        return None
    if mode != "expected_average_only_in":
        raise InvalidInputError(
            f"SAELens normalize_activations={mode!r} is not supported (it depends on each input); "
            "fold it into the weights first",
            details={"normalize_activations": mode, "supported": ["none", "expected_average_only_in"]},
        )
    if given is not None and from_file is not None and not math.isclose(given, from_file, rel_tol=1e-6):
        raise InvalidInputError(
            f"norm_scaling_factor {given} disagrees with activation_scaler.json ({from_file})",
            details={"given": given, "activation_scaler": from_file},
        )
    factor = given if given is not None else from_file
    if factor is None:
        raise InvalidInputError(
            "cfg.json says normalize_activations='expected_average_only_in': give its norm_scaling_factor "
            "(sqrt(d_in) / mean activation norm; SAELens lists it per SAE in pretrained_saes.yaml) "
            "or include the activation_scaler.json written beside it",
            details={"normalize_activations": mode, "missing": "norm_scaling_factor"},
        )
    return float(factor)


def _scaler_factor(scaler_json: bytes) -> float | None:
    scaler = loads_object(scaler_json, SAELENS_SCALER_FILE)
    if scaler.get("has_whitening"):
        raise InvalidInputError("activation_scaler.json has whitening, which Kestrel does not read")
    factor = scaler.get("scaling_factor")
    if factor is None:
        return None
    if (
        isinstance(factor, bool)
        or not isinstance(factor, int | float)
        or not math.isfinite(factor)
        or factor <= 0
    ):
        raise InvalidInputError(
            f"activation_scaler.json's scaling_factor must be a positive number, got {factor!r}"
        )
    return float(factor)


def _rescale(cfg: dict[str, Any], architecture: str) -> bool:
    rescale = cfg.get("rescale_acts_by_decoder_norm", False)
    if not isinstance(rescale, bool):
        raise InvalidInputError("cfg.json's rescale_acts_by_decoder_norm must be true or false")
    if rescale and architecture != "topk":
        raise InvalidInputError(
            f"rescale_acts_by_decoder_norm is set on a {cfg.get('architecture')!r} SAE, which SAELens runs "
            "without it; refusing an SAE whose meaning is unclear",
            details={"architecture": cfg.get("architecture"), "rescale_acts_by_decoder_norm": True},
        )
    return rescale


def _check_reshape(cfg: dict[str, Any]) -> None:
    reshape = cfg.get("reshape_activations") or "none"
    if reshape != "none":
        raise InvalidInputError(
            f"SAELens reshape_activations={reshape!r} is not supported (Kestrel reads whole module outputs)",
            details={"reshape_activations": reshape},
        )


def _saelens_shape(header: dict[str, TensorInfo], architecture: str) -> tuple[int, int]:
    """``(d_in, d_sae)`` from the header: W_enc [d_in, d_sae], W_dec [d_sae, d_in], biases to match."""
    missing = sorted(set(_CORE_TENSORS) - set(header))
    if architecture in ("jumprelu", "batchtopk") and not {"threshold", "log_threshold"} & set(header):
        missing.append("threshold")
    if missing:
        raise InvalidInputError(f"SAELens weights lack {missing}", details={"missing": missing})
    unknown = sorted(set(header) - set(_CORE_TENSORS) - set(_OPTIONAL_TENSORS))
    if architecture not in ("jumprelu", "batchtopk"):
        unknown = sorted(set(unknown) | ({"threshold", "log_threshold"} & set(header)))
    if unknown:
        raise InvalidInputError(
            f"SAELens weights hold tensors a {architecture} SAE does not use: {unknown}",
            details={"unexpected": unknown},
        )
    w_enc = header["W_enc"].shape
    if len(w_enc) != 2 or 0 in w_enc:
        raise InvalidInputError(f"W_enc has shape {list(w_enc)}: it must be [d_in, d_sae], both > 0")
    d_in, d_sae = w_enc
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    for name in ("threshold", "log_threshold"):
        if name in header:
            expected[name] = (d_sae,)
    if "scaling_factor" in header:
        expected["scaling_factor"] = (d_sae,)
    for name, shape in expected.items():
        info = header[name]
        if info.shape != shape:
            raise InvalidInputError(
                f"SAELens tensor {name} has shape {list(info.shape)}; with W_enc {list(w_enc)} it must be "
                f"{list(shape)}",
                details={"tensor": name, "shape": list(info.shape), "expected": list(shape)},
            )
        if info.dtype not in _SAELENS_FLOATS:
            raise InvalidInputError(
                f"SAELens tensor {name} is {info.dtype}: it must be floating point",
                details={"tensor": name, "dtype": info.dtype},
            )
    return d_in, d_sae


def _check_claimed_shape(cfg: dict[str, Any], d_in: int, d_sae: int) -> None:
    """cfg.json's ``d_in``/``d_sae`` (and a Kestrel config riding along) say what the weights are."""
    claims = [("d_in", cfg.get("d_in"), d_in), ("d_sae", cfg.get("d_sae"), d_sae)]
    ours = cfg.get("kestrel")
    if isinstance(ours, dict):
        claims += [
            ("kestrel.d_in", ours.get("d_in"), d_in),
            ("kestrel.n_latents", ours.get("n_latents"), d_sae),
        ]
    for key, claimed, actual in claims:
        if claimed is None and not key.startswith("kestrel."):
            raise InvalidInputError(f"cfg.json has no {key}", details={"field": key})
        if claimed is not None and (isinstance(claimed, bool) or claimed != actual):
            shown = claimed if isinstance(claimed, int | float | bool) and abs(claimed) < 1e12 else "…"
            raise InvalidInputError(
                f"cfg.json says {key}={shown} but the weights have {actual} (W_enc is [d_in, d_sae])",
                details={"field": key, "weights": actual},
            )


def _kestrel_weights(
    cfg: dict[str, Any], tensors: dict[str, Tensor], architecture: str, *, scale: float | None, rescale: bool
) -> dict[str, Tensor]:
    """Kestrel's tensors for the function SAELens computes, in SAELens's order of folds.

    In float32, as SAELens folds (a float32 file's weights are used as they are: no copy in a
    wider type, whose size an SAE near the caps could not afford).
    """
    w_enc = tensors["W_enc"].float()  # [d_in, d_sae]
    b_enc, w_dec, b_dec = (tensors[name].float() for name in ("b_enc", "W_dec", "b_dec"))
    if "scaling_factor" in tensors and not bool((tensors["scaling_factor"] == 1).all()):
        raise InvalidInputError(
            "the weights hold a finetuning scaling_factor other than 1, which Kestrel does not read"
        )
    if scale is not None:  # fold_activation_norm_scaling_factor: the SAE then reads raw activations
        w_enc, w_dec, b_dec = w_enc * scale, w_dec / scale, b_dec / scale
    if rescale:  # fold_W_dec_norm: encode gives hidden_pre·‖W_dec‖, decode divides it back out
        norms = w_dec.norm(dim=1).clamp_min(1e-8)
        w_enc, b_enc, w_dec = w_enc * norms, b_enc * norms, w_dec / norms[:, None]
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ w_enc  # Kestrel encoders read x − b_dec: move b_dec's share into b_enc
    ours = {"W_enc": w_enc.t().contiguous(), "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}
    if architecture in ("jumprelu", "batchtopk"):
        threshold = tensors.get("threshold")
        ours["threshold"] = (
            threshold.float() if threshold is not None else tensors["log_threshold"].float().exp()
        )
    return ours


def _config(
    cfg: dict[str, Any], architecture: str, d_in: int, d_sae: int, *, scale: float | None, rescale: bool
) -> SAEConfig:
    kestrel = cfg.get("kestrel")
    if isinstance(kestrel, dict) and scale is None and not rescale:
        return SAEConfig.from_dict(kestrel)  # Kestrel's own export: its config, unchanged
    metadata = cfg.get("metadata") or {}
    fields: dict[str, Any] = {"architecture": architecture}
    if architecture == "topk":
        k = cfg.get("k")
        if k is None:
            raise InvalidInputError("cfg.json describes a topk SAE but gives no k", details={"missing": "k"})
        fields["k"] = k
    elif architecture == "batchtopk":
        raise InvalidInputError(
            "a batchtopk SAE can only be imported with the Kestrel config it was exported with"
        )
    dtype = str(cfg.get("dtype", "float32")).removeprefix("torch.")
    folded = [
        name
        for name, done in (("normalize_activations", scale), ("rescale_acts_by_decoder_norm", rescale))
        if done
    ]
    return SAEConfig(
        **fields,
        d_in=d_in,
        n_latents=d_sae,
        dtype=dtype if dtype in ("float32", "float16", "bfloat16") else "float32",
        model=metadata.get("model_name"),
        layer=metadata.get("hf_hook_name") or metadata.get("hook_name"),
        normalize_input=True if scale is not None else None,
        input_scale=scale,
        data={
            "imported_from": "saelens",
            "saelens_metadata": _jsonable(metadata),
            **({"folded": folded} if folded else {}),
        },
    )


def _jsonable(value: Any) -> Any:
    """``value`` as JSON keeps it (a config must serialise), or its repr when it cannot."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError):
        return repr(value)
