"""Real `cornserve executor` processes (and the sidecar they put tensors into) for executor tests."""

from __future__ import annotations

from typing import Any

import asyncio
import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
import redis

from flyte_cornserve import redis_server
from flyte_cornserve.launch import LaunchError, ReadyFile, start
from flyte_cornserve.models import resolve_model
from flyte_cornserve.protocol.invocations import InvocationStore, Priority, Record, events_key, invocation_key, queue_key
from flyte_cornserve.namespace import ENV_NAMESPACE
from flyte_cornserve.sidecar.directory import ENV_SIDECAR_ID
from flyte_cornserve.task import UnitTask
from tests.processes import Sidecars

START_TIMEOUT_S = 300.0


@dataclasses.dataclass
class ExecutorProcess:
    id: str
    process: subprocess.Popen
    log: pathlib.Path

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def alive(self) -> bool:
        return self.process.poll() is None


class Executors:
    """Starts executor processes against one sidecar; stops them and clears their queues at `close()`."""

    def __init__(self, redis_url: str, sidecar_id: str, namespace: str, logs: pathlib.Path) -> None:
        self.redis_url, self.sidecar_id, self.namespace, self.logs = redis_url, sidecar_id, namespace, logs
        self._started: list[ExecutorProcess] = []
        self._deployments: set[str] = set()

    def start(self, task: UnitTask, executor_id: str | None = None, *, metrics_port: int | None = None) -> ExecutorProcess:
        executor_id = executor_id or f"x{uuid.uuid4().hex[:8]}"
        command = [sys.executable, "-c", "from flyte_cornserve.cli import main; main()", "executor",
                   "--task", task.to_json(), "--executor-id", executor_id]  # fmt: skip
        if metrics_port is not None:
            command += ["--metrics-port", str(metrics_port)]
        env = {**os.environ, redis_server.ENV_URL: self.redis_url, ENV_SIDECAR_ID: self.sidecar_id,
               ENV_NAMESPACE: self.namespace}  # fmt: skip
        log = self.logs / f"{executor_id}.log"
        launched = start(command, env, log, ReadyFile(), f"executor {executor_id}")
        started = ExecutorProcess(executor_id, launched.process, log)
        self._started.append(started)
        self._deployments.add(task.deployment_id())
        try:  # ready once it writes its ready file (`flyte_cornserve.launch`)
            launched.wait_ready(START_TIMEOUT_S)
        except LaunchError as exc:
            raise AssertionError(str(exc)) from None
        return started

    def close(self) -> None:
        for executor in self._started:
            if executor.alive():
                executor.process.terminate()
                try:
                    executor.process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    executor.kill()
        client = redis.Redis.from_url(self.redis_url)
        for key in client.scan_iter(match=invocation_key("*")):
            if not key.endswith(b":events") and client.hget(key, "deployment_id").decode() in self._deployments:
                invocation = key.decode().removeprefix(invocation_key(""))
                client.delete(invocation_key(invocation), events_key(invocation))
        for deployment in self._deployments:
            client.delete(queue_key(deployment))


@pytest.fixture(scope="session")
def tiny_llava() -> pathlib.Path:
    return resolve_model("tiny-llava")


@pytest.fixture(scope="module")
def executors(redis_url: str, module_sidecar, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Executors]:
    """The executors and this test process share the sidecar's namespace: every key (queues, records) is in it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_NAMESPACE, module_sidecar.namespace)
        started = Executors(redis_url, module_sidecar.id, module_sidecar.namespace, tmp_path_factory.mktemp("executors"))
        yield started
        started.close()


def run(coroutine):
    return asyncio.run(coroutine)


async def one_batch(store: InvocationStore, deployment_id: str, items: list[dict], timeout_s: float = 120,
                    **submission: Any) -> Record:
    """`items` as one batch invocation, as the batch runner sends them (the executor hands them to
    one `handle()` call); its record once it ended. `submission`: more of `queue_submission`'s
    arguments (pins, tensors)."""
    await store.ensure_queue(deployment_id)
    invocation_id = uuid.uuid4().hex
    async with store.redis.pipeline(transaction=True) as pipe:
        store.queue_submission(pipe, deployment_id, invocation_id, items=items, timeout_s=timeout_s,
                               priority=Priority.BATCH, **submission)
        await pipe.execute()
    return await store.wait(invocation_id, timeout_s)


@dataclasses.dataclass
class Node:
    """This module's sidecar: executors started by `executors` put and get through it."""

    id: str
    namespace: str


@pytest.fixture(scope="module")
def sidecar_pool(redis_url: str) -> Iterator[Sidecars]:
    pool = Sidecars(redis_url, f"test-{uuid.uuid4().hex[:10]}")
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def module_sidecar(sidecar_pool: Sidecars) -> Node:
    process = sidecar_pool.start(memory_cap="256MiB", heartbeat_ttl=3.0)
    return Node(process.id, sidecar_pool.namespace)


@pytest.fixture(scope="module")
def sidecar_client(sidecar_pool: Sidecars, module_sidecar: Node):
    return sidecar_pool.client(module_sidecar.id)
