"""`LLMTask`: a prompt, optionally with embeddings of other modalities, in; generated text out."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flyte_cornserve.descriptors import TaskExecutionDescriptor, register_descriptor
from flyte_cornserve.task import Resources, TaskIO, TensorRef, UnitTask
from flyte_cornserve.task.options import quantity_bytes


class SamplingParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int = Field(default=64, ge=1, le=32768)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)  # vLLM's range
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    ignore_eos: bool = Field(default=False, description="generate exactly max_tokens (benchmarks, tests)")


class EngineArgs(BaseModel):
    """The vLLM engine's settings: part of the deployment (they change the engine). Unset ones take
    the executor's defaults for the hardware it finds: on CPU the project's (float32, eager, at most
    256 tokens, a KV cache sized for the sequences it steps at once), on a GPU vLLM's own (dtype
    auto, CUDA graphs, the model's full length, 90 % of the GPU's memory)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_model_len: int | None = Field(default=None, gt=0, description="tokens per sequence (prompt and output)")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = None
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs one engine spans")
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1, description="share of each GPU's memory")
    enforce_eager: bool | None = Field(default=None, description="no CUDA graphs (faster start, slower steps)")
    kv_cache_memory: str | None = Field(default=None, description="the KV cache's size, e.g. 4Gi")

    @field_validator("kv_cache_memory")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        if value is not None:
            quantity_bytes(value)
        return value


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
    engine: EngineArgs = EngineArgs()

    NOT_IDENTITY: ClassVar[frozenset[str]] = UnitTask.NOT_IDENTITY | {"sampling", "alternative_models"}

    @model_validator(mode="after")
    def _gpus_for_tensor_parallelism(self) -> LLMTask:
        parallel = self.engine.tensor_parallel_size
        if parallel > 1 and (self.resources is None or self.resources.gpu < parallel):
            raise ValueError(f"engine.tensor_parallel_size={parallel} needs resources with gpu >= {parallel}")
        return self

    def routing_candidates(self) -> list[UnitTask]:
        models = dict.fromkeys((self.model_id, *self.alternative_models))  # ordered, without repeats
        return [self.model_copy(update={"model_id": model, "alternative_models": ()}) for model in models]


@register_descriptor(LLMTask, default=True)
class VLLMDescriptor(TaskExecutionDescriptor[LLMTask]):
    """Runs in a vLLM engine hosted by the project's executor, fed embeddings through the sidecar."""

    executor = "vllm"
    default_resources = Resources(cpu=1, memory="4Gi")

    def executor_args(self) -> dict[str, Any]:
        return {"model_id": self.task.model_id, "engine": self.task.engine.model_dump(exclude_none=True)}

    def encode_request(self, request: TaskIO) -> dict[str, Any]:
        return {**request.model_dump(mode="json"), "sampling": self.task.sampling.model_dump(mode="json")}
