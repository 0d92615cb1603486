"""Fuzz: hand-built literal maps to a real `pyflyte serve connector` over gRPC, as Propeller sends them.

For the encoder (`data: str`) and the LLM (`prompt: str`, `embeddings: list[TensorRef]`): literals of
the wrong type (int, float with NaN/inf, bool, a struct, a collection where a scalar is expected, a
scalar where a collection is expected), empty and huge strings, missing and unknown inputs, junk in
the TensorRef structs of `embeddings` (wrong field types, negative shapes, unknown dtypes, sizes
that disagree). CreateTask always answers (no gRPC error) and GetTask ends in FAILED with a message
naming the task and the field; a valid but odd input (a string that is no image) runs and fails as
the encoder says. No LLM input here is valid, so no vLLM engine starts. Afterwards the same
connector process still runs a normal encoder task to SUCCEEDED.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import timedelta

import grpc
import pytest
from flyteidl.admin import agent_pb2
from flyteidl.core import literals_pb2 as L
from flyteidl.core.execution_pb2 import TaskExecution
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cornserve_builtins.encoder import EncoderTask
from cornserve_builtins.llm import LLMTask, SamplingParams
from flyte_cornserve.task import TaskOptions
from flyte_cornserve.task.tensor_ref import DTYPE_ITEMSIZE

from ..connector import ConnectorProcess
from ..flyte.test_connector_grpc import IMAGE, template, until_terminal
from ..stack import Stack

OPTIONS = TaskOptions(timeout=timedelta(seconds=60))  # anything that queues ends within a minute
ENCODER = EncoderTask(model_id="tiny-llava", options=OPTIONS)
LLM = LLMTask(model_id="tiny-llava", sampling=SamplingParams(max_tokens=4), options=OPTIONS)
TEMPLATES = {}
MAX_MESSAGE = 16 * 1024  # a failure message is for people (and Propeller stores it): bounded
FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def connector(stack: Stack) -> Iterator[ConnectorProcess]:
    process = ConnectorProcess(stack.url)
    try:
        yield process
    finally:
        process.stop()


def create(connector: ConnectorProcess, task, literals: dict[str, L.Literal], prefix) -> bytes:
    """CreateTask as Propeller sends it; it must answer, whatever the literals."""
    if task not in TEMPLATES:
        TEMPLATES[task] = template(task)
    reply = connector.stub.CreateTask(agent_pb2.CreateTaskRequest(
        template=TEMPLATES[task], inputs=L.LiteralMap(literals=literals), output_prefix=str(prefix)))
    return reply.resource_meta


def outcome(connector: ConnectorProcess, meta: bytes):
    resource, phases = until_terminal(connector.stub, meta, timeout_s=120)
    assert connector.process.poll() is None, "the connector process died"
    assert len(resource.message) <= MAX_MESSAGE, f"a {len(resource.message)}-character message"
    return resource, phases


# --- literals ----------------------------------------------------------------------------------------

def string(value: str) -> L.Literal:
    return L.Literal(scalar=L.Scalar(primitive=L.Primitive(string_value=value)))


def struct(value: dict) -> L.Literal:
    generic = struct_pb2.Struct()
    generic.update(value)
    return L.Literal(scalar=L.Scalar(generic=generic))


def collection(*items: L.Literal) -> L.Literal:
    return L.Literal(collection=L.LiteralCollection(literals=list(items)))


floats = st.floats() | st.sampled_from([math.nan, math.inf, -math.inf])
json_like = st.recursive(st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=6),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                         max_leaves=5)
not_a_string = st.one_of(
    st.integers(-2**63, 2**63 - 1).map(lambda i: L.Literal(scalar=L.Scalar(primitive=L.Primitive(integer=i)))),
    floats.map(lambda f: L.Literal(scalar=L.Scalar(primitive=L.Primitive(float_value=f)))),
    st.booleans().map(lambda b: L.Literal(scalar=L.Scalar(primitive=L.Primitive(boolean=b)))),
    st.dictionaries(st.text(max_size=5), json_like, max_size=3).map(struct),
    st.lists(st.text(max_size=5).map(string), max_size=3).map(lambda items: collection(*items)),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5).map(string), max_size=2).map(
        lambda m: L.Literal(map=L.LiteralMap(literals=m))),
    st.just(L.Literal(scalar=L.Scalar(none_type=L.Void()))),
    st.just(L.Literal()),  # nothing set at all
)

GOOD_REF = {"id": "abc", "shape": [2, 3], "dtype": "float32", "nbytes": 24, "location": "nowhere"}
#: ways to spoil a TensorRef struct; each makes it invalid
spoiled_refs = st.one_of(
    st.lists(st.integers(-2**40, -1), min_size=1, max_size=3).map(lambda s: {**GOOD_REF, "shape": s, "nbytes": 0}),
    st.text(max_size=10).filter(lambda d: d not in DTYPE_ITEMSIZE).map(lambda d: {**GOOD_REF, "dtype": d}),
    st.integers(-2**50, 2**50).filter(lambda n: n != 24).map(lambda n: {**GOOD_REF, "nbytes": n}),
    st.sampled_from([math.nan, math.inf, 1.5, -0.5]).map(lambda n: {**GOOD_REF, "nbytes": n}),
    json_like.filter(lambda v: not isinstance(v, str) or not v).map(lambda v: {**GOOD_REF, "id": v}),
    json_like.filter(lambda v: not isinstance(v, list)).map(lambda v: {**GOOD_REF, "shape": v}),
    st.sampled_from(sorted(GOOD_REF)).filter(lambda k: k != "location").map(
        lambda k: {name: v for name, v in GOOD_REF.items() if name != k}),
    st.text(min_size=1, max_size=6).filter(lambda k: k not in GOOD_REF).map(lambda k: {**GOOD_REF, k: 1}),
    st.just({**GOOD_REF, "shape": [2, {"nested": [1, 2]}]}),
)
bad_embeddings = st.one_of(
    st.lists(spoiled_refs.map(struct), min_size=1, max_size=3).map(lambda refs: collection(struct(GOOD_REF), *refs)),
    spoiled_refs.map(struct),  # a struct where a collection is expected
    not_a_string.filter(lambda lit: not lit.HasField("collection")),
    st.lists(not_a_string, min_size=1, max_size=2).map(lambda items: collection(*items)),
)


def assert_refused(connector, meta: bytes, task: str, field: str) -> None:
    failed, phases = outcome(connector, meta)
    assert phases == [TaskExecution.FAILED], (phases, failed.message)
    assert task in failed.message and field in failed.message, failed.message


# --- the encoder -----------------------------------------------------------------------------------

@FUZZ
@given(data=not_a_string)
def test_encoder_data_of_the_wrong_type_is_refused_naming_task_and_field(connector, tmp_path, data) -> None:
    assert_refused(connector, create(connector, ENCODER, {"data": data}, tmp_path), "EncoderTask tiny-llava", "data")


@FUZZ
@given(extra=st.dictionaries(st.text(min_size=1, max_size=10).filter(lambda k: k != "data"), st.text(max_size=5).map(string),
                             min_size=1, max_size=3),
       with_data=st.booleans())
def test_encoder_missing_and_unknown_inputs_are_refused(connector, tmp_path, extra, with_data) -> None:
    literals = {**extra, **({"data": string(IMAGE)} if with_data else {})}
    field = repr(sorted(extra)[0]) if with_data else "data"
    assert_refused(connector, create(connector, ENCODER, literals, tmp_path), "EncoderTask", field)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.text(max_size=200), st.sampled_from(["/a\x00b", "/tmp/" + "y" * 300, "file://", "data:,x"])))
def test_encoder_strings_that_are_no_image_fail_as_the_encoder_says(connector, tmp_path, data) -> None:
    """Valid input (a string), odd content: it runs and fails as a user error naming the task, or is
    refused at create when empty."""
    failed, phases = outcome(connector, create(connector, ENCODER, {"data": string(data)}, tmp_path))
    assert failed.phase == TaskExecution.FAILED, (phases, failed.message)
    assert "EncoderTask" in failed.message, failed.message


@pytest.mark.parametrize("megabytes", [1, 3])
def test_encoder_huge_strings_fail_with_a_bounded_message(connector, tmp_path, megabytes) -> None:
    """The executor's error quotes the path it could not open: cut short, it stays a user error."""
    data = "/no/such/" + "x" * (megabytes << 20)
    failed, phases = outcome(connector, create(connector, ENCODER, {"data": string(data)}, tmp_path))
    assert failed.phase == TaskExecution.FAILED, (phases, failed.message[:500])
    assert "EncoderTask tiny-llava" in failed.message and "cannot read /no/such/xxx" in failed.message, failed.message[:500]


