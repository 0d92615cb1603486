"""`EncoderTask`: one item (an image, a text) in, its embeddings out, as a `TensorRef`.

The embeddings never leave the executor's node as bytes: the encoder puts them into its sidecar
and returns only the reference, which the consumer (typically an `LLMTask`) resolves.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from flyte_cornserve.descriptors import TaskExecutionDescriptor, register_descriptor
from flyte_cornserve.task import Resources, TaskIO, TensorRef, UnitTask


class Modality(str, Enum):
    IMAGE = "image"
    TEXT = "text"


class EncoderInput(TaskIO):
    data: str = Field(
        min_length=1,
        description="what to encode: for images a reference the executor reads (a path on its machine, "
                    "file://, http(s)://, s3://, gs:// or a data: URL); for text, the text",
    )


class EncoderOutput(TaskIO):
    embeddings: TensorRef


class ElasticEncode(BaseModel):
    """The encoder stage of a batch as a distributed job (flytekitplugins-kfpytorch `Elastic`): in a
    batch workflow, each chunk's encodes run on `nnodes` x `nproc_per_node` processes that load the
    model for the job's hour and are gone after it, while the LLM stays on its warm deployment.
    `nnodes > 1` is a PyTorchJob on a cluster; `nnodes == 1` runs the processes in one pod (or, under
    `pyflyte run`, on this machine). Outside a batch (an interactive call) the task runs on a warm
    encoder executor as with the default descriptor."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: the registered descriptor this settings object chooses
    descriptor_name: ClassVar[str] = "ElasticEncodeDescriptor"

    kind: Literal["elastic"] = "elastic"  # tells it apart from a descriptor's name in a task's JSON
    nnodes: int = Field(default=1, ge=1, le=1024, description="nodes (pods) of the job")
    nproc_per_node: int = Field(default=1, ge=1, le=64, description="processes per node, one GPU each")
    max_restarts: int = Field(default=0, ge=0, le=10, description="torch elastic's restarts of the worker group")
    micro_batch: int = Field(default=64, ge=1, le=4096, description="items each process encodes at once")


class EncoderTask(UnitTask[EncoderInput, EncoderOutput]):
    """Encode one item of `modality` with `model_id` (e.g. the vision tower + projector of a VLM)."""

    #: a registered descriptor's name, or `ElasticEncode(...)`: a batch's encoder stage as a distributed job
    descriptor: str | ElasticEncode = ""
    modality: Modality = Modality.IMAGE
    model_id: str = Field(min_length=1)


@register_descriptor(EncoderTask, default=True)
class EncoderServerDescriptor(TaskExecutionDescriptor[EncoderTask]):
    """Runs on the project's encoder server, which fetches images itself (their bytes never travel
    through Redis), batches items and writes embeddings to the sidecar."""

    executor = "encoder"
    default_resources = Resources(cpu=1, memory="2Gi")

    def executor_args(self) -> dict[str, Any]:
        return {"model_id": self.task.model_id, "modality": self.task.modality.value}

    def input_content(self, request: EncoderInput) -> bytes | str:
        """An image's reference (the executor reads it), or a text's bytes: the executor's content ids."""
        return request.data if self.task.modality is Modality.IMAGE else request.data.encode()

    def response_for(self, ref: TensorRef) -> dict[str, Any]:
        return EncoderOutput(embeddings=ref).model_dump(mode="json")


@register_descriptor(EncoderTask)
class ElasticEncodeDescriptor(EncoderServerDescriptor):
    """`EncoderTask(descriptor=ElasticEncode(...))`: a batch's encoder stage runs as an Elastic job
    (`flyte_cornserve.flyte.elastic`), with the encoder server's own loading and encoding code; an
    invocation outside a batch goes to an encoder executor, as with the default descriptor."""
