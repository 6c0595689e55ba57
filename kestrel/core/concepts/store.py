"""Where discovered features live under an SAE, and how they are published and read.

    saes/<sae_id>/features/manifest.json                 which version is current, and its summary
    saes/<sae_id>/features/<version>/features.safetensors tensors per latent (see `TENSORS`)
    saes/<sae_id>/features/<version>/vocab.json           token id → text for every id stored
    saes/<sae_id>/features/dictionary.json                names, descriptions, tags (kept across runs)

The SAE directory is already published when discovery runs, so a new result is staged in
``features/.staging-*`` (a local scratch directory for a remote store), moved in as its version
(``Store.put_tree``: one rename locally, an upload to S3), and made current by rewriting
``manifest.json`` atomically, last (``Store.put_json``). A reader resolves the manifest once and
reads that version, so it sees one complete result, old or new, never a mix. The previous
version is kept (a reader may still hold it); older ones are removed once they are a while old.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kestrel.core.errors import NotFoundError
from kestrel.core.store import Store, new_id, validate_id

if TYPE_CHECKING:
    import torch

# safetensors and torch are imported where tensors are written or read, so the manifest and the
# dictionary (which the API reads) load without the engine.

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


def _features_rel(*parts: str) -> str:
    return "/".join((FEATURES_DIR, *parts))


def _require_sae(store: Store, sae_id: str) -> str:
    sae_id = validate_id(sae_id, "sae id")
    if not store.exists(SAE_KIND, sae_id):
        raise NotFoundError(f"no {SAE_KIND} artifact with id {sae_id!r}", details={"id": sae_id})
    return sae_id


def features_root(store: Store, sae_id: str) -> Path:
    """A local copy of ``saes/<sae_id>/features`` (a local store's own directory; a remote store
    downloads the whole SAE into its cache, so the engine itself reads through the verbs below)."""
    return store.local_dir(SAE_KIND, _require_sae(store, sae_id)) / FEATURES_DIR


def staging_dir(store: Store, sae_id: str) -> Path:
    """A private local directory for one discovery's files (and temporary docs); inside
    ``features/`` for a local store, so publishing it is one rename."""
    scratch = store.scratch_dir(SAE_KIND, _require_sae(store, sae_id), FEATURES_DIR)
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=scratch))


def publish(
    store: Store,
    sae_id: str,
    staging: Path,
    tensors: dict[str, torch.Tensor],
    vocab: dict[str, str],
    summary: dict[str, Any],
) -> dict[str, Any]:
    """Write the files into ``staging``, move it in as a new version, then point the manifest at it."""
    from safetensors.torch import save_file

    save_file({name: t.contiguous() for name, t in tensors.items()}, str(staging / TENSORS_FILE))
    (staging / VOCAB_FILE).write_text(json.dumps(vocab, ensure_ascii=False))
    version = new_id("v")
    store.put_tree(SAE_KIND, sae_id, _features_rel(version), staging)
    previous = _current_version(store, sae_id)
    manifest = {**summary, "version": version, "tensors": TENSORS}
    store.put_json(SAE_KIND, sae_id, _features_rel(MANIFEST_FILE), manifest)
    _prune(store, sae_id, keep={version, previous})
    return manifest


def _current_version(store: Store, sae_id: str) -> str | None:
    try:
        return store.read_json(SAE_KIND, sae_id, _features_rel(MANIFEST_FILE)).get("version")
    except (NotFoundError, OSError, json.JSONDecodeError):
        return None


def _prune(store: Store, sae_id: str, keep: set[str | None]) -> None:
    """Remove versions neither current nor previous, and staging leftovers, once they are old."""
    cutoff = time.time() - PRUNE_AFTER_S
    written: dict[str, float] = {}  # version -> its newest file's time
    for stored in store.list_files(SAE_KIND, sae_id, _features_rel("v-")):
        parts = stored.rel.split("/")
        if len(parts) >= 3:
            written[parts[1]] = max(written.get(parts[1], 0.0), stored.modified)
    for version, modified in written.items():
        if version not in keep and modified < cutoff:
            store.delete_tree(SAE_KIND, sae_id, _features_rel(version))
    _prune_staging(store.scratch_dir(SAE_KIND, sae_id, FEATURES_DIR), cutoff)


def _prune_staging(scratch: Path, cutoff: float) -> None:
    for path in scratch.glob(f"{STAGING_PREFIX}*"):
        with contextlib.suppress(OSError):
            if path.is_dir() and path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)


def read_manifest(store: Store, sae_id: str) -> dict[str, Any]:
    """The current discovery's summary; NotFoundError naming the fix if there is none."""
    sae_id = _require_sae(store, sae_id)
    try:
        return store.read_json(SAE_KIND, sae_id, _features_rel(MANIFEST_FILE))
    except NotFoundError:
        raise NotFoundError(
            f"sae {sae_id!r} has no discovered features yet; run discovery first "
            f"(`kestrel discover {sae_id}` or POST /v1/saes/{sae_id}/features/discover)",
            details={"sae_id": sae_id},
        ) from None


class FeatureReader:
    """Reads one version's tensors lazily: a feature page loads one latent's slices only."""

    def __init__(self, store: Store, sae_id: str) -> None:
        self.sae_id = sae_id
        self.manifest = read_manifest(store, sae_id)
        version = self.manifest["version"]
        files = [_features_rel(version, TENSORS_FILE), _features_rel(version, VOCAB_FILE)]
        self.directory = store.local_dir(SAE_KIND, sae_id, files) / FEATURES_DIR / version
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
        from safetensors import safe_open

        with safe_open(str(self.directory / TENSORS_FILE), "pt") as f:
            return {name: f.get_tensor(name) for name in names}

    def latent(self, latent: int, *names: str) -> dict[str, torch.Tensor]:
        """Row ``latent`` of each named per-latent tensor."""
        self.check_latent(latent)
        from safetensors import safe_open

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
