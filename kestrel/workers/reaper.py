"""Deal with the jobs of workers that died, within seconds rather than at rq's next maintenance.

A worker refreshes its running job's entry in the started registry every few seconds with a short
ttl (``heartbeat_ttl_s``). When the worker is SIGKILLed or its machine vanishes the entry expires;
``StartedJobRegistry.cleanup`` then moves the job to failed, or requeues it when it has retries
left. rq runs that cleanup only every ten minutes, so the API and every worker run ``reap`` every
few seconds, one of them at a time (a Redis lock), and first decide what becomes of each job:

- a training is requeued (up to ``TRAIN_REQUEUES`` times, counted in its meta as ``requeues``)
  and its next run resumes from the newest checkpoint, so a dead worker costs at most the
  training since that checkpoint (``checkpoint_every_s``, a minute by default);
- a ledger is requeued the same way and computes again from the start (it writes nothing
  until it is done, so there is nothing half-made to resume or clean up);
- any other job fails with code ``worker_died`` and a message saying so. Captures, analyses and
  discovery write large artifacts and are not resumable, and an interactive job's caller gave up
  long before the ttl ran out; the client resubmits if it wants to.

If the worker was not dead but cut off from Redis for longer than the ttl, it notices at its
next check that the job was taken from it and lets go (see ``context.Superseded``).
"""

from __future__ import annotations

import logging
import threading
import time

from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from kestrel.workers.lifecycle import PREFIX, QUEUES, WORKER_DIED

log = logging.getLogger("kestrel.reaper")
LOCK_KEY = f"{PREFIX}:reaper-lock"

#: Job kinds a dead worker's job is requeued for (a training resumes from a checkpoint; a
#: ledger and a Neuronpedia export, which publish in one step at the end, compute again from the
#: start; a label job rewrites the same names and scores only the latents not yet scored).
RESUMABLE_KINDS = frozenset({"train", "ledger", "export", "label"})
#: How often one training is requeued after its worker died before it fails for good.
TRAIN_REQUEUES = 3


def reap(redis: Redis, queue_names: tuple[str, ...] = QUEUES, *, lock_ms: int = 2000) -> list[str]:
    """Requeue or fail started jobs whose heartbeat expired; return their ids."""
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
            registry.cleanup()  # requeues the jobs given a retry above, fails the rest
    return reaped


def _mark_dead(redis: Redis, job_id: str) -> bool:
    """Write what happened into the job's meta; give a resumable job one rq retry."""
    try:
        job = Job.fetch(job_id, connection=redis)
    except NoSuchJobError:
        return False
    if job.get_status(refresh=False) != JobStatus.STARTED:
        return False
    requeues = int(job.meta.get("requeues") or 0)
    stamp = time.strftime("%H:%M:%S")
    if job.meta.get("kind") in RESUMABLE_KINDS and requeues < TRAIN_REQUEUES:
        job.meta["requeues"] = requeues + 1
        again = "resume from its last checkpoint" if job.meta.get("kind") == "train" else "run again"
        line = f"{WORKER_DIED}; requeued to {again} (requeue {requeues + 1} of {TRAIN_REQUEUES})"
        job.meta["message"] = f"requeued: {line}"
        job.meta.setdefault("log", []).append(f"{stamp} {line}")
        job.save_meta()
        redis.hset(job.key, "retries_left", 1)  # StartedJobRegistry.cleanup then requeues it
        log.warning("job %s: %s", job_id, line)
        return True
    message = WORKER_DIED
    if job.meta.get("kind") in RESUMABLE_KINDS:
        message += f"; not requeued again after {requeues} requeues"
    job.meta["error"] = {
        "code": "worker_died",
        "message": message,
        "details": {"worker": job.worker_name, "requeues": requeues},
    }
    job.meta["message"] = f"failed: {message}"
    job.meta.setdefault("log", []).append(f"{stamp} {message}")
    job.save_meta()
    log.warning("job %s: %s", job_id, message)
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
