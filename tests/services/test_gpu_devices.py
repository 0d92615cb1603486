"""GPUs on one machine (issue 13): the local backend gives each GPU executor devices of its own
(`CUDA_VISIBLE_DEVICES`), none to a CPU executor, and takes them back when the executor stops. The
stack declares 2 GPUs (accounting: the encoder executors here run on CPU whatever they are given)."""

from __future__ import annotations

import asyncio
import json
import pathlib

import pytest
import redis.asyncio as aioredis

from cornserve_builtins.encoder import EncoderTask, Modality
from flyte_cornserve.models import resolve_model
from flyte_cornserve.protocol.deployments import executor_key
from flyte_cornserve.services import control
from flyte_cornserve.services.control import load_deployment
from flyte_cornserve.services.dispatcher import Dispatcher
from flyte_cornserve.task import Resources

from ..stack import Stack

ONE_GPU = Resources(cpu=1, memory="1Gi", gpu=1)


@pytest.fixture
def gpu_stack(redis_url: str, tmp_path: pathlib.Path):
    stack = Stack(redis_url, tmp_path / "control-plane.log", "--cpu", "8", "--memory", "16Gi", "--gpu", "2")
    yield stack
    stack.stop()


async def deploy_and_see(url: str, task: EncoderTask) -> str:
    """Deploy `task`; the CUDA_VISIBLE_DEVICES its executor process was started with."""
    client = aioredis.Redis.from_url(url)
    try:
        deployment_id = await Dispatcher(client).deploy(task)
        (executor_id,) = (await load_deployment(client, deployment_id)).executors
        pid = json.loads(await client.get(executor_key(executor_id)))["pid"]
    finally:
        await client.aclose()
    environ = dict(entry.split("=", 1) for entry in
                   pathlib.Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in entry)
    return environ["CUDA_VISIBLE_DEVICES"]


async def undeploy(url: str, task: EncoderTask) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        await control.request(client, "undeploy", 120.0, deployment_id=task.deployment_id())
    finally:
        await client.aclose()


def test_each_gpu_executor_gets_devices_of_its_own_and_gives_them_back(gpu_stack: Stack) -> None:
    folder = str(resolve_model("tiny-llava"))  # another model id: another deployment of the same model
    first, second = EncoderTask(model_id="tiny-llava", resources=ONE_GPU), EncoderTask(model_id=folder, resources=ONE_GPU)
    on_cpu = EncoderTask(model_id="tiny-llava", modality=Modality.TEXT)

    devices = [asyncio.run(deploy_and_see(gpu_stack.url, task)) for task in (first, second, on_cpu)]
    assert sorted(devices[:2]) == ["0", "1"] and devices[2] == ""

    asyncio.run(undeploy(gpu_stack.url, first))
    third = EncoderTask(model_id=folder, modality=Modality.TEXT, resources=ONE_GPU)
    assert asyncio.run(deploy_and_see(gpu_stack.url, third)) == devices[0]  # the first one's, given back
