"""SAEs as the store holds them, read without loading one: summaries, training history, which
model and layer an SAE reads, and deletion.

Training, loading and running SAEs is `kestrel.core.sae.artifacts`; this module is torch-free, so
the API process lists, reads and deletes SAEs and checks a request against them without torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from kestrel.core.errors import InvalidInputError, NotFoundError
from kestrel.core.runs import get_manifest
from kestrel.core.store import Store, read_manifests, validate_id

KIND = "saes"
HISTORY_FILE = "history.jsonl"


def checkpoint_dir(store: Store, sae_id: str) -> Path:
    """Checkpoints are this machine's scratch (never uploaded until the SAE is published)."""
    return store.local_root / "checkpoints" / sae_id


def list_saes(store: Store) -> list[dict[str, Any]]:
    return read_manifests(store, KIND)


def get_sae(store: Store, sae_id: str) -> dict[str, Any]:
    return store.read_json(KIND, validate_id(sae_id, "sae id"))


def training_history(store: Store, sae_id: str) -> list[dict[str, Any]]:
    """The trainer's progress lines (history.jsonl), for curves; empty for an imported SAE."""
    get_sae(store, sae_id)  # NotFoundError for an unknown id, rather than an empty history
    try:
        path = store.local_path(KIND, sae_id, HISTORY_FILE)
    except NotFoundError:
        return []
    return read_history(path.parent)


def delete_sae(store: Store, sae_id: str) -> None:
    store.delete(KIND, validate_id(sae_id, "sae id"))
    checkpoints = checkpoint_dir(store, sae_id)
    shutil.rmtree(checkpoints, ignore_errors=True)
    checkpoints.with_name(f"{sae_id}.lock").unlink(missing_ok=True)  # see checkpoint.writer_lock


def unloadable_model_reason(run: dict[str, Any]) -> str | None:
    """Why the service cannot load the model a run came from (None when it can).

    A run written during a user's own training (``kestrel.core.callbacks``) marks its model
    ``loadable: false``: a model the service never had, so nothing that needs it in the loop
    (CE-loss recovered, KL) can be computed, and loading a model by its name could even pick an
    unrelated one.
    """
    model = run.get("model") or {}
    if model.get("loadable", True):
        return None
    if "import" in run:
        origin = "imported from a file of"
    elif (run.get("source") or {}).get("kind") == "training":
        origin = "captured during training from"
    else:
        origin = "recorded from"
    return (
        f"run {run.get('id')!r} was {origin} the model {model.get('name')!r}, which the service "
        "cannot load; model-in-the-loop work (CE-loss recovered, encode, discovery, steering) needs it"
    )


def require_loadable_model(store: Store, summary: dict[str, Any]) -> None:
    """InvalidInputError before a job loads a model for an SAE whose run's model is not loadable."""
    run_id = summary.get("run_id")
    if run_id and store.exists("activations", run_id):
        reason = unloadable_model_reason(get_manifest(store, run_id))
        if reason is not None:
            raise InvalidInputError(reason, details={"sae_id": summary.get("id"), "run_id": run_id})


def read_history(directory: Path) -> list[dict[str, Any]]:
    """The lines of an SAE directory's history.jsonl; empty when it has none (an import)."""
    path = Path(directory) / HISTORY_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sae_model(summary: dict[str, Any]) -> str | None:
    """The model an SAE reads, as its summary records it (top level, else in its config)."""
    return summary.get("model") or (summary.get("config") or {}).get("model")


def sae_model_and_layer(summary: dict[str, Any]) -> tuple[str, str]:
    """The model and layer an SAE reads; InvalidInputError for one imported without them."""
    config = summary.get("config") or {}
    model = sae_model(summary)
    layer = summary.get("layer") or config.get("layer")
    if not model or not layer:
        missing = " and ".join(what for what, value in (("model", model), ("layer", layer)) if not value)
        raise InvalidInputError(
            f"sae {summary.get('id')!r} does not record the {missing} it reads (an import whose cfg.json "
            "names none): import it again with the model and layer form fields to run it on text",
            details={"sae_id": summary.get("id"), "missing": missing.split(" and ")},
        )
    return model, layer
