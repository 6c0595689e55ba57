"""The Lightning callback over ``TrainingCapture`` (``kestrel.core.callbacks``): capture activations
during ``Trainer.fit`` with one line in the user's code.

Lightning is an optional extra: importing this module never imports it; the name
``KestrelCaptureCallback`` builds the callback class on first use, subclassing the ``Callback`` of
``lightning.pytorch`` and/or ``pytorch_lightning``, whichever are installed.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kestrel.core.callbacks import StoreLocation, TrainingCapture, _check_layer_names
from kestrel.core.errors import InvalidInputError
from kestrel.core.runs import RunManifest

BatchTokens = Callable[[Any], tuple[torch.Tensor | None, torch.Tensor | None]]


def batch_tokens(batch: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(input_ids, attention_mask)`` of a batch when it has them: a mapping with those keys, a
    tensor of integer ids, or a tuple/list whose first item is one of those. Otherwise Nones."""
    if isinstance(batch, Mapping):
        return batch.get("input_ids"), batch.get("attention_mask")
    if isinstance(batch, torch.Tensor):
        return (batch, None) if not batch.is_floating_point() else (None, None)
    if isinstance(batch, (tuple, list)) and batch:
        return batch_tokens(batch[0])
    return None, None


class _CaptureCallbackMixin:
    """The Lightning hooks; ``KestrelCaptureCallback`` adds Lightning's ``Callback`` base(s).

    The capture starts at ``on_fit_start`` on the LightningModule (or its ``submodule``, e.g.
    ``"model"`` for an HF model held as ``self.model``, so layers are Kestrel's names), samples at
    ``trainer.global_step`` (optimizer steps), publishes at ``on_train_end``, and on an exception
    publishes the completed steps marked interrupted. Only global rank 0 captures.
    """

    def __init__(
        self,
        layers: Sequence[str],
        store: StoreLocation,
        *,
        submodule: str | None = None,
        tokens: BatchTokens = batch_tokens,
        **options: Any,
    ) -> None:
        _check_layer_names(layers)
        self.layers = list(layers)
        self.store = store
        self.submodule = submodule
        self.tokens = tokens
        self.options = options
        self.capture: TrainingCapture | None = None
        self.manifest: RunManifest | None = None

    @property
    def run_id(self) -> str | None:
        return self.capture.run_id if self.capture is not None else self.options.get("run_id")

    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        if not trainer.is_global_zero:
            return
        if self.capture is not None:
            raise InvalidInputError(
                f"this callback already captured run {self.capture.run_id}; use a new callback per fit"
            )
        self.capture = TrainingCapture(
            _submodule(pl_module, self.submodule),
            self.layers,
            self.store,
            framework="lightning",
            **self.options,
        )

    def on_train_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int) -> None:
        if self.capture is not None:
            input_ids, attention_mask = self.tokens(batch)
            self.capture.begin_step(int(trainer.global_step), input_ids, attention_mask)

    def on_train_batch_end(
        self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.capture is not None:
            self.capture.end_step()

    def on_train_end(self, trainer: Any, pl_module: nn.Module) -> None:
        if self.capture is not None:
            self.manifest = self.capture.close()

    def on_exception(self, trainer: Any, pl_module: nn.Module, exception: BaseException) -> None:
        if self.capture is not None:
            self.manifest = self.capture.close("interrupted", f"{type(exception).__name__}: {exception}")


def _submodule(root: nn.Module, path: str | None) -> nn.Module:
    """The model whose module paths name the layers: the LightningModule or one of its children."""
    if not path:
        return root
    try:
        return root.get_submodule(path)
    except AttributeError as exc:
        children = [name for name, _ in root.named_children()]
        raise InvalidInputError(
            f"submodule {path!r} is not in {type(root).__name__}; its children are {children}",
            details={"submodule": path},
        ) from exc


@functools.cache
def _callback_class() -> type:
    """The callback class over every installed Lightning flavour's ``Callback`` (one or both), so
    either flavour's Trainer accepts it."""
    bases = []
    for module in ("lightning.pytorch", "pytorch_lightning"):
        try:
            bases.append(importlib.import_module(module).Callback)
        except ImportError:
            continue
    if not bases:
        raise InvalidInputError(
            "KestrelCaptureCallback needs Lightning: pip install 'kestrel[lightning]' "
            "(or lightning / pytorch-lightning)"
        )
    return type(
        "KestrelCaptureCallback",
        (_CaptureCallbackMixin, *bases),
        {"__module__": __name__, "__doc__": _CaptureCallbackMixin.__doc__},
    )


def __getattr__(name: str) -> Any:
    """``KestrelCaptureCallback`` is built on first access, so importing this module needs no Lightning."""
    if name == "KestrelCaptureCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
