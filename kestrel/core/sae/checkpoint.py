"""Training checkpoints: everything needed to continue a run as if it had never stopped.

    <checkpoint_dir>/step-00001200/
        sae.safetensors        SAE parameters and buffers in training space (input scale not folded)
        optimizer.safetensors  Adam moments and step counts, keyed "<parameter>.<slot>"
        tracker.safetensors    tokens since each latent last fired
        state.json             counters, data position, configs, plan (no tensors)
        history.jsonl          history lines so far

Tensors go through safetensors and the rest through JSON: no pickle anywhere. A checkpoint is
written under a temporary name and renamed into place, so a reader never sees half of one; the
newest `keep` are kept. `writer_lock` lets one process at a time train into a checkpoint
directory (a job requeued while its first worker still runs waits for that worker to let go).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from kestrel.core.errors import InvalidInputError, NotFoundError
from kestrel.core.sae.base import SAE

FORMAT_VERSION = 1
STEP_PREFIX = "step-"


@dataclass
class RunState:
    """Counters and tensors outside the SAE and optimiser that a resumed run needs."""

    step: int = 0
    tokens: int = 0
    epoch: int = 0
    rows_in_epoch: int = 0
    """Rows of `epoch` already consumed: a resumed run skips exactly these."""
    input_scale: float = 1.0
    output_scale: float | None = None
    """A transcoder's target scale (None for an SAE, or when inputs are not normalised)."""
    tokens_since_fired_N: Tensor | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints under `checkpoint_dir`, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [
        path
        for path in checkpoint_dir.iterdir()
        if path.is_dir() and path.name.startswith(STEP_PREFIX) and (path / "state.json").is_file()
    ]
    return sorted(found, key=lambda path: path.name)


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(Path(checkpoint_dir))
    return found[-1] if found else None


@contextlib.contextmanager
def writer_lock(
    checkpoint_dir: Path, should_stop: Callable[[], bool] | None = None, poll_s: float = 0.5
) -> Iterator[bool]:
    """Hold an exclusive lock on ``<checkpoint_dir>.lock`` while training into ``checkpoint_dir``.

    Yields True once held, or False when ``should_stop`` said stop while waiting. The kernel
    releases the lock when its process dies, so a SIGKILLed trainer never leaves it held.
    """
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = checkpoint_dir.with_name(checkpoint_dir.name + ".lock")
    with lock_path.open("a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if should_stop is not None and should_stop():
                    yield False
                    return
                time.sleep(poll_s)
        try:
            yield True
        finally:
            if not checkpoint_dir.exists():  # published (moved into the SAE) or never written
                lock_path.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_checkpoint(
    checkpoint_dir: Path,
    sae: SAE,
    optimizer: torch.optim.Optimizer,
    state: RunState,
    extra: dict[str, Any],
    *,
    keep: int,
) -> Path:
    """Write one checkpoint atomically and prune old ones; returns its directory."""
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir / step_dir_name(state.step)
    staging = checkpoint_dir / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        save_file(_cpu_state(sae.state_dict()), staging / "sae.safetensors")
        save_file(_optimizer_tensors(sae, optimizer), staging / "optimizer.safetensors")
        since_N = state.tokens_since_fired_N
        tracker = {} if since_N is None else {"tokens_since_fired": since_N}
        save_file(_cpu_state(tracker), staging / "tracker.safetensors")
        _write_history(staging / "history.jsonl", state.history)
        meta = {
            "format": FORMAT_VERSION,
            "step": state.step,
            "tokens": state.tokens,
            "epoch": state.epoch,
            "rows_in_epoch": state.rows_in_epoch,
            "input_scale": state.input_scale,
            "output_scale": state.output_scale,
            "elapsed_s": state.elapsed_s,
            **extra,
        }
        (staging / "state.json").write_text(json.dumps(meta, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in list_checkpoints(checkpoint_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class LoadedCheckpoint:
    """A checkpoint read back: apply it with `restore`."""

    path: Path
    meta: dict[str, Any]
    sae_state: dict[str, Tensor]
    optimizer_state: dict[str, Tensor]
    tracker: dict[str, Tensor]
    history: list[dict[str, Any]]

    def run_state(self, device: torch.device) -> RunState:
        since = self.tracker.get("tokens_since_fired")
        return RunState(
            step=int(self.meta["step"]),
            tokens=int(self.meta["tokens"]),
            epoch=int(self.meta["epoch"]),
            rows_in_epoch=int(self.meta["rows_in_epoch"]),
            input_scale=float(self.meta["input_scale"]),
            output_scale=self.meta.get("output_scale"),
            tokens_since_fired_N=None if since is None else since.to(device),
            history=list(self.history),
            elapsed_s=float(self.meta.get("elapsed_s", 0.0)),
        )

    def restore(self, sae: SAE, optimizer: torch.optim.Optimizer) -> None:
        """Load weights and Adam state into freshly built `sae` and `optimizer`."""
        device = next(sae.parameters()).device
        sae.load_state_dict({name: t.to(device) for name, t in self.sae_state.items()})
        for name, param in sae.named_parameters():
            slots = {
                slot: self.optimizer_state[f"{name}.{slot}"].to(device)
                for slot in ("step", "exp_avg", "exp_avg_sq")
                if f"{name}.{slot}" in self.optimizer_state
            }
            if slots:
                optimizer.state[param] = slots


def read_checkpoint(path: Path) -> LoadedCheckpoint:
    """Read a checkpoint directory, or the newest one inside a checkpoints directory."""
    path = Path(path)
    if not (path / "state.json").is_file():
        newest = latest_checkpoint(path)
        if newest is None:
            raise NotFoundError(f"no complete checkpoint at {path}", details={"checkpoint": str(path)})
        path = newest
    meta = json.loads((path / "state.json").read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise InvalidInputError(
            f"checkpoint {path.name} has format {meta.get('format')}, this version reads {FORMAT_VERSION}"
        )
    return LoadedCheckpoint(
        path=path,
        meta=meta,
        sae_state=load_file(path / "sae.safetensors"),
        optimizer_state=load_file(path / "optimizer.safetensors"),
        tracker=load_file(path / "tracker.safetensors"),
        history=_read_history(path / "history.jsonl"),
    )


def _cpu_state(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}


def _optimizer_tensors(sae: SAE, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, param in sae.named_parameters():
        for slot, value in optimizer.state.get(param, {}).items():
            tensor = value if isinstance(value, Tensor) else torch.tensor(float(value))
            out[f"{name}.{slot}"] = tensor
    return _cpu_state(out)


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in history))


def _read_history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
