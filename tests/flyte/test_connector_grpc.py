"""`pyflyte serve connector` driven exactly as FlytePropeller drives it: flyteidl gRPC stubs.

CreateTask / GetTask / DeleteTask on the serialized `cornserve` task templates of the caption
workflow, each node with its own output prefix; the encoder's TensorRef output literal (read from
its `outputs.pb`, as Propeller reads it) passed on as the LLM's input; each node's deck.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections import OrderedDict
from collections.abc import Iterator

import pytest
from flyteidl.admin import agent_pb2
from flyteidl.core import literals_pb2
from flyteidl.core.execution_pb2 import TaskExecution
from flyteidl.service import agent_pb2_grpc
from flytekit import FlyteContextManager
from flytekit.configuration import ImageConfig, SerializationSettings
from flytekit.core.type_engine import TypeEngine
from flytekit.models.literals import LiteralMap
from flytekit.tools.translator import get_serializable

from cornserve_builtins.encoder import EncoderTask
from cornserve_builtins.llm import LLMTask, SamplingParams
from flyte_cornserve.flyte import flyte_task
from flyte_cornserve.protocol.invocations import events_key, invocation_key
from flyte_cornserve.task import Resources

from ..connector import ConnectorProcess, outputs_at
from ..html_deck import parse, read_deck
from ..media_servers import S3Server
from ..stack import Stack, new_image

IMAGE = os.path.join(os.path.dirname(__file__), "..", "..", "workflows", "images", "blue-circle-on-yellow.png")
ENCODER = EncoderTask(model_id="tiny-llava")
LLM = LLMTask(model_id="tiny-llava", sampling=SamplingParams(max_tokens=16))
CATEGORY = agent_pb2.TaskCategory(name="cornserve", version=0)
TERMINAL = {TaskExecution.SUCCEEDED, TaskExecution.FAILED, TaskExecution.RETRYABLE_FAILED, TaskExecution.ABORTED}


@pytest.fixture(scope="module")
def connector(stack: Stack, s3: S3Server) -> Iterator[agent_pb2_grpc.AsyncAgentServiceStub]:
    process = ConnectorProcess(stack.url, env=s3.flytekit_env)  # output prefixes may be s3:// ones
    try:
        yield process.stub
    finally:
        process.stop()


def template(unit_task):
    settings = SerializationSettings(ImageConfig.auto_default_image())
    return get_serializable(OrderedDict(), settings, flyte_task(unit_task)).template.to_flyte_idl()


def literals(values: dict, types: dict):
    return TypeEngine.dict_to_literal_map(FlyteContextManager.current_context(), values, types).to_flyte_idl()


def create(stub, unit_task, values: dict, types: dict, output_prefix: pathlib.Path | str, **passed) -> bytes:
    """CreateTask with `values` as literals, plus `passed`: literals taken as they are (node outputs)."""
    inputs = literals(values, types)
    for name, literal in passed.items():
        inputs.literals[name].CopyFrom(literal)
    reply = stub.CreateTask(agent_pb2.CreateTaskRequest(template=template(unit_task), inputs=inputs,
                                                        output_prefix=str(output_prefix)))
    return reply.resource_meta


def until_terminal(stub, meta: bytes, timeout_s: float = 300.0):
    """GetTask until a terminal phase, as FlytePropeller polls a connector task."""
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        resource = stub.GetTask(agent_pb2.GetTaskRequest(task_category=CATEGORY, resource_meta=meta)).resource
        if not seen or seen[-1] != resource.phase:
            seen.append(resource.phase)
        if resource.phase in TERMINAL:
            return resource, seen
        time.sleep(0.2)  # Propeller's own polling interval stands in here
    raise AssertionError(f"still not terminal after {timeout_s} s; phases seen {seen}")


def test_encoder_then_llm_through_grpc_passing_the_tensor_ref(connector, tmp_path) -> None:
    n0, n1 = tmp_path / "n0", tmp_path / "n1"
    image = str(new_image(IMAGE, tmp_path))  # a put, not a hit of an earlier test's: its deck shows it
    encoded, phases = until_terminal(connector, create(connector, ENCODER, {"data": image}, {"data": str}, n0))
    assert encoded.phase == TaskExecution.SUCCEEDED, encoded.message
    assert phases[-1] == TaskExecution.SUCCEEDED and set(phases) <= {TaskExecution.QUEUED, TaskExecution.RUNNING,
                                                                      TaskExecution.SUCCEEDED}
    embeddings = outputs_at(encoded, n0).literals["embeddings"]
    assert embeddings.scalar.generic.fields["shape"].list_value.values  # a TensorRef struct, not tensor bytes
    assert embeddings.ByteSize() < 1024

    # the LLM node's `embeddings` input binds a collection of the encoder node's output literal
    passed = literals_pb2.Literal(collection=literals_pb2.LiteralCollection(literals=[embeddings]))
    answer, _ = until_terminal(connector, create(
        connector, LLM, {"prompt": "Describe the image."}, {"prompt": str}, n1, embeddings=passed,
    ))
    assert answer.phase == TaskExecution.SUCCEEDED, answer.message
    outputs = LiteralMap.from_flyte_idl(outputs_at(answer, n1))  # flytekit's LiteralMap, as Propeller reads it
    text = TypeEngine.to_python_value(FlyteContextManager.current_context(), outputs.literals["text"], str)
    assert "circle" in text or "square" in text or "background" in text, text
    links = {link.name: link.uri for link in answer.log_links}
    assert links["deck"] == (n1 / "deck.html").as_uri()  # locally, the deck; and each executor's log file
    assert any(name.startswith("executor log (") and pathlib.Path(uri.removeprefix("file://")).is_file()
               for name, uri in links.items())

    # each node's deck: the timeline, the executor, the tensors it wrote or read
    shape = [int(v.number_value) for v in embeddings.scalar.generic.fields["shape"].list_value.values]
    for prefix, op, state_count in ((n0, "put", 1), (n1, "get", 1)):
        deck = read_deck(prefix / "deck.html")
        states = [row[1] for row in deck.rows("timeline", "event")]
        assert states == ["CREATED", "QUEUED", "RUNNING", "DONE"], states
        executor = dict((row[0], row[1]) for row in deck.rows("summary"))["executor"]
        assert executor and any(executor in row for row in deck.rows("timeline", "event"))
        assert executor in {link.name.split("(")[-1].rstrip(")") for link in
                            (encoded if prefix == n0 else answer).log_links}
        tensors = [row for row in deck.rows("tensors", "tensor")]
        assert len(tensors) == state_count, tensors
        assert tensors[0][0] == op and tensors[0][2] == "×".join(map(str, shape)) and tensors[0][5] == "shared memory"


def test_outputs_and_deck_go_to_an_object_store_prefix(connector, s3: S3Server) -> None:
    """As on a cluster: the node's output prefix is in a bucket; the connector writes there with
    flytekit's data persistence (its credentials and endpoint)."""
    s3.put("flyte-outputs", {})
    prefix = "s3://flyte-outputs/metadata/run1/n0/0"
    encoded, _ = until_terminal(connector, create(connector, ENCODER, {"data": IMAGE}, {"data": str}, prefix))
    assert encoded.phase == TaskExecution.SUCCEEDED, encoded.message
    assert not encoded.outputs.literals and "deck" not in {link.name for link in encoded.log_links}
    outputs = literals_pb2.LiteralMap.FromString(s3.read("flyte-outputs", "metadata/run1/n0/0/outputs.pb"))
    assert outputs.literals["embeddings"].scalar.generic.fields["shape"].list_value.values
    deck = parse(s3.read("flyte-outputs", "metadata/run1/n0/0/deck.html").decode())
    assert [row[1] for row in deck.rows("timeline", "event")] == ["CREATED", "QUEUED", "RUNNING", "DONE"]


