"""Scoped hooks on named modules: detectors observe, controllers edit.

Everything in Kestrel that looks inside a model (capture, steering, ablation, patching) goes through
this module, so the rules that keep those features correct live in one place:

* **Scoped lifetimes.** Torch hooks are registered on ``__enter__`` and removed in ``__exit__``
  (also when the block raises), as TransformerLens does. Workers keep models loaded between jobs,
  so a hook that outlived its request would silently steer the next caller's generation.
* **One torch hook per (layer, when).** The manager owns a single torch hook per slot and runs
  the user's hooks itself, which is what makes the order defined: controllers first, in the order
  added, each seeing the previous one's output; then detectors, so what is recorded is what the
  rest of the model actually receives (nnsight's rule for caches after interventions).
* **Our hooks run before anyone else's on the same module** (``prepend=True``). Other hooks, such
  as the ones transformers installs lazily to build ``output_hidden_states``, then see the edited
  value whether they were installed before or after us; otherwise a steered model could report
  unsteered hidden states depending on which request happened to come first.
* **Unwrapping.** Hugging Face modules return tensors, tuples, or ``ModelOutput`` dataclasses. A
  user's hook always gets the one tensor that matters (element 0 / the first field) and the
  container is rebuilt around the edited value, so the calling code sees the shape it expects.
* **Stopping early.** Capture only needs the model up to the deepest requested layer;
  ``stop_after`` raises ``StopForward`` there and ``run_until_stopped`` swallows it.

A ``HookManager`` is not thread-safe, and hooks act on every forward of the model while active:
callers that share a model between threads must serialise the use of it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

import torch
from torch.utils.hooks import RemovableHandle
from transformers.utils import ModelOutput

from kestrel.core.errors import InvalidInputError, NotFoundError, not_found

__all__ = [
    "ActivationRecorder",
    "Controller",
    "Detector",
    "HookContext",
    "HookFn",
    "HookManager",
    "HookWhen",
    "StopForward",
    "add_vector",
    "function_controller",
    "hooks",
    "mean_ablate",
    "replace",
    "run_until_stopped",
    "scale",
    "stop_after",
    "zero_ablate",
]

T = TypeVar("T")

HookWhen = Literal["forward", "pre"]
_WHENS: tuple[str, ...] = get_args(HookWhen)


@dataclass
class HookContext:
    """What a hook function may want to know about the call it is seeing."""

    layer: str
    """Module path of the hooked module, e.g. ``model.layers.3``."""
    when: HookWhen
    """``"forward"``: the module's output; ``"pre"``: its first input."""
    call: int
    """How many times this (layer, when) already fired inside the current ``with`` block. With
    ``generate`` and a KV cache, call 0 is the prompt pass and each later call is one new token."""


HookFn = Callable[[torch.Tensor, HookContext], torch.Tensor | None]


def _check_hook_fields(kind: str, layer: str, fn: object, when: str) -> None:
    """Reject malformed hooks when they are built, not in the middle of someone's forward pass."""
    if not isinstance(layer, str):
        raise InvalidInputError(f"{kind} layer must be a module path string, got {type(layer).__name__}")
    if not callable(fn):
        raise InvalidInputError(f"{kind} fn for layer {layer!r} is not callable")
    if when not in _WHENS:
        raise InvalidInputError(f"{kind} when={when!r} for layer {layer!r}; expected one of {list(_WHENS)}")


@dataclass(frozen=True)
class Detector:
    """Observes a value; whatever ``fn`` returns is ignored, so a detector can never edit."""

    layer: str
    fn: HookFn
    when: HookWhen = "forward"

    def __post_init__(self) -> None:
        _check_hook_fields("Detector", self.layer, self.fn, self.when)


@dataclass(frozen=True)
class Controller:
    """Edits a value: ``fn`` returns the replacement (same shape), or None to leave it unchanged."""

    layer: str
    fn: HookFn
    when: HookWhen = "forward"

    def __post_init__(self) -> None:
        _check_hook_fields("Controller", self.layer, self.fn, self.when)


class StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a hook to end a forward pass early, once everything needed has been seen."""


def stop_after(layer: str) -> Detector:
    """A detector that ends the forward at ``layer``, so capture does not pay for deeper layers.

    Other detectors on the same layer still run (the manager re-raises only after all of them),
    so the order in which ``stop_after`` and a recorder were added does not matter.
    """

    def _stop(_: torch.Tensor, ctx: HookContext) -> None:
        raise StopForward(ctx.layer)

    return Detector(layer, _stop)


def run_until_stopped(fn: Callable[[], T]) -> T | None:
    """Call ``fn``; return its result, or None if a hook ended it with ``StopForward``.

    A stopped forward leaves any KV cache it was writing half-updated; do not reuse that cache.
    """
    try:
        return fn()
    except StopForward:
        return None


# --- unwrapping module inputs and outputs -------------------------------------------------------

Rebuild = Callable[[torch.Tensor], Any]


def _unwrap(value: Any, layer: str, what: str) -> tuple[torch.Tensor, Rebuild]:
    """The tensor a hook acts on, and how to put an edited one back into the same structure."""
    if isinstance(value, torch.Tensor):
        return value, _identity
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0], lambda new: _replace_first_item(value, new)
    if isinstance(value, ModelOutput):
        # ModelOutput's own notion of element 0: its first field that is not None (e.g. the logits
        # of a CausalLMOutput whose ``loss`` field is empty).
        key = next(iter(value.keys()), None)
        if key is not None and isinstance(value[key], torch.Tensor):
            return value[key], lambda new: _replace_model_output_field(value, key, new)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        first = dataclasses.fields(value)[0].name if dataclasses.fields(value) else None
        if first is not None and isinstance(getattr(value, first), torch.Tensor):
            return getattr(value, first), lambda new: dataclasses.replace(value, **{first: new})
    raise InvalidInputError(
        f"layer {layer!r}: its {what} is a {type(value).__name__} without a leading tensor to hook; "
        "hook a submodule that produces one",
        details={"layer": layer},
    )


def _identity(new: torch.Tensor) -> torch.Tensor:
    return new


def _replace_first_item(value: tuple | list, new: torch.Tensor) -> tuple | list:
    """A copy of the sequence with element 0 replaced; named tuples stay named tuples."""
    items = [new, *value[1:]]
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)._make(items)
    return type(value)(items)


def _replace_model_output_field(value: ModelOutput, key: str, new: torch.Tensor) -> ModelOutput:
    """A shallow copy, so whoever still holds the original output does not see the edit."""
    out = copy.copy(value)
    out[key] = new  # ModelOutput.__setitem__ keeps the attribute and the dict entry in step
    return out


def _first_input(args: tuple, kwargs: dict[str, Any]) -> tuple[str | int, Any]:
    """Where a module's main input lives: first positional arg, else ``hidden_states``, else the
    first tensor-valued kwarg (transformers 5 passes attention ``hidden_states=`` by keyword)."""
    if args:
        return 0, args[0]
    if "hidden_states" in kwargs:
        return "hidden_states", kwargs["hidden_states"]
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return name, value
    return "", None


# --- the manager --------------------------------------------------------------------------------


@dataclass
class _Slot:
    """The user hooks behind one torch hook, and the call counter they share."""

    layer: str
    when: HookWhen
    controllers: list[Controller] = field(default_factory=list)
    detectors: list[Detector] = field(default_factory=list)
    calls: int = 0
    handle: RemovableHandle | None = None


class HookManager:
    """Registers detectors and controllers on a model for the duration of a ``with`` block."""

    def __init__(self, model: torch.nn.Module, hooks: Iterable[Detector | Controller] = ()) -> None:
        self.model = model
        self._modules: dict[str, torch.nn.Module] = dict(model.named_modules())
        self._slots: dict[tuple[str, HookWhen], _Slot] = {}
        self._active = False
        self.add(*hooks)

    @property
    def active(self) -> bool:
        return self._active

    def add(self, *hooks: Detector | Controller) -> None:
        """Validate every hook before adding any, so a typo leaves the manager unchanged."""
        for hook in hooks:
            self._validate(hook)
        for hook in hooks:
            slot = self._slot(hook.layer, hook.when)
            if isinstance(hook, Controller):
                slot.controllers.append(hook)
            else:
                slot.detectors.append(hook)

    def __enter__(self) -> HookManager:
        if self._active:
            raise RuntimeError("this HookManager is already active; it cannot be entered twice")
        self._active = True
        try:
            for slot in self._slots.values():
                slot.calls = 0
                self._register(slot)
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every torch hook this manager registered; safe to call more than once."""
        self._active = False
        for slot in self._slots.values():
            if slot.handle is not None:
                slot.handle.remove()
                slot.handle = None

    def _validate(self, hook: object) -> None:
        if not isinstance(hook, (Detector, Controller)):
            raise InvalidInputError(f"expected a Detector or Controller, got {type(hook).__name__}")
        if hook.layer not in self._modules:
            raise not_found("layer", hook.layer, self._modules)

    def _slot(self, layer: str, when: HookWhen) -> _Slot:
        slot = self._slots.get((layer, when))
        if slot is None:
            slot = self._slots[(layer, when)] = _Slot(layer, when)
            if self._active:
                self._register(slot)
        return slot

    def _register(self, slot: _Slot) -> None:
        module = self._modules[slot.layer]
        if slot.when == "forward":
            slot.handle = module.register_forward_hook(self._forward_hook(slot), prepend=True)
        else:
            slot.handle = module.register_forward_pre_hook(
                self._pre_hook(slot), prepend=True, with_kwargs=True
            )

    def _forward_hook(self, slot: _Slot) -> Callable[..., Any]:
        def hook(_module: torch.nn.Module, _args: tuple, output: Any) -> Any:
            value, rebuild = _unwrap(output, slot.layer, "output")
            new = self._dispatch(slot, value)
            return None if new is value else rebuild(new)

        return hook

    def _pre_hook(self, slot: _Slot) -> Callable[..., Any]:
        def hook(_module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
            where, first = _first_input(args, kwargs)
            value, rebuild = _unwrap(first, slot.layer, "first input")
            new = self._dispatch(slot, value)
            if new is value:
                return None
            if where == 0:
                return (rebuild(new), *args[1:]), kwargs
            return args, {**kwargs, where: rebuild(new)}

        return hook

    def _dispatch(self, slot: _Slot, value: torch.Tensor) -> torch.Tensor:
        """Controllers in order, then detectors on the result; StopForward waits for all detectors."""
        ctx = HookContext(slot.layer, slot.when, slot.calls)
        slot.calls += 1
        for controller in tuple(slot.controllers):
            out = controller.fn(value, ctx)
            if out is not None:
                value = _checked_replacement(out, value, slot.layer)
        stop: StopForward | None = None
        for detector in tuple(slot.detectors):
            try:
                detector.fn(value, ctx)
            except StopForward as exc:
                stop = stop or exc
        if stop is not None:
            raise stop
        return value


def _checked_replacement(out: object, value: torch.Tensor, layer: str) -> torch.Tensor:
    """A controller may not change the shape: the rest of the model would fail far from the cause.

    The dtype and device are brought back to the original's, so a float32 edit on a bf16 model
    does not silently upcast every later layer.
    """
    if not isinstance(out, torch.Tensor):
        raise InvalidInputError(
            f"controller on layer {layer!r} returned {type(out).__name__}; expected a tensor or None",
            details={"layer": layer},
        )
    if out.shape != value.shape:
        raise InvalidInputError(
            f"controller on layer {layer!r} changed the shape from {tuple(value.shape)} "
            f"to {tuple(out.shape)}; it must return a tensor of the same shape",
            details={"layer": layer, "expected": list(value.shape), "got": list(out.shape)},
        )
    return out.to(device=value.device, dtype=value.dtype)


@contextmanager
def hooks(model: torch.nn.Module, *hs: Detector | Controller) -> Iterator[HookManager]:
    """Shorthand for ``with HookManager(model, hs)``."""
    with HookManager(model, hs) as manager:
        yield manager


# --- ready-made hooks ---------------------------------------------------------------------------


class ActivationRecorder:
    """Keeps a detached copy of each listed layer's value on every call.

    Copies (not views) so later in-place edits by the model cannot change what was recorded;
    ``to_cpu`` by default so a long capture does not hold accelerator memory.
    """

    def __init__(
        self,
        layers: Sequence[str],
        when: HookWhen = "forward",
        to_cpu: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(layers, str):
            raise InvalidInputError(f"layers must be a sequence of names, not the string {layers!r}")
        self.layers: list[str] = list(dict.fromkeys(layers))
        self.when: HookWhen = when
        self.to_cpu = to_cpu
        self.dtype = dtype
        self.records: dict[str, list[torch.Tensor]] = {layer: [] for layer in self.layers}

    def hooks(self) -> list[Detector]:
        return [Detector(layer, self._recorder(layer), self.when) for layer in self.layers]

    def last(self, layer: str) -> torch.Tensor:
        """The most recent value recorded for ``layer``."""
        if layer not in self.records:
            raise not_found("layer", layer, self.layers)
        if not self.records[layer]:
            raise NotFoundError(f"nothing recorded yet for layer {layer!r}", details={"layer": layer})
        return self.records[layer][-1]

    def clear(self) -> None:
        for values in self.records.values():
            values.clear()

    def _recorder(self, layer: str) -> HookFn:
        def record(value: torch.Tensor, _: HookContext) -> None:
            device = torch.device("cpu") if self.to_cpu else value.device
            self.records[layer].append(value.detach().to(device=device, dtype=self.dtype, copy=True))

        return record


def scale(layer: str, factor: float, when: HookWhen = "forward") -> Controller:
    """Multiply the value by ``factor``."""
    return Controller(layer, lambda x, _: x * factor, when)


def add_vector(
    layer: str, vector: torch.Tensor, alpha: float = 1.0, when: HookWhen = "forward"
) -> Controller:
    """Add ``alpha * vector`` at every position: the basic steering edit."""
    _require_vector(vector, "add_vector", layer)

    def add(x: torch.Tensor, _: HookContext) -> torch.Tensor:
        _require_width(vector, x, "add_vector", layer)
        return x + alpha * vector.to(device=x.device, dtype=x.dtype)

    return Controller(layer, add, when)


def zero_ablate(layer: str, when: HookWhen = "forward") -> Controller:
    """Replace the value by zeros."""
    return Controller(layer, lambda x, _: torch.zeros_like(x), when)


def mean_ablate(layer: str, mean: torch.Tensor, when: HookWhen = "forward") -> Controller:
    """Replace every position by ``mean`` (typically the layer's mean over a dataset)."""
    _require_vector(mean, "mean_ablate", layer)

    def ablate(x: torch.Tensor, _: HookContext) -> torch.Tensor:
        _require_width(mean, x, "mean_ablate", layer)
        return _broadcast_like(mean, x, "mean_ablate", layer)

    return Controller(layer, ablate, when)


def replace(layer: str, value: torch.Tensor, when: HookWhen = "forward") -> Controller:
    """Replace the value by ``value``, broadcast to the activation's shape (patching)."""
    return Controller(layer, lambda x, _: _broadcast_like(value, x, "replace", layer), when)


def function_controller(
    layer: str, fn: Callable[[torch.Tensor], torch.Tensor], when: HookWhen = "forward"
) -> Controller:
    """Wrap a plain ``tensor -> tensor`` function that does not need the hook context."""
    return Controller(layer, lambda x, _: fn(x), when)


def _require_vector(vector: torch.Tensor, name: str, layer: str) -> None:
    if not isinstance(vector, torch.Tensor) or vector.ndim != 1:
        shape = tuple(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
        raise InvalidInputError(f"{name} on layer {layer!r} needs a 1-D vector, got {shape}")


def _require_width(vector: torch.Tensor, x: torch.Tensor, name: str, layer: str) -> None:
    if vector.shape[-1] != x.shape[-1]:
        raise InvalidInputError(
            f"{name} on layer {layer!r}: vector has width {vector.shape[-1]}, "
            f"the activation {x.shape[-1]} (shape {tuple(x.shape)})",
            details={"layer": layer},
        )


def _broadcast_like(value: torch.Tensor, x: torch.Tensor, name: str, layer: str) -> torch.Tensor:
    """Always a fresh contiguous copy: in-place ops downstream would fail on a stride-0 expanded
    view, and must never write into the caller's tensor."""
    try:
        target = torch.broadcast_to(value.to(device=x.device, dtype=x.dtype), x.shape)
        return target.clone(memory_format=torch.contiguous_format)
    except RuntimeError as exc:
        raise InvalidInputError(
            f"{name} on layer {layer!r}: value of shape {tuple(value.shape)} does not broadcast "
            f"to the activation's shape {tuple(x.shape)}",
            details={"layer": layer},
        ) from exc
