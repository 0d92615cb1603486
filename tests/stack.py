"""A real stack for tests of the control plane and the connector: `cornserve up --foreground` on its own Redis database.

Each stack gets a database of the session's Redis to itself while it lives (database 0 is the
executor tests'), so its queues, deployments and sidecar directory never meet those of the executor
tests or of another live stack; a stopped stack's database is flushed and given to the next one.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time
import uuid

import redis
import redis.asyncio as aioredis

from flyte_cornserve.protocol.deployments import deployment_events_key
from flyte_cornserve.launch import LaunchError, ReadyFile, launch
from flyte_cornserve.redis_server import ENV_URL, connect_async
from flyte_cornserve.services.backend import CLI

DATABASES = range(1, 16)  # a Redis server has 16 unless configured otherwise
_in_use: dict[str, set[int]] = {}  # server URL -> databases of live stacks
START_TIMEOUT_S = 300.0


def new_image(image: str | pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
    """`image`'s pixels under bytes no other file has (a PNG text chunk of its own), in `folder`: the
    stack's encoders address their outputs by content, so its encode is a put, never a cache hit."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    unique = PngInfo()
    unique.add_text("test", uuid.uuid4().hex)
    path = folder / f"{uuid.uuid4().hex[:8]}.png"
    Image.open(image).save(path, pnginfo=unique)
    return path


class Stack:
    """A control plane process with its executors; `stop()` ends it all (SIGTERM, graceful)."""

    def __init__(self, redis_url: str, log: pathlib.Path, *up_args: str, env: dict[str, str] | None = None,
                 beside: Stack | None = None) -> None:
        """`beside`: share that stack's database (e.g. another installation under another namespace)."""
        self._server, self._database = redis_url, None
        if beside is not None:
            self.url = beside.url
        else:
            taken = _in_use.setdefault(redis_url, set())
            free = [db for db in DATABASES if db not in taken]
            if not free:
                raise AssertionError(f"{len(taken)} stacks are live on {redis_url}: stop one before starting another")
            self._database = free[0]
            taken.add(self._database)
            self.url = f"{redis_url}{'&' if '?' in redis_url else '?'}db={self._database}"
            redis.Redis.from_url(self.url).flushdb()
        self.log = log
        self.up_args = up_args
        self.env = {**os.environ, **(env or {}), ENV_URL: self.url}
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        try:  # ready once it writes its ready file (`flyte_cornserve.launch`); its output goes to `log`
            self.process = launch([*CLI, "up", "--foreground", *self.up_args], self.env, self.log, ReadyFile(),
                                  START_TIMEOUT_S, "the control plane").process
        except LaunchError as exc:
            raise AssertionError(str(exc)) from None

    def restart(self) -> None:
        """Stop the control plane (gracefully: its executors stop too) and start a new one on the same Redis."""
        self._stop_process()
        self._start()

    def client(self) -> aioredis.Redis:
        return connect_async(self.url)

    def sync_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        """Stop the control plane and give this stack's database back."""
        self._stop_process()
        if self._database is not None:
            _in_use[self._server].discard(self._database)
            self._database = None

    def _stop_process(self) -> None:
        if getattr(self, "process", None) is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait_for_event(stack: Stack, deployment_id: str, event: str, timeout_s: float = 180.0) -> dict[str, str]:
    """Block (XREAD, no polling) until the control plane reports `event` for the deployment."""
    client = stack.sync_client()
    last = "0"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reply = client.xread({deployment_events_key(): last}, block=2000)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                last = entry_id
                decoded = {k.decode(): v.decode() for k, v in fields.items()}
                if decoded["deployment"] == deployment_id and decoded["event"] == event:
                    return decoded
    raise AssertionError(f"no {event!r} event for {deployment_id} within {timeout_s:g} s")
