"""Scaling on backlog (issue 13): a deployment gains executors while its backlog per executor is
long, within its `Replicas` bounds and the resources the control plane accounts, and loses them
when idle, down to its minimum (0: none between runs, the next invocation starts one).

The stacks declare more cores than this machine has (the executors are tiny text encoders)."""

from __future__ import annotations

import asyncio
import pathlib
import uuid

import pytest
import redis.asyncio as aioredis

from cornserve_builtins.encoder import EncoderInput, EncoderTask, Modality
from flyte_cornserve.descriptors import descriptor_for
from flyte_cornserve.protocol.invocations import InvocationStore, State
from flyte_cornserve.services.control import load_deployment
from flyte_cornserve.services.dispatcher import Dispatcher
from flyte_cornserve.task import Replicas, Resources

from ..stack import Stack, wait_for_event

FLOOD = 5000


def encoder(replicas: Replicas) -> EncoderTask:
    return EncoderTask(model_id="tiny-llava", modality=Modality.TEXT, replicas=replicas,
                       resources=Resources(cpu=1, memory="1Gi"))


async def flood(url: str, task: EncoderTask, count: int) -> list[str]:
    """Deploy `task` (one executor, READY) and queue `count` invocations of distinct texts at once."""
    client = aioredis.Redis.from_url(url)
    try:
        deployment_id = await Dispatcher(client).deploy(task)
        store = InvocationStore(client)
        await store.ensure_queue(deployment_id)
        ids = [uuid.uuid4().hex for _ in range(count)]
        async with client.pipeline(transaction=False) as pipe:
            for number, invocation_id in enumerate(ids):
                payload = descriptor_for(task).encode_request(EncoderInput(data=f"text {number} {invocation_id}"))
                store.queue_submission(pipe, deployment_id, invocation_id, payload, pins=0)
            await pipe.execute()
        return ids
    finally:
        await client.aclose()


async def outcomes(url: str, ids: list[str]) -> list:
    client = aioredis.Redis.from_url(url)
    try:
        store = InvocationStore(client)
        return [await store.wait(invocation_id, 120.0) for invocation_id in ids]
    finally:
        await client.aclose()


async def executors_of(url: str, deployment_id: str) -> list[str]:
    client = aioredis.Redis.from_url(url)
    try:
        return (await load_deployment(client, deployment_id)).executors
    finally:
        await client.aclose()


@pytest.fixture
def roomy_stack(redis_url: str, tmp_path: pathlib.Path):
    stack = Stack(redis_url, tmp_path / "control-plane.log", "--cpu", "4", "--memory", "16Gi", "--gpu", "0")
    yield stack
    stack.stop()


def test_a_flood_scales_the_encoder_to_two_executors_and_idle_scales_it_back(roomy_stack: Stack) -> None:
    task = encoder(Replicas(min=1, max=2, backlog_per_executor=8, idle_s=2))
    ids = asyncio.run(flood(roomy_stack.url, task, FLOOD))

    up = wait_for_event(roomy_stack, task.deployment_id(), "scaled-up")
    assert "2 executor(s)" in up["detail"] and "backlog" in up["detail"]
    down = wait_for_event(roomy_stack, task.deployment_id(), "scaled-down")
    assert "1 executor(s)" in down["detail"] and "idle for 2 s" in down["detail"]

    records = asyncio.run(outcomes(roomy_stack.url, ids))
    assert {record.state for record in records} == {State.DONE}
    assert len(asyncio.run(executors_of(roomy_stack.url, task.deployment_id()))) == 1
    # both served it (one executor takes ~15 s for this flood here, a second one starts in ~6 s)
    assert len({record.executor for record in records}) == 2


def test_a_deployment_scales_only_as_far_as_the_accounted_resources_allow(redis_url: str, tmp_path: pathlib.Path) -> None:
    stack = Stack(redis_url, tmp_path / "control-plane.log", "--cpu", "1", "--memory", "16Gi", "--gpu", "0")
    try:
        task = encoder(Replicas(min=1, max=3, backlog_per_executor=8, idle_s=2))
        records = asyncio.run(outcomes(stack.url, asyncio.run(flood(stack.url, task, FLOOD))))
        assert {record.state for record in records} == {State.DONE}
        assert len({record.executor for record in records}) == 1
    finally:
        stack.stop()
    log = stack.log.read_text()  # the control plane's: it wanted more and said why not, once
    assert log.count("stays at 1 executor(s)") == 1 and "lacks cpu" in log
    assert "starting executor" not in log


def test_min_zero_stops_the_last_executor_when_idle_and_the_next_invocation_starts_one(roomy_stack: Stack) -> None:
    task = encoder(Replicas(min=0, max=1, idle_s=1))
    asyncio.run(flood(roomy_stack.url, task, 1))
    down = wait_for_event(roomy_stack, task.deployment_id(), "scaled-down")
    assert "0 executor(s)" in down["detail"]
    assert asyncio.run(executors_of(roomy_stack.url, task.deployment_id())) == []

    async def run_one() -> object:
        client = aioredis.Redis.from_url(roomy_stack.url)
        try:
            return await Dispatcher(client).run(task, {"data": "after the pause"})
        finally:
            await client.aclose()

    output = asyncio.run(run_one())
    assert output.embeddings.shape[-1] > 0
    up = wait_for_event(roomy_stack, task.deployment_id(), "scaled-up")
    assert "backlog 1 for 0 executor(s)" in up["detail"] and up["detail"].endswith("; 1 executor(s)")


def test_the_latest_deploy_request_sets_the_bounds_of_the_shared_deployment(roomy_stack: Stack) -> None:
    first, wider = encoder(Replicas(min=1, max=1)), encoder(Replicas(min=1, max=3, backlog_per_executor=5))
    assert first.deployment_id() == wider.deployment_id()  # the bounds are not part of its identity

    async def deploy_both() -> tuple[dict, dict]:
        client = aioredis.Redis.from_url(roomy_stack.url)
        try:
            await Dispatcher(client).deploy(first)
            before = (await load_deployment(client, first.deployment_id())).scaling
            await Dispatcher(client).deploy(wider)  # READY already: asks again only because its bounds differ
            return before, (await load_deployment(client, first.deployment_id())).scaling
        finally:
            await client.aclose()

    before, after = asyncio.run(deploy_both())
    assert (before["max"], after["max"], after["backlog_per_executor"]) == (1, 3, 5)
