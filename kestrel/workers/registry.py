"""The worker registry: each worker's liveness record (``kestrel:worker:<name>``, refreshed by its
heartbeat, expiring when it stops) and the set that names them, read by health and metrics."""

from __future__ import annotations

import json
from typing import Any

from redis import Redis

from kestrel.workers.lifecycle import PREFIX, QUEUES

WORKER_KEY = PREFIX + ":worker:{}"
WORKERS_SET = f"{PREFIX}:workers"


def live_workers(redis: Redis) -> list[dict[str, Any]]:
    """Workers whose heartbeat record has not expired; stale members are removed from the set."""
    names = [n.decode() for n in redis.smembers(WORKERS_SET)]
    if not names:
        return []
    records = redis.mget([WORKER_KEY.format(n) for n in names])
    alive, dead = [], []
    for name, raw in zip(names, records, strict=True):
        if raw is None:
            dead.append(name)
        else:
            alive.append(json.loads(raw))
    if dead:
        redis.srem(WORKERS_SET, *dead)
    return alive


def workers_per_queue(workers: list[dict[str, Any]]) -> dict[str, int]:
    counts = dict.fromkeys(QUEUES, 0)
    for worker in workers:
        for name in worker.get("queues", []):
            counts[name] = counts.get(name, 0) + 1
    return counts
