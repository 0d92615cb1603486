"""The vLLM executor: lossless disaggregation against transformers, concurrency, bad input."""

from __future__ import annotations

import random

import pytest
import redis
import redis.asyncio as aioredis
import torch
from PIL import Image

from cornserve_builtins.encoder import EncoderTask
from cornserve_builtins.llm import LLMInput, LLMTask
from flyte_cornserve.descriptors import descriptor_for
from flyte_cornserve.models.tiny import COLORS, PROMPT, SHAPES, draw, llava_prompt
from flyte_cornserve.services.invocations import ErrorKind, InvocationStore, State, events_key

from .conftest import run
from .test_encoder import data_url

ENCODER = EncoderTask(model_id="tiny-llava")
LLM = LLMTask(model_id="tiny-llava")


@pytest.fixture(scope="module")
def services(executors, tiny_llava):
    return executors.start(ENCODER), executors.start(LLM)


def llm_payload(prompt: str, embeddings: list) -> dict:
    return descriptor_for(LLM).encode_request(LLMInput(prompt=prompt, embeddings=embeddings))


async def caption(store: InvocationStore, image, prompt: str = PROMPT):
    encoded = await store.wait(await store.submit(ENCODER.deployment_id(), {"data": data_url(image)}, timeout_s=60), 60)
    assert encoded.state == State.DONE, encoded.error
    return await store.wait(await store.submit(LLM.deployment_id(), llm_payload(prompt, [encoded.output["embeddings"]])), 120)


def transformers_caption(model_dir, image) -> str:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    inputs = processor(images=Image.fromarray(image), text=llava_prompt(PROMPT, 1), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=LLM.sampling.max_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_disaggregated_greedy_text_equals_transformers_generate(services, tiny_llava, redis_url):
    rng = random.Random(11)
    images = [draw(color, shape, "white" if color != "white" else "black", rng)
              for color, shape in [("red", "square"), ("blue", "circle"), ("yellow", "stripe")]]

    async def scenario():
        store = InvocationStore(aioredis.Redis.from_url(redis_url))
        return [await caption(store, image) for image in images]

    for image, record in zip(images, run(scenario()), strict=True):
        assert record.state == State.DONE, record.error
        assert record.output["text"] == transformers_caption(tiny_llava, image)
        assert any(word in record.output["text"] for word in [*COLORS, *SHAPES])  # a trained caption, not noise


def test_many_invocations_are_in_flight_at_once(services, redis_url):
    async def scenario():
        store = InvocationStore(aioredis.Redis.from_url(redis_url))
        ids = [await store.submit(LLM.deployment_id(), llm_payload(f"what is {i}?", [])) for i in range(16)]
        return [await store.wait(i, 120) for i in ids]

    records = run(scenario())
    assert all(r.state == State.DONE and r.output["text"] for r in records)
    sync = redis.Redis.from_url(redis_url)
    spans = []
    for record in records:
        events = {fields[b"state"]: int(entry_id.split(b"-")[0]) for entry_id, fields in sync.xrange(events_key(record.id))}
        spans.append((events[b"RUNNING"], events[b"DONE"]))
    assert max_concurrency(spans) > 1  # continuous batching, not one at a time


def max_concurrency(spans: list[tuple[int, int]]) -> int:
    """Most invocations RUNNING at once; at equal timestamps an end counts before a start."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (lambda ref: llm_payload(PROMPT, [{**ref, "shape": [8, 64], "nbytes": 2048}]), "takes [16, 64] per image"),
        (lambda ref: llm_payload(PROMPT, [{**ref, "shape": [16, 32], "nbytes": 2048}]), "takes [16, 64] per image"),
        (lambda ref: llm_payload(PROMPT, [{**ref, "dtype": "int32"}]), "expected one of"),
        (lambda ref: llm_payload(" ".join(["describe"] * 2000), []), "maximum context length is 256 tokens"),
        (lambda ref: {"prompt": PROMPT, "embeddings": "nope"}, "invalid input"),
    ],
    ids=["too-few-tokens", "wrong-hidden-size", "integer-dtype", "prompt-longer-than-context", "malformed"],
)
def test_bad_input_is_that_invocations_error_and_the_engine_keeps_serving(services, redis_url, payload, message):
    _, llm = services

    async def scenario():
        store = InvocationStore(aioredis.Redis.from_url(redis_url))
        encoded = await store.wait(
            await store.submit(ENCODER.deployment_id(), {"data": data_url(draw("red", "square", "blue", random.Random(3)))}), 60
        )
        bad = await store.wait(await store.submit(LLM.deployment_id(), payload(encoded.output["embeddings"])), 120)
        good = await caption(store, draw("green", "circle", "black", random.Random(4)))
        return bad, good

    bad, good = run(scenario())
    assert bad.state == State.ERROR and message in bad.error, bad.error
    assert bad.error_kind == ErrorKind.USER
    assert good.state == State.DONE and llm.alive()


def test_unknown_model_path_is_a_clear_startup_error(executors):
    with pytest.raises(AssertionError, match="model '/no/such/model' is neither a folder"):
        executors.start(LLMTask(model_id="/no/such/model"))
