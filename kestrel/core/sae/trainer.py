"""Streaming SAE trainer: activation batches in, a trained SAE (plus history and metrics) out.

The trainer never sees a model. `data(epoch)` returns that epoch's activations as an iterable of
[rows, d_in] tensors of any size; the trainer re-batches them to `batch_size`, so memory stays at
one batch plus one chunk whatever the run's size. The source must return the same rows in the
same order for the same epoch: a resumed run skips the rows its checkpoint had consumed. A
transcoder's rows are its input and target side by side, [rows, d_in + d_out]
(`kestrel.core.sae.transcoder`); its loss and FVU are against the target.

One step: encode (dense scores, k-sparse choice), decode from the chosen rows, loss, backward
(k-sparse for the k-sparse architectures), drop the decoder gradient parallel to its rows, clip,
Adam, renormalise decoder rows, update the tokens-since-fired counters that define dead latents.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kestrel.core.errors import InvalidInputError
from kestrel.core.models import resolve_device
from kestrel.core.sae.base import SAE, LossOutput, LossSettings, create
from kestrel.core.sae.batches import check_chunk, epoch_shape, geometric_median, rebatch
from kestrel.core.sae.checkpoint import LoadedCheckpoint, RunState, read_checkpoint, write_checkpoint
from kestrel.core.sae.config import DEAD_TOKENS_CAP, DEFAULT_BATCH_SIZE, SAEConfig, TrainConfig, default_lr
from kestrel.core.sae.metrics import evaluate
from kestrel.core.sae.progress import TrainingPoint
from kestrel.core.sae.transcoder import check_init, check_resumable, norm_scale, split_rows

DataFn = Callable[[int], Iterable[Tensor]]


@dataclass(frozen=True)
class TrainPlan:
    """Settings derived from the configs and the data size, fixed before the first step."""

    lr: float
    total_steps: int
    total_tokens: int
    warmup_steps: int
    decay_start_step: int
    aux_k: int
    dead_tokens_threshold: int
    l1_warmup_steps: int
    device: str

    def lr_at(self, step: int) -> float:
        """Linear warm-up, flat, then linear decay to (almost) zero at the last step."""
        factor = 1.0
        if step < self.warmup_steps:
            factor = (step + 1) / (self.warmup_steps + 1)
        if step >= self.decay_start_step:
            remaining = max(self.total_steps - step, 1)
            factor = min(factor, remaining / max(self.total_steps - self.decay_start_step, 1))
        return self.lr * factor

    def l1_scale_at(self, step: int) -> float:
        return min(1.0, (step + 1) / self.l1_warmup_steps) if self.l1_warmup_steps else 1.0


@dataclass
class TrainResult:
    """What a run returns; `sae` reads raw activations (the input scale is folded in)."""

    sae: SAE
    config: SAEConfig
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    stopped: bool
    """True when `should_stop` ended the run early (resume from `checkpoint`)."""
    step: int
    tokens: int
    plan: TrainPlan
    checkpoint: Path | None
    """The last checkpoint written, if any."""


def resolve_plan(sae_config: SAEConfig, train_config: TrainConfig, rows_per_epoch: int | None) -> TrainPlan:
    """Fill every "derive from the run" default. Needs the rows per epoch unless a budget is set.
    An unset batch size is `DEFAULT_BATCH_SIZE` here (`artifacts` chooses one from the run first)."""
    batch = train_config.batch_size or DEFAULT_BATCH_SIZE
    if train_config.token_budget is not None:
        total_tokens = train_config.token_budget
        total_steps = math.ceil(total_tokens / batch)
    else:
        if rows_per_epoch is None:
            raise InvalidInputError("rows_per_epoch is needed to plan an epoch-based run")
        steps_per_epoch, rows_used = epoch_shape(rows_per_epoch, batch)
        if steps_per_epoch == 0:
            raise InvalidInputError(
                f"the data has {rows_per_epoch} rows per epoch, fewer than half a batch ({batch // 2}); "
                "lower batch_size or provide more rows",
                details={"rows_per_epoch": rows_per_epoch, "batch_size": batch},
            )
        total_steps = steps_per_epoch * train_config.epochs
        total_tokens = rows_used * train_config.epochs
    warmup = train_config.warmup_steps
    if warmup is None:
        warmup = min(1000, total_steps // 20)
    decay_steps = round(train_config.lr_decay_fraction * total_steps)
    l1_warmup = train_config.l1_warmup_steps
    if l1_warmup is None:
        l1_warmup = total_steps // 20
    dead_threshold = train_config.dead_tokens_threshold
    if dead_threshold is None:
        dead_threshold = min(DEAD_TOKENS_CAP, max(batch, total_tokens // 10))
    device = str(resolve_device(train_config.device or "auto"))  # InvalidInputError: not on this worker
    return TrainPlan(
        lr=train_config.lr or default_lr(sae_config.n_latents, sae_config.d_in),
        total_steps=total_steps,
        total_tokens=total_tokens,
        warmup_steps=warmup,
        decay_start_step=total_steps - decay_steps,
        aux_k=min(train_config.aux_k or max(sae_config.d_in // 2, 1), sae_config.n_latents),
        dead_tokens_threshold=dead_threshold,
        l1_warmup_steps=l1_warmup,
        device=device,
    )


def train_sae(
    sae_config: SAEConfig,
    train_config: TrainConfig,
    data: DataFn,
    *,
    on_progress: Callable[[TrainingPoint], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    checkpoint_dir: Path | None = None,
    resume_from: Path | None = None,
    eval_data: Callable[[], Iterable[Tensor]] | None = None,
    init: SAE | None = None,
    rows_per_epoch: int | None = None,
) -> TrainResult:
    """Train an SAE on the activations `data(epoch)` yields.

    `should_stop` is checked before every step; when it returns True the run writes a checkpoint
    (if `checkpoint_dir` is set) and returns with `stopped=True`. `resume_from` (a checkpoint, or
    a directory of them) continues a run to the weights an uninterrupted one would reach.
    `init` starts from an existing SAE (say, one imported from SAELens) instead of a fresh one.
    `rows_per_epoch` plans the learning-rate schedule of an epoch-based run; without it the
    trainer counts the rows of `data(0)` once (after every check that needs no data).
    `eval_data()` yields held-out rows for the final evaluation stored in `metrics`.
    """
    run = open_run(
        sae_config,
        train_config,
        rows_per_epoch if rows_per_epoch is not None else lambda: count_rows(data(0), sae_config),
        on_progress=on_progress,
        checkpoint_dir=checkpoint_dir,
        resume_from=resume_from,
        init=init,
    )
    stopped = run.train(data, should_stop)
    return run.result(stopped, eval_data)


def open_run(
    sae_config: SAEConfig,
    train_config: TrainConfig,
    rows_per_epoch: int | Callable[[], int] | None,
    *,
    on_progress: Callable[[TrainingPoint], None] | None = None,
    checkpoint_dir: Path | None = None,
    resume_from: Path | None = None,
    init: SAE | None = None,
) -> TrainingRun:
    """A run ready to step: configs checked, plan fixed, fresh or resumed state.

    `train_sae` pulls batches into it; the stream trainer (`kestrel.core.sae.stream`) pushes them
    with `feed`. `rows_per_epoch` may be a function, called only once every check has passed
    (and only when no token budget fixes the plan).
    """
    if train_config.batch_size is None:  # `artifacts` chooses it from the run's size first
        train_config = train_config.model_copy(update={"batch_size": DEFAULT_BATCH_SIZE})
    _check_compatible(sae_config, train_config, init)
    loaded = read_checkpoint(Path(resume_from)) if resume_from is not None else None
    if loaded is not None:
        _check_resumable(loaded, sae_config, train_config)
    if callable(rows_per_epoch):
        rows_per_epoch = rows_per_epoch() if train_config.token_budget is None else None
    plan = resolve_plan(sae_config, train_config, rows_per_epoch)
    run = TrainingRun(sae_config, train_config, plan, on_progress, checkpoint_dir, init)
    if loaded is not None:
        run.resume(loaded)
    return run


def count_rows(chunks: Iterable[Tensor], sae_config: SAEConfig) -> int:
    """Rows in one epoch (one pass over the data; pass `rows_per_epoch` to skip it)."""
    return sum(check_chunk(chunk, sae_config).shape[0] for chunk in chunks)


class TrainingRun:
    """One training run's mutable state and the step that advances it."""

    def __init__(
        self,
        sae_config: SAEConfig,
        train_config: TrainConfig,
        plan: TrainPlan,
        on_progress: Callable[[TrainingPoint], None] | None,
        checkpoint_dir: Path | None,
        init: SAE | None = None,
    ) -> None:
        self.sae_config = sae_config
        self.init = init
        self.train_config = train_config
        self.plan = plan
        self.on_progress = on_progress
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.device = torch.device(plan.device)
        generator = torch.Generator().manual_seed(train_config.seed)
        self.sae = create(sae_config, generator=generator).to(self.device).train()
        self.optimizer = _make_optimizer(self.sae, plan, train_config)
        self.state = RunState(tokens_since_fired_N=self._zeros_N())
        self.initialised = False
        self.last_checkpoint: Path | None = None
        self.last_checkpoint_at = time.monotonic()
        self.started = time.perf_counter()
        self.window = _Window(self.device)

    def _zeros_N(self) -> Tensor:
        return torch.zeros(self.sae_config.n_latents, dtype=torch.int64, device=self.device)

    # -- lifecycle --------------------------------------------------------------------------------

    def resume(self, loaded: LoadedCheckpoint) -> None:
        loaded.restore(self.sae, self.optimizer)
        self.state = loaded.run_state(self.device)
        if self.state.tokens_since_fired_N is None:
            self.state.tokens_since_fired_N = self._zeros_N()
        self.initialised = True
        self.last_checkpoint = loaded.path

    def train(self, data: DataFn, should_stop: Callable[[], bool] | None) -> bool:
        """Run steps until the data or budget is spent (False) or `should_stop` says so (True)."""
        batches = self._batches(data)
        self.start()
        try:
            while not self.budget_spent():
                if should_stop is not None and should_stop():
                    self.stop()
                    return True
                item = next(batches, None)
                if item is None:
                    break
                self.feed(*item)
            self.finish()
            return False
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    def start(self) -> None:
        """Start the clock `elapsed_s` counts (continuing a resumed run's figure)."""
        self.started = time.perf_counter() - self.state.elapsed_s
        self.last_checkpoint_at = time.monotonic()

    def feed(self, epoch: int, rows_in_epoch: int, x_BD: Tensor) -> None:
        """One optimiser step on one batch (`rows_in_epoch`: rows of the epoch consumed with it),
        then the progress report and the checkpoint when they are due."""
        x_BD = x_BD.to(self.device, torch.float32, non_blocking=True)
        if not self.initialised:
            self._initialise(x_BD, self.init)
        self._step(x_BD)
        self.state.epoch, self.state.rows_in_epoch = epoch, rows_in_epoch
        self.state.elapsed_s = time.perf_counter() - self.started
        self._log(force=False)
        if self._checkpoint_due():
            self._checkpoint()

    def stop(self) -> None:
        """End early: report and checkpoint, so a resume continues from here."""
        self.state.elapsed_s = time.perf_counter() - self.started
        self._log(force=True)
        self._checkpoint()

    def finish(self) -> None:
        self._log(force=True)

    def result(self, stopped: bool, eval_data: Callable[[], Iterable[Tensor]] | None) -> TrainResult:
        sae = self.export_sae()
        metrics: dict[str, Any] = {"training": self._training_summary()}
        if eval_data is not None and not stopped:
            metrics.update(evaluate(sae, eval_data()))
        return TrainResult(
            sae=sae,
            config=sae.config,
            history=list(self.state.history),
            metrics=metrics,
            stopped=stopped,
            step=self.state.step,
            tokens=self.state.tokens,
            plan=self.plan,
            checkpoint=self.last_checkpoint,
        )

    def export_sae(self) -> SAE:
        """A copy that reads raw activations: input scale folded in, cast to the config's dtype."""
        sae = copy.deepcopy(self.sae).eval()
        scale, out_scale = self.state.input_scale, self.state.output_scale
        if self.sae_config.normalize_input:
            sae.fold_input_scale(scale, out_scale)
        fields = self.sae_config.model_dump()
        fields["input_scale"] = scale if self.sae_config.normalize_input else None
        fields["output_scale"] = out_scale if self.sae_config.normalize_input else None
        sae.config = SAEConfig(**fields)
        for param in sae.parameters():
            param.requires_grad_(False)
        return sae.to(getattr(torch, self.sae_config.dtype))

    # -- steps ----------------------------------------------------------------------------------

    @torch.no_grad()
    def _initialise(self, rows_BW: Tensor, init: SAE | None) -> None:
        """Data-dependent start: input (and a transcoder's target) scale, then b_dec at the centre
        of what the decoder writes (fresh runs only)."""
        x_BD, target_BD = split_rows(self.sae_config, rows_BW)
        scale, out_scale = 1.0, None
        if self.sae_config.normalize_input:
            scale = norm_scale(x_BD)
            out_scale = norm_scale(target_BD) if target_BD is not None else None
        self.state.input_scale, self.state.output_scale = scale, out_scale
        # what the decoder writes, scaled as training sees it: b_dec starts at its centre
        written_BD = x_BD * scale if target_BD is None else target_BD * (out_scale or 1.0)
        if init is not None:
            _copy_weights(init, self.sae)
            # init reads raw inputs; training sees scaled ones
            self.sae.fold_input_scale(1.0 / scale, None if out_scale is None else 1.0 / out_scale)
            if self.sae.unit_norm_decoder:
                self.sae.normalize_decoder()
        elif self.train_config.b_dec_init == "geometric_median":
            self.sae.b_dec.copy_(geometric_median(written_BD))
        else:
            self.sae.b_dec.copy_(written_BD.double().mean(dim=0).float())
        self.initialised = True

    def _step(self, rows_BW: Tensor) -> None:
        plan, sae, state = self.plan, self.sae, self.state
        x_BD, target_BD = split_rows(self.sae_config, rows_BW)
        x_BD = x_BD * state.input_scale
        if target_BD is not None:
            target_BD = target_BD * (state.output_scale or 1.0)
        lr = plan.lr_at(state.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        assert state.tokens_since_fired_N is not None
        settings = LossSettings(
            dead_N=state.tokens_since_fired_N >= plan.dead_tokens_threshold,
            aux_k=plan.aux_k,
            aux_k_coefficient=self.train_config.aux_k_coefficient,
            l1_scale=plan.l1_scale_at(state.step),
        )
        with _autocast(self.device, self.train_config.autocast):
            if target_BD is None:  # an SAE (a custom architecture may take no target)
                out = sae.training_loss(x_BD, settings)
            else:
                out = sae.training_loss(x_BD, settings, target_BD)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if sae.unit_norm_decoder:
            sae.remove_parallel_decoder_grad()
        if self.train_config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), self.train_config.grad_clip)
        self.optimizer.step()
        if sae.unit_norm_decoder:
            sae.normalize_decoder()
        n_rows = x_BD.shape[0]
        state.tokens_since_fired_N.add_(n_rows).masked_fill_(out.fire_counts_N > 0, 0)
        state.step += 1
        state.tokens += n_rows
        self.window.add(out, n_rows, lr)

    def _checkpoint_due(self) -> bool:
        """Every ``checkpoint_every`` steps, and every ``checkpoint_every_s`` seconds of training."""
        every, every_s = self.train_config.checkpoint_every, self.train_config.checkpoint_every_s
        if every and self.state.step % every == 0:
            return True
        return bool(every_s) and time.monotonic() - self.last_checkpoint_at >= every_s

    def budget_spent(self) -> bool:
        budget = self.train_config.token_budget
        return budget is not None and self.state.tokens >= budget

    # -- data -----------------------------------------------------------------------------------

    def _batches(self, data: DataFn) -> Iterator[tuple[int, int, Tensor]]:
        """(epoch, rows of the epoch consumed after this batch, batch) from the resume point on."""
        epoch, skip = self.state.epoch, self.state.rows_in_epoch
        cycle = self.train_config.token_budget is not None
        while cycle or epoch < self.train_config.epochs:
            produced = False
            chunks = data(epoch)
            for rows_in_epoch, x_BD in rebatch(chunks, self.train_config.batch_size, self.sae_config, skip):
                produced = True
                yield epoch, rows_in_epoch, x_BD
            if not produced and skip == 0:
                raise InvalidInputError(
                    f"data({epoch}) yielded fewer than {self.train_config.batch_size // 2} rows "
                    "(half a batch); nothing to train on",
                    details={"epoch": epoch},
                )
            epoch, skip = epoch + 1, 0

    # -- reporting ------------------------------------------------------------------------------

    def _log(self, *, force: bool) -> None:
        state = self.state
        due = state.step % self.train_config.log_every == 0
        if self.window.steps == 0 or not (due or force):
            return
        assert state.tokens_since_fired_N is not None
        dead = state.tokens_since_fired_N >= self.plan.dead_tokens_threshold
        progress = self.window.progress(state, float(dead.float().mean()), self.plan)
        state.history.append(progress.model_dump())
        if self.on_progress is not None:
            self.on_progress(progress)

    def _checkpoint(self) -> None:
        if self.checkpoint_dir is None or not self.initialised:
            return
        extra = {
            "sae_config": self.sae_config.model_dump(mode="json"),
            "train_config": self.train_config.model_dump(mode="json"),
            "plan": asdict(self.plan),
        }
        keep = self.train_config.keep_checkpoints
        self.last_checkpoint = write_checkpoint(
            self.checkpoint_dir, self.sae, self.optimizer, self.state, extra, keep=keep
        )
        self.last_checkpoint_at = time.monotonic()
        self.window.restart_clock()

    def _training_summary(self) -> dict[str, Any]:
        state = self.state
        assert state.tokens_since_fired_N is not None
        dead = state.tokens_since_fired_N >= self.plan.dead_tokens_threshold
        last = state.history[-1] if state.history else {}
        return {
            "steps": state.step,
            "tokens": state.tokens,
            "elapsed_s": round(state.elapsed_s, 3),
            "tokens_per_s": state.tokens / state.elapsed_s if state.elapsed_s > 0 else None,
            "final_loss": last.get("loss"),
            "final_fvu": last.get("fvu"),
            "final_l0": last.get("l0"),
            "dead_fraction": float(dead.float().mean()),
            "dead_tokens_threshold": self.plan.dead_tokens_threshold,
            "input_scale": state.input_scale,
            "plan": asdict(self.plan),
        }


