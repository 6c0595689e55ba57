"""Hyperparameters of an SAE (what it is) and of its training run (how it was made).

Both are pydantic models so that one definition serves the Python API, the HTTP schema and the
saved `config.json`. Constructing either with a bad value raises `InvalidInputError` naming the
field and the reason, so a job fails before it reads any data.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from kestrel.core.catalog import DEVICE_FIELD_PATTERN
from kestrel.core.config import EngineConfig

# Re-exported: defined in the torch-free module, still importable from here.
from kestrel.core.config import invalid_config as invalid_config
from kestrel.core.errors import InvalidInputError, close_matches

#: The dtype an SAE's weights are kept in, by torch's names: what every saved config.json and the
#: API have always used, so it stays apart from the short model/storage names (`catalog.DType`).
SAEDType = Literal["float32", "float16", "bfloat16"]
DType = SAEDType  # the older name

#: A latent that has not fired for this many tokens is dead, unless the run is too short for
#: that to mean anything (see `TrainConfig.dead_tokens_threshold`). The figure follows sparsify.
DEAD_TOKENS_CAP = 10_000_000
DEFAULT_BATCH_SIZE = 4096  # rows per step when the run is large enough (see artifacts.choose_batch_size)

#: Checkpoint a training run every minute of training by default: a SIGKILLed worker, a lost
#: machine or an OOM then costs at most about this much work (the job resumes from the checkpoint).
DEFAULT_CHECKPOINT_EVERY_S = 60.0


class SAEConfig(EngineConfig):
    """What the autoencoder is: shape, sparsity mechanism and where its training data came from.

    `k` applies to the k-sparse architectures (topk, batchtopk), `l1_coefficient` to relu_l1 and
    `l0_coefficient` to jumprelu; each architecture fills its own default and rejects the others'
    fields, so a saved config never carries a knob that had no effect.

    An imported SAE (``data.imported_from`` set) records only what its files say: no default is
    filled in for a training knob (`l1_coefficient`, `l0_coefficient`) or `normalize_input`, which
    stay None when the file does not give them. `k` is never optional where it applies: it is
    part of how a k-sparse SAE encodes.
    """

    architecture: str = Field("topk", description="topk, batchtopk, relu_l1 or jumprelu")
    d_in: int = Field(gt=0, description="width of the activations the SAE reads")
    n_latents: int = Field(gt=0, description="dictionary size")
    k: int | None = Field(default=None, description="active latents per row (topk) or on average (batchtopk)")
    l1_coefficient: float | None = Field(default=None, description="sparsity penalty weight (relu_l1)")
    l0_coefficient: float | None = Field(
        default=None, description="weight of the L0 penalty on active latents per row (jumprelu)"
    )
    normalize_input: bool | None = Field(
        default=True,
        description=(
            "train on inputs scaled so their mean norm is sqrt(d_in), which makes the default learning "
            "rate and L1 coefficient work across layers; the factor is folded into the saved weights "
            "(None on an imported SAE whose files do not say)"
        ),
    )
    input_scale: float | None = Field(
        default=None,
        gt=0,
        description="the factor applied to inputs during training, already folded into the weights (record)",
    )
    dtype: SAEDType = "float32"
    model: str | None = None
    layer: str | None = None
    run_id: str | None = None
    data: dict[str, Any] = Field(default_factory=dict, description="which rows trained it (filters, splits)")
    # -- transcoders: the decoder predicts another layer (an MLP's output from its input)
    target_layer: str | None = Field(
        default=None,
        description="a transcoder: the layer its decoder predicts (None: an SAE reconstructs `layer`)",
    )
    d_out: int | None = Field(
        default=None, gt=0, description="a transcoder: width of the target layer (None: d_in)"
    )
    skip: bool = Field(
        default=False, description="a skip-transcoder: adds a linear term W_skip·x to the prediction"
    )
    output_scale: float | None = Field(
        default=None,
        gt=0,
        description="a transcoder: the factor applied to targets during training, folded in (record)",
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_architecture_defaults(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        rules = architecture_rules(values.get("architecture", "topk"))
        filled = dict(values)
        if is_imported(filled):
            return filled  # record only what the files said (`check` still requires k)
        for key, default in rules.defaults.items():
            if filled.get(key) is None:
                filled[key] = default
        return filled

    @model_validator(mode="after")
    def _check_architecture(self) -> SAEConfig:
        architecture_rules(self.architecture).check(self)
        check_transcoder_fields(self)
        return self

    @property
    def is_transcoder(self) -> bool:
        """Whether the decoder predicts another layer than the one the encoder reads."""
        return self.target_layer is not None or self.d_out is not None or self.skip

    @property
    def kind(self) -> Literal["sae", "transcoder", "skip_transcoder"]:
        if self.skip:
            return "skip_transcoder"
        return "transcoder" if self.is_transcoder else "sae"

    @property
    def output_width(self) -> int:
        """Width of what the decoder writes: the target layer's (d_out), else the input's."""
        return self.d_out if self.d_out is not None else self.d_in

    @property
    def row_width(self) -> int:
        """Width of a training row: a transcoder trains on input and target side by side."""
        return self.d_in + self.output_width if self.is_transcoder else self.d_in

    def validate_against(self, d_in: int, *, source: str = "the data") -> None:
        """Fail early when the activations to be read have a different width from this SAE."""
        if d_in != self.d_in:
            raise InvalidInputError(
                f"d_in mismatch: the SAE reads vectors of width {self.d_in} but {source} has width {d_in}",
                details={"sae_d_in": self.d_in, "data_d_in": d_in},
            )


#: The architectures a transcoder trains with: the k-sparse ones, whose loss (FVU + AuxK) is the
#: base class's and so reads a target as readily as the input. Others may be imported (SAELens's
#: ReLU and JumpReLU transcoders) and run, not trained.
TRANSCODER_TRAINABLE = ("topk", "batchtopk")


def check_transcoder_fields(config: SAEConfig) -> None:
    """A transcoder's fields agree: d_out and skip need a target, and training needs a k-sparse
    architecture (an import records whatever its files say)."""
    if not config.is_transcoder:
        return
    imported = is_imported({"data": config.data})
    if config.target_layer is None and not imported:
        raise ValueError("d_out and skip describe a transcoder: give target_layer, the layer it predicts")
    if not imported and config.architecture not in TRANSCODER_TRAINABLE:
        raise ValueError(
            f"a transcoder trains with architecture {' or '.join(TRANSCODER_TRAINABLE)}, "
            f"not {config.architecture!r}"
        )


def is_imported(values: dict[str, Any]) -> bool:
    """Whether raw config values describe an SAE imported from files (``data.imported_from``)."""
    data = values.get("data")
    return isinstance(data, dict) and bool(data.get("imported_from"))


# ---------------------------------------------------------------------------------------------
# What each architecture accepts, without importing it (torch)


@dataclass(frozen=True)
class ArchitectureRules:
    """The config an architecture takes: defaults for its knobs, and a check that raises ValueError."""

    defaults: dict[str, Any]
    check: Callable[[SAEConfig], None]


#: The sparsity knobs; an architecture accepts those in its defaults and rejects the others.
SPARSITY_KNOBS = ("k", "l1_coefficient", "l0_coefficient")


def check_knobs(architecture: str, defaults: dict[str, Any], config: SAEConfig) -> None:
    """A knob the architecture has no default for does not apply to it (`SAE.check_config`)."""
    for field in SPARSITY_KNOBS:
        if field not in defaults and getattr(config, field) is not None:
            raise ValueError(f"{field} does not apply to architecture {architecture!r}")


def check_k(config: SAEConfig) -> None:
    """k must select at least one latent and no more than exist."""
    if config.k is None or config.k <= 0:
        raise ValueError(f"k must be a positive number of active latents, got {config.k}")
    if config.k > config.n_latents:
        raise ValueError(f"k ({config.k}) cannot exceed n_latents ({config.n_latents})")


def check_l1_coefficient(config: SAEConfig) -> None:
    """Positive; None only on an imported SAE (a training config has its default filled in)."""
    if config.l1_coefficient is None and not is_imported({"data": config.data}):
        raise ValueError("l1_coefficient must be positive, got None")
    if config.l1_coefficient is not None and not config.l1_coefficient > 0:
        raise ValueError(f"l1_coefficient must be positive, got {config.l1_coefficient}")


def check_l0_coefficient(config: SAEConfig) -> None:
    """Positive; None only on an imported SAE (as `check_l1_coefficient`)."""
    if config.l0_coefficient is None and not is_imported({"data": config.data}):
        raise ValueError("l0_coefficient must be positive, got None")
    if config.l0_coefficient is not None and not config.l0_coefficient > 0:
        raise ValueError(f"l0_coefficient must be positive, got {config.l0_coefficient}")


def _builtin(name: str, defaults: dict[str, Any], check: Callable[[SAEConfig], None]) -> ArchitectureRules:
    def check_all(config: SAEConfig) -> None:
        check_knobs(name, defaults, config)
        check(config)

    return ArchitectureRules(defaults, check_all)


#: The built-in architectures' rules, which their classes (topk.py, ...) use too (a test holds
#: them equal), so a config is checked the same with or without the engine loaded.
BUILTIN_ARCHITECTURES: dict[str, ArchitectureRules] = {
    "topk": _builtin("topk", {"k": 32}, check_k),
    "batchtopk": _builtin("batchtopk", {"k": 32}, check_k),
    "relu_l1": _builtin("relu_l1", {"l1_coefficient": 2.0}, check_l1_coefficient),
    # SAELens's default l0_coefficient, on the same loss scale (summed squared error per row of
    # inputs normalised to mean norm sqrt(d_in)).
    "jumprelu": _builtin("jumprelu", {"l0_coefficient": 1.0}, check_l0_coefficient),
}


def unknown_architecture(name: str, known: list[str]) -> InvalidInputError:
    suggestions = close_matches(name, known)
    hint = f"; did you mean {suggestions[0]!r}?" if suggestions else ""
    return InvalidInputError(
        f"unknown SAE architecture {name!r} (known: {', '.join(known)}){hint}",
        details={"architecture": name, "known": known},
    )


def architecture_rules(name: str) -> ArchitectureRules:
    """How ``name`` is configured. Without the engine loaded only the built-in architectures can
    exist (another registers itself through ``kestrel.core.sae.base``), so the API process checks
    a config without torch; with it, the registry answers, custom architectures included."""
    base = sys.modules.get("kestrel.core.sae.base")
    if base is not None and hasattr(base, "lookup_architecture"):
        sae_class = base.lookup_architecture(name)
        return ArchitectureRules(sae_class.config_defaults, sae_class.check_config)
    if name not in BUILTIN_ARCHITECTURES:
        raise unknown_architecture(name, sorted(BUILTIN_ARCHITECTURES))
    return BUILTIN_ARCHITECTURES[name]


def default_lr(n_latents: int, d_in: int) -> float:
    """Adam learning rate for a width and input size: 2e-4 at 16k latents and d_in=768.

    ∝ 1/sqrt(n_latents) is the fit of Gao et al. (2024), made at GPT-2 small's d_in=768. The extra
    ∝ 1/sqrt(d_in) keeps the angle a unit decoder row turns per step the same across input sizes:
    Adam moves each coordinate by about lr, and a unit row's coordinates are about 1/sqrt(d_in).
    At d_in=576 and 4608 latents this gives 4.4e-4; at d_in=64 and 1024 latents 2.8e-3.
    """
    return 2e-4 * math.sqrt(2**14 / n_latents) * math.sqrt(768 / d_in)


class TrainConfig(EngineConfig):
    """How the SAE is trained. `None` means "derive from the run" (see `resolve_plan`)."""

    lr: float | None = Field(default=None, gt=0, description="Adam learning rate; default scales with width")
    batch_size: int | None = Field(
        default=None,
        gt=0,
        description="rows per optimiser step; default 4096, halved on small runs down to 128 so that "
        "training takes at least 500 steps (see kestrel.core.sae.artifacts.choose_batch_size)",
    )
    epochs: int = Field(default=1, gt=0, description="passes over the data, unless token_budget is set")
    token_budget: int | None = Field(
        default=None, gt=0, description="train on this many rows, cycling epochs as needed; overrides epochs"
    )
    warmup_steps: int | None = Field(
        default=None, ge=0, description="linear learning-rate warm-up; default 5% of steps, at most 1000"
    )
    lr_decay_fraction: float = Field(
        default=0.2, ge=0, le=1, description="the learning rate falls linearly to 0 over this final part"
    )
    aux_k_coefficient: float = Field(default=1 / 32, ge=0, description="weight of the AuxK dead-latent loss")
    aux_k: int | None = Field(default=None, gt=0, description="dead latents used by AuxK; default d_in // 2")
    dead_tokens_threshold: int | None = Field(
        default=None,
        gt=0,
        description=(
            "a latent is dead after this many tokens without firing; default min(10M, a tenth of the run), "
            "so that a short run still sees (and revives) dead latents"
        ),
    )
    l1_warmup_steps: int | None = Field(
        default=None,
        ge=0,
        description="relu_l1 (L1), jumprelu (L0): the penalty weight ramps up linearly; default 5% of steps",
    )
    grad_clip: float | None = Field(default=1.0, gt=0, description="max global gradient norm (None: off)")
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(default=6.25e-10, gt=0)
    seed: int = 0
    b_dec_init: Literal["mean", "geometric_median"] = "mean"
    checkpoint_every: int | None = Field(default=None, gt=0, description="steps between checkpoints")
    checkpoint_every_s: float | None = Field(
        default=DEFAULT_CHECKPOINT_EVERY_S,
        gt=0,
        description=(
            "seconds of training between checkpoints (None: off), besides checkpoint_every; a killed "
            "worker's training resumes from the last one, so this bounds the work a crash loses"
        ),
    )
    keep_checkpoints: int = Field(default=2, gt=0)
    log_every: int = Field(default=10, gt=0, description="steps per history line and progress report")
    device: str | None = Field(
        default=None,
        pattern=DEVICE_FIELD_PATTERN,
        description="'cpu', 'cuda', 'cuda:1'; default cuda when present",
    )
    autocast: bool = Field(default=True, description="bf16 autocast for the encoder matmul (CUDA only)")

    @model_validator(mode="after")
    def _check_betas(self) -> TrainConfig:
        if not all(0 <= beta < 1 for beta in self.adam_betas):
            raise ValueError(f"adam_betas must lie in [0, 1), got {self.adam_betas}")
        return self

    def same_trajectory(self, other: TrainConfig) -> bool:
        """Whether resuming under `other` continues this run (bookkeeping fields may differ)."""
        ignored = {"checkpoint_every", "checkpoint_every_s", "keep_checkpoints", "log_every", "device"}
        return self.model_dump(exclude=ignored) == other.model_dump(exclude=ignored)

    def check_one_pass(self, index: int) -> None:
        """A stream trains in one pass over its dataset: refuse more epochs (the API before it
        queues the job, the engine before its first forward), naming ``saes[index]``."""
        if self.epochs != 1 and self.token_budget is None:
            raise InvalidInputError(
                f"saes[{index}].train.epochs is {self.epochs}: a stream is one pass; spill the run and "
                "train on the stored run for more epochs",
                details={"index": index, "epochs": self.epochs},
            )
