"""`MLLMTask`: a multimodal LLM as a composite of an `EncoderTask` per image and one `LLMTask`."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from flyte_cornserve.task import Task, TaskIO

from .encoder import EncoderInput, EncoderTask, Modality
from .llm import LLMInput, LLMTask, SamplingParams


class MLLMInput(TaskIO):
    prompt: str = Field(min_length=1)
    images: list[str] = Field(default_factory=list, description="references the encoder's executor reads: paths on "
                              "its machine, file://, http(s)://, s3://, gs:// or data: URLs")


class MLLMOutput(TaskIO):
    text: str


class MLLMTask(Task[MLLMInput, MLLMOutput]):
    """Answer a prompt about zero or more images. With no image, only the LLM runs.

    `MLLMTask(model_id=...)` builds both subtasks from one model; pass `encoder=` / `llm=` to customise them.
    """

    model_id: str = Field(min_length=1)
    sampling: SamplingParams = SamplingParams()
    encoder: EncoderTask
    llm: LLMTask

    @model_validator(mode="before")
    @classmethod
    def _default_subtasks(cls, data: Any) -> Any:
        if isinstance(data, dict) and "model_id" in data:
            data = dict(data)
            data.setdefault("encoder", {"modality": Modality.IMAGE, "model_id": data["model_id"]})
            data.setdefault("llm", {"model_id": data["model_id"], "sampling": data.get("sampling", {})})
        return data

    def invoke(self, request: MLLMInput) -> MLLMOutput:
        embeddings = [self.encoder(EncoderInput(data=image)).embeddings for image in request.images]
        answer = self.llm(LLMInput(prompt=request.prompt, embeddings=embeddings))
        return MLLMOutput(text=answer.text)
