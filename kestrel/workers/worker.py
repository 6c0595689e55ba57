"""The Kestrel worker: rq's in-process worker, plus heartbeats, cooperative stop and a model cache.

Why not rq's stock workers:

- ``Worker`` forks a work horse per job, so every job reloads its model (seconds) and forking after
  CUDA initialisation is unsafe. Jobs here run in the worker process, so the model cache
  (``context.model_cache``) survives between jobs.
- ``SimpleWorker`` runs in-process but heartbeats only when a job ends and registers the job with
  a ttl of its whole timeout: a SIGKILLed worker's job would read "started" for days. Here a
  background thread refreshes worker, execution and job heartbeats every ``heartbeat_interval_s``
  with a ttl of ``heartbeat_ttl_s``, so a dead worker's job expires within that ttl and the reaper
  (which the same thread runs, as does the API) fails it with a reason.
- SIGTERM/SIGINT ask for a warm shutdown: the running job sees ``should_stop()`` at its next step
  (training saves a checkpoint) and is requeued to continue; then the worker exits.
- Redis going away (restarted, network cut) is ridden out instead of ending the process: the
  running job keeps running (``context``: meta saves and cancel checks retry with backoff), the
  heartbeat thread keeps trying every ``heartbeat_interval_s``, and rq's own bookkeeping (job
  start, success or failure, worker state, the idle loop) waits for Redis with backoff (0.5 s
  doubling to 10 s) and then goes on. A job that ends while Redis is down keeps its result in
  memory (its artifact is already in the store) and records it once Redis answers, unless the
  job was requeued or failed meanwhile (Redis gone longer than ``heartbeat_ttl_s``): then the
  job belongs to its new run and this worker leaves it alone.

What happens when it is killed: SIGKILL (or OOM, power loss) stops the heartbeats; after
``heartbeat_ttl_s`` the reaper (``reaper``) requeues a running training, which resumes from its
last checkpoint, and fails any other running job with ``worker_died``. ``kestrel up`` restarts the
process; under compose, its restart policy does.

The same thread publishes a small liveness record (``kestrel:worker:<name>``: queues, state,
current job, loaded models) that ``/ready`` and ``GET /v1/models`` read, and applies model unload
requests.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from redis import Redis
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.timeouts import JobTimeoutException
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus

from kestrel.core.loading import LoadConfig, parse_gpu_ids, require_packages
from kestrel.settings import Settings, get_settings
from kestrel.workers import lifecycle, registry
from kestrel.workers.context import (
    REDIS_ERRORS,
    REDIS_RETRY_MAX_S,
    REDIS_RETRY_MIN_S,
    SHUTDOWN,
    RedisBackoff,
    Superseded,
    model_cache,
)
from kestrel.workers.reaper import reap

log = logging.getLogger("kestrel.worker")
T = TypeVar("T")


class KestrelWorker(SimpleWorker):
    """An rq ``SimpleWorker`` with short-ttl heartbeats, a liveness record, cooperative stop, and
    bookkeeping that waits for Redis rather than dying without it."""

    # rq's own reconnect loop while idle (it doubles from 1 s): cap it like ours.
    max_connection_wait_time = REDIS_RETRY_MAX_S

    def __init__(
        self, queue_names: list[str], *, connection: Redis, settings: Settings, **kwargs: Any
    ) -> None:
        # worker_ttl bounds how long an idle worker blocks on the queue between rq heartbeats.
        super().__init__(
            queue_names, connection=connection, worker_ttl=max(30, settings.heartbeat_ttl_s), **kwargs
        )
        self.settings = settings
        self._running: tuple[Job, Any] | None = None
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None

    # ---- heartbeats ---------------------------------------------------------------------------

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """Short on purpose: a job whose worker is silent this long is declared dead by the reaper."""
        return int(self.settings.heartbeat_ttl_s)

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)
        self._publish()
        self._beat_thread = threading.Thread(target=self._beat, name="kestrel-heartbeat", daemon=True)
        self._beat_thread.start()

    def _beat(self) -> None:
        """Every ``heartbeat_interval_s``: heartbeats, liveness record, unloads, reaper. A tick that
        cannot reach Redis is logged once and retried at the next tick (the redis client
        reconnects by itself), so heartbeats resume as soon as Redis is back."""
        backoff = RedisBackoff("heartbeat")
        while not self._beat_stop.wait(self.settings.heartbeat_interval_s):
            try:
                running = self._running
                if running is not None:
                    self.maintain_heartbeats(*running)
                self._publish()
                model_cache(self.settings).apply_unload_requests(self._unload_requests())
                reap(self.connection, lock_ms=int(self.settings.reaper_interval_s * 800))
                backoff.succeeded()
            except REDIS_ERRORS as exc:
                backoff.failed(time.monotonic(), exc)
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)

    def _publish(self) -> None:
        """Write this worker's liveness record; it expires unless refreshed."""
        running = self._running
        record = {
            "name": self.name,
            "queues": self.queue_names(),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "state": "busy" if running else "idle",
            "job_id": running[0].id if running else None,
            "models": model_cache(self.settings).describe(),
            "at": time.time(),
        }
        ttl = max(3 * self.settings.heartbeat_interval_s, 10)
        with self.connection.pipeline() as pipe:
            pipe.set(registry.WORKER_KEY.format(self.name), json.dumps(record), ex=int(ttl))
            pipe.sadd(registry.WORKERS_SET, self.name)
            pipe.execute()

    def _unload_requests(self) -> dict[str, float]:
        raw = self.connection.hgetall(lifecycle.UNLOAD_HASH)
        return {k.decode(): float(v) for k, v in raw.items()}

    # ---- jobs -----------------------------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run the job in this process (as SimpleWorker does) with heartbeats flowing meanwhile."""
        model_cache(self.settings).apply_unload_requests(self._until_redis(self._unload_requests))
        execution = self._until_redis(lambda: self.prepare_execution(job))
        self._running = (job, execution)
        self._until_redis(self._publish)
        try:
            self.perform_job(job, queue, execution)
        finally:
            self._running = None
        self.set_state(WorkerStatus.IDLE)
        self._until_redis(self._publish)

    def perform_job(self, job: Job, queue: Queue, execution: Any) -> bool:
        """rq's ``perform_job``, with the bookkeeping after the job waiting for Redis.

        rq records a result right after the job returns and, if Redis is unreachable then, fails
        the job and ends the worker. Here the result waits (the artifact is in the store already)
        until Redis answers, and is recorded only if the job is still this worker's.
        """
        self._until_redis(lambda: self.prepare_job_execution(job, len(self.queues) == 1))
        job.started_at = now()
        timeout = job.timeout or self.queue_class.DEFAULT_TIMEOUT
        try:
            with self.death_penalty_class(timeout, JobTimeoutException, job_id=job.id):
                return_value = job.perform()
        except Superseded as exc:
            log.warning("%s; leaving it to its new run", exc)
            self._let_go(job, execution)
            return False
        except BaseException:
            exc_info = sys.exc_info()
            self._record(job, execution, lambda: self._finalize_failure(job, queue, execution, exc_info))
            return False
        self._record(job, execution, lambda: self._finalize_success(job, queue, execution, return_value))
        return True

    def _record(self, job: Job, execution: Any, finalize: Callable[[], None]) -> None:
        """Run rq's success or failure bookkeeping once Redis answers, if the job is still ours."""
        while True:
            owned = self._until_redis(lambda: self._still_owns(job), f"job {job.id}: recording its outcome")
            if not owned:
                log.warning("job %s was requeued or failed while Redis was unreachable", job.id)
                self._let_go(job, execution)
                return
            try:
                job.save_meta()  # the job's last progress, if it could not land while Redis was away
                finalize()
                return
            except REDIS_ERRORS as exc:  # cut off again halfway: the pipeline is all or nothing
                log.warning("job %s: recording its outcome failed (%s); retrying", job.id, exc)
                time.sleep(REDIS_RETRY_MIN_S)

    def _still_owns(self, job: Job) -> bool:
        status, worker = self.connection.hmget(job.key, "status", "worker_name")
        if status is None:  # the job's hash is gone (expired, deleted): nothing to protect
            return True
        return status.decode() == JobStatus.STARTED.value and (worker or b"").decode() == self.name

    def _let_go(self, job: Job, execution: Any) -> None:
        """Forget this worker's execution of a job that now belongs to another run."""
        try:
            with self.connection.pipeline() as pipe:
                self.cleanup_execution(job, pipeline=pipe, execution=execution)
                pipe.execute()
        except REDIS_ERRORS as exc:
            log.warning("job %s: could not remove this worker's execution record: %s", job.id, exc)

    # ---- riding out Redis outages -----------------------------------------------------------------

    def _until_redis(self, call: Callable[[], T], what: str = "worker bookkeeping") -> T:
        """``call()``, retried with backoff (0.5 s doubling to 10 s) while Redis is unreachable."""
        delay = REDIS_RETRY_MIN_S
        while True:
            try:
                return call()
            except REDIS_ERRORS as exc:
                log.warning("%s: Redis unreachable (%s); retrying in %.1f s", what, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, REDIS_RETRY_MAX_S)

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        if pipeline is not None:  # part of a pipeline its caller executes (and retries)
            return super().heartbeat(timeout, pipeline)
        return self._until_redis(lambda: super(KestrelWorker, self).heartbeat(timeout))

    def set_state(self, state: str, pipeline: Any = None) -> None:
        if pipeline is not None:
            return super().set_state(state, pipeline)
        return self._until_redis(lambda: super(KestrelWorker, self).set_state(state))

    def check_for_suspension(self, burst: bool) -> None:
        return self._until_redis(lambda: super(KestrelWorker, self).check_for_suspension(burst))

    def run_maintenance_tasks(self) -> None:
        return self._until_redis(super().run_maintenance_tasks)

    def clean_registries(self) -> None:
        """rq's registry cleanup fails every expired job as abandoned; ``reap`` goes first, so a
        dead worker's training is requeued (and every job says why) whichever process gets there."""
        reap(self.connection, lock_ms=int(self.settings.reaper_interval_s * 800))
        super().clean_registries()

    def set_shutdown_requested_date(self) -> None:
        """Called from the SIGTERM handler: never let an unreachable Redis raise into the job."""
        try:
            super().set_shutdown_requested_date()
        except REDIS_ERRORS as exc:
            log.warning("could not record the shutdown request: %s", exc)

    # ---- shutdown -------------------------------------------------------------------------------

    def handle_warm_shutdown_request(self) -> None:
        """Tell the running job to stop at its next check; rq exits once it has returned."""
        super().handle_warm_shutdown_request()
        SHUTDOWN.set()

    def teardown(self) -> None:
        self._beat_stop.set()
        try:
            self.connection.delete(registry.WORKER_KEY.format(self.name))
            self.connection.srem(registry.WORKERS_SET, self.name)
        except Exception as exc:
            log.warning("could not remove the liveness record: %s", exc)
        super().teardown()


