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

The same thread publishes a small liveness record (``kestrel:worker:<name>``: queues, state,
current job, loaded models) that ``/ready`` and ``GET /v1/models`` read, and applies model unload
requests.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

from redis import Redis
from rq.job import Job
from rq.queue import Queue
from rq.worker import SimpleWorker, WorkerStatus

from kestrel.settings import Settings, get_settings
from kestrel.workers import queues
from kestrel.workers.context import SHUTDOWN, model_cache
from kestrel.workers.reaper import reap

log = logging.getLogger("kestrel.worker")


class KestrelWorker(SimpleWorker):
    """An rq ``SimpleWorker`` with short-ttl heartbeats, a liveness record and cooperative stop."""

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
        while not self._beat_stop.wait(self.settings.heartbeat_interval_s):
            try:
                running = self._running
                if running is not None:
                    self.maintain_heartbeats(*running)
                self._publish()
                model_cache(self.settings).apply_unload_requests(self._unload_requests())
                reap(self.connection, lock_ms=int(self.settings.reaper_interval_s * 800))
            except Exception as exc:  # keep beating through Redis restarts
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
            pipe.set(queues.WORKER_KEY.format(self.name), json.dumps(record), ex=int(ttl))
            pipe.sadd(queues.WORKERS_SET, self.name)
            pipe.execute()

    def _unload_requests(self) -> dict[str, float]:
        raw = self.connection.hgetall(queues.UNLOAD_HASH)
        return {k.decode(): float(v) for k, v in raw.items()}

    # ---- jobs -----------------------------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run the job in this process (as SimpleWorker does) with heartbeats flowing meanwhile."""
        model_cache(self.settings).apply_unload_requests(self._unload_requests())
        execution = self.prepare_execution(job)
        self._running = (job, execution)
        self._publish()
        try:
            self.perform_job(job, queue, execution)
        finally:
            self._running = None
        self.set_state(WorkerStatus.IDLE)
        self._publish()

    # ---- shutdown -------------------------------------------------------------------------------

    def handle_warm_shutdown_request(self) -> None:
        """Tell the running job to stop at its next check; rq exits once it has returned."""
        super().handle_warm_shutdown_request()
        SHUTDOWN.set()

    def teardown(self) -> None:
        self._beat_stop.set()
        try:
            self.connection.delete(queues.WORKER_KEY.format(self.name))
            self.connection.srem(queues.WORKERS_SET, self.name)
        except Exception as exc:
            log.warning("could not remove the liveness record: %s", exc)
        super().teardown()


def run_worker(queue_names: list[str], *, name: str | None = None, burst: bool = False) -> bool:
    """Entry point of ``kestrel worker``: work until stopped (or, with ``burst``, until idle)."""
    settings = get_settings()
    _quiet_libraries()
    redis = queues.connect(settings.redis_url)
    cache = model_cache(settings)
    log.info(
        "worker on %s, store %s, models cached up to %d",
        ",".join(queue_names),
        cache.store_root,
        cache.max_models,
    )
    worker = KestrelWorker(queue_names, connection=redis, settings=settings, name=name)
    return worker.work(burst=burst, logging_level="INFO")


def _quiet_libraries() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
