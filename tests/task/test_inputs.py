"""Bad input is rejected at the boundary with the task and the field named."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cornserve_builtins.encoder import EncoderInput
from cornserve_builtins.llm import LLMTask
from cornserve_builtins.mllm import MLLMTask
from flyte_cornserve.task import TaskInputError, TaskOptions, TensorRef, trace


@pytest.mark.parametrize(
    ("request_", "field", "problem"),
    [
        ({}, "prompt", "Field required"),
        ({"prompt": 42}, "prompt", "valid string"),
        ({"prompt": ""}, "prompt", "at least 1 character"),
        ({"prompt": "p", "images": "cat.png"}, "images", "valid list"),
        ({"prompt": "p", "images": [1]}, "images.0", "valid string"),
        ({"prompt": "p", "imagez": ["cat.png"]}, "imagez", "Extra inputs"),
    ],
)
def test_invalid_request_names_task_and_field(request_: dict, field: str, problem: str):
    with pytest.raises(TaskInputError) as caught:
        trace(MLLMTask(model_id="m"), request_)
    message = str(caught.value)
    assert message.startswith("invalid input for MLLMTask: ")
    assert f"field '{field}'" in message and problem in message


def test_request_of_another_type_is_rejected():
    with pytest.raises(TaskInputError, match="MLLMTask expects MLLMInput, got EncoderInput"):
        trace(MLLMTask(model_id="m"), EncoderInput(data="x"))
    with pytest.raises(TaskInputError, match="MLLMTask expects MLLMInput, got str"):
        trace(MLLMTask(model_id="m"), "a cat")


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"model_id": ""}, "model_id"),
        ({"model_id": "m", "sampling": {"temperature": -1}}, "sampling.temperature"),
        ({"model_id": "m", "options": {"retries": 11}}, "options.retries"),
        ({"model_id": "m", "resources": {"memory": "lots"}}, "resources.memory"),
        ({"model_id": "m", "nonsense": 1}, "nonsense"),
    ],
)
def test_invalid_unit_task_config_names_the_field(config: dict, field: str):
    with pytest.raises(ValidationError) as caught:
        LLMTask.model_validate(config)
    assert caught.value.title == "LLMTask"
    assert [".".join(map(str, e["loc"])) for e in caught.value.errors()] == [field]


def test_cache_needs_a_version():
    with pytest.raises(ValidationError, match="cache=True needs a cache_version"):
        TaskOptions(cache=True)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"dtype": "complex64"}, "not allowed"),
        ({"nbytes": 100}, "disagrees with shape"),
        ({"shape": (2, -4), "nbytes": -32}, "greater than or equal to 0"),
        ({"id": "has spaces"}, "String should match pattern"),
    ],
)
def test_tensor_ref_rejects_inconsistent_metadata(fields: dict, problem: str):
    base = {"id": "t1", "shape": (2, 4), "dtype": "float32", "nbytes": 32}
    with pytest.raises(ValidationError, match=problem):
        TensorRef(**{**base, **fields})
