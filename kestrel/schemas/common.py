"""Errors, pages, health and jobs: the shapes every resource shares."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field

# Torch-free modules only: the API process imports this one (tests/unit/test_torch_free.py).

T = TypeVar("T")

JobState = Literal["queued", "started", "finished", "failed", "canceled"]
TERMINAL_STATES: frozenset[str] = frozenset({"finished", "failed", "canceled"})

# `datasets.load_dataset` builders that read local files: useless without data_files and unsafe with.
PACKAGED_BUILDERS = frozenset(
    {"json", "csv", "parquet", "text", "arrow", "pandas", "sql", "xml", "webdataset", "generator", "hdf5"}
    | {"imagefolder", "audiofolder", "videofolder", "pdffolder", "niftifolder", "folder_based_builder"}
)


# ---------------------------------------------------------------------------------------------
# Errors and pages


class ErrorBody(BaseModel):
    code: str = Field(description="machine-readable: not_found, invalid_input, limit_exceeded, ...")
    message: str = Field(description="what was wrong and, where known, what would be right")
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorResponse(BaseModel):
    """The one shape of every 4xx and 5xx answer."""

    error: ErrorBody


class Page(BaseModel, Generic[T]):
    """One page of a list: ``items[offset : offset + limit]`` of ``total``."""

    items: list[T]
    total: int
    limit: int
    offset: int


# ---------------------------------------------------------------------------------------------
# Health


class HealthStatus(BaseModel):
    status: Literal["ok"] = "ok"
    version: str


class ReadyStatus(BaseModel):
    status: Literal["ready"] = "ready"
    redis: bool
    workers: dict[str, int] = Field(description="live workers per queue")


# ---------------------------------------------------------------------------------------------
# Jobs


class JobInfo(BaseModel):
    """A queued or finished unit of work, as a client sees it."""

    id: str
    kind: str
    queue: str
    status: JobState
    progress: float = Field(0.0, ge=0.0, le=1.0)
    message: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict, description="latest metrics reported")
    log: list[str] = Field(default_factory=list, description="the last lines of the job's log")
    error: ErrorBody | None = None
    artifacts: dict[str, str | list[str]] = Field(
        default_factory=dict,
        description="ids of what the job makes or made, e.g. run_id, sae_id (sae_ids: a stream training's)",
    )
    result: dict[str, Any] | None = Field(None, description="the job's return value once finished")
    created_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    location: str = Field(description="where to poll this job")
    cancel_requested: bool = Field(
        False,
        description="a cancel was asked for and the job has not stopped yet: it reads started "
        "until its next step, then canceled",
    )


class JobPage(Page[JobInfo]):
    pass
