"""`EncoderTask`: one item (an image, a text) in, its embeddings out, as a `TensorRef`.

The embeddings never leave the executor's node as bytes: the encoder puts them into its sidecar
and returns only the reference, which the consumer (typically an `LLMTask`) resolves.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import Field

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


class EncoderTask(UnitTask[EncoderInput, EncoderOutput]):
    """Encode one item of `modality` with `model_id` (e.g. the vision tower + projector of a VLM)."""

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
