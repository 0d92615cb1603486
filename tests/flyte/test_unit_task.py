"""A unit task as a Flyte task: interface, metadata, custom struct, and no pretend execution."""

from __future__ import annotations

from datetime import timedelta

import pytest
from flytekit import workflow
from flytekit.configuration import Image, ImageConfig, SerializationSettings
from flytekit.models.core.types import BlobType  # noqa: F401  (flytekit models load order)
from flytekit.tools.translator import get_serializable
from google.protobuf.json_format import MessageToDict

from cornserve_builtins.encoder import EncoderTask
from cornserve_builtins.llm import LLMTask
from cornserve_builtins.mllm import MLLMTask
from flyte_cornserve.flyte import call, flyte_task
from flyte_cornserve.task import PlaceholderMisuseError, Resources, Task, TaskInputError, TaskOptions

SETTINGS = SerializationSettings(
    image_config=ImageConfig(default_image=Image(name="default", fqn="cornserve", tag="local")),
    project="p", domain="d", version="v1",
)


def template(task):
    from collections import OrderedDict

    return get_serializable(OrderedDict(), SETTINGS, flyte_task(task)).template


def test_metadata_set_on_a_unit_task_reaches_the_task_template():
    task = LLMTask(
        model_id="llama",
        resources=Resources(cpu=2, memory="8Gi", gpu=1),
        options=TaskOptions(retries=3, timeout=timedelta(minutes=2), cache=True, cache_version="v7", interruptible=True),
    )
    t = template(task)
    assert t.type == "cornserve"
    assert t.metadata.retries.retries == 3
    assert t.metadata.timeout == timedelta(minutes=2)
    assert t.metadata.discoverable is True and t.metadata.discovery_version == "v7"
    assert t.metadata.interruptible is True
    custom = t.custom
    assert custom["descriptor"]["resources"] == {"cpu": 2.0, "memory": "8Gi", "gpu": 1}
    assert custom["deployment_id"] == task.deployment_id()
    assert custom["unit_task"]["config"]["options"]["retries"] == 3


def test_defaults_come_from_the_descriptor():
    t = template(EncoderTask(model_id="clip"))
    # 3 retries by default: Propeller counts a failed create() and RETRYABLE_FAILED against them
    assert t.metadata.retries.retries == 3 and t.metadata.discoverable is False
    assert t.custom["descriptor"] == {
        "name": "EncoderServerDescriptor", "executor": "encoder",
        "args": {"model_id": "clip", "modality": "image"},
        "resources": {"cpu": 1.0, "memory": "2Gi", "gpu": 0},
    }


def test_interface_comes_from_the_pydantic_models():
    t = template(LLMTask(model_id="llama"))
    assert set(t.interface.inputs) == {"prompt", "embeddings"}
    assert set(t.interface.outputs) == {"text"}
    assert t.interface.inputs["embeddings"].type.collection_type.metadata == {"title": "TensorRef"}


def test_different_options_make_different_flyte_tasks_of_one_deployment():
    a, b = LLMTask(model_id="llama"), LLMTask(model_id="llama", options=TaskOptions(retries=2))
    assert flyte_task(a) is flyte_task(LLMTask(model_id="llama"))
    assert flyte_task(a).name != flyte_task(b).name
    assert template(a).custom["deployment_id"] == template(b).custom["deployment_id"]


def test_unknown_descriptor_is_a_clear_error():
    with pytest.raises(TypeError, match="LLMTask names descriptor 'TensorRTDescriptor'.*registered: \\['VLLMDescriptor'\\]"):
        flyte_task(LLMTask(model_id="llama", descriptor="TensorRTDescriptor"))


captioner = MLLMTask(model_id="tiny")


#: retries nothing: a missing control plane is recoverable, and the retries' backoff is not under test
impatient = MLLMTask(model_id="tiny", encoder=EncoderTask(model_id="tiny", options=TaskOptions(retries=0)))


@workflow
def caption_once(image: str, prompt: str) -> str:
    return call(impatient, prompt=prompt, images=[image]).text


def test_a_unit_task_run_without_a_control_plane_says_how_to_start_one(redis_url):
    # the session's Redis database 0 has no control plane (test stacks use their own databases)
    with pytest.raises(Exception, match="no cornserve control plane is serving this Redis: start one with `cornserve up`"):
        caption_once(image="cat.png", prompt="what is it?")


def test_a_failed_local_run_prints_one_clear_message_without_a_traceback(stack):
    """`pyflyte run` of a workflow whose encoder cannot read the image: the run fails with the
    task's message naming the path, not a traceback through flyte_cornserve's modules."""
    import os
    import subprocess
    import sys

    from flyte_cornserve.redis_server import ENV_URL

    workflow_file = os.path.join(os.path.dirname(__file__), "..", "..", "workflows", "vlm.py")
    done = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "pyflyte"), "run", workflow_file, "caption",
         "--image", "/nonexistent.png"],
        env={**os.environ, ENV_URL: stack.url, "COLUMNS": "200"}, capture_output=True, text=True, timeout=600,
    )
    shown = done.stdout + done.stderr
    assert done.returncode != 0, shown
    assert "EncoderTask tiny-llava" in shown and "/nonexistent.png" in shown, shown
    assert "flyte_cornserve/" not in shown and "Traceback" not in shown, shown
    assert len(done.stderr.splitlines()) < 15 and len(done.stdout.splitlines()) < 5, shown


def test_a_wrong_request_field_fails_when_the_workflow_compiles():
    """flytekit compiles a workflow when it is packaged, registered or run."""

    @workflow
    def broken(image: str, prompt: str) -> str:
        return call(captioner, prompt=prompt, imagez=[image]).text

    with pytest.raises(TaskInputError, match="invalid input for MLLMTask: field 'imagez'"):
        broken.compile()


def test_branching_on_a_workflow_input_fails_when_the_workflow_compiles():
    from cornserve_builtins.mllm import MLLMInput, MLLMOutput

    class Picky(Task[MLLMInput, MLLMOutput]):
        inner: MLLMTask

        def invoke(self, request: MLLMInput) -> MLLMOutput:
            if request.prompt == "":
                raise ValueError("empty")
            return self.inner(request)

    @workflow
    def picky(prompt: str) -> str:
        return call(Picky(inner=captioner), prompt=prompt).text

    with pytest.raises(PlaceholderMisuseError, match="Picky.invoke\\(\\) used the value in a comparison.*'prompt'"):
        picky.compile()


def test_constants_and_workflow_inputs_mix():
    @workflow
    def fixed_prompt(image: str) -> str:
        return call(captioner, prompt="Describe it.", images=[image, "logo.png"]).text

    from collections import OrderedDict

    spec = get_serializable(OrderedDict(), SETTINGS, fixed_prompt).template
    encoders = [n for n in spec.nodes if n.id.endswith("encodertask")]
    literal_or_var = [MessageToDict(n.inputs[0].binding.to_flyte_idl()) for n in encoders]
    assert literal_or_var[0]["promise"]["var"] == "image"
    assert literal_or_var[1]["scalar"]["primitive"]["stringValue"] == "logo.png"
    (llm,) = [n for n in spec.nodes if n.id.endswith("llmtask")]
    prompt = [b for b in llm.inputs if b.var == "prompt"][0]
    assert prompt.binding.scalar.primitive.string_value == "Describe it."
