"""Where discovered features live under an SAE, and how they are published and read.

    saes/<sae_id>/features/manifest.json                 which version is current, and its summary
    saes/<sae_id>/features/<version>/features.safetensors tensors per latent (see `TENSORS`)
    saes/<sae_id>/features/<version>/vocab.json           token id → text for every id stored
    saes/<sae_id>/features/dictionary.json                names, descriptions, tags (kept across runs)

The SAE directory is already published when discovery runs, so a new result is staged in
``features/.staging-*``, renamed to its version directory, and made current by rewriting
``manifest.json`` atomically, last. A reader resolves the manifest once and reads that version,
so it sees one complete result, old or new, never a mix. The previous version is kept (a reader
may still hold it); older ones are removed once they are a while old.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kestrel.core.errors import NotFoundError
from kestrel.core.store import LocalStore, new_id, validate_id, write_json_atomic

SAE_KIND = "saes"
FEATURES_DIR = "features"
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "features.safetensors"
VOCAB_FILE = "vocab.json"
STAGING_PREFIX = ".staging-"
PRUNE_AFTER_S = 600.0

TENSORS = {
    "top_values": "[L, N] top activations, descending (0: unused slot)",
    "top_rows": "[L, N] packed rows doc << 24 | position (-1: unused)",
    "top_windows": "[L, N, W] token ids of the window around each top row (-1: outside the text)",
    "bin_values": "[L, B, M] samples from B equal-width bins of (0, max]",
    "bin_rows": "[L, B, M] packed rows of the samples",
    "bin_windows": "[L, B, M, W] token windows of the samples",
    "fire_count": "[L] rows on which the latent fired",
    "density": "[L] fire_count / rows seen",
    "max_activation": "[L]",
    "mean_activation": "[L] mean over the rows it fired on",
    "hist_counts": "[L, F] firings per log-spaced bin",
    "hist_edges": "[F + 1] bin edges (the first and last bins are open-ended)",
    "top_token_ids": "[L, 3] most frequent tokens at the top rows (-1: none)",
    "top_token_counts": "[L, 3] how many of the top rows they are",
    "logit_pos_ids": "[L, K] tokens the decoder direction most promotes",
    "logit_pos_values": "[L, K]",
    "logit_neg_ids": "[L, K] tokens it most suppresses",
    "logit_neg_values": "[L, K]",
}


def features_root(store: LocalStore, sae_id: str) -> Path:
    """``saes/<sae_id>/features`` of a published SAE (NotFoundError if the SAE does not exist)."""
    return store.require(SAE_KIND, validate_id(sae_id, "sae id")) / FEATURES_DIR


def staging_dir(store: LocalStore, sae_id: str) -> Path:
    """A private directory inside ``features/`` for one discovery's files (and temporary docs)."""
    root = features_root(store, sae_id)
    root.mkdir(exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root))


def publish(
    store: LocalStore,
    sae_id: str,
    staging: Path,
    tensors: dict[str, torch.Tensor],
    vocab: dict[str, str],
    summary: dict[str, Any],
) -> dict[str, Any]:
    """Write the files into ``staging``, rename it to a new version, then point the manifest at it."""
    root = features_root(store, sae_id)
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(staging / TENSORS_FILE))
    (staging / VOCAB_FILE).write_text(json.dumps(vocab, ensure_ascii=False))
    version = new_id("v")
    staging.chmod(0o755)
    os.rename(staging, root / version)
    previous = _current_version(root)
    manifest = {**summary, "version": version, "tensors": TENSORS}
    write_json_atomic(root / MANIFEST_FILE, manifest)
    _prune(root, keep={version, previous})
    return manifest


def _current_version(root: Path) -> str | None:
    try:
        return json.loads((root / MANIFEST_FILE).read_text()).get("version")
    except (OSError, json.JSONDecodeError):
        return None


def _prune(root: Path, keep: set[str | None]) -> None:
    """Remove versions neither current nor previous, and staging leftovers, once they are old."""
    cutoff = time.time() - PRUNE_AFTER_S
    for path in root.iterdir():
        is_version = path.is_dir() and path.name.startswith("v-")
        is_leftover = path.is_dir() and path.name.startswith(STAGING_PREFIX)
        if (is_version and path.name not in keep) or is_leftover:
            try:
                if path.stat().st_mtime < cutoff:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


def read_manifest(store: LocalStore, sae_id: str) -> dict[str, Any]:
    """The current discovery's summary; NotFoundError naming the fix if there is none."""
    path = features_root(store, sae_id) / MANIFEST_FILE
    if not path.is_file():
        raise NotFoundError(
            f"sae {sae_id!r} has no discovered features yet; run discovery first "
            f"(`kestrel discover {sae_id}` or POST /v1/saes/{sae_id}/features/discover)",
            details={"sae_id": sae_id},
        )
    return json.loads(path.read_text())


class FeatureReader:
    """Reads one version's tensors lazily: a feature page loads one latent's slices only."""

    def __init__(self, store: LocalStore, sae_id: str) -> None:
        self.sae_id = sae_id
        self.manifest = read_manifest(store, sae_id)
        self.directory = features_root(store, sae_id) / self.manifest["version"]
        self.n_latents = int(self.manifest["n_latents"])
        self._vocab: dict[str, str] | None = None

    @property
    def vocab(self) -> dict[str, str]:
        if self._vocab is None:
            self._vocab = json.loads((self.directory / VOCAB_FILE).read_text())
        return self._vocab

    def token(self, token_id: int) -> str:
        return self.vocab.get(str(int(token_id)), f"<{int(token_id)}>")

    def full(self, *names: str) -> dict[str, torch.Tensor]:
        """Whole tensors (the small per-latent vectors a list needs)."""
        with safe_open(str(self.directory / TENSORS_FILE), "pt") as f:
            return {name: f.get_tensor(name) for name in names}

    def latent(self, latent: int, *names: str) -> dict[str, torch.Tensor]:
        """Row ``latent`` of each named per-latent tensor."""
        self.check_latent(latent)
        with safe_open(str(self.directory / TENSORS_FILE), "pt") as f:
            return {name: f.get_slice(name)[latent : latent + 1][0] for name in names}

    def check_latent(self, latent: int) -> int:
        if not 0 <= latent < self.n_latents:
            raise NotFoundError(
                f"latent {latent} is out of range: sae {self.sae_id!r} has {self.n_latents} latents "
                f"(0..{self.n_latents - 1})",
                details={"latent": latent, "n_latents": self.n_latents},
            )
        return latent
