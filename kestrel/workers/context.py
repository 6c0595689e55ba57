"""What a running job function can reach: settings, store, model cache, progress, the stop flag.

Job functions are thin: they parse their arguments, call the engine and commit. Everything around
that (writing progress to the job's meta a few times a second, polling the cancel key, turning an
engine error into the job's public error, requeueing on a worker shutdown) lives here once, in
the ``job_function`` decorator, so each job function stays a dozen lines.

Redis going away does not stop a running job: a meta save or a cancel check that cannot reach
Redis is skipped and retried with backoff (0.5 s doubling to 10 s), so the engine keeps working
and the latest meta lands once Redis answers again. Each save and check also confirms that the
job is still this worker's: if Redis was unreachable longer than ``heartbeat_ttl_s`` the reaper
may have requeued the job (a training) or failed it. The job then stops at its next check
(a training writes a checkpoint first), touches nothing in Redis, and raises ``Superseded``,
which the worker answers by leaving the job to its new run.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import get_current_job
from rq.job import Job, JobStatus, Retry

from kestrel.core.errors import CancelledError, KestrelError
from kestrel.settings import Settings, get_settings
from kestrel.workers.lifecycle import CANCEL_KEY, CANCEL_PARTS_KEY, LOG_LINES
from kestrel.workers.model_cache import ModelCache

log = logging.getLogger("kestrel.jobs")
F = TypeVar("F", bound=Callable[..., Any])

#: Set when this worker process is shutting down: running jobs stop at their next check and are
#: requeued to continue elsewhere (training from its checkpoint).
SHUTDOWN = threading.Event()
SHUTDOWN_RETRIES = 5
META_SAVE_INTERVAL_S = 0.25
STOP_CHECK_INTERVAL_S = 0.2

#: Redis failures a running job rides out (retried later) rather than dying of.
REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError)
REDIS_RETRY_MIN_S = 0.5
REDIS_RETRY_MAX_S = 10.0

# Set the job's meta only while the job is still this worker's (started, by this worker name):
# the check and the write are one atomic step, so a requeued job's meta is never overwritten.
_SAVE_META_IF_OWNED = """
local owned = redis.call('HMGET', KEYS[1], 'status', 'worker_name')
if owned[1] == ARGV[1] and owned[2] == ARGV[2] then
  redis.call('HSET', KEYS[1], 'meta', ARGV[3])
  return 1
end
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return 0
"""

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
                default_dtype=settings.model_dtype,
                device_map=settings.device_map,
                quantization=settings.quantization,
                local_models=settings.local_models,
                allowed_models=settings.allowed_models,
                hub_timeout_s=settings.hub_timeout_s,
            )
        return _model_cache


class Superseded(Exception):  # noqa: N818 (a state, not an error)
    """The job was requeued or failed while this worker ran it; its new run owns it now."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} was taken from this worker (requeued or failed meanwhile)")
        self.job_id = job_id


