"""Fixed-size training batches from chunks of any size, pulled (`rebatch`) or pushed (`Rebatcher`).

Both give the same batches for the same rows whatever the chunk boundaries, so a trainer fed by
a stored run (pull) and one fed by a live model forward (push, `kestrel.core.sae.stream`) see the
same steps. Also the data-dependent start `geometric_median`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from kestrel.core.errors import InvalidInputError
from kestrel.core.sae.config import SAEConfig


class Rebatcher:
    """Cuts pushed chunks into batches of `batch_size` rows after skipping `skip_rows` rows.

    `push` returns the batches a chunk completes, as (rows consumed so far, batch); `finish`
    returns the remainder when it is at least half a batch (a smaller one is dropped: its FVU
    denominator would be too noisy).
    """

    def __init__(self, batch_size: int, sae_config: SAEConfig, skip_rows: int = 0) -> None:
        self.batch_size = batch_size
        self.sae_config = sae_config
        self.skip_rows = skip_rows
        self.pending: list[Tensor] = []
        self.pending_rows = 0
        self.consumed = 0

    def push(self, chunk: Tensor) -> list[tuple[int, Tensor]]:
        chunk = check_chunk(chunk, self.sae_config)
        if self.skip_rows > self.consumed:
            dropped = min(self.skip_rows - self.consumed, chunk.shape[0])
            chunk = chunk[dropped:]
            self.consumed += dropped
        ready: list[tuple[int, Tensor]] = []
        while chunk.shape[0] > 0:
            take = min(self.batch_size - self.pending_rows, chunk.shape[0])
            self.pending.append(chunk[:take])
            self.pending_rows += take
            self.consumed += take
            chunk = chunk[take:]
            if self.pending_rows == self.batch_size:
                ready.append((self.consumed, _join(self.pending)))
                self.pending, self.pending_rows = [], 0
        return ready

    def finish(self) -> tuple[int, Tensor] | None:
        if self.pending_rows < max(self.batch_size // 2, 1):
            return None
        batch = _join(self.pending)
        self.pending, self.pending_rows = [], 0
        return self.consumed, batch


def rebatch(
    chunks: Iterable[Tensor], batch_size: int, sae_config: SAEConfig, skip_rows: int = 0
) -> Iterator[tuple[int, Tensor]]:
    """`Rebatcher` over an iterable: (rows consumed so far, batch), the remainder rule included."""
    batcher = Rebatcher(batch_size, sae_config, skip_rows)
    for chunk in chunks:
        yield from batcher.push(chunk)
    last = batcher.finish()
    if last is not None:
        yield last


def epoch_shape(rows: int, batch: int) -> tuple[int, int]:
    """(steps, rows trained on) for one epoch, matching `rebatch`'s remainder rule."""
    full, remainder = divmod(rows, batch)
    keep_remainder = remainder >= max(batch // 2, 1)
    return full + int(keep_remainder), full * batch + (remainder if keep_remainder else 0)


def check_chunk(chunk: Tensor, sae_config: SAEConfig) -> Tensor:
    """A [rows, d_in] chunk (a transcoder's: [rows, d_in + d_out], input and target side by side)."""
    if not isinstance(chunk, Tensor) or chunk.ndim != 2:
        shape = tuple(chunk.shape) if isinstance(chunk, Tensor) else type(chunk).__name__
        raise InvalidInputError(f"activation batches must be [rows, d_in] tensors, got {shape}")
    if not sae_config.is_transcoder:
        sae_config.validate_against(chunk.shape[1])
    elif chunk.shape[1] != sae_config.row_width:
        raise InvalidInputError(
            f"a transcoder trains on rows of its input and target side by side, width "
            f"{sae_config.d_in} + {sae_config.output_width}; the data has width {chunk.shape[1]}",
            details={"row_width": sae_config.row_width, "data_width": int(chunk.shape[1])},
        )
    return chunk


def _join(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def geometric_median(points_BD: Tensor, iterations: int = 50, tolerance: float = 1e-6) -> Tensor:
    """The point minimising the summed distance to the rows (Weiszfeld's algorithm, float64).

    A more robust origin than the mean when a few activations are huge.
    """
    points_BD = points_BD.double()
    guess_D = points_BD.mean(dim=0)
    for _ in range(iterations):
        weights_B = 1.0 / (points_BD - guess_D).norm(dim=1).clamp_min(1e-12)
        updated_D = (weights_B[:, None] * points_BD).sum(dim=0) / weights_B.sum()
        moved = float((updated_D - guess_D).norm())
        guess_D = updated_D
        if moved <= tolerance * float(guess_D.norm().clamp_min(1.0)):
            break
    return guess_D.float()
