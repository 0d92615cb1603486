"""Unit tasks round-trip through JSON by registered class name; equivalent ones share a deployment."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cornserve_builtins.encoder import EncoderTask, Modality
from cornserve_builtins.llm import LLMTask, SamplingParams
from flyte_cornserve.task import (
    Resources,
    TaskOptions,
    UnitTask,
    UnknownTaskClassError,
    unit_task_classes,
    unit_task_from_json,
)

text = st.text(min_size=1, max_size=40)
resources = st.none() | st.builds(
    Resources,
    cpu=st.floats(min_value=0.1, max_value=64, allow_nan=False),
    memory=st.sampled_from(["512Mi", "1Gi", "4Gi", "1.5Gi", "2000M"]),
    gpu=st.integers(0, 8),
)
options = st.builds(
    TaskOptions,
    retries=st.integers(0, 10),
    timeout=st.none() | st.integers(1, 10**6).map(lambda s: timedelta(seconds=s)),
    cache=st.just(False),
    interruptible=st.none() | st.booleans(),
) | st.builds(TaskOptions, cache=st.just(True), cache_version=text)
common = {"resources": resources, "options": options}

#: one strategy per built-in unit task class; a new built-in must add its own here
BUILTIN_STRATEGIES = {
    "EncoderTask": st.builds(EncoderTask, model_id=text, modality=st.sampled_from(Modality), **common),
    "LLMTask": st.builds(
        LLMTask,
        model_id=text,
        sampling=st.builds(
            SamplingParams,
            max_tokens=st.integers(1, 32768),
            temperature=st.floats(0, 2, allow_nan=False),
            top_p=st.floats(0.01, 1, allow_nan=False),
            seed=st.none() | st.integers(-(2**31), 2**31),
        ),
        **common,
    ),
}


def test_every_builtin_unit_task_has_a_round_trip_strategy():
    builtins = {n for n, c in unit_task_classes().items() if c.__module__.startswith("cornserve_builtins.")}
    assert builtins == set(BUILTIN_STRATEGIES)


@given(st.one_of(*BUILTIN_STRATEGIES.values()))
def test_json_round_trip(task: UnitTask):
    restored = unit_task_from_json(task.to_json())
    assert type(restored) is type(task)
    assert restored == task
    assert restored.deployment_id() == task.deployment_id()
    assert json.loads(task.to_json())["task_class"] == type(task).__name__


@given(st.one_of(*BUILTIN_STRATEGIES.values()))
def test_round_trip_survives_numbers_turned_into_floats(task: UnitTask):
    """A Flyte Struct (the TaskTemplate's custom field) stores every number as a double."""

    def floats(value):
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, int):
            return float(value)
        if isinstance(value, dict):
            return {k: floats(v) for k, v in value.items()}
        if isinstance(value, list):
            return [floats(v) for v in value]
        return value

    document = json.loads(task.to_json())
    if any(abs(v) > 2**53 for v in _ints(document)):
        return  # beyond a double's exact range: not representable in a Struct at all
    assert unit_task_from_json(floats(document)) == task


def _ints(value):
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _ints(v)


def test_unknown_class_name_is_a_clear_error():
    with pytest.raises(UnknownTaskClassError, match="unknown unit task class 'DiffusionTask'.*EncoderTask.*LLMTask"):
        unit_task_from_json({"task_class": "DiffusionTask", "config": {}})


def test_malformed_documents_are_rejected():
    with pytest.raises(ValueError, match="'task_class' and 'config'"):
        unit_task_from_json("[1, 2]")
    with pytest.raises(ValueError, match="invalid input for LLMTask: field 'model_id'"):
        unit_task_from_json({"task_class": "LLMTask", "config": {"model_id": ""}})


def test_equivalent_unit_tasks_share_a_deployment():
    base = LLMTask(model_id="llama")
    same = LLMTask(model_id="llama", sampling=SamplingParams(temperature=0.7), options=TaskOptions(retries=3))
    assert same.deployment_id() == base.deployment_id()
    assert same.to_json() != base.to_json()

    for different in [
        LLMTask(model_id="mistral"),
        LLMTask(model_id="llama", resources=Resources(gpu=1)),
        LLMTask(model_id="llama", descriptor="VLLMDescriptor"),
        EncoderTask(model_id="llama"),
    ]:
        assert different.deployment_id() != base.deployment_id()


def test_deployment_id_is_stable_across_processes():
    code = (
        "from cornserve_builtins.llm import LLMTask;"
        "print(LLMTask(model_id='llama').deployment_id())"
    )
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other_process.stdout.strip() == LLMTask(model_id="llama").deployment_id()
    assert other_process.stdout.startswith("llmtask-")


def test_builtin_plugins_are_discovered_through_entry_points():
    """A fresh interpreter that never imported the built-ins still resolves them by class name."""
    code = (
        "import sys, flyte_cornserve.task as t;"
        "assert 'cornserve_builtins.llm' not in sys.modules;"
        "task = t.unit_task_from_json({'task_class': 'LLMTask', 'config': {'model_id': 'x'}});"
        "print(type(task).__module__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "cornserve_builtins.llm"
