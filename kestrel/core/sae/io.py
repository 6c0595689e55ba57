"""SAE files: Kestrel's own layout, and SAELens's for exchange.

Kestrel (`<root>/saes/<sae_id>/`):

    config.json         SAEConfig (the manifest: a directory without it is incomplete)
    weights.safetensors W_enc [n, d], b_enc [n], W_dec [n, d], b_dec [d] (+ architecture buffers)
    metrics.json        final evaluation and training summary (optional)
    history.jsonl       one progress line per log step (optional)

The weights read raw activations: an input scale used in training is already folded in (see
`SAE.fold_input_scale`; `config.input_scale` records the factor). Every file is written under a
temporary name and renamed; config.json is removed first when overwriting and written last, so a
reader that requires it never sees a half-written SAE, and the directory may hold other things
(a `checkpoints/` folder from training).

SAELens (`cfg.json` + `sae_weights.safetensors`): W_enc is [d_in, d_sae] there. topk exports as
"topk", relu_l1 as "standard", batchtopk as "jumprelu" with its single threshold repeated per
latent (which is how SAELens runs a BatchTopK SAE at inference). The full Kestrel config rides
along under a "kestrel" key that SAELens ignores, so export then import gives back the same
config and bit-identical weights.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save
from torch import Tensor

from kestrel.core.clientdata import TensorInfo, loads_object, safetensors_header
from kestrel.core.errors import ConflictError, InvalidInputError, NotFoundError
from kestrel.core.limits import Caps, check_sae_size
from kestrel.core.sae.base import SAE, create
from kestrel.core.sae.config import SAEConfig
from kestrel.core.sae.records import HISTORY_FILE

# Re-exported: defined in the torch-free module, still importable from here.
from kestrel.core.sae.records import read_history as read_history

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
METRICS_FILE = "metrics.json"
SAELENS_CONFIG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"

_TO_SAELENS = {"topk": "topk", "relu_l1": "standard", "batchtopk": "jumprelu"}


# -- Kestrel layout ------------------------------------------------------------------------------


def save_sae(
    sae: SAE,
    directory: Path,
    *,
    metrics: dict[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `sae` (its config travels on `sae.config`) with optional metrics and history."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if config_path.exists() and not overwrite:
        raise ConflictError(f"an SAE is already saved at {directory}", details={"directory": str(directory)})
    header = {"format": "kestrel-sae", "architecture": sae.architecture}
    files: dict[str, bytes] = {WEIGHTS_FILE: _safetensors_bytes(_weights(sae), header)}
    if metrics is not None:
        files[METRICS_FILE] = json.dumps(metrics, indent=2, allow_nan=True).encode()
    if history is not None:
        files[HISTORY_FILE] = "".join(json.dumps(line) + "\n" for line in history).encode()
    files[CONFIG_FILE] = json.dumps(sae.config.model_dump(mode="json"), indent=2).encode()
    _write_files(directory, files, manifest=CONFIG_FILE)
    return directory


def load_sae(directory: Path, *, device: str | torch.device = "cpu") -> SAE:
    """Read an SAE saved by `save_sae`, in eval mode with gradients off."""
    directory = Path(directory)
    config = SAEConfig.from_dict(_read_json(directory / CONFIG_FILE))
    weights = _read_weights(directory / WEIGHTS_FILE)
    return _build(config, weights, device, source=f"SAE {directory.name}")


def read_metrics(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# -- SAELens layout ------------------------------------------------------------------------------


def export_saelens(sae: SAE, directory: Path, *, overwrite: bool = False) -> Path:
    """Write `cfg.json` + `sae_weights.safetensors` that SAELens's `SAE.load_from_disk` reads."""
    directory = Path(directory)
    if (directory / SAELENS_CONFIG_FILE).exists() and not overwrite:
        raise ConflictError(
            f"an SAE is already exported at {directory}", details={"directory": str(directory)}
        )
    config = sae.config
    if config.architecture not in _TO_SAELENS:
        raise InvalidInputError(
            f"architecture {config.architecture!r} has no SAELens equivalent",
            details={"exportable": sorted(_TO_SAELENS)},
        )
    with torch.no_grad():
        weights = {
            "W_enc": sae.W_enc.detach().t().contiguous(),
            "b_enc": sae.b_enc.detach(),
            "W_dec": sae.W_dec.detach(),
            "b_dec": sae.b_dec.detach(),
        }
        if config.architecture == "batchtopk":
            weights["threshold"] = sae.threshold.detach().expand(config.n_latents).to(sae.W_dec.dtype)
    files = {
        SAELENS_WEIGHTS_FILE: _safetensors_bytes({k: v.cpu().contiguous() for k, v in weights.items()}, None),
        SAELENS_CONFIG_FILE: json.dumps(_saelens_config(config), indent=2).encode(),
    }
    _write_files(directory, files, manifest=SAELENS_CONFIG_FILE)
    return directory