class RedisBackoff:
    """When to try Redis next after a failure: 0.5 s, doubling to 10 s, reset by a success."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.delay = 0.0
        self.next_try = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.next_try

    def failed(self, now: float, exc: BaseException) -> None:
        if self.delay == 0.0:
            log.warning("%s: Redis unreachable (%s); retrying with backoff", self.what, exc)
        self.delay = min(max(self.delay * 2, REDIS_RETRY_MIN_S), REDIS_RETRY_MAX_S)
        self.next_try = now + self.delay

    def succeeded(self) -> None:
        if self.delay:
            log.info("%s: Redis reachable again", self.what)
        self.delay, self.next_try = 0.0, 0.0


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
        self.cancelled_parts: set[str] = set()
        """Parts of the job (SAE ids of a stream training) cancelled on their own."""
        self._meta: dict[str, Any] = job.meta if job is not None else {}
        self._log: deque[str] = deque(self._meta.get("log") or [], maxlen=LOG_LINES)
        self._last_save = 0.0
        self._last_stop_check = 0.0
        self._dirty = False
        self.outcome: str | None = None
        """What a finished job made, in a few words: its final message reads ``finished: <outcome>``,
        so the last line a client sees states the final figures (not the last throttled progress)."""
        self._redis = RedisBackoff(f"job {job.id}" if job is not None else "job")

    @property
    def attempt(self) -> int:
        """Which run of this job this is: 1, then 2 after a requeue (shutdown, dead worker)."""
        return int(self._meta.get("attempts") or 1)

    @property
    def superseded(self) -> bool:
        return self.stop_reason == "superseded"

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
        if self.job is None or not self._dirty or self.superseded:
            return
        now = time.monotonic()
        if not (force or now - self._last_save >= META_SAVE_INTERVAL_S) or not self._redis.ready(now):
            return  # throttled, or Redis is down and not due for another try: stays dirty
        try:
            owned = self._save_if_owned()
        except REDIS_ERRORS as exc:
            self._redis.failed(now, exc)
            return
        self._redis.succeeded()
        self._last_save, self._dirty = now, False
        if not owned:
            self._supersede()

    def _save_if_owned(self) -> bool:
        """Write the meta if the job is still ours; False when it was taken from this worker."""
        job = self.job
        assert job is not None
        meta = job.serializer.dumps(self._meta)
        args = (JobStatus.STARTED.value, job.worker_name or "", meta)
        return job.connection.eval(_SAVE_META_IF_OWNED, 1, job.key, *args) != 0

    def flush(self, deadline_s: float = 30.0) -> None:
        """Land the latest meta before the job ends, waiting for Redis up to ``deadline_s``."""
        stop_at = time.monotonic() + deadline_s
        while self._dirty and not self.superseded and time.monotonic() < stop_at:
            self._save(force=True)
            if self._dirty:
                time.sleep(min(max(self._redis.next_try - time.monotonic(), 0.05), 1.0))

    def _supersede(self) -> None:
        if not self.superseded:
            log.warning("job %s: taken from this worker (requeued or failed meanwhile)", self.job.id)
        self.stop_reason = "superseded"

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
            if self._redis.ready(now):
                self._check_redis(now)
        return self.stop_reason is not None

    def part_cancelled(self, part: str) -> bool:
        """True once ``part`` (an SAE id of a stream training) or the whole job was cancelled, or
        the worker is shutting down; as cheap as `should_stop` (the same throttled round trip)."""
        return self.should_stop() or part in self.cancelled_parts

    def _check_redis(self, now: float) -> None:
        """One round trip: the cancel keys, and whether the job is still this worker's."""
        job = self.job
        assert job is not None
        try:
            with job.connection.pipeline(transaction=False) as pipe:
                pipe.exists(CANCEL_KEY.format(job.id))
                pipe.smembers(CANCEL_PARTS_KEY.format(job.id))
                pipe.hmget(job.key, "status", "worker_name")
                cancelled, parts, (status, worker) = pipe.execute()
        except REDIS_ERRORS as exc:
            self._redis.failed(now, exc)
            return
        self._redis.succeeded()
        self.cancelled_parts = {p.decode() if isinstance(p, bytes) else p for p in parts}
        if cancelled:
            self.stop_reason = "cancel"
        elif status is not None and (
            status.decode() != JobStatus.STARTED.value or (worker or b"").decode() != job.worker_name
        ):
            self._supersede()

    def stopped(self, what: str, result: dict[str, Any] | None = None) -> dict[str, Any] | Retry:
        """End a job that stopped on request: canceled for a cancel, requeued for a shutdown."""
        result = dict(result or {})
        if self.superseded:
            assert self.job is not None
            raise Superseded(self.job.id)
        if self.stop_reason == "shutdown":
            self.log(f"worker shutting down: {what}; requeued to continue", force=True)
            self.update(message="requeued: the worker shut down", force=True)
            return Retry(max=SHUTDOWN_RETRIES)
        self.record(outcome="canceled", message=f"canceled: {what}")
        self.log(f"canceled: {what}", force=True)
        return {**result, "status": "canceled"}

    # ---- failure ------------------------------------------------------------------------------

    def fail(self, exc: BaseException) -> None:
        """Record the error a client should read: the engine's message for an engine error; for
        anything else a generic message with an id that finds the traceback in the worker's log.

        The traceback goes to the worker's log only; the job's ``log`` and ``error`` are public
        (any client with the key reads them) and would otherwise show server paths and code.
        """
        if self.superseded:
            return
        job_id = self.job.id if self.job is not None else "-"
        if isinstance(exc, KestrelError):
            log.info("job %s failed: %s", job_id, exc.message)
            redact = _path_redactor(self.settings)
            error = {
                "code": exc.code,
                "message": redact(exc.message),
                "details": _jsonable(exc.details, redact),
            }
        else:
            error_id = uuid.uuid4().hex[:12]
            log.error("job %s failed (error id %s)", job_id, error_id, exc_info=exc)
            error = {
                "code": "internal",
                "message": f"internal error (see the worker log, error id {error_id})",
                "details": {"error_id": error_id},
            }
        self._log.append(f"{time.strftime('%H:%M:%S')} failed: {error['message']}")
        self._meta["log"] = list(self._log)
        self.record(error=error, message=f"failed: {error['message']}")


def _jsonable(details: dict[str, Any], redact: Callable[[str], str] = str) -> dict[str, Any]:
    import json

    return json.loads(redact(json.dumps(details, default=str)))


def _path_redactor(settings: Settings) -> Callable[[str], str]:
    """Replace the server's directories (store, caches, model dirs) in a message with names a
    client may read: an engine message about an uploaded file names the file by where it lies."""
    roots: dict[str, str] = {}
    for root, name in (
        (settings.store_root, "<store>"),
        (settings.s3_cache_dir, "<s3-cache>"),
        *((directory, "<model-dir>") for directory in settings.model_dirs),
    ):
        if root is None:
            continue
        # absolute forms only: a relative root ("data") would also match ordinary words
        for form in {Path(root).expanduser(), Path(root).expanduser().resolve()}:
            if form.is_absolute() and len(form.parts) > 1:
                roots[str(form)] = name
    ordered = sorted(roots, key=len, reverse=True)  # the longest first: a root inside another

    def redact(text: str) -> str:
        for root in ordered:
            text = text.replace(root, roots[root])
        return text

    return redact


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
            if job is not None:  # counted in the job's meta, so a requeued run knows it is one
                ctx._meta["attempts"] = int(ctx._meta.get("attempts") or 0) + 1
            ctx.update(message="started", force=True)
            try:
                result = fn(ctx, *args, **kwargs)
            except CancelledError as exc:
                result = ctx.stopped(exc.message)
            except Superseded:
                raise
            except BaseException as exc:
                ctx.fail(exc)
                ctx.flush()
                raise
            if ctx.superseded:
                raise Superseded(ctx.job.id)  # type: ignore[union-attr]
            if (
                isinstance(result, dict)
                and result.get("status") != "canceled"
                and not isinstance(result, Retry)
            ):
                message = f"finished: {ctx.outcome}" if ctx.outcome else "finished"
                ctx.update(progress=1.0, message=message, force=True)
            ctx.flush()
            return result

        return run  # type: ignore[return-value]

    return wrap
