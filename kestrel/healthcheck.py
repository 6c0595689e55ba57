"""Container health probes: ``python -m kestrel.healthcheck api`` (or ``worker``).

Docker runs them every few seconds in every container, so they stay light: the standard library
and the Redis client, never torch (``kestrel.workers.lifecycle`` pulls in the schemas and the engine;
the two key names below are checked against it by a test).

- ``api``: ``GET /health`` on this container's API answers 200.
- ``worker``: a worker on this host (the container) has a live liveness record in Redis, the one
  its heartbeat thread refreshes; a hung or dead worker's record expires within seconds.

Exit code 0 is healthy, 1 unhealthy (with the reason on stderr).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import urllib.request

WORKER_KEY = "kestrel:worker:{}"
WORKERS_SET = "kestrel:workers"
TIMEOUT_S = 3.0


def check_api(port: int | None = None) -> str:
    port = port or int(os.environ.get("KESTREL_PORT", "8000"))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=TIMEOUT_S) as response:
        if response.status != 200:
            raise RuntimeError(f"/health answered {response.status}")
    return f"api on port {port} is live"


def check_worker(redis_url: str | None = None, host: str | None = None) -> str:
    from redis import Redis

    redis_url = redis_url or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    host = host or socket.gethostname()
    client = Redis.from_url(redis_url, socket_connect_timeout=TIMEOUT_S, socket_timeout=TIMEOUT_S)
    try:
        names = [name.decode() for name in client.smembers(WORKERS_SET)]
        records = client.mget([WORKER_KEY.format(name) for name in names]) if names else []
    finally:
        client.close()
    mine = [json.loads(raw) for raw in records if raw is not None]
    mine = [record for record in mine if record.get("host") == host]
    if not mine:
        raise RuntimeError(f"no live worker on host {host!r} in Redis")
    return ", ".join(f"{r['name']} ({','.join(r.get('queues', []))}, {r.get('state')})" for r in mine)


CHECKS = {"api": check_api, "worker": check_worker}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in CHECKS:
        print(f"usage: python -m kestrel.healthcheck {{{'|'.join(CHECKS)}}}", file=sys.stderr)
        return 2
    try:
        print(CHECKS[args[0]]())
    except Exception as exc:
        print(f"unhealthy: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