def test_user_error_is_a_permanent_failure_naming_the_task(connector, tmp_path) -> None:
    failed, _ = until_terminal(connector, create(connector, ENCODER, {"data": "/no/such/image.png"}, {"data": str},
                                                 tmp_path))
    assert failed.phase == TaskExecution.FAILED  # not RETRYABLE_FAILED: retrying cannot help
    assert "EncoderTask tiny-llava" in failed.message and "/no/such/image.png" in failed.message
    assert "[1 attempt(s) on " in failed.message and "queued" in failed.message  # no deck shows: the summary


def test_invalid_input_is_refused_at_create(connector, tmp_path) -> None:
    failed, phases = until_terminal(connector, create(connector, LLM, {"prompt": ""}, {"prompt": str}, tmp_path))
    assert phases == [TaskExecution.FAILED]
    assert "LLMTask" in failed.message and "prompt" in failed.message


def test_delete_cancels(connector, stack: Stack, tmp_path) -> None:
    long = LLMTask(model_id="tiny-llava", sampling=SamplingParams(max_tokens=200, ignore_eos=True))
    meta = create(connector, long, {"prompt": "tell me a long story"}, {"prompt": str}, tmp_path)
    connector.DeleteTask(agent_pb2.DeleteTaskRequest(task_category=CATEGORY, resource_meta=meta))
    cancelled, _ = until_terminal(connector, meta)
    assert cancelled.phase == TaskExecution.ABORTED, cancelled.message


def test_no_control_plane_at_create_is_a_retryable_failure(redis_url, tmp_path) -> None:
    """Infrastructure trouble at create() (here: no control plane serves the Redis, the session's
    database 0) is RETRYABLE_FAILED, so Flyte's retries apply; the message says what is wrong."""
    process = ConnectorProcess(redis_url)
    try:
        failed, phases = until_terminal(process.stub, create(process.stub, ENCODER, {"data": IMAGE}, {"data": str},
                                                             tmp_path))
    finally:
        process.stop()
    assert phases == [TaskExecution.RETRYABLE_FAILED], failed.message
    assert "no cornserve control plane is serving this Redis" in failed.message


def test_a_deployment_that_does_not_fit_is_a_permanent_failure(connector, tmp_path) -> None:
    """The control plane's refusal (no node has the cores) cannot be fixed by retrying: FAILED."""
    huge = EncoderTask(model_id="tiny-llava", resources=Resources(cpu=512))
    failed, phases = until_terminal(connector, create(connector, huge, {"data": IMAGE}, {"data": str}, tmp_path))
    assert phases == [TaskExecution.FAILED], failed.message
    assert "cpu" in failed.message


def test_get_of_an_expired_invocation_is_a_clear_failure(connector, stack: Stack, tmp_path) -> None:
    """The invocation's record is gone (expired, or another Redis): GetTask answers FAILED naming
    the invocation, instead of an error of the connector service."""
    meta = create(connector, ENCODER, {"data": IMAGE}, {"data": str}, tmp_path)
    done, _ = until_terminal(connector, meta)
    assert done.phase == TaskExecution.SUCCEEDED, done.message
    invocation_id = json.loads(meta)["invocation_id"]
    assert stack.sync_client().delete(invocation_key(invocation_id), events_key(invocation_id)) == 2
    gone, phases = until_terminal(connector, meta)
    assert phases == [TaskExecution.FAILED]
    assert invocation_id in gone.message and "expired" in gone.message
