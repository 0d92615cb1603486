"""`pyflyte serve connector` driven exactly as FlytePropeller drives it: flyteidl gRPC stubs.

CreateTask / GetTask / DeleteTask on the serialized `cornserve` task templates of the caption
workflow, the encoder's TensorRef output literal passed on as the LLM's input.
"""

from __future__ import annotations

import os
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
from flytekit.tools.translator import get_serializable

from cornserve_builtins.encoder import EncoderTask
from cornserve_builtins.llm import LLMTask, SamplingParams
from flyte_cornserve.flyte import flyte_task

from ..connector import ConnectorProcess
from ..stack import Stack

IMAGE = os.path.join(os.path.dirname(__file__), "..", "..", "workflows", "images", "blue-circle-on-yellow.png")
ENCODER = EncoderTask(model_id="tiny-llava")
LLM = LLMTask(model_id="tiny-llava", sampling=SamplingParams(max_tokens=16))
CATEGORY = agent_pb2.TaskCategory(name="cornserve", version=0)
TERMINAL = {TaskExecution.SUCCEEDED, TaskExecution.FAILED, TaskExecution.RETRYABLE_FAILED, TaskExecution.ABORTED}


@pytest.fixture(scope="module")
def connector(stack: Stack) -> Iterator[agent_pb2_grpc.AsyncAgentServiceStub]:
    process = ConnectorProcess(stack.url)
    try:
        yield process.stub
    finally:
        process.stop()


def template(unit_task):
    settings = SerializationSettings(ImageConfig.auto_default_image())
    return get_serializable(OrderedDict(), settings, flyte_task(unit_task)).template.to_flyte_idl()


def literals(values: dict, types: dict):
    return TypeEngine.dict_to_literal_map(FlyteContextManager.current_context(), values, types).to_flyte_idl()


def create(stub, unit_task, values: dict, types: dict, **passed) -> bytes:
    """CreateTask with `values` as literals, plus `passed`: literals taken as they are (node outputs)."""
    inputs = literals(values, types)
    for name, literal in passed.items():
        inputs.literals[name].CopyFrom(literal)
    reply = stub.CreateTask(agent_pb2.CreateTaskRequest(template=template(unit_task), inputs=inputs,
                                                        output_prefix="/tmp/unused"))
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


def test_encoder_then_llm_through_grpc_passing_the_tensor_ref(connector) -> None:
    encoded, phases = until_terminal(connector, create(connector, ENCODER, {"data": IMAGE}, {"data": str}))
    assert encoded.phase == TaskExecution.SUCCEEDED, encoded.message
    assert phases[-1] == TaskExecution.SUCCEEDED and set(phases) <= {TaskExecution.QUEUED, TaskExecution.RUNNING,
                                                                      TaskExecution.SUCCEEDED}
    embeddings = encoded.outputs.literals["embeddings"]
    assert embeddings.scalar.generic.fields["shape"].list_value.values  # a TensorRef struct, not tensor bytes
    assert embeddings.ByteSize() < 1024

    # the LLM node's `embeddings` input binds a collection of the encoder node's output literal
    passed = literals_pb2.Literal(collection=literals_pb2.LiteralCollection(literals=[embeddings]))
    answer, _ = until_terminal(connector, create(
        connector, LLM, {"prompt": "Describe the image."}, {"prompt": str}, embeddings=passed,
    ))
    assert answer.phase == TaskExecution.SUCCEEDED, answer.message
    text = answer.outputs.literals["text"].scalar.primitive.string_value
    assert "circle" in text or "square" in text or "background" in text, text


def test_user_error_is_a_permanent_failure_naming_the_task(connector) -> None:
    failed, _ = until_terminal(connector, create(connector, ENCODER, {"data": "/no/such/image.png"}, {"data": str}))
    assert failed.phase == TaskExecution.FAILED  # not RETRYABLE_FAILED: retrying cannot help
    assert "EncoderTask tiny-llava" in failed.message and "/no/such/image.png" in failed.message


def test_invalid_input_is_refused_at_create(connector) -> None:
    failed, phases = until_terminal(connector, create(connector, LLM, {"prompt": ""}, {"prompt": str}))
    assert phases == [TaskExecution.FAILED]
    assert "LLMTask" in failed.message and "prompt" in failed.message


def test_delete_cancels(connector, stack: Stack) -> None:
    long = LLMTask(model_id="tiny-llava", sampling=SamplingParams(max_tokens=200, ignore_eos=True))
    meta = create(connector, long, {"prompt": "tell me a long story"}, {"prompt": str})
    connector.DeleteTask(agent_pb2.DeleteTaskRequest(task_category=CATEGORY, resource_meta=meta))
    cancelled, _ = until_terminal(connector, meta)
    assert cancelled.phase == TaskExecution.ABORTED, cancelled.message
