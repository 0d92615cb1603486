"""What the cluster would run, run here (issue 13): the executor Pod the Kubernetes backend builds, the
sidecar DaemonSet's container and the connector Deployment's container, each taken as it is (its
command, args, env with the downward API's values and the Secrets' filled in, its volumes, its
readiness probe) and started as a local process by `tests.k8s_local.Kubelet`. The executor pod serves
an invocation through the DaemonSet's sidecar; the connector runs a task template over gRPC, as
FlytePropeller does. No Kubernetes runs here, so what the API server and the kubelet do around this
(scheduling, pulling, the probes' timing) is not covered: the objects' shapes are (test_pods)."""

from __future__ import annotations

import asyncio
import pathlib
import secrets
import time
import uuid
from collections.abc import Callable, Iterator

import grpc
import pytest
import redis.asyncio as aioredis
import yaml
from flyteidl.admin import agent_pb2
from flyteidl.core import tasks_pb2
from flyteidl.core.execution_pb2 import TaskExecution
from flyteidl.service import agent_pb2_grpc
from flytekit import FlyteContextManager
from flytekit.core.type_engine import TypeEngine
from google.protobuf.json_format import Parse

from cornserve_builtins.encoder import EncoderTask
from flyte_cornserve.descriptors import descriptor_for
from flyte_cornserve.models import resolve_model
from flyte_cornserve.protocol.invocations import InvocationStore, State
from flyte_cornserve.redis_server import EmbeddedRedis
from flyte_cornserve.services.backend import ExecutorSpec
from flyte_cornserve.services.pods import PodSettings, escape, executor_pod
from flyte_cornserve.sidecar.client import SidecarClient
from flyte_cornserve.task import TensorRef

from ..connector import outputs_at
from ..k8s_local import VENV_BIN, Kubelet, expand
from ..stack import Stack

PROJECT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = PROJECT / "deploy" / "base"
FIXTURE = PROJECT / "tests" / "flyte" / "fixtures" / "encoder-template-0.1.0.json"
IMAGE = PROJECT / "workflows" / "images" / "blue-circle-on-yellow.png"


def deploy_object(file: str, kind: str) -> dict:
    (obj,) = [doc for doc in yaml.safe_load_all((DEPLOY / file).read_text()) if doc and doc["kind"] == kind]
    return obj


@pytest.fixture
def kubelets(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Kubelet]]:
    """Kubelets of a node of their own; every container they started is stopped at the end."""
    monkeypatch.delenv("CORNSERVE_NAMESPACE", raising=False)  # this process reads the containers' keys
    started: list[Kubelet] = []

    def kubelet(secrets: dict[str, dict[str, str]]) -> Kubelet:
        image = tmp_path / "image"  # the Dockerfile's ENV and the base image's, as folders here
        (image / "home").mkdir(parents=True, exist_ok=True)
        (image / "var" / "lib" / "cornserve").mkdir(parents=True, exist_ok=True)
        image_env = {"PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": str(image / "home"),
                     "TMPDIR": str(tmp_path), "CORNSERVE_HOME": str(image / "var" / "lib" / "cornserve")}
        started.append(Kubelet(tmp_path / "kubelet", f"node-{uuid.uuid4().hex[:8]}", secrets, image_env))
        return started[-1]

    yield kubelet
    for kubelet_ in started:
        kubelet_.stop_all()


@pytest.fixture(scope="module")
def private_redis() -> Iterator[str]:
    """The Redis the `cornserve-redis` Secret names: one of this module's own, as the containers
    set no Redis namespace."""
    with EmbeddedRedis() as server:
        yield server.url


@pytest.mark.parametrize("text", ["$(HOME)", "a$$b", "$", "price: $5", "$(", "{\"p\": \"$(X) $$(Y)\"}", ""])
def test_an_escaped_argument_reaches_the_process_unchanged(text: str) -> None:
    assert expand(escape(text), {"HOME": "/root", "X": "x", "Y": "y"}) == text


