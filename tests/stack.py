"""A real stack for tests of the control plane and the connector: `cornserve up --foreground` on its own Redis database.

Each stack gets a database of the session's Redis to itself, so its queues, deployments and
sidecar directory never meet those of the executor tests or of another stack.
"""

from __future__ import annotations

import collections
import itertools
import os
import pathlib
import signal
import subprocess
import threading
import time

import redis
import redis.asyncio as aioredis

from flyte_cornserve.redis_server import ENV_URL, connect_async
from flyte_cornserve.services.backend import CLI
from flyte_cornserve.services.control import DEPLOYMENT_EVENTS_KEY

_databases = itertools.count(1)


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
        self.process = subprocess.Popen(
            [*CLI, "up", "--foreground", *self.up_args], env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.tail: collections.deque[str] = collections.deque(maxlen=60)
        for line in self.process.stdout:
            self.tail.append(line)
            if "control plane ready" in line:
                break
        else:
            raise AssertionError(f"the control plane exited with {self.process.wait()}:\n{''.join(self.tail)}")
        threading.Thread(target=self._drain, daemon=True).start()

    def restart(self) -> None:
        """Stop the control plane (gracefully: its executors stop too) and start a new one on the same Redis."""
        self.stop()
        self._start()

    def _drain(self) -> None:
        with open(self.log, "a") as out:
            out.writelines(self.tail)
            for line in self.process.stdout:
                out.write(line)
                out.flush()

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