def import_saelens(
    directory: Path,
    *,
    device: str | torch.device = "cpu",
    d_in: int | None = None,
    caps: Caps | None = None,
) -> SAE:
    """Read an SAELens SAE (topk, standard, or jumprelu with one shared threshold).

    Pass `d_in` (the width of the activations it will read) to fail here on a mismatch.
    """
    directory = Path(directory)
    cfg_json = _read_bytes(directory / SAELENS_CONFIG_FILE)
    weights = _read_bytes(directory / SAELENS_WEIGHTS_FILE)
    return saelens_from_bytes(cfg_json, weights, device=device, d_in=d_in, caps=caps)


def saelens_from_bytes(
    cfg_json: bytes,
    weights: bytes,
    *,
    device: str | torch.device = "cpu",
    d_in: int | None = None,
    caps: Caps | None = None,
) -> SAE:
    """An SAE from the bytes of SAELens's ``cfg.json`` and ``sae_weights.safetensors``.

    Every check that needs no allocation comes first: the config parses, the safetensors header
    is well formed, the tensors SAELens writes are there with consistent shapes, those shapes are
    the ones cfg.json claims, and the size is within ``caps``. Only then are the weights read
    (their size is the file's), checked finite, and placed in a module built on the meta device:
    an import never allocates a randomly initialised SAE of whatever size a config claims.
    """
    cfg = loads_object(cfg_json, SAELENS_CONFIG_FILE)
    d_model, d_sae = _saelens_shape(safetensors_header(weights))
    _check_claimed_shape(cfg, d_model, d_sae)
    check_sae_size(d_model, d_sae, caps or Caps())
    tensors = _load_tensors(weights)
    _check_finite(tensors)
    config = _config_from_saelens(cfg, tensors, d_model, d_sae)
    if d_in is not None:
        config.validate_against(d_in)
    ours = _weights_from_saelens(cfg, tensors, config)
    return _build(config, ours, device, source=SAELENS_WEIGHTS_FILE)


_SAELENS_FLOATS = ("F16", "BF16", "F32", "F64")


def _saelens_shape(header: dict[str, TensorInfo]) -> tuple[int, int]:
    """``(d_in, d_sae)`` from the header: W_enc [d_in, d_sae], W_dec [d_sae, d_in], biases to match."""
    missing = sorted({"W_enc", "b_enc", "W_dec", "b_dec"} - set(header))
    if missing:
        raise InvalidInputError(f"SAELens weights lack {missing}", details={"missing": missing})
    w_enc = header["W_enc"].shape
    if len(w_enc) != 2 or 0 in w_enc:
        raise InvalidInputError(f"W_enc has shape {list(w_enc)}: it must be [d_in, d_sae], both > 0")
    d_in, d_sae = w_enc
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    if "threshold" in header:
        expected["threshold"] = (d_sae,)
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


def _load_tensors(weights: bytes) -> dict[str, Tensor]:
    try:
        return safetensors_load(weights)
    except (SafetensorError, RuntimeError, ValueError) as exc:
        raise InvalidInputError(f"the weights are not a readable safetensors file: {exc}") from None


def _check_finite(tensors: dict[str, Tensor]) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InvalidInputError(
                f"SAELens tensor {name} has non-finite values (NaN or inf)", details={"tensor": name}
            )


def _saelens_config(config: SAEConfig) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architecture": _TO_SAELENS[config.architecture],
        "d_in": config.d_in,
        "d_sae": config.n_latents,
        "dtype": config.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # any training-time scale is folded into the weights
        "reshape_activations": "none",
        "metadata": {"model_name": config.model, "hook_name": config.layer},
        # Older SAELens (< 6) read these top-level fields instead.
        "model_name": config.model,
        "hook_name": config.layer,
        "activation_fn_str": "topk" if config.architecture == "topk" else "relu",
        "kestrel": config.model_dump(mode="json"),
    }
    if config.architecture == "topk":
        cfg["k"] = config.k
        cfg["activation_fn_kwargs"] = {"k": config.k}
    return cfg


