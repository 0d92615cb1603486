"""`EncoderTask`: one item (an image, a text) in, its embeddings out, as a `TensorRef`.

The embeddings never leave the executor's node as bytes: the encoder puts them into its sidecar
and returns only the reference, which the consumer (typically an `LLMTask`) resolves.
"""

from __future__ import annotations

import base64
import mimetypes
import pathlib
from enum import Enum
from typing import Any

from pydantic import Field

from flyte_cornserve.descriptors import TaskExecutionDescriptor, register_descriptor
from flyte_cornserve.task import Resources, TaskIO, TensorRef, UnitTask


#: larger local images should live where the executor can read them (a path or URL it resolves)
MAX_INLINE_IMAGE = 16 * 2**20


class Modality(str, Enum):
    IMAGE = "image"
    TEXT = "text"


class EncoderInput(TaskIO):
    data: str = Field(
        min_length=1,
        description="what to encode: for images a file path, http(s) URL or data: URL; for text, the text",
    )


class EncoderOutput(TaskIO):
    embeddings: TensorRef


class EncoderTask(UnitTask[EncoderInput, EncoderOutput]):
    """Encode one item of `modality` with `model_id` (e.g. the vision tower + projector of a VLM)."""

    modality: Modality = Modality.IMAGE
    model_id: str = Field(min_length=1)


@register_descriptor(EncoderTask, default=True)
class EncoderServerDescriptor(TaskExecutionDescriptor[EncoderTask]):
    """Runs on the project's encoder server, which batches items and writes embeddings to the sidecar."""

    executor = "encoder"
    default_resources = Resources(cpu=1, memory="2Gi")

    def executor_args(self) -> dict[str, Any]:
        return {"model_id": self.task.model_id, "modality": self.task.modality.value}

    def encode_request(self, request: TaskIO) -> dict[str, Any]:
        """An image file on the submitting machine travels as a data: URL (the executor may run
        elsewhere, or in another folder); other paths and URLs go as they are."""
        payload = request.model_dump(mode="json")
        path = pathlib.Path(payload["data"]) if self.task.modality is Modality.IMAGE else None
        if path is not None and len(payload["data"]) < 4096 and path.is_file() and path.stat().st_size <= MAX_INLINE_IMAGE:
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            payload["data"] = f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"
        return payload
