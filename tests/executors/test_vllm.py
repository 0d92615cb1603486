"""The vLLM executor: lossless disaggregation against transformers, concurrency, bad input, aborts."""

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
from flyte_cornserve.protocol.invocations import MAX_BLOCK_S, ErrorKind, InvocationStore, State, events_key, queue_key

from ..scrape import scrape, series
from .conftest import one_batch, run
from .test_encoder import data_url, free_port

ENCODER = EncoderTask(model_id="tiny-llava")
LLM = LLMTask(model_id="tiny-llava")


@pytest.fixture(scope="module")
def services(executors, tiny_llava):
    port = free_port()
    llm = executors.start(LLM, metrics_port=port)
    llm.metrics_port = port
    return executors.start(ENCODER), llm


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
        (lambda ref: {**llm_payload(PROMPT, []), "sampling": {"temperature": 3.0}}, "temperature must be in"),
    ],
    ids=["too-few-tokens", "wrong-hidden-size", "integer-dtype", "prompt-longer-than-context", "malformed",
         "temperature-out-of-range"],
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


def generating(prompt: str, tokens: int) -> dict:
    """A text-only request that generates exactly `tokens` tokens (greedy, past any end-of-text): one
    engine step each, so requests in flight together finish in order of their lengths."""
    return {**llm_payload(prompt, []), "sampling": {"max_tokens": tokens, "temperature": 0.0, "ignore_eos": True}}


async def reached(store: InvocationStore, invocation_id: str, state: State, timeout_s: float = 120.0) -> None:
    """Block until the invocation's events stream shows `state`."""
    last = "0"
    for _ in range(int(timeout_s / MAX_BLOCK_S)):
        for _, entries in await store.redis.xread({events_key(invocation_id): last}, block=int(MAX_BLOCK_S * 1000)):
            for last, fields in entries:
                if fields[b"state"] == state.value.encode():
                    return
    raise AssertionError(f"{invocation_id} did not reach {state.value} within {timeout_s} s")


def aborted_total(process, state: State) -> float:
    metrics = scrape(f"http://127.0.0.1:{process.metrics_port}/metrics")
    return metrics[series("cornserve_executor_aborted_total", deployment=LLM.deployment_id(), executor=process.id,
                          state=state.value)]


@pytest.mark.parametrize(("end", "state"), [("cancel", State.CANCELLED), ("time_out", State.ERROR)])
def test_an_invocation_ended_while_generating_is_aborted_and_the_engine_keeps_serving(services, redis_url, end, state):
    """Someone else ends a generating invocation (cancels it, or times it out); its executor must
    abort the engine request. Lengths in engine steps make this observable without timing: the
    ended one had 230 tokens to generate, was cancelled after another request's 40, and a request of
    80 submitted after that finishes while it would still be generating, were it not aborted; its
    queue entry is acknowledged only once the handler gave it up."""
    _, llm = services
    before = aborted_total(llm, state)

    async def scenario():
        store = InvocationStore(aioredis.Redis.from_url(redis_url))
        long = await store.submit(LLM.deployment_id(), generating("Count to a thousand.", 230))
        await reached(store, long, State.RUNNING)  # so the next one is another batch, with its own outcome
        meanwhile = await store.wait(await store.submit(LLM.deployment_id(), generating("Wait.", 40)), 120)
        assert meanwhile.state == State.DONE, meanwhile.error  # `long` is 40 engine steps in
        ended = await store.cancel(long) if end == "cancel" else await store.time_out(long, 30)
        assert ended, "it was no longer running"
        after = await store.wait(await store.submit(LLM.deployment_id(), generating("Then this.", 80)), 120)
        queued = [fields[b"id"].decode() for _, fields in await store.redis.xrange(queue_key(LLM.deployment_id()))]
        return await store.record(long), after, queued

    long, after, queued = run(scenario())
    assert long.state == state and long.history == [State.CREATED, State.QUEUED, State.RUNNING, state]
    if state == State.ERROR:
        assert long.error_kind == ErrorKind.RECOVERABLE and "timed out" in long.error
    assert after.state == State.DONE and after.executor == llm.id and after.output["text"]
    assert long.id not in queued  # given up (acknowledged) before the 80 tokens of `after`: aborted
    assert aborted_total(llm, state) == before + 1
    assert llm.alive()


def test_an_embedding_outlives_a_recoverable_failure_so_the_retry_reads_it(services, sidecar_client, redis_url):
    """Regression: the executor released an invocation's embeddings whatever its outcome, so the retry
    of an LLM call that timed out found its embedding gone (TensorNotFound). A recoverable failure
    now leaves its pin; the outcome that is final (the text) releases it, and the embedding stays
    readable as cache (CACHED, no pins)."""
    rng = random.Random(5)

    async def scenario():
        store = InvocationStore(aioredis.Redis.from_url(redis_url))
        encoded = await store.wait(await store.submit(ENCODER.deployment_id(), {"data": data_url(
            draw("red", "circle", "white", rng))}, timeout_s=60), 60)
        embeddings = [encoded.output["embeddings"]]
        slow = {**llm_payload(PROMPT, embeddings), "sampling": {"max_tokens": 200, "temperature": 0.0, "ignore_eos": True}}
        first = await store.submit(LLM.deployment_id(), slow)
        await reached(store, first, State.RUNNING)
        assert await store.time_out(first, 1)  # the first attempt fails, recoverably, while generating
        retry = await store.wait(await store.submit(LLM.deployment_id(), llm_payload(PROMPT, embeddings)), 120)
        again = await store.wait(await store.submit(LLM.deployment_id(), llm_payload(PROMPT, embeddings)), 120)
        return await store.record(first), retry, again, embeddings[0]["id"]

    first, retry, again, embedding = run(scenario())
    assert first.state == State.ERROR and first.error_kind == ErrorKind.RECOVERABLE
    assert retry.state == State.DONE and retry.output["text"], retry.error
    # the retry's outcome was final: it released the embedding's one pin, which leaves it as cache
    assert sidecar_client.directory.entry(embedding).pins == 0
    assert again.state == State.DONE and again.output["text"] == retry.output["text"], again.error