def run_worker(
    queue_names: list[str], *, name: str | None = None, burst: bool = False, gpus: str | None = None
) -> bool:
    """Entry point of ``kestrel worker``: work until stopped (or, with ``burst``, until idle).

    ``gpus`` (else ``KESTREL_WORKER_GPUS``) are the GPUs this worker owns (``own_gpus``). A device
    map or quantization whose packages are missing stops the worker here, before it takes a job
    that would fail on them.
    """
    settings = get_settings()
    own_gpus(parse_gpu_ids(gpus) if gpus is not None else settings.worker_gpus)
    require_packages(LoadConfig(device_map=settings.device_map, quantization=settings.quantization))
    _quiet_libraries()
    redis = lifecycle.connect(settings.redis_url)
    cache = model_cache(settings)
    log.info(
        "worker on %s, store %s, models cached up to %d",
        ",".join(queue_names),
        cache.store_root,
        cache.max_models,
    )
    worker = KestrelWorker(queue_names, connection=redis, settings=settings, name=name)
    return worker.work(burst=burst, logging_level="INFO")


def own_gpus(visible: str | None) -> None:
    """Make ``visible`` (CUDA_VISIBLE_DEVICES's value: ``"0,1"``; ``""`` for none) the only GPUs
    this process sees, numbered from cuda:0; None leaves the environment as it is.

    CUDA reads the variable once, when it initialises, so this runs before anything in the worker
    touches a GPU; a process whose CUDA is already up cannot change its GPUs and says so. GPUs are
    numbered in PCI bus order (as nvidia-smi numbers them) unless CUDA_DEVICE_ORDER says otherwise.
    """
    if visible is None:
        return
    torch = sys.modules.get("torch")
    already = torch is not None and torch.cuda.is_initialized()
    if already and os.environ.get("CUDA_VISIBLE_DEVICES") != visible:
        raise RuntimeError(f"CUDA is already initialised; this process cannot switch to GPUs {visible!r}")
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible
    log.info("worker owns GPU(s) %s", visible or "none")


def _quiet_libraries() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
