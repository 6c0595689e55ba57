"""Moving SAEs between Kestrel and other tools: an SAE from a file set in any layout, the files of
an export, and the model metadata an export carries.

File sets (``{file name: bytes}``, from a directory, a zip or two uploads) and their layouts are
`kestrel.core.sae.filesets` (torch-free, re-exported here); every check runs before anything is
allocated or stored (see each layout's reader).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from kestrel.core import catalog, hub
from kestrel.core.clientdata import loads_object, safetensors_header
from kestrel.core.errors import InvalidInputError
from kestrel.core.limits import Caps, check_sae_size
from kestrel.core.models import bos_prefix
from kestrel.core.sae import io as sae_io
from kestrel.core.sae import saelens, sparsify
from kestrel.core.sae.base import SAE
from kestrel.core.sae.config import SAEConfig

# Re-exported: the torch-free file-set readers.
from kestrel.core.sae.filesets import LAYOUTS as LAYOUTS
from kestrel.core.sae.filesets import detect_layout as detect_layout
from kestrel.core.sae.filesets import files_from_directory as files_from_directory
from kestrel.core.sae.filesets import files_from_path as files_from_path
from kestrel.core.sae.filesets import files_from_zip as files_from_zip

ExportFormat = Literal["kestrel", "saelens", "sparsify"]
#: Layouts `export_files` writes (Kestrel's own is the stored files themselves).
EXPORT_FORMATS = ("saelens", "sparsify")


def sae_from_files(
    files: Mapping[str, bytes],
    *,
    caps: Caps | None = None,
    norm_scaling_factor: float | None = None,
    device: str | torch.device = "cpu",
) -> tuple[SAE, str]:
    """The SAE a file set holds, and its layout."""
    layout = detect_layout(files)
    config_name, weights_name = LAYOUTS[layout]
    cfg, weights = files[config_name], files[weights_name]
    if norm_scaling_factor is not None and layout != "saelens":
        raise InvalidInputError("norm_scaling_factor applies to SAELens files only")
    if layout == "saelens":
        sae = saelens.saelens_from_bytes(
            cfg,
            weights,
            device=device,
            caps=caps,
            norm_scaling_factor=norm_scaling_factor,
            scaler_json=files.get(saelens.SAELENS_SCALER_FILE),
        )
    elif layout == "sparsify":
        sae = sparsify.sparsify_from_bytes(cfg, weights, device=device, caps=caps)
    else:
        sae = kestrel_from_bytes(cfg, weights, device=device, caps=caps)
    return sae, layout


def kestrel_from_bytes(
    config_json: bytes, weights: bytes, *, device: str | torch.device = "cpu", caps: Caps | None = None
) -> SAE:
    """An SAE from Kestrel's own files (another store's download), checked like any client file.

    Its run belongs to another store, so the config keeps the run's record under ``data`` but
    not the ``run_id`` (nothing here could read it).
    """
    raw = loads_object(config_json, sae_io.CONFIG_FILE)
    config = SAEConfig.from_dict(raw)
    check_sae_size(config.d_in, config.n_latents, caps or Caps())
    safetensors_header(weights)  # well formed, before anything is parsed
    tensors = sae_io._load_tensors(weights)
    sae_io._check_finite(tensors)
    data = {**config.data, "imported_from": "kestrel", "original_run_id": config.run_id}
    config = config.model_copy(update={"run_id": None, "data": data})
    return sae_io._build(config, tensors, device, source=sae_io.WEIGHTS_FILE)


def export_files(sae: SAE, fmt: str, *, metadata: dict[str, Any] | None = None) -> dict[str, bytes]:
    """The SAE's files in another tool's layout (``metadata``: SAELens's model entries)."""
    if fmt == "saelens":
        return saelens.saelens_files(sae, metadata)
    if fmt == "sparsify":
        if sae.config.is_transcoder:
            raise InvalidInputError(
                f"sparsify export reads SAEs only; this is a {sae.config.kind}: "
                "export it as 'saelens' or 'kestrel'",
                details={"kind": sae.config.kind, "format": fmt},
            )
        return sparsify.sparsify_files(sae)
    raise InvalidInputError(
        f"unknown export format {fmt!r}; use 'kestrel', 'saelens' or 'sparsify'",
        details={"format": fmt, "supported": ["kestrel", "saelens", "sparsify"]},
    )


# -- model metadata ------------------------------------------------------------------------------


def model_metadata(model: str | None, store_root: Path | None = None) -> dict[str, Any]:
    """What SAELens's metadata says of the model: its Hugging Face id and whether its tokenizer
    prepends BOS (so SAELens feeds the SAE the same token stream Kestrel captured). An entry is
    left out when it cannot be known here (a model whose tokenizer this machine lacks)."""
    if not model:
        return {}
    hf_id = hub_id(model)
    meta: dict[str, Any] = {"model_name": hf_id or model}
    if hf_id and hf_id != model:
        meta["kestrel_model_name"] = model
    prepends = tokenizer_prepends_bos(model, str(store_root or catalog.default_store_root()))
    if prepends is not None:
        meta["prepend_bos"] = prepends
    return meta


def hub_id(model: str) -> str | None:
    """The Hugging Face id of a model Kestrel names: a bundled one's source, or a hub id itself."""
    if model in catalog.BUNDLED:
        return catalog.BUNDLED[model].hf_id
    if Path(model).expanduser().is_absolute() or model.startswith("."):
        return None  # a local directory
    try:
        return hub.validate_hub_id(model, "model")
    except ValueError:
        return None


_BOS_CACHE: dict[tuple[str, str], bool] = {}


def tokenizer_prepends_bos(model: str, store_root: str) -> bool | None:
    """Whether the tokenizer Kestrel loads for ``model`` starts a text with BOS (as capture
    tokenizes: special tokens on); None when no tokenizer for it is on this machine (not cached:
    the model may be fetched later)."""
    key = (model, store_root)
    if key not in _BOS_CACHE:
        found = _probe_bos(model, Path(store_root))
        if found is None:
            return None
        _BOS_CACHE[key] = found
    return _BOS_CACHE[key]


def _probe_bos(model: str, store_root: Path) -> bool | None:
    if model in catalog.BUNDLED:
        directory = catalog.cache_dir(store_root, model)
        if not catalog.cache_complete(directory):
            return None
        target = str(directory)
    else:
        target = model
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
        return bool(bos_prefix(tokenizer))
    except Exception:  # any failure to load means "unknown", which is reported as such
        return None
