"""Operator caps on what one request may ask the engine to build or run, checked in one place.

The API checks them before a job is queued (a 422 naming the setting) and the worker checks them
again when the job starts, since a job can reach a queue from elsewhere (an older API, a script);
both call the same functions, so the two can never disagree. The engine itself knows nothing of
settings: a ``Caps`` is built from whatever carries these fields (``kestrel.settings.Settings``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from kestrel.core.errors import InvalidInputError


class LimitExceededError(InvalidInputError):
    """A request over an operator cap; the message and details name the setting (a 422)."""

    code = "limit_exceeded"


@dataclass(frozen=True)
class Caps:
    """The caps (defaults match ``Settings``'s)."""

    max_n_latents: int = 131_072
    max_sae_params: int = 1 << 28
    max_batch_size: int = 65_536
    max_epochs: int = 1000
    max_batch_tokens: int = 1 << 20
    max_tokens_per_job: int = 10_000_000_000
    min_shard_mb: float = 1.0
    max_shard_mb: float = 1024.0

    @classmethod
    def of(cls, source: Any) -> Caps:
        """The caps an object (settings) carries; fields it lacks keep their defaults."""
        return cls(**{f.name: getattr(source, f.name) for f in fields(cls) if hasattr(source, f.name)})


def shown(value: Any) -> Any:
    """A number as a message may quote it: an int of thousands of digits is summarised."""
    if isinstance(value, int) and abs(value) >= 10**18:
        try:
            digits = len(str(abs(value)))
        except ValueError:  # str() refuses ints past 4,300 digits (log10 takes any int)
            digits = math.floor(math.log10(abs(value))) + 1
        return f"a {digits}-digit number"
    return value


def exceeded(setting: str, limit: float, got: Any, what: str, *, below: bool = False) -> LimitExceededError:
    relation = "is below" if below else "exceeds"
    got = shown(got)
    return LimitExceededError(
        f"{what}: {got} {relation} the limit {setting}={limit} (an operator setting, "
        f"KESTREL_{setting.upper()})",
        details={"limit": setting, "min" if below else "max": limit, "got": got},
    )


def check_sae_size(d_in: int, n_latents: int, caps: Caps) -> None:
    """An SAE's dictionary and weight count within ``max_n_latents`` and ``max_sae_params``."""
    if n_latents > caps.max_n_latents:
        raise exceeded("max_n_latents", caps.max_n_latents, n_latents, "n_latents too large")
    if d_in * n_latents > caps.max_sae_params:
        raise exceeded(
            "max_sae_params",
            caps.max_sae_params,
            d_in * n_latents,
            f"d_in × n_latents ({d_in} × {n_latents})",
        )


def check_train(train: Mapping[str, Any], caps: Caps) -> None:
    """A training config (as a dict) within the batch, epoch and token caps."""
    batch_size = train.get("batch_size")
    if isinstance(batch_size, int) and batch_size > caps.max_batch_size:
        raise exceeded("max_batch_size", caps.max_batch_size, batch_size, "train.batch_size too large")
    epochs = train.get("epochs")
    if isinstance(epochs, int) and epochs > caps.max_epochs:
        raise exceeded("max_epochs", caps.max_epochs, epochs, "train.epochs too large")
    budget = train.get("token_budget")
    if isinstance(budget, int) and budget > caps.max_tokens_per_job:
        raise exceeded("max_tokens_per_job", caps.max_tokens_per_job, budget, "train.token_budget too large")


def check_batch_tokens(token_budget: int, caps: Caps, field: str) -> None:
    """Padded tokens per forward batch (capture, discovery) within ``max_batch_tokens``."""
    if token_budget > caps.max_batch_tokens:
        raise exceeded("max_batch_tokens", caps.max_batch_tokens, token_budget, f"{field} too large")


def check_batch_size(batch_size: int | None, caps: Caps, field: str) -> None:
    if batch_size is not None and batch_size > caps.max_batch_size:
        raise exceeded("max_batch_size", caps.max_batch_size, batch_size, f"{field} too large")


def check_shard_mb(shard_mb: float, caps: Caps, field: str = "shard_mb") -> None:
    """Shards neither tiny (thousands of files) nor huge: within [min_shard_mb, max_shard_mb]."""
    if shard_mb < caps.min_shard_mb:
        raise exceeded("min_shard_mb", caps.min_shard_mb, shard_mb, f"{field} too small", below=True)
    if shard_mb > caps.max_shard_mb:
        raise exceeded("max_shard_mb", caps.max_shard_mb, shard_mb, f"{field} too large")


def check_capture_options(options: Any, caps: Caps, field: str = "options") -> None:
    """A capture's ``CaptureOptions`` within the caps (token budget, batch size, shard size)."""
    check_batch_tokens(options.token_budget, caps, f"{field}.token_budget")
    check_batch_size(options.max_batch_size, caps, f"{field}.max_batch_size")
    check_shard_mb(options.shard_mb, caps, f"{field}.shard_mb")
