"""A real stack for tests of the control plane and the connector: `cornserve up --foreground` on its own Redis database.

Each stack gets a database of the session's Redis to itself, so its queues, deployments and
sidecar directory never meet those of the executor tests or of another stack.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import signal
import subprocess
import time

import redis
import redis.asyncio as aioredis

from flyte_cornserve.protocol.deployments import DEPLOYMENT_EVENTS_KEY
from flyte_cornserve.launch import LaunchError, ReadyFile, launch
from flyte_cornserve.redis_server import ENV_URL, connect_async
from flyte_cornserve.services.backend import CLI

_databases = itertools.count(1)
START_TIMEOUT_S = 300.0


class Stack:
    """A control plane process with its executors; `stop()` ends it all (SIGTERM, graceful)."""

    def __init__(self, redis_url: str, log: pathlib.Path, *up_args: str, env: dict[str, str] | None = None) -> None:
        self.url = f"{redis_url}{'&' if '?' in redis_url else '?'}db={next(_databases)}"
        redis.Redis.from_url(self.url).flushdb()
        self.log = log
        self.up_args = up_args
        self.env = {**os.environ, **(env or {}), ENV_URL: self.url}
        self._start()

    def _start(self) -> None:
        try:  # ready once it writes its ready file (`flyte_cornserve.launch`); its output goes to `log`
            self.process = launch([*CLI, "up", "--foreground", *self.up_args], self.env, self.log, ReadyFile(),
                                  START_TIMEOUT_S, "the control plane").process
        except LaunchError as exc:
            raise AssertionError(str(exc)) from None

    def restart(self) -> None:
        """Stop the control plane (gracefully: its executors stop too) and start a new one on the same Redis."""
        self.stop()
        self._start()

    def client(self) -> aioredis.Redis:
        return connect_async(self.url)

    def sync_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        if self.process.poll() is None:
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
        reply = client.xread({DEPLOYMENT_EVENTS_KEY: last}, block=2000)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                last = entry_id
                decoded = {k.decode(): v.decode() for k, v in fields.items()}
                if decoded["deployment"] == deployment_id and decoded["event"] == event:
                    return decoded
    raise AssertionError(f"no {event!r} event for {deployment_id} within {timeout_s:g} s")
