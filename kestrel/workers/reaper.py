"""Fail the jobs of workers that died, within seconds rather than at rq's next maintenance.

A worker refreshes its running job's entry in the started registry every few seconds with a short
ttl (``heartbeat_ttl_s``). When the worker is SIGKILLed or its machine vanishes the entry expires;
``StartedJobRegistry.cleanup`` then moves the job to failed (or retries it, if it has retries).
rq runs that cleanup only every ten minutes, so the API and every worker run ``reap`` every few
seconds, one of them at a time (a Redis lock), and first write the reason into the job's meta so
a client reads "worker died" instead of an rq exception name.
"""

from __future__ import annotations

import logging
import threading
import time

from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from kestrel.workers.queues import PREFIX, QUEUES, WORKER_DIED

log = logging.getLogger("kestrel.reaper")
LOCK_KEY = f"{PREFIX}:reaper-lock"


def reap(redis: Redis, queue_names: tuple[str, ...] = QUEUES, *, lock_ms: int = 2000) -> list[str]:
    """Fail (or retry) started jobs whose heartbeat expired; return their ids."""
    if not redis.set(LOCK_KEY, "1", nx=True, px=lock_ms):
        return []
    reaped: list[str] = []
    for name in queue_names:
        registry = StartedJobRegistry(name, connection=redis)
        expired = registry.get_expired_job_ids()
        for job_id in expired:
            if _mark_dead(redis, job_id):
                reaped.append(job_id)
        if expired:
            registry.cleanup()
    for job_id in reaped:
        log.warning("job %s: %s", job_id, WORKER_DIED)
    return reaped


def _mark_dead(redis: Redis, job_id: str) -> bool:
    try:
        job = Job.fetch(job_id, connection=redis)
    except NoSuchJobError:
        return False
    if job.get_status(refresh=False) != JobStatus.STARTED:
        return False
    job.meta["error"] = {
        "code": "worker_died",
        "message": WORKER_DIED,
        "details": {"worker": job.worker_name},
    }
    job.meta["message"] = f"failed: {WORKER_DIED}"
    job.meta.setdefault("log", []).append(f"{time.strftime('%H:%M:%S')} {WORKER_DIED}")
    job.save_meta()
    return True


class Reaper:
    """``reap`` every ``interval_s`` on a daemon thread until ``stop``."""

    def __init__(self, redis: Redis, interval_s: float = 5.0) -> None:
        self.redis = redis
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kestrel-reaper", daemon=True)

    def start(self) -> Reaper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                reap(self.redis, lock_ms=int(self.interval_s * 800))
            except Exception as exc:  # Redis restarting, network blips: try again next tick
                log.debug("reaper tick failed: %s", exc)
