"""A FAILED deployment (its executor kept crashing) can be undeployed, expires on its own, and a new
deploy of its task starts afresh.

Real processes: `cornserve up --foreground` on the session's Redis (`tests/stack.py`) with
`--restart-limit 1` (the first exit of an executor fails its deployment), the cheap encoder.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from datetime import timedelta

import pytest

from cornserve_builtins.encoder import EncoderTask
from flyte_cornserve.services import control
from flyte_cornserve.services.control import (
    DeploymentState,
    deployment_key,
    deployments_key,
    list_deployments,
    load_deployment,
)
from flyte_cornserve.services.dispatcher import Dispatcher
from flyte_cornserve.services.stack import wait_for_exit
from flyte_cornserve.services.task_manager import FAILED_TTL_S
from flyte_cornserve.task import TaskOptions

from ..stack import Stack, wait_for_event
from .test_recovery import IMAGE, executor_pid, kill_leftovers

ENCODER = EncoderTask(model_id="tiny-llava", options=TaskOptions(timeout=timedelta(seconds=60), retries=0))


@pytest.fixture
def failed(redis_url: str, tmp_path):
    """A stack whose deployment of ENCODER is FAILED: its only executor was killed, with a restart limit of 1."""
    stack = Stack(redis_url, tmp_path / "control-plane.log", "--cpu", "2", "--memory", "8Gi", "--restart-limit", "1")
    leftovers: list[int] = []
    try:
        asyncio.run(Dispatcher(stack.client()).deploy(ENCODER))
        pid = executor_pid(stack.sync_client(), ENCODER.deployment_id())
        leftovers.append(pid)
        os.kill(pid, signal.SIGKILL)
        assert wait_for_exit(pid, 30.0)
        wait_for_event(stack, ENCODER.deployment_id(), "failed", 60.0)
        record = asyncio.run(load_deployment(stack.client(), ENCODER.deployment_id()))
        assert record is not None and record.state is DeploymentState.FAILED, record
        yield stack
    finally:
        stack.stop()
        kill_leftovers(leftovers)


def test_undeploy_removes_a_failed_deployment(failed: Stack) -> None:
    reply = asyncio.run(control.request(failed.client(), "undeploy", 30.0, deployment_id=ENCODER.deployment_id()))
    assert reply["found"] is True, reply
    client = failed.sync_client()
    assert not client.exists(deployment_key(ENCODER.deployment_id())), "the FAILED record is left"
    assert not client.sismember(deployments_key(), ENCODER.deployment_id())
    assert ENCODER.deployment_id() not in [d.id for d in asyncio.run(list_deployments(failed.client()))]
    again = asyncio.run(control.request(failed.client(), "undeploy", 30.0, deployment_id=ENCODER.deployment_id()))
    assert again["found"] is False, again


def test_a_failed_record_expires_and_is_then_no_longer_listed(failed: Stack) -> None:
    client = failed.sync_client()
    key = deployment_key(ENCODER.deployment_id())
    ttl = client.ttl(key)
    assert 0 < ttl <= FAILED_TTL_S, f"the FAILED record's TTL is {ttl}"
    assert FAILED_TTL_S >= 600, "long enough to read its message in `cornserve status`"
    client.pexpire(key, 1)  # Redis's clock, moved on: the record expires as it would after FAILED_TTL_S
    deadline = time.monotonic() + 30.0
    while client.sismember(deployments_key(), ENCODER.deployment_id()):  # the control plane's look prunes it
        assert time.monotonic() < deadline, "the expired deployment's id stays in the deployments set"
        time.sleep(0.05)  # the poll's period
    assert asyncio.run(load_deployment(failed.client(), ENCODER.deployment_id())) is None


def test_a_new_deploy_after_failed_starts_afresh_and_does_not_expire(failed: Stack) -> None:
    async def invoke():
        dispatcher = Dispatcher(failed.client())
        return await dispatcher.run(ENCODER, {"data": IMAGE})

    output = asyncio.run(invoke())
    assert output.embeddings.shape == (16, 64)
    record = asyncio.run(load_deployment(failed.client(), ENCODER.deployment_id()))
    assert record is not None and record.state is DeploymentState.READY, record
    assert record.message == "" and len(record.executors) == 1, record
    assert failed.sync_client().ttl(deployment_key(ENCODER.deployment_id())) == -1, "the new record keeps the old TTL"
