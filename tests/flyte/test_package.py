"""Packaging the example workflows offline, as a user's CI would, and reading the protobufs back."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tarfile

import pytest
from flyteidl.admin import launch_plan_pb2, task_pb2, workflow_pb2
from flyteidl.core import execution_pb2
from google.protobuf.json_format import MessageToDict

PROJECT = pathlib.Path(__file__).resolve().parents[2]
PYFLYTE = pathlib.Path(sys.executable).with_name("pyflyte")


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list]:
    out = tmp_path_factory.mktemp("package")
    archive = out / "flyte-package.tgz"
    # The README's command (`./dev package`) without the set-up step.
    subprocess.run(
        [str(PYFLYTE), "--pkgs", "workflows", "package", "--image", "cornserve:local", "--force",
         "--output", str(archive)],
        cwd=PROJECT, check=True, capture_output=True, text=True,
    )
    with tarfile.open(archive) as tar:
        tar.extractall(out / "files", filter="data")
    entities: dict[str, list] = {"tasks": [], "workflows": [], "launch_plans": []}
    for path in sorted((out / "files").glob("*.pb")):
        data = path.read_bytes()
        if path.stem.endswith("_1"):
            entities["tasks"].append(task_pb2.TaskSpec.FromString(data))
        elif path.stem.endswith("_2"):
            entities["workflows"].append(workflow_pb2.WorkflowSpec.FromString(data))
        else:
            entities["launch_plans"].append(launch_plan_pb2.LaunchPlan.FromString(data))
    return entities


def workflow(package: dict, name: str, module: str = "workflows.vlm") -> workflow_pb2.WorkflowSpec:
    (spec,) = [w for w in package["workflows"] if w.template.id.name == f"{module}.{name}"]
    return spec


def unit_tasks(package: dict) -> list[task_pb2.TaskSpec]:
    return [spec for spec in package["tasks"] if spec.template.type == "cornserve"]


def task_of(package: dict, node) -> task_pb2.TaskSpec:
    (spec,) = [t for t in package["tasks"] if t.template.id.name == node.task_node.reference_id.name]
    return spec


def test_tasks_have_the_cornserve_type_and_the_unit_task_json(package):
    classes = set()
    for spec in unit_tasks(package):
        template = spec.template
        assert template.type == "cornserve"
        assert not template.HasField("container")  # no pod per call: the connector runs it
        custom = MessageToDict(template.custom)
        classes.add(custom["unit_task"]["task_class"])
        assert custom["unit_task"]["config"]["model_id"] == "tiny-llava"
        assert custom["deployment_id"].startswith(custom["unit_task"]["task_class"].lower() + "-")
        assert custom["descriptor"]["executor"] in {"encoder", "vllm"}
    assert classes == {"EncoderTask", "LLMTask"}


def test_every_cornserve_task_generates_a_deck(package):
    """Propeller shows a node's deck only if its template's metadata says `generates_deck`."""
    cornserve = [spec for spec in package["tasks"] if spec.template.type in ("cornserve", "cornserve_batch")]
    assert {spec.template.type for spec in cornserve} == {"cornserve", "cornserve_batch"}
    assert all(spec.template.metadata.generates_deck.value for spec in cornserve), [
        spec.template.id.name for spec in cornserve if not spec.template.metadata.generates_deck.value]
    others = [spec for spec in package["tasks"] if spec not in cornserve]  # plain tasks: flytekit's default
    assert others and not any(spec.template.metadata.generates_deck.value for spec in others)


def test_image_variant_is_exactly_encoder_then_llm(package):
    nodes = workflow(package, "caption").template.nodes
    kinds = [MessageToDict(task_of(package, n).template.custom)["unit_task"]["task_class"] for n in nodes]
    assert kinds == ["EncoderTask", "LLMTask"]
    encoder, llm = nodes
    assert list(llm.upstream_node_ids) == [encoder.id]
    bindings = {b.var: b.binding for b in llm.inputs}
    (item,) = bindings["embeddings"].collection.bindings
    assert (item.promise.node_id, item.promise.var) == (encoder.id, "embeddings")
    assert bindings["prompt"].promise.var == "prompt"  # a workflow input
    assert {b.var: b.binding.promise.var for b in encoder.inputs} == {"data": "image"}
    (output,) = workflow(package, "caption").template.outputs
    assert (output.binding.promise.node_id, output.binding.promise.var) == (llm.id, "text")


def test_text_variant_is_the_llm_alone(package):
    (node,) = workflow(package, "chat").template.nodes
    custom = MessageToDict(task_of(package, node).template.custom)
    assert custom["unit_task"]["task_class"] == "LLMTask"
    assert node.inputs[0].binding.collection.bindings == []


def test_both_variants_share_the_llm_deployment(package):
    llm_ids = {
        MessageToDict(task_of(package, n).template.custom)["deployment_id"]
        for name in ("caption", "chat")
        for n in workflow(package, name).template.nodes
        if n.id.endswith("llmtask")
    }
    assert len(llm_ids) == 1


def test_unit_task_json_in_custom_rebuilds_the_task(package):
    from flyte_cornserve.task import unit_task_from_json

    for spec in unit_tasks(package):
        custom = MessageToDict(spec.template.custom)
        task = unit_task_from_json(custom["unit_task"])  # numbers came back as floats
        assert task.deployment_id() == custom["deployment_id"]
        assert task.model_id == "tiny-llava"


def test_a_batch_is_planned_then_fans_out_chunk_nodes_over_a_launch_plan_then_merged(package):
    plan, fan_out, merge = workflow(package, "batch_caption", "workflows.batch_caption").template.nodes
    assert plan.task_node.reference_id.name == "flyte_cornserve.flyte.batch.plan_chunks"
    assert merge.task_node.reference_id.name == "flyte_cornserve.flyte.batch.merge_jsonl"
    assert fan_out.array_node.min_success_ratio == 1.0
    assert fan_out.array_node.execution_mode == fan_out.array_node.FULL_STATE  # a child execution per chunk
    sub = fan_out.array_node.node
    assert sub.inputs[0].binding.promise.node_id == plan.id
    chunk_plan = sub.workflow_node.launchplan_ref.name
    (launch_plan,) = [lp for lp in package["launch_plans"] if lp.id.name == chunk_plan]
    (chunk_workflow,) = [w for w in package["workflows"] if w.template.id.name == launch_plan.spec.workflow_id.name]
    (node,) = chunk_workflow.template.nodes
    (chunk_task,) = [t for t in package["tasks"] if t.template.id.name == node.task_node.reference_id.name]
    template = chunk_task.template
    assert template.type == "cornserve_batch" and not template.HasField("container")  # the connector runs it
    assert MessageToDict(template.custom) == {"schema": 1.0, "label": "MLLMTask tiny-llava",
                                              "min_success_ratio": 0.0, "max_in_flight": None}
    assert template.metadata.retries.retries == 3


def test_the_nightly_launch_plan_carries_its_schedule_inputs_and_failure_notification(package):
    (nightly,) = [lp for lp in package["launch_plans"] if lp.id.name == "nightly_captions"]
    spec = nightly.spec
    assert spec.workflow_id.name == "workflows.batch_caption.nightly"
    assert spec.entity_metadata.schedule.cron_schedule.schedule == "0 2 * * *"
    assert spec.entity_metadata.schedule.kickoff_time_input_arg == "run_date"
    defaults = spec.default_inputs.parameters
    assert defaults["run_date"].required and defaults["images"].default.scalar.blob.uri  # the dataset location
    fixed = spec.fixed_inputs.literals
    assert fixed["prompt"].scalar.primitive.string_value == "Describe the image."
    assert fixed["results"].scalar.primitive.string_value  # where the results go
    (notification,) = spec.entity_metadata.notifications
    assert list(notification.phases) == [execution_pb2.WorkflowExecution.FAILED, execution_pb2.WorkflowExecution.TIMED_OUT]
    assert list(notification.email.recipients_email) == ["ml-platform@example.com"]