class _Window:
    """Sums since the last report, kept as tensors so a step never waits for the device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        zero = torch.zeros(4, dtype=torch.float64, device=self.device)
        self.sums = zero  # loss, fvu, l0, aux
        self.steps = 0
        self.tokens = 0
        self.lr = 0.0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.clock = time.perf_counter()
        self.tokens_since_clock = 0

    def add(self, out: LossOutput, n_rows: int, lr: float) -> None:
        figures = [out.loss.detach(), out.fvu, out.l0, out.aux_loss]
        self.sums += torch.stack([f.double() for f in figures])
        self.steps += 1
        self.tokens += n_rows
        self.tokens_since_clock += n_rows
        self.lr = lr

    def progress(self, state: RunState, dead_fraction: float, plan: TrainPlan) -> TrainingPoint:
        loss, fvu, l0, _ = (self.sums / self.steps).tolist()
        seconds = time.perf_counter() - self.clock
        progress = TrainingPoint(
            step=state.step,
            tokens=state.tokens,
            epoch=state.epoch,
            loss=loss,
            fvu=fvu,
            l0=l0,
            dead_fraction=dead_fraction,
            dead_tokens_threshold=plan.dead_tokens_threshold,
            tokens_per_s=self.tokens_since_clock / seconds if seconds > 0 else 0.0,
            lr=self.lr,
            total_steps=plan.total_steps,
            elapsed_s=round(state.elapsed_s, 3),
        )
        self.reset()
        return progress


def _check_compatible(sae_config: SAEConfig, train_config: TrainConfig, init: SAE | None) -> None:
    """Cross-field checks that neither config can make alone; all before any data is read."""
    if not isinstance(sae_config, SAEConfig) or not isinstance(train_config, TrainConfig):
        raise InvalidInputError("train_sae needs an SAEConfig and a TrainConfig")
    if init is not None:
        check_init(sae_config, init.config)
    if train_config.device is not None:
        try:
            device = torch.device(train_config.device)
        except RuntimeError as error:
            raise InvalidInputError(f"unknown device {train_config.device!r}: {error}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidInputError("device 'cuda' was requested but no CUDA device is available")


def _check_resumable(loaded: LoadedCheckpoint, sae_config: SAEConfig, train_config: TrainConfig) -> None:
    check_resumable(loaded.meta, loaded.path.name, sae_config, train_config)


def _make_optimizer(sae: SAE, plan: TrainPlan, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam, fused where the device supports it (several times faster on CPU)."""
    kwargs: dict[str, Any] = {"lr": plan.lr, "betas": config.adam_betas, "eps": config.adam_eps}
    try:
        return torch.optim.Adam(sae.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(sae.parameters(), foreach=True, **kwargs)


def _autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """bf16 autocast on CUDA (the encoder matmul dominates); CPU runs stay in float32.

    Under it the dense encoder matmul runs in bf16; the weights stay float32 (Adam's master copy),
    the k-sparse decode and the sparse backward cast to the weights' float32, and the loss is a
    float32 reduction (the reconstruction is float32). On CUDA, index_add in the sparse backward
    accumulates with atomics, so runs there agree to float tolerance rather than bit for bit; on
    CPU a seed fixes every bit. Nothing in a step reads a value back to the host (the figures
    accumulate in `_Window` until a report), so the host queues steps ahead of the GPU.
    """
    on = enabled and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on)


@torch.no_grad()
def _copy_weights(source: SAE, target: SAE) -> None:
    for name, tensor in source.state_dict().items():
        target.state_dict()[name].copy_(tensor.to(target.state_dict()[name].dtype))