def test_expansion_is_the_kubelets() -> None:
    """The examples of the Kubernetes API reference (a container's `args`)."""
    variables = {"VAR_NAME": "value"}
    assert expand("$(VAR_NAME)", variables) == "value"
    assert expand("$$(VAR_NAME)", variables) == "$(VAR_NAME)"
    assert expand("$(UNKNOWN) and $(VAR_NAME)", variables) == "$(UNKNOWN) and value"


def test_the_sidecar_daemonset_and_an_executor_pod_serve_an_invocation(kubelets, private_redis: str,
                                                                       tmp_path: pathlib.Path) -> None:
    token = secrets.token_hex(16)
    kubelet = kubelets({"cornserve-redis": {"url": private_redis}, "cornserve-sidecar-token": {"token": token}})
    sidecar = kubelet.run(deploy_object("sidecar.yaml", "DaemonSet"), "sidecar")
    assert sidecar.argv[sidecar.argv.index("--id") + 1] == kubelet.node_name

    task = EncoderTask(model_id=str(resolve_model("tiny-llava")))  # a folder: the pod builds no model
    spec = ExecutorSpec(f"{task.deployment_id()[:24]}-{uuid.uuid4().hex[:6]}", task.deployment_id(), task.to_json(),
                        "cluster", descriptor_for(task).resources())
    pod = executor_pod(spec, PodSettings(namespace="cornserve", image="flyte-cornserve")).to_dict()
    executor = kubelet.run(pod, "executor")  # ready: its readiness probe found the ready file
    assert executor.argv[executor.argv.index("--task") + 1] == task.to_json()
    assert executor.env["CORNSERVE_SIDECAR_ID"] == kubelet.node_name
    assert "HF_TOKEN" not in executor.env  # its Secret is optional, and absent here

    record = asyncio.run(invoke(private_redis, task.deployment_id(), {"data": str(IMAGE)}))
    assert record.state == State.DONE, record.error
    ref = TensorRef.model_validate(record.output["embeddings"])
    client = SidecarClient(kubelet.node_name, redis_url=private_redis, token=token)
    try:
        embeddings = client.get(ref, timeout=30)
        assert tuple(embeddings.shape) == (16, 64)
        client.release(ref)
    finally:
        client.close()


async def invoke(redis_url: str, deployment_id: str, item: dict):
    store = InvocationStore(aioredis.Redis.from_url(redis_url))
    try:
        return await store.wait(await store.submit(deployment_id, item, timeout_s=120), 120)
    finally:
        await store.redis.aclose()


def test_the_connector_deployment_runs_a_task_over_grpc(kubelets, stack: Stack, tmp_path: pathlib.Path) -> None:
    kubelet = kubelets({"cornserve-redis": {"url": stack.url}})
    kubelet.run(deploy_object("connector.yaml", "Deployment"), "connector")  # its gRPC health: SERVING

    template = Parse(FIXTURE.read_text(), tasks_pb2.TaskTemplate())
    inputs = TypeEngine.dict_to_literal_map(FlyteContextManager.current_context(), {"data": str(IMAGE)},
                                            {"data": str}).to_flyte_idl()
    with grpc.insecure_channel(f"{kubelet.ip}:8000") as channel:
        stub = agent_pb2_grpc.AsyncAgentServiceStub(channel)
        meta = stub.CreateTask(agent_pb2.CreateTaskRequest(template=template, inputs=inputs,
                                                           output_prefix=str(tmp_path / "out"))).resource_meta
        deadline = time.monotonic() + 300
        while True:
            resource = stub.GetTask(agent_pb2.GetTaskRequest(
                task_category=agent_pb2.TaskCategory(name="cornserve", version=0), resource_meta=meta)).resource
            if resource.phase in (TaskExecution.SUCCEEDED, TaskExecution.FAILED, TaskExecution.RETRYABLE_FAILED):
                break
            assert time.monotonic() < deadline, resource.message
            time.sleep(0.2)  # Propeller's own polling interval stands in here
    assert resource.phase == TaskExecution.SUCCEEDED, resource.message
    embeddings = outputs_at(resource, tmp_path / "out").literals["embeddings"].scalar.generic.fields
    assert embeddings["id"].string_value.startswith("emb-")