def _config_from_saelens(cfg: dict[str, Any], weights: dict[str, Tensor], d_in: int, d_sae: int) -> SAEConfig:
    if isinstance(cfg.get("kestrel"), dict):
        return SAEConfig.from_dict(cfg["kestrel"])
    for key, allowed in (("normalize_activations", "none"), ("reshape_activations", "none")):
        if cfg.get(key, allowed) not in (allowed, None):
            raise InvalidInputError(
                f"SAELens {key}={cfg[key]!r} is not supported; fold it into the weights first",
                details={key: cfg[key]},
            )
    architecture = cfg.get("architecture", "standard")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise InvalidInputError("cfg.json's activation_fn_kwargs must be an object")
    k = cfg.get("k", kwargs.get("k"))
    if architecture == "standard" and cfg.get("activation_fn_str") == "topk":
        architecture = "topk"  # SAELens < 6 wrote TopK SAEs as "standard" with a topk activation
    if architecture == "topk":
        fields: dict[str, Any] = {"architecture": "topk", "k": k}
    elif architecture == "standard":
        fields = {"architecture": "relu_l1"}
    elif architecture == "jumprelu":
        threshold = weights.get("threshold")
        if threshold is None or not bool((threshold == threshold.reshape(-1)[0]).all()):
            raise InvalidInputError(
                "only JumpReLU SAEs with one shared threshold (that is, BatchTopK) can be imported"
            )
        fields = {"architecture": "batchtopk", "k": k}
    else:
        raise InvalidInputError(
            f"SAELens architecture {architecture!r} is not supported",
            details={"supported": ["topk", "standard", "jumprelu"]},
        )
    metadata = cfg.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise InvalidInputError("cfg.json's metadata must be an object")
    dtype = str(cfg.get("dtype", "float32")).removeprefix("torch.")
    return SAEConfig(
        **fields,
        d_in=d_in,
        n_latents=d_sae,
        dtype=dtype if dtype in ("float32", "float16", "bfloat16") else "float32",
        model=metadata.get("model_name", cfg.get("model_name")),
        layer=metadata.get("hook_name", cfg.get("hook_name")),
        data={"imported_from": "saelens"},
    )


def _weights_from_saelens(
    cfg: dict[str, Any], weights: dict[str, Tensor], config: SAEConfig
) -> dict[str, Tensor]:
    missing = {"W_enc", "b_enc", "W_dec", "b_dec"} - set(weights)
    if missing:
        raise InvalidInputError(f"SAELens weights lack {sorted(missing)}")
    ours = {
        "W_enc": weights["W_enc"].t().contiguous(),
        "b_enc": weights["b_enc"],
        "W_dec": weights["W_dec"],
        "b_dec": weights["b_dec"],
    }
    if not cfg.get("apply_b_dec_to_input", True):
        # Kestrel encoders read x − b_dec; move b_dec's share into the encoder bias instead.
        ours["b_enc"] = ours["b_enc"] + ours["W_enc"] @ ours["b_dec"]
    if config.architecture == "batchtopk":
        if "threshold" not in weights:
            raise InvalidInputError("a BatchTopK (jumprelu) SAE needs its threshold tensor in the weights")
        ours["threshold"] = weights["threshold"].reshape(-1)[0].to(torch.float32)
    return ours


# -- shared helpers ------------------------------------------------------------------------------


def _weights(sae: SAE) -> dict[str, Tensor]:
    return {name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()}


def _build(config: SAEConfig, weights: dict[str, Tensor], device: str | torch.device, *, source: str) -> SAE:
    """An SAE of `config` holding `weights`, after checking names and shapes match.

    The module is built on the meta device and the weights assigned into it: nothing is
    initialised only to be overwritten, and nothing of the config's size is allocated beyond the
    weights themselves.
    """
    with torch.device("meta"):
        sae = create(config)
    expected = {name: tuple(t.shape) for name, t in sae.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in weights.items()}
    if expected != found:
        problems = {
            name: {"expected": expected.get(name), "found": found.get(name)}
            for name in sorted(set(expected) | set(found))
            if expected.get(name) != found.get(name)
        }
        raise InvalidInputError(
            f"the weights of {source} do not fit the config: {problems}", details=problems
        )
    dtype = getattr(torch, config.dtype)
    sae.load_state_dict({name: weights[name].to(dtype) for name in expected}, assign=True)
    for param in sae.parameters():
        param.requires_grad_(False)
    return sae.to(device).eval()


def _safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str] | None) -> bytes:
    return safetensors_save(tensors, metadata=metadata)


def _read_json(path: Path) -> dict[str, Any]:
    return loads_object(_read_bytes(path), path.name)


def _read_bytes(path: Path) -> bytes:
    """The file's bytes; NotFoundError naming the file only (a message may reach a client)."""
    if not path.is_file():
        raise NotFoundError(f"{path.name} not found", details={"file": path.name})
    return path.read_bytes()


def _read_weights(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise NotFoundError(f"{path.name} not found", details={"file": path.name})
    with safe_open(str(path), framework="pt"):
        pass  # raises a clear error for a file that is not safetensors
    return load_file(str(path))


def _write_files(directory: Path, files: dict[str, bytes], *, manifest: str) -> None:
    """Write `files` so that `manifest` appears only once every other file is complete.

    A new directory is assembled beside its final name and renamed into place in one step; an
    existing one (holding checkpoints, say) gets its manifest removed first, then each file
    replaced atomically, the manifest last.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    if not directory.exists():
        staging = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            for name, payload in files.items():
                (staging / name).write_bytes(payload)
            os.rename(staging, directory)
            return
        except FileExistsError:
            shutil.rmtree(staging, ignore_errors=True)  # someone created it meanwhile: fall through
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    (directory / manifest).unlink(missing_ok=True)
    ordered = [name for name in files if name != manifest] + [manifest]
    for name in ordered:
        temporary = directory / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        temporary.write_bytes(files[name])
        os.replace(temporary, directory / name)
