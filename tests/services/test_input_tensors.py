"""Input tensors that are gone (issue 12): the dispatcher checks an invocation's input refs before it
queues it; one that cannot be computed again is a clear error that no retry can fix. (The case that
can, a cached ref after `cornserve down`, runs end to end in tests/flyte/test_tensor_refs_outlive_stacks.py.)"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from cornserve_builtins.encoder import EncoderTask
from cornserve_builtins.llm import LLMTask
from flyte_cornserve.protocol.content import content_digest, tensor_source
from flyte_cornserve.services.dispatcher import Dispatcher, InputTensorGone
from flyte_cornserve.task import TaskInputError, TensorRef

LLM = LLMTask(model_id="tiny-llava")
PRODUCER = EncoderTask(model_id="tiny-llava").compact_json()


def ref_with(source) -> TensorRef:
    return TensorRef(id=f"emb-{uuid.uuid4().hex}", shape=(16, 32), dtype="float32", nbytes=16 * 32 * 4,
                     location="127.0.0.1:40000", source=source)


@pytest.mark.parametrize("source, why", [
    (tensor_source(PRODUCER, "data:image/png;base64,iVBORw0KGgo=", content_digest(b"png")),
     "its input was inline data"),
    (tensor_source(PRODUCER, None, content_digest(b"a text")), "its input was inline data"),
    (None, "the ref does not say how it was computed"),
], ids=["data-url", "text", "no-source"])
def test_a_gone_tensor_whose_input_was_inline_fails_at_submit_naming_the_fix(redis_url, source, why) -> None:
    ref = ref_with(source)

    async def submit() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            await Dispatcher(client).submit(LLM, {"prompt": "Describe the image.", "embeddings": [ref]})
        finally:
            await client.aclose()

    with pytest.raises(InputTensorGone) as failed:
        asyncio.run(submit())
    message = str(failed.value)
    assert isinstance(failed.value, TaskInputError)  # the connector's create() fails it without retries
    assert f"LLMTask tiny-llava: input tensor {ref.id} is gone" in message and why in message
    assert "cache_version" in message and "TaskOptions(cache=False)" in message


def test_a_ref_that_can_be_computed_again_stays_under_a_kibibyte() -> None:
    """The longest input reference a ref carries, and a producer of the longest JSON it takes."""
    producer = EncoderTask(model_id="m" * 150).compact_json()
    ref = ref_with(tensor_source(producer, "s3://" + "k" * 507, content_digest(b"image bytes")))
    assert ref.source is not None and len(ref.source.input) == 512
    assert len(ref.model_dump_json()) < 1024
    assert tensor_source("x" * 257, "a.png", content_digest(b"")) is None  # a producer too long: no source
    assert tensor_source(producer, "s3://" + "k" * 508, content_digest(b"")).input == ""  # too long: not carried
