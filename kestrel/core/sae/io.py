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

Other libraries' layouts are `kestrel.core.sae.saelens` (whose names are still importable from
here) and `kestrel.core.sae.sparsify`; they share this module's checked readers and writers.
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

from kestrel.core.clientdata import loads_object
from kestrel.core.errors import ConflictError, InvalidInputError, NotFoundError
from kestrel.core.sae.base import SAE, create
from kestrel.core.sae.config import SAEConfig
from kestrel.core.sae.records import HISTORY_FILE

# Re-exported: defined in the torch-free module, still importable from here.
from kestrel.core.sae.records import read_history as read_history

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
METRICS_FILE = "metrics.json"
#: Names that moved to `kestrel.core.sae.saelens`, still importable from here (PEP 562).
_SAELENS_NAMES = frozenset(
    {
        "SAELENS_CONFIG_FILE",
        "SAELENS_WEIGHTS_FILE",
        "export_saelens",
        "import_saelens",
        "saelens_from_bytes",
        "saelens_config",
        "_saelens_config",
    }
)


def __getattr__(name: str) -> Any:
    if name in _SAELENS_NAMES:
        from kestrel.core.sae import saelens

        return getattr(saelens, name.removeprefix("_"))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def _load_tensors(weights: bytes) -> dict[str, Tensor]:
    try:
        return safetensors_load(weights)
    except (SafetensorError, RuntimeError, ValueError) as exc:
        raise InvalidInputError(f"the weights are not a readable safetensors file: {exc}") from None


def _check_finite(tensors: dict[str, Tensor]) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InvalidInputError(
                f"tensor {name} has non-finite values (NaN or inf)", details={"tensor": name}
            )


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
