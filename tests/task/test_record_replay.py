"""Recording `invoke()` into a graph, and replaying it with real outputs."""

from __future__ import annotations

import pytest

from cornserve_builtins.encoder import EncoderInput, EncoderTask
from cornserve_builtins.llm import LLMInput, LLMTask
from cornserve_builtins.mllm import MLLMInput, MLLMOutput, MLLMTask
from flyte_cornserve.task import (
    ReplayMismatchError,
    Task,
    TaskError,
    TaskIO,
    TensorRef,
    replay,
    trace,
)


class CompareInput(TaskIO):
    prompt: str
    image: str | None = None


class CompareOutput(TaskIO):
    first: str
    second: str
    summary: str


class Compare(Task[CompareInput, CompareOutput]):
    """Nested composite: two MLLMs answer, a third LLM summarises both answers' embeddings-free text."""

    first: MLLMTask
    second: MLLMTask
    judge: LLMTask

    def invoke(self, request: CompareInput) -> CompareOutput:
        images = [] if request.image is None else [request.image]
        a = self.first(MLLMInput(prompt=request.prompt, images=images))
        b = self.second(MLLMInput(prompt=request.prompt, images=images))
        verdict = self.judge(LLMInput(prompt=request.prompt))
        return CompareOutput(first=a.text, second=b.text, summary=verdict.text)


def compare() -> Compare:
    return Compare(first=MLLMTask(model_id="m1"), second=MLLMTask(model_id="m2"), judge=LLMTask(model_id="j"))


def ref(i: int) -> TensorRef:
    return TensorRef(id=f"t{i}", shape=(4, 8), dtype="float32", nbytes=128)


def test_mllm_graph_has_one_encoder_per_image_feeding_the_llm():
    graph = trace(MLLMTask(model_id="m"), {"prompt": "what is this?", "images": ["a.png", "b.png"]})

    assert [inv.path for inv in graph.invocations] == [
        ("MLLMTask", "EncoderTask"), ("MLLMTask", "EncoderTask"), ("MLLMTask", "LLMTask"),
    ]
    assert [inv.input.data for inv in graph.invocations[:2]] == ["a.png", "b.png"]
    assert sorted((e.source, e.target, e.target_field) for e in graph.edges) == [
        ("n0", "n2", "embeddings"), ("n1", "n2", "embeddings"), ("n2", "output", "text"),
    ]


def test_branching_on_request_fields_changes_the_graph():
    text_only = trace(MLLMTask(model_id="m"), {"prompt": "hello"})
    assert [inv.path[-1] for inv in text_only.invocations] == ["LLMTask"]
    assert text_only.edges[0].source == "n0"


def test_nested_composites_flatten_to_unit_task_invocations():
    with_image = trace(compare(), CompareInput(prompt="p", image="cat.png"))
    assert [(inv.id, inv.path) for inv in with_image.invocations] == [
        ("n0", ("Compare", "MLLMTask", "EncoderTask")),
        ("n1", ("Compare", "MLLMTask", "LLMTask")),
        ("n2", ("Compare", "MLLMTask", "EncoderTask")),
        ("n3", ("Compare", "MLLMTask", "LLMTask")),
        ("n4", ("Compare", "LLMTask")),
    ]
    assert [inv.task.model_id for inv in with_image.invocations] == ["m1", "m1", "m2", "m2", "j"]
    assert sorted((e.source, e.target, e.target_field) for e in with_image.edges) == [
        ("n0", "n1", "embeddings"), ("n1", "output", "first"), ("n2", "n3", "embeddings"),
        ("n3", "output", "second"), ("n4", "output", "summary"),
    ]
    without_image = trace(compare(), CompareInput(prompt="p"))
    assert [inv.path[-1] for inv in without_image.invocations] == ["LLMTask", "LLMTask", "LLMTask"]


def test_replay_feeds_real_outputs_through_invoke():
    graph = trace(compare(), CompareInput(prompt="p", image="cat.png"))
    outputs = {
        "n0": {"embeddings": ref(0)}, "n1": {"text": "a cat"},
        "n2": {"embeddings": ref(2)}, "n3": {"text": "a kitten"}, "n4": {"text": "both agree"},
    }
    assert replay(graph, outputs) == CompareOutput(first="a cat", second="a kitten", summary="both agree")


def test_replay_of_a_single_unit_task():
    graph = trace(EncoderTask(model_id="e"), EncoderInput(data="x.png"))
    assert replay(graph, {"n0": {"embeddings": ref(0)}}).embeddings == ref(0)


def test_replay_rejects_missing_outputs_and_invalid_outputs():
    graph = trace(MLLMTask(model_id="m"), {"prompt": "p", "images": ["a.png"]})
    with pytest.raises(ValueError, match="missing: \\['n1'\\]"):
        replay(graph, {"n0": {"embeddings": ref(0)}})
    with pytest.raises(ValueError, match="embeddings"):
        replay(graph, {"n0": {"embeddings": "not a ref"}, "n1": {"text": "t"}})


class Flaky(Task[MLLMInput, MLLMOutput]):
    """Calls a different model on its second run: not deterministic given its request."""

    llm: LLMTask
    other: LLMTask
    runs: list = []

    def invoke(self, request: MLLMInput) -> MLLMOutput:
        self.runs.append(1)
        chosen = self.llm if len(self.runs) == 1 else self.other
        return MLLMOutput(text=chosen(LLMInput(prompt=request.prompt)).text)


def test_replay_detects_a_nondeterministic_invoke():
    task = Flaky(llm=LLMTask(model_id="a"), other=LLMTask(model_id="b"), runs=[])
    graph = trace(task, {"prompt": "p"})
    with pytest.raises(ReplayMismatchError, match="call #0 is LLMTask"):
        replay(graph, {"n0": {"text": "t"}})


def test_calling_a_task_outside_a_graph_is_a_clear_error():
    with pytest.raises(TaskError, match="LLMTask was called outside a task graph"):
        LLMTask(model_id="m")(LLMInput(prompt="p"))
