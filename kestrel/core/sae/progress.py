"""One training progress point: what the trainer reports at each log step.

The one definition of it: the trainer emits a `TrainingPoint` to its `on_progress` callback and
appends its `model_dump()` to the run's history (history.jsonl, one line per point); the training
job reports its fields as the job's metrics; ``GET /v1/saes/{id}/history`` serves the lines back
as these points (``kestrel.schemas.TrainingPoint`` is this class).

Torch-free: the API process reads histories with it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["TrainingPoint"]


class TrainingPoint(BaseModel):
    """One log step of an SAE's training (the trainer's progress report)."""

    # Means are over the window of steps since the previous point.
    # A history line may carry figures this version does not name; reading it keeps them.
    model_config = ConfigDict(extra="allow", frozen=True)

    step: int = Field(description="optimiser steps taken so far")
    tokens: int = Field(description="rows trained on so far")
    # Not finite on a diverging step; null in JSON, which has no NaN.
    loss: float | None = Field(
        description="training objective (FVU + AuxK, or MSE + L1), mean over the window"
    )
    fvu: float | None = Field(description="batch FVU, mean over the window")
    l0: float | None = Field(description="non-zero latents per row, mean over the window")
    dead_fraction: float | None = Field(
        description="latents silent for dead_tokens_threshold tokens or more, at this step"
    )
    lr: float | None = Field(None, description="learning rate of the last step")
    elapsed_s: float | None = Field(
        None,
        description="seconds of training so far, across resumes (what a crash after this point would "
        "redo, counted from the last checkpoint's figure)",
    )
    epoch: int | None = Field(None, description="the pass over the data this step belongs to, from 0")
    dead_tokens_threshold: int | None = Field(
        None, description="tokens without firing that make a latent dead"
    )
    tokens_per_s: float | None = Field(
        None, description="throughput over the window (wall clock, data reading included)"
    )
    total_steps: int | None = Field(None, description="planned steps for the whole run")

    @property
    def fraction(self) -> float | None:
        """How far through the run this point is (None when the plan is unknown)."""
        return self.step / self.total_steps if self.total_steps else None

    def headline(self) -> str:
        """One line for logs and job messages; a value that was not finite reads 'n/a'."""

        def show(value: float | None, spec: str) -> str:
            return "n/a" if value is None else format(value, spec)

        loss, fvu, l0 = show(self.loss, ".4g"), show(self.fvu, ".3f"), show(self.l0, ".1f")
        return f"step {self.step}: loss {loss}, fvu {fvu}, l0 {l0}"