def test_interactive_work_is_served_before_queued_batch_work(services, redis_url):
    """Batch invocations fill the executor (its max_in_flight items) and more wait in the batch queue;
    an interactive invocation submitted after them is taken first: it starts (by the records)
    before the batch invocation queued ahead of it."""
    from flyte_cornserve.executors.vllm_engine import VLLMHandler
    from flyte_cornserve.protocol.invocations import Priority

    per_invocation = 64
    fill = VLLMHandler.max_in_flight // per_invocation + 1  # one more than fits: it waits in the queue
    item = generating("Go on.", 48)

    async def scenario():
        store = InvocationStore(aioredis.Redis.from_url(redis_url))
        await store.ensure_queue(LLM.deployment_id())
        batch = []
        for _ in range(fill):
            invocation_id = f"batch-{random.getrandbits(64):x}"
            async with store.redis.pipeline(transaction=True) as pipe:
                store.queue_submission(pipe, LLM.deployment_id(), invocation_id, items=[item] * per_invocation,
                                       priority=Priority.BATCH)
                await pipe.execute()
            batch.append(invocation_id)
        await reached(store, batch[fill - 2], State.RUNNING)  # the executor is full now
        interactive = await store.submit(LLM.deployment_id(), generating("Me first.", 4))
        done = await store.wait(interactive, 120)
        records = [await store.wait(invocation_id, 120) for invocation_id in batch]
        return done, records

    done, records = run(scenario())
    assert done.state == State.DONE and all(r.state == State.DONE and r.items == per_invocation for r in records)
    texts = {item["output"]["text"] for r in records for item in r.output["items"]}
    assert len(texts) == 1  # batch items preempted for the interactive one were generated again, alike
    last = records[-1]  # queued before the interactive one was submitted, and still queued then
    assert done.created_at > last.created_at and done.started_at < last.started_at


def embedding_ref(sidecar_client, rows: int, claimed_rows: int = 16) -> dict:
    """A random embedding put into the module's sidecar: `rows` rows of the model's 64, its ref
    claiming `claimed_rows` (what the executor checks before it fetches)."""
    ref = sidecar_client.put(torch.randn(rows, 64), pins=1)
    return {**ref.model_dump(mode="json"), "shape": [claimed_rows, 64], "nbytes": claimed_rows * 64 * 4}


def test_an_item_whose_embedding_is_gone_fails_alone(services, sidecar_client, redis_url):
    """One item of a batch references a tensor that is gone (evicted, or its sidecar restarted); the
    batch's other items (text only, and one with an embedding that is there) are generated, that one
    is a recoverable error."""
    there = embedding_ref(sidecar_client, 16)
    gone = {**embedding_ref(sidecar_client, 16), "id": f"gone-{random.getrandbits(64):x}"}  # never put
    items = [generating("One.", 4), {**llm_payload(PROMPT, [gone]), "sampling": {"max_tokens": 4}},
             {**llm_payload(PROMPT, [there]), "sampling": {"max_tokens": 4}}, generating("Two.", 4)]

    record = run(one_batch(InvocationStore(aioredis.Redis.from_url(redis_url)), LLM.deployment_id(), items))
    assert record.state == State.DONE, record.error
    outcomes = record.output["items"]
    assert [("output" in o) for o in outcomes] == [True, False, True, True], outcomes
    assert outcomes[1]["kind"] == ErrorKind.RECOVERABLE.value and "embedding not available" in outcomes[1]["error"]


def test_an_item_whose_generation_raises_fails_alone_and_the_engine_keeps_serving(services, sidecar_client, redis_url):
    """One item's handling raises something unexpected (its ref claims 16 rows, the tensor behind it
    has 8: stacking it fails after the checks passed); the batch's other items are generated, that
    one is a recoverable error, and the engine keeps serving."""
    _, llm = services
    lying = embedding_ref(sidecar_client, 8, claimed_rows=16)
    items = [generating("One.", 6), {**llm_payload(PROMPT, [lying]), "sampling": {"max_tokens": 4}},
             generating("Two.", 6)]

    async def scenario():
        store = InvocationStore(aioredis.Redis.from_url(redis_url))
        record = await one_batch(store, LLM.deployment_id(), items)
        after = await store.wait(await store.submit(LLM.deployment_id(), generating("After.", 4)), 120)
        return record, after

    record, after = run(scenario())
    assert record.state == State.DONE, record.error
    outcomes = record.output["items"]
    assert "output" in outcomes[0] and "output" in outcomes[2], outcomes
    assert outcomes[1]["kind"] == ErrorKind.RECOVERABLE.value and "RuntimeError" in outcomes[1]["error"], outcomes
    assert after.state == State.DONE and llm.alive()
