"""SAE file sets, torch-free: which layout a set of files is, and reading one from a directory or
a zip (the API reads an uploaded zip with this module before any engine code runs).

A file set is ``{file name: bytes}``; its layout is told by its names:

    kestrel   config.json + weights.safetensors      (what `GET /saes/{id}/download` zips)
    saelens   cfg.json + sae_weights.safetensors     (+ activation_scaler.json, optional)
    sparsify  cfg.json + sae.safetensors

Reading an SAE from a set is `kestrel.core.sae.exchange.sae_from_files`.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from kestrel.core.errors import InvalidInputError

LAYOUTS: dict[str, tuple[str, str]] = {
    "kestrel": ("config.json", "weights.safetensors"),
    "saelens": ("cfg.json", "sae_weights.safetensors"),
    "sparsify": ("cfg.json", "sae.safetensors"),
}
SAELENS_SCALER_FILE = "activation_scaler.json"
#: Files an import reads; anything else in a zip (metrics, history, a README) is skipped unread.
READ_FILES = frozenset({name for pair in LAYOUTS.values() for name in pair} | {SAELENS_SCALER_FILE})
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
