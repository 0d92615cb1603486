"""A control plane that was replaced (frozen past its liveness key's TTL while a second one took
over the Redis) stops what it started and exits once it runs again; the new one serves.

Real processes: two `cornserve up --foreground` on one Redis database (`tests/stack.py`), the
cheap encoder as the executor; the first is frozen with SIGSTOP.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from datetime import timedelta

import redis

from cornserve_builtins.encoder import EncoderTask
from flyte_cornserve.protocol.deployments import executor_key
from flyte_cornserve.protocol.invocations import State
from flyte_cornserve.services.control import control_plane_key
from flyte_cornserve.services.dispatcher import Dispatcher
from flyte_cornserve.services.stack import process_alive, wait_for_exit
from flyte_cornserve.task import TaskOptions

from ..stack import Stack
from .test_recovery import IMAGE, kill_leftovers, sidecar_pid

ENCODER = EncoderTask(model_id="tiny-llava", options=TaskOptions(timeout=timedelta(seconds=60), retries=0))


def executor_pids(client: redis.Redis) -> dict[str, int]:
    """Every executor that heartbeats on this Redis: its heartbeat key -> its pid."""
    pattern = executor_key("*")
    return {key.decode(): json.loads(beat)["pid"] for key in client.scan_iter(match=pattern)
            if (beat := client.get(key)) is not None}


def test_a_replaced_control_plane_stops_its_children_and_exits(redis_url: str, tmp_path) -> None:
    first = Stack(redis_url, tmp_path / "first.log", "--cpu", "2", "--memory", "8Gi")
    second: Stack | None = None
    leftovers: list[int] = []
    try:
        asyncio.run(Dispatcher(first.client()).run(ENCODER, {"data": IMAGE}))
        client = first.sync_client()
        children = {**executor_pids(client), "sidecar": sidecar_pid(client)}
        assert len(children) == 2, children  # one executor, one sidecar
        leftovers += children.values()

        os.kill(first.process.pid, signal.SIGSTOP)  # frozen: it cannot refresh its liveness key
        deadline = time.monotonic() + 60.0
        while client.exists(control_plane_key()):
            assert time.monotonic() < deadline, "the frozen control plane's key did not expire"
            time.sleep(0.05)  # the poll's period
        second = Stack(redis_url, tmp_path / "second.log", "--cpu", "2", "--memory", "8Gi", beside=first)
        os.kill(first.process.pid, signal.SIGCONT)

        assert wait_for_exit(first.process.pid, 60.0), "the replaced control plane keeps running"
        first.process.wait()
        # it stopped them itself before it exited (not left to its children's guards, nor running on)
        survivors = {name: pid for name, pid in children.items() if process_alive(pid)}
        assert not survivors, f"still running when the replaced control plane exited: {survivors}"
        assert "replaced" in (tmp_path / "first.log").read_text(), "no log line says why it exited"
        assert json.loads(client.get(control_plane_key()))["pid"] == second.process.pid

        async def invoke():
            dispatcher = Dispatcher(second.client())
            return await dispatcher.outcome(await dispatcher.submit(ENCODER, {"data": IMAGE}))

        record = asyncio.run(invoke())
        assert record.state is State.DONE, record.error
        assert record.executor not in {key.rpartition(":")[2] for key in children}
    finally:
        if first.process.poll() is None:
            os.kill(first.process.pid, signal.SIGCONT)
        first.stop()
        if second is not None:
            second.stop()
        kill_leftovers(leftovers)
