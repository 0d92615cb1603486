"""`TaskExecutionDescriptor`: how a unit task is executed.

The task says *what* to compute; its descriptor says which executor runs it, with which arguments
and resources, and how an invocation's input and output cross the wire to that executor. Each unit
task class has a default descriptor; a task instance may name another one (`descriptor="..."`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from flyte_cornserve.task import Resources, TaskIO, TensorRef, UnitTask

TaskT = TypeVar("TaskT", bound=UnitTask)


class TaskExecutionDescriptor(BaseModel, Generic[TaskT]):
    """Binds one unit task instance to the executor kind that runs it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: the executor kind that runs this task (e.g. "vllm", "encoder")
    executor: ClassVar[str]
    #: resources of one executor when the task does not set its own
    default_resources: ClassVar[Resources] = Resources()

    task: TaskT

    def executor_args(self) -> dict[str, Any]:
        """Arguments the executor is started with (model, limits, ...). JSON-serializable."""
        return {}

    def resources(self) -> Resources:
        return self.task.resources or self.default_resources

    def encode_request(self, request: TaskIO) -> dict[str, Any]:
        """The invocation payload sent to the executor: JSON, never pickle."""
        return request.model_dump(mode="json")

    def decode_response(self, response: dict[str, Any]) -> TaskIO:
        """The executor's JSON reply as the task's output model (validated)."""
        _, output_model = self.task.io_models()
        return output_model.model_validate(response)

    def input_content(self, request: TaskIO) -> bytes | str | None:
        """For a task whose output is one content-addressed tensor (`protocol.content`): what that
        output depends on besides the deployment, as the input's content (bytes) or the reference
        its executor reads the content from (str). None (the default): not content-addressed; the
        batch runner then neither looks its outputs up nor joins equal inputs."""
        return None

    def response_for(self, ref: TensorRef) -> dict[str, Any]:
        """The executor's reply (JSON) for a content-addressed output found stored (`input_content`)."""
        raise NotImplementedError(f"{type(self).__name__} is not content-addressed")

    def spec(self) -> dict[str, Any]:
        """What a deployment needs to know, as plain JSON."""
        return {
            "name": type(self).__name__,
            "executor": self.executor,
            "args": self.executor_args(),
            "resources": self.resources().model_dump(mode="json"),
        }
