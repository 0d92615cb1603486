"""`LLMTask`: a prompt, optionally with embeddings of other modalities, in; generated text out."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from flyte_cornserve.descriptors import TaskExecutionDescriptor, register_descriptor
from flyte_cornserve.task import Resources, TaskIO, TensorRef, UnitTask


class SamplingParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int = Field(default=64, ge=1, le=32768)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)  # vLLM's range
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    ignore_eos: bool = Field(default=False, description="generate exactly max_tokens (benchmarks, tests)")


class LLMInput(TaskIO):
    prompt: str = Field(min_length=1)
    #: one entry per image placeholder in the prompt, in order (e.g. from `EncoderTask`s)
    embeddings: list[TensorRef] = Field(default_factory=list)


class LLMOutput(TaskIO):
    text: str


class LLMTask(UnitTask[LLMInput, LLMOutput]):
    """Generate with `model_id`. Sampling is per call, so it does not split deployments.

    `alternative_models` are other models that are just as acceptable: an invocation goes to the
    least-loaded deployed one of all of them (`model_id` is deployed when none is).
    """

    model_id: str = Field(min_length=1)
    alternative_models: tuple[str, ...] = ()
    sampling: SamplingParams = SamplingParams()

    NOT_IDENTITY: ClassVar[frozenset[str]] = UnitTask.NOT_IDENTITY | {"sampling", "alternative_models"}

    def routing_candidates(self) -> list[UnitTask]:
        models = dict.fromkeys((self.model_id, *self.alternative_models))  # ordered, without repeats
        return [self.model_copy(update={"model_id": model, "alternative_models": ()}) for model in models]


@register_descriptor(LLMTask, default=True)
class VLLMDescriptor(TaskExecutionDescriptor[LLMTask]):
    """Runs in a vLLM engine hosted by the project's executor, fed embeddings through the sidecar."""

    executor = "vllm"
    default_resources = Resources(cpu=1, memory="4Gi")

    def executor_args(self) -> dict[str, Any]:
        return {"model_id": self.task.model_id}

    def encode_request(self, request: TaskIO) -> dict[str, Any]:
        return {**request.model_dump(mode="json"), "sampling": self.task.sampling.model_dump(mode="json")}
