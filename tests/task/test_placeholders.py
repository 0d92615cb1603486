"""Using a placeholder's value inside `invoke()` fails at trace time, naming the task and the field."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from cornserve_builtins.encoder import EncoderInput, EncoderTask
from cornserve_builtins.llm import LLMInput, LLMTask
from flyte_cornserve.task import (
    InputRef,
    PlaceholderMisuseError,
    Task,
    TaskInputError,
    TaskIO,
    trace,
)


class QAInput(TaskIO):
    prompt: str


class QAOutput(TaskIO):
    text: str


MISUSES: dict[str, tuple[Callable[[Any], Any], str]] = {
    "bool": (lambda v: bool(v), "truth value"),
    "if": (lambda v: 1 if v else 0, "truth value"),
    "not": (lambda v: not v, "truth value"),
    "==": (lambda v: v == "yes", "comparison \\(==\\)"),
    "!=": (lambda v: v != "yes", "comparison \\(!=\\)"),
    "<": (lambda v: v < "m", "comparison \\(<\\)"),
    ">=": (lambda v: v >= "m", "comparison \\(>=\\)"),
    "+": (lambda v: v + "!", "arithmetic \\(\\+\\)"),
    "radd": (lambda v: "!" + v, "arithmetic \\(\\+\\)"),
    "*": (lambda v: v * 2, "arithmetic \\(\\*\\)"),
    "neg": (lambda v: -v, "arithmetic \\(unary -\\)"),
    "iter": (lambda v: [c for c in v], "iteration"),
    "len": (lambda v: len(v), "length"),
    "in": (lambda v: "a" in v, "items"),
    "index": (lambda v: v[0], "indexing"),
    "str": (lambda v: str(v), "as text \\(str\\)"),
    "f-string": (lambda v: f"{v}", "as text"),
    "int": (lambda v: int(v), "as a number"),
    "float": (lambda v: float(v), "as a number"),
}


class Misuser(Task[QAInput, QAOutput]):
    """Feeds the first LLM's answer into `misuse`, then asks a second LLM."""

    llm: LLMTask
    misuse: str

    def invoke(self, request: QAInput) -> QAOutput:
        answer = self.llm(LLMInput(prompt=request.prompt)).text
        MISUSES[self.misuse][0](answer)
        return QAOutput(text=answer)


@pytest.mark.parametrize("misuse", sorted(MISUSES))
def test_using_an_output_placeholder_names_the_task_and_field(misuse: str):
    task = Misuser(llm=LLMTask(model_id="m"), misuse=misuse)
    with pytest.raises(PlaceholderMisuseError, match=MISUSES[misuse][1]) as caught:
        trace(task, {"prompt": "is it a cat?"})
    message = str(caught.value)
    assert message.startswith("Misuser.invoke() used the")
    assert "output field 'text' of LLMTask (invocation n0)" in message


class InputBrancher(Task[QAInput, QAOutput]):
    llm: LLMTask

    def invoke(self, request: QAInput) -> QAOutput:
        prompt = request.prompt if request.prompt else "default"
        return QAOutput(text=self.llm(LLMInput(prompt=prompt)).text)


def test_branching_on_a_request_value_is_fine_when_it_is_concrete():
    graph = trace(InputBrancher(llm=LLMTask(model_id="m")), {"prompt": "hi"})
    assert graph.invocations[0].input.prompt == "hi"


def test_branching_on_a_workflow_input_value_names_the_request_field():
    request = QAInput.model_construct(prompt=InputRef(("prompt",), "InputBrancher", str))
    with pytest.raises(PlaceholderMisuseError, match="request field 'prompt' of InputBrancher"):
        trace(InputBrancher(llm=LLMTask(model_id="m")), request)


class WrongWiring(Task[QAInput, QAOutput]):
    llm: LLMTask
    encoder: EncoderTask

    def invoke(self, request: QAInput) -> QAOutput:
        text = self.llm(LLMInput(prompt=request.prompt)).text
        self.llm(LLMInput(prompt=request.prompt, embeddings=[text]))
        return QAOutput(text=text)


def test_wiring_a_placeholder_of_the_wrong_type_is_caught_at_trace_time():
    task = WrongWiring(llm=LLMTask(model_id="m"), encoder=EncoderTask(model_id="e"))
    with pytest.raises(TaskInputError, match="field 'embeddings'.*output field 'text' of LLMTask.*has type str"):
        trace(task, {"prompt": "p"})


def test_placeholders_pass_through_validation_next_to_validated_fields():
    class Wires(Task[QAInput, QAOutput]):
        encoder: EncoderTask
        llm: LLMTask

        def invoke(self, request: QAInput) -> QAOutput:
            emb = self.encoder(EncoderInput(data="cat.png")).embeddings
            with pytest.raises(TaskInputError, match="invalid LLMInput: field 'prompt'"):
                LLMInput(prompt="", embeddings=[emb])
            return QAOutput(text=self.llm(LLMInput(prompt=request.prompt, embeddings=[emb])).text)

    graph = trace(Wires(encoder=EncoderTask(model_id="e"), llm=LLMTask(model_id="m")), {"prompt": "p"})
    assert graph.invocations[1].dependencies()[0].invocation_id == "n0"