def test_a_request_over_grpcs_message_limit_is_refused_by_grpc(connector, tmp_path) -> None:
    """5 MiB of input exceeds gRPC's default 4 MiB message limit: the gRPC server refuses it with
    RESOURCE_EXHAUSTED (Propeller offloads literals that large), and the connector keeps serving."""
    with pytest.raises(grpc.RpcError) as refused:
        create(connector, ENCODER, {"data": string("/no/such/" + "x" * (5 << 20))}, tmp_path)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
    assert connector.process.poll() is None


# --- the LLM (never a valid input: no vLLM engine starts) -------------------------------------------

@FUZZ
@given(prompt=st.one_of(not_a_string, st.just(string("")), st.none()), embeddings=st.none() | st.just(collection()))
def test_llm_prompt_of_the_wrong_type_or_missing_is_refused(connector, tmp_path, prompt, embeddings) -> None:
    literals = {**({} if prompt is None else {"prompt": prompt}), **({} if embeddings is None else {"embeddings": embeddings})}
    assert_refused(connector, create(connector, LLM, literals, tmp_path), "LLMTask", "prompt")


@FUZZ
@given(embeddings=bad_embeddings, prompt=st.text(min_size=1, max_size=50).filter(str.strip))
def test_llm_junk_embeddings_are_refused_naming_the_field(connector, tmp_path, embeddings, prompt) -> None:
    literals = {"prompt": string(prompt), "embeddings": embeddings}
    assert_refused(connector, create(connector, LLM, literals, tmp_path), "LLMTask", "embeddings")


def test_the_connector_runs_a_normal_encoder_task_after_the_fuzzing(connector, tmp_path) -> None:
    done, phases = outcome(connector, create(connector, ENCODER, {"data": string(IMAGE)}, tmp_path))
    assert done.phase == TaskExecution.SUCCEEDED, (phases, done.message)
