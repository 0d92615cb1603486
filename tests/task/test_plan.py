"""Plans: a recorded graph as JSON, filled in with outputs where the task's code is not installed."""

from __future__ import annotations

import pytest

from cornserve_builtins.mllm import MLLMInput, MLLMOutput, MLLMTask
from flyte_cornserve.task import Plan, Task, TaskDefinitionError, plan_of, task_from_reference, task_reference, trace
from flyte_cornserve.task.errors import UnknownTaskClassError
from flyte_cornserve.task.placeholder import InputRef

CAPTIONER = MLLMTask(model_id="tiny-llava")


def test_a_plan_names_its_unit_tasks_and_where_each_output_goes() -> None:
    table: dict = {}
    plan = plan_of(trace(CAPTIONER, {"prompt": "hi", "images": ["/a.png", "/b.png"]}), table)
    encoders = [n for n in plan.nodes if n.task == table[CAPTIONER.encoder]]
    (llm,) = [n for n in plan.nodes if n.task == table[CAPTIONER.llm]]
    assert [n.input.value for n in encoders] == [{"data": "/a.png"}, {"data": "/b.png"}]
    assert llm.input.needs == {n.id for n in encoders}
    assert llm.input.value["prompt"] == "hi"
    # the LLM's two embeddings come from the two encoders, in order
    assert [(s.at, s.node) for s in llm.input.slots] == [(("embeddings", 0), encoders[0].id),
                                                          (("embeddings", 1), encoders[1].id)]
    outputs = {encoders[0].id: {"embeddings": "A"}, encoders[1].id: {"embeddings": "B"}}
    assert llm.input.fill(outputs) == {"prompt": "hi", "embeddings": ["A", "B"]}
    assert plan.output.fill({llm.id: {"text": "two shapes"}}) == {"text": "two shapes"}


def test_one_task_table_serves_many_plans_and_json_round_trips() -> None:
    table: dict = {}
    first = plan_of(trace(CAPTIONER, {"prompt": "a", "images": ["/a.png"]}), table)
    second = plan_of(trace(CAPTIONER, {"prompt": "b"}), table)  # text only: the LLM alone
    assert len(table) == 2 and [n.task for n in second.nodes] == [table[CAPTIONER.llm]]
    assert Plan.model_validate_json(first.model_dump_json()) == first


def test_filling_leaves_the_template_unchanged() -> None:
    plan = plan_of(trace(CAPTIONER, {"prompt": "a", "images": ["/a.png"]}), {})
    llm = plan.nodes[-1]
    llm.input.fill({plan.nodes[0].id: {"embeddings": "X"}})
    assert llm.input.value["embeddings"] == [None]


def test_a_json_value_that_looks_like_a_reference_stays_a_value() -> None:
    class Constant(Task[MLLMInput, MLLMOutput]):
        def invoke(self, request: MLLMInput) -> MLLMOutput:
            return MLLMOutput(text='{"node": "n0", "field": "text"}')

    plan = plan_of(trace(Constant(), {"prompt": "x"}), {})
    assert plan.nodes == () and plan.output.fill({}) == {"text": '{"node": "n0", "field": "text"}'}


def test_a_request_with_workflow_inputs_has_no_plan() -> None:
    graph = trace(CAPTIONER, {"prompt": InputRef(("prompt",), "MLLMTask", str), "images": []})
    with pytest.raises(TaskDefinitionError, match="request field 'prompt'"):
        plan_of(graph, {})


def test_a_task_reference_rebuilds_the_task_from_its_import_path() -> None:
    assert task_from_reference(task_reference(CAPTIONER)) == CAPTIONER


def test_a_task_class_defined_in_a_function_cannot_be_referenced() -> None:
    class Local(Task[MLLMInput, MLLMOutput]):
        pass

    with pytest.raises(TaskDefinitionError, match="inside a function"):
        task_reference(Local())


def test_a_reference_to_a_missing_module_says_where_the_code_must_be() -> None:
    with pytest.raises(UnknownTaskClassError, match="must be installed where the batch is planned"):
        task_from_reference('{"module": "no_such_module", "class": "X", "config": {}}')
