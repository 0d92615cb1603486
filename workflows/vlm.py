"""Image captioning with a multimodal LLM: an encoder node feeding an LLM node.

Two variants of one `MLLMTask`, each its own static workflow:
  caption(image, prompt): encoder -> LLM
  chat(prompt):           LLM alone
"""

from flytekit import workflow

from cornserve_builtins.mllm import MLLMTask
from flyte_cornserve.flyte import call

#: the project's tiny locally built Llava-style model; any Hugging Face model id works the same way
captioner = MLLMTask(model_id="tiny-llava")


@workflow
def caption(image: str, prompt: str = "Describe the image.") -> str:
    """Caption one image: a path on this machine, or a file://, http(s)://, s3://, gs:// or data: URL."""
    return call(captioner, prompt=prompt, images=[image]).text


@workflow
def chat(prompt: str) -> str:
    """Answer a text-only prompt with the same model."""
    return call(captioner, prompt=prompt).text
