"""Prometheus metrics: HTTP (prometheus-fastapi-instrumentator) plus queues, workers and jobs.

The queue figures are read from Redis at scrape time by a custom collector, so they are right
whichever API replica is scraped and cost nothing between scrapes. Each app gets its own registry,
so several apps in one process (tests) never collide.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis import Redis
from rq import Queue
from rq.registry import (
    CanceledJobRegistry,
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)

from kestrel.workers import lifecycle, registry

log = logging.getLogger("kestrel.metrics")

# rq registries per state. Counted without cleanup: cleaning the started registry would fail a dead
# worker's job here, before the reaper has recorded why.
REGISTRIES = {
    "started": StartedJobRegistry,
    "finished": FinishedJobRegistry,
    "failed": FailedJobRegistry,
    "canceled": CanceledJobRegistry,
    "deferred": DeferredJobRegistry,
    "scheduled": ScheduledJobRegistry,
}


class QueueCollector(Collector):
    """Queue depth, live workers and jobs by state, per queue."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("kestrel_redis_up", "1 when Redis answered this scrape")
        try:
            families = list(self._families())
        except Exception as exc:
            log.warning("metrics: Redis unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("kestrel_queue_depth", "jobs waiting in the queue", labels=["queue"])
        workers = GaugeMetricFamily("kestrel_workers", "live workers serving the queue", labels=["queue"])
        jobs = GaugeMetricFamily("kestrel_jobs", "jobs by state", labels=["queue", "state"])
        per_queue = registry.workers_per_queue(registry.live_workers(self.redis))
        for name in lifecycle.QUEUES:
            waiting = Queue(name, connection=self.redis).count
            depth.add_metric([name], waiting)
            workers.add_metric([name], per_queue.get(name, 0))
            jobs.add_metric([name, "queued"], waiting)
            for state, registry_class in REGISTRIES.items():
                count = registry_class(name, connection=self.redis).get_job_count(cleanup=False)
                jobs.add_metric([name, state], count)
        yield depth
        yield workers
        yield jobs


def make_registry(redis: Redis) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(QueueCollector(redis))
    return registry
