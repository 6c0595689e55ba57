"""Moving SAEs between Kestrel and other tools: file sets in each layout, zips, and the model
metadata an export carries.

A file set is ``{file name: bytes}``; its layout is told by its names:

    kestrel   config.json + weights.safetensors      (what `GET /saes/{id}/download` zips)
    saelens   cfg.json + sae_weights.safetensors     (+ activation_scaler.json, optional)
    sparsify  cfg.json + sae.safetensors

An import takes the set from a directory, a zip (flat, or with every file in one folder, as a
zip of a folder is), or two uploaded files; every check runs before anything is allocated or
stored (see each layout's reader).
"""

from __future__ import annotations

import functools
import io
import zipfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import torch

from kestrel.core import catalog, hub
from kestrel.core.clientdata import loads_object, safetensors_header
from kestrel.core.errors import InvalidInputError
from kestrel.core.limits import Caps, check_sae_size
from kestrel.core.sae import io as sae_io
from kestrel.core.sae import saelens, sparsify
from kestrel.core.sae.base import SAE
from kestrel.core.sae.config import SAEConfig

ExportFormat = Literal["kestrel", "saelens", "sparsify"]
#: Layouts `export_files` writes (Kestrel's own is the stored files themselves).
EXPORT_FORMATS = ("saelens", "sparsify")
LAYOUTS: dict[str, tuple[str, str]] = {
    "kestrel": (sae_io.CONFIG_FILE, sae_io.WEIGHTS_FILE),
    "saelens": (saelens.SAELENS_CONFIG_FILE, saelens.SAELENS_WEIGHTS_FILE),
    "sparsify": (sparsify.SPARSIFY_CONFIG_FILE, sparsify.SPARSIFY_WEIGHTS_FILE),
}
#: Files an import reads; anything else in a zip (metrics, history, a README) is skipped unread.
READ_FILES = frozenset({name for pair in LAYOUTS.values() for name in pair} | {saelens.SAELENS_SCALER_FILE})
MAX_ZIP_MEMBERS = 10_000


def detect_layout(names: set[str] | Mapping[str, Any]) -> str:
    """Which layout a set of file names is; InvalidInputError naming what each layout needs."""
    found = [layout for layout, pair in LAYOUTS.items() if set(pair) <= set(names)]
    if len(found) == 1:
        return found[0]
    expected = {layout: list(pair) for layout, pair in LAYOUTS.items()}
    raise InvalidInputError(
        f"cannot tell the SAE's layout from its files {sorted(names)}: expected one of "
        + "; ".join(f"{layout}: {' + '.join(pair)}" for layout, pair in LAYOUTS.items()),
        details={"files": sorted(names), "layouts": expected},
    )


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


def files_from_directory(directory: Path) -> dict[str, bytes]:
    """The files of an SAE directory that an import reads."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidInputError(f"{directory} is not a directory", details={"path": str(directory)})
    return {
        p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name in READ_FILES and p.is_file()
    }


def files_from_zip(data: bytes, *, max_bytes: int) -> dict[str, bytes]:
    """The files an import reads from a zip, at most ``max_bytes`` uncompressed in all.

    Members lie at the top level or all in one folder; sizes are checked as they are read (a
    header may lie), so a zip bomb costs at most ``max_bytes``.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError) as exc:
        raise InvalidInputError(f"not a zip file: {exc}") from None
    with archive:
        infos = [info for info in archive.infolist() if not info.is_dir()]
        if len(infos) > MAX_ZIP_MEMBERS:
            raise InvalidInputError(f"the zip holds {len(infos)} files; an SAE has a few")
        folders = {PurePosixPath(info.filename).parent for info in infos}
        if len(folders) > 1:
            raise InvalidInputError(
                "the zip's files must lie at its top level or all in one folder",
                details={"folders": sorted(str(f) for f in folders)[:20]},
            )
        files: dict[str, bytes] = {}
        budget = max_bytes
        for info in infos:
            name = PurePosixPath(info.filename).name
            if name not in READ_FILES:
                continue
            try:
                with archive.open(info) as member:
                    payload = member.read(budget + 1)
            except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, EOFError) as exc:
                raise InvalidInputError(f"cannot read {name} from the zip: {exc}") from None
            if len(payload) > budget:
                raise InvalidInputError(
                    f"the zip's SAE files exceed {max_bytes:,} bytes uncompressed",
                    details={"max_bytes": max_bytes},
                )
            budget -= len(payload)
            files[name] = payload
    return files


def files_from_path(path: Path, *, max_bytes: int) -> dict[str, bytes]:
    """A directory's or a zip's files (the CLI's ``kestrel saes import PATH``)."""
    path = Path(path)
    if path.is_dir():
        return files_from_directory(path)
    if not path.is_file():
        raise InvalidInputError(f"{path} does not exist", details={"path": str(path)})
    return files_from_zip(path.read_bytes(), max_bytes=max_bytes)


def export_files(sae: SAE, fmt: str, *, metadata: dict[str, Any] | None = None) -> dict[str, bytes]:
    """The SAE's files in another tool's layout (``metadata``: SAELens's model entries)."""
    if fmt == "saelens":
        return saelens.saelens_files(sae, metadata)
    if fmt == "sparsify":
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


@functools.lru_cache(maxsize=32)
def tokenizer_prepends_bos(model: str, store_root: str) -> bool | None:
    """Whether the tokenizer Kestrel loads for ``model`` starts a text with BOS (as capture
    tokenizes: special tokens on); None when no tokenizer for it is on this machine."""
    if model in catalog.BUNDLED:
        directory = catalog.cache_dir(Path(store_root), model)
        if not catalog.cache_complete(directory):
            return None
        target = str(directory)
    else:
        target = model
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
        ids = tokenizer("a")["input_ids"]
    except Exception:
        return None
    bos = tokenizer.bos_token_id
    return bool(ids) and bos is not None and ids[0] == bos
