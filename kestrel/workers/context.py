"""What a running job function can reach: settings, store, model cache, progress, the stop flag.

Job functions are thin: they parse their arguments, call the engine and commit. Everything around
that (writing progress to the job's meta a few times a second, polling the cancel key, turning an
engine error into the job's public error, requeueing on a worker shutdown) lives here once, in
the ``job_function`` decorator, so each job function stays a dozen lines.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from rq import get_current_job
from rq.job import Job, Retry

from kestrel.core.errors import CancelledError, KestrelError
from kestrel.settings import Settings, get_settings
from kestrel.workers.model_cache import ModelCache
from kestrel.workers.queues import CANCEL_KEY, LOG_LINES

log = logging.getLogger("kestrel.jobs")
F = TypeVar("F", bound=Callable[..., Any])

#: Set when this worker process is shutting down: running jobs stop at their next check and are
#: requeued to continue elsewhere (training from its checkpoint).
SHUTDOWN = threading.Event()
SHUTDOWN_RETRIES = 5
META_SAVE_INTERVAL_S = 0.25
STOP_CHECK_INTERVAL_S = 0.2

_cache_lock = threading.Lock()
_model_cache: ModelCache | None = None


def model_cache(settings: Settings | None = None) -> ModelCache:
    """This process's model cache (one per worker process, shared by all its jobs)."""
    global _model_cache
    with _cache_lock:
        if _model_cache is None:
            settings = settings or get_settings()
            _model_cache = ModelCache(
                Path(settings.store_root),
                max_models=settings.worker_max_models,
                default_device=settings.device,
                local_models=settings.local_models,
            )
        return _model_cache


class JobContext:
    """A running job's handle on its meta and its stop flag.

    Meta writes are throttled to one per ``META_SAVE_INTERVAL_S`` (the last one always lands), and
    the cancel key is polled at most every ``STOP_CHECK_INTERVAL_S``, so a training loop may call
    ``update`` and ``should_stop`` every step.
    """

    def __init__(self, kind: str, job: Job | None, settings: Settings) -> None:
        self.kind = kind
        self.job = job
        self.settings = settings
        self.store = settings.open_store()
        self.models = model_cache(settings)
        self.stop_reason: str | None = None
        self._meta: dict[str, Any] = job.meta if job is not None else {}
        self._log: deque[str] = deque(self._meta.get("log") or [], maxlen=LOG_LINES)
        self._last_save = 0.0
        self._last_stop_check = 0.0
        self._dirty = False
        self.outcome: str | None = None
        """What a finished job made, in a few words: its final message reads ``finished: <outcome>``,
        so the last line a client sees states the final figures (not the last throttled progress)."""

    # ---- progress ---------------------------------------------------------------------------

    def update(
        self,
        *,
        progress: float | None = None,
        message: str | None = None,
        metrics: dict[str, Any] | None = None,
        force: bool = False,
    ) -> None:
        if progress is not None:
            self._meta["progress"] = round(min(max(float(progress), 0.0), 1.0), 4)
        if message is not None:
            self._meta["message"] = message
        if metrics is not None:
            self._meta["metrics"] = metrics
        self._dirty = True
        self._save(force)

    def log(self, line: str, *, force: bool = False) -> None:
        log.info("job %s: %s", self.job.id if self.job else "-", line)
        self._log.append(f"{time.strftime('%H:%M:%S')} {line}")
        self._meta["log"] = list(self._log)
        self._dirty = True
        self._save(force)

    def record(self, **fields: Any) -> None:
        """Set meta fields (artifacts, outcome, error) and save at once."""
        self._meta.update(fields)
        self._dirty = True
        self._save(force=True)

    def _save(self, force: bool) -> None:
        if self.job is None or not self._dirty:
            return
        now = time.monotonic()
        if force or now - self._last_save >= META_SAVE_INTERVAL_S:
            self.job.save_meta()
            self._last_save, self._dirty = now, False

    # ---- stopping -----------------------------------------------------------------------------

    def should_stop(self) -> bool:
        """True once the job was cancelled or the worker is shutting down (cheap; call every step)."""
        if self.stop_reason is not None:
            return True
        if SHUTDOWN.is_set():
            self.stop_reason = "shutdown"
            return True
        now = time.monotonic()
        if self.job is not None and now - self._last_stop_check >= STOP_CHECK_INTERVAL_S:
            self._last_stop_check = now
            if self.job.connection.exists(CANCEL_KEY.format(self.job.id)):
                self.stop_reason = "cancel"
        return self.stop_reason is not None

    def stopped(self, what: str, result: dict[str, Any] | None = None) -> dict[str, Any] | Retry:
        """End a job that stopped on request: canceled for a cancel, requeued for a shutdown."""
        result = dict(result or {})
        if self.stop_reason == "shutdown":
            self.log(f"worker shutting down: {what}; requeued to continue", force=True)
            self.update(message="requeued: the worker shut down", force=True)
            return Retry(max=SHUTDOWN_RETRIES)
        self.record(outcome="canceled", message=f"canceled: {what}")
        self.log(f"canceled: {what}", force=True)
        return {**result, "status": "canceled"}

    # ---- failure ------------------------------------------------------------------------------

    def fail(self, exc: BaseException) -> None:
        """Record the error a client should read (the engine's message, never a traceback)."""
        if isinstance(exc, KestrelError):
            error = {"code": exc.code, "message": exc.message, "details": _jsonable(exc.details)}
        else:
            error = {"code": "internal", "message": f"{type(exc).__name__}: {exc}", "details": {}}
        for chunk in traceback.format_exception(exc)[-12:]:
            self._log.extend(chunk.rstrip().splitlines())
        self._meta["log"] = list(self._log)
        self.record(error=error, message=f"failed: {error['message']}")


def _jsonable(details: dict[str, Any]) -> dict[str, Any]:
    import json

    return json.loads(json.dumps(details, default=str))


def job_function(kind: str) -> Callable[[F], F]:
    """Run a job function with a ``JobContext`` as its first argument and the shared bookkeeping.

    An engine error fails the job with its message (the job's ``error``); a CancelledError ends it
    as canceled (or requeued on shutdown); a result is recorded as finished.
    """

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            job = get_current_job()
            ctx = JobContext(kind, job, get_settings())
            ctx._meta.pop("error", None)  # a retried job starts clean
            ctx.update(message="started", force=True)
            try:
                result = fn(ctx, *args, **kwargs)
            except CancelledError as exc:
                return ctx.stopped(exc.message)
            except BaseException as exc:
                ctx.fail(exc)
                raise
            if (
                isinstance(result, dict)
                and result.get("status") != "canceled"
                and not isinstance(result, Retry)
            ):
                message = f"finished: {ctx.outcome}" if ctx.outcome else "finished"
                ctx.update(progress=1.0, message=message, force=True)
            return result

        return run  # type: ignore[return-value]

    return wrap
