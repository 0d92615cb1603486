"""`CORNSERVE_NAMESPACE`: two installations share one Redis database, each under its own prefix.

Every key either stack writes (control plane, sidecar, executors, submitter) starts with its
namespace, and neither sees the other's deployments, invocations or tensors.
"""

from __future__ import annotations

import asyncio
import pathlib

import pytest
import torch

from cornserve_builtins.encoder import EncoderTask, Modality
from flyte_cornserve.namespace import ENV_NAMESPACE
from flyte_cornserve.protocol.invocations import InvocationStore, State
from flyte_cornserve.services.control import control_plane_info, list_deployments
from flyte_cornserve.services.dispatcher import Dispatcher
from flyte_cornserve.sidecar.client import SidecarClient

from ..stack import Stack

TEXT = EncoderTask(model_id="tiny-llava", modality=Modality.TEXT)
NAMESPACES = ("tenant-a", "tenant-b")


def test_two_installations_share_one_redis_and_every_key_is_under_its_namespace(
        redis_url: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = Stack(redis_url, tmp_path / "a.log", env={ENV_NAMESPACE: NAMESPACES[0]})
    second = Stack(redis_url, tmp_path / "b.log", env={ENV_NAMESPACE: NAMESPACES[1]}, beside=first)
    try:
        embeddings = {}
        for namespace, stack in zip(NAMESPACES, (first, second)):
            monkeypatch.setenv(ENV_NAMESPACE, namespace)  # this process submits and reads as that installation

            async def use(stack: Stack = stack) -> tuple:
                client = stack.client()
                try:
                    output = await Dispatcher(client).run(TEXT, {"data": f"hello from {namespace}"})
                    (sidecar_id,) = (await control_plane_info(client))["sidecars"].values()
                    return output, sidecar_id, await list_deployments(client), await InvocationStore(client).recent(10)
                finally:
                    await client.aclose()

            output, sidecar_id, deployments, invocations = asyncio.run(use())
            with SidecarClient(sidecar_id, redis_url=stack.url) as sidecar:
                embeddings[namespace] = sidecar.get(output.embeddings)
            assert [d.id for d in deployments] == [TEXT.deployment_id()]
            assert [r.state for r in invocations] == [State.DONE]
        assert not torch.equal(embeddings[NAMESPACES[0]], embeddings[NAMESPACES[1]])

        keys = [key.decode() for key in first.sync_client().scan_iter(count=1000)]
        strays = [key for key in keys if not key.startswith(tuple(f"{ns}:" for ns in NAMESPACES))]
        assert not strays, f"keys outside both namespaces: {strays[:10]}"
        for namespace in NAMESPACES:  # each installation wrote its queues, records, sidecar, heartbeats
            own = {key.split(":")[1] for key in keys if key.startswith(f"{namespace}:")}
            assert {"control-plane", "deployment", "executor", "invocation", "queue", "sidecar", "metrics"} <= own, own
    finally:
        second.stop()
        first.stop()
