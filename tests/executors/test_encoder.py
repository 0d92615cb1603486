"""The encoder executor: real tiny Llava vision tower + projector, embeddings through the sidecar."""

from __future__ import annotations

import base64
import io
import os
import random
import signal
import socket

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
import torch
from PIL import Image

from cornserve_builtins.encoder import EncoderTask
from flyte_cornserve.protocol.deployments import executor_key
from flyte_cornserve.models.tiny import draw
from flyte_cornserve.protocol.invocations import ErrorKind, InvocationStore, State, queue_key
from flyte_cornserve.task import TensorRef

from ..scrape import eventually, scrape, series
from .conftest import one_batch, run

TASK = EncoderTask(model_id="tiny-llava")


def data_url(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def reference_embeddings(model_dir, image: np.ndarray) -> torch.Tensor:
    """What transformers' own Llava computes for these pixels: vision tower, feature select, projector."""
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    with torch.no_grad():
        features = model.get_image_features(pixel_values=processor(images=Image.fromarray(image), return_tensors="pt")["pixel_values"])
    return getattr(features, "pooler_output", features)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def encoder(executors, tiny_llava):
    port = free_port()
    process = executors.start(TASK, metrics_port=port)
    process.metrics_port = port
    return process


async def submit_all(redis_url: str, inputs: list[dict], timeout: float = 120.0):
    store = InvocationStore(aioredis.Redis.from_url(redis_url))
    ids = [await store.submit(TASK.deployment_id(), item, timeout_s=timeout) for item in inputs]
    return [await store.wait(i, timeout) for i in ids]


def test_embeddings_equal_transformers_for_paths_and_data_urls(encoder, tiny_llava, sidecar_client, redis_url, tmp_path):
    rng = random.Random(7)
    images = [draw("red", "circle", "white", rng), draw("blue", "square", "black", rng), draw("green", "stripe", "yellow", rng)]
    path = tmp_path / "image.png"
    Image.fromarray(images[0]).save(path)
    records = run(submit_all(redis_url, [{"data": str(path)}, {"data": data_url(images[1])}, {"data": data_url(images[2])}]))

    for image, record in zip(images, records, strict=True):
        assert record.state == State.DONE, record.error
        ref = TensorRef.model_validate(record.output["embeddings"])
        assert ref.shape == (16, 64) and ref.dtype == "float32"
        got = sidecar_client.get(ref, timeout=30).clone()
        sidecar_client.release(ref)
        torch.testing.assert_close(got, reference_embeddings(tiny_llava, image), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("data:image/png;base64," + base64.b64encode(b"not a png at all").decode(), "undecodable image"),
        ("data:image/png;base64,@@@", "not valid base64"),
        ("data:image/png,rawbytes", "is not ;base64"),
        ("/no/such/image.png", "no such file or object: /no/such/image.png"),
    ],
)
def test_bad_images_are_that_invocations_error_and_the_executor_keeps_serving(encoder, redis_url, data, message):
    good = data_url(draw("red", "square", "blue", random.Random(1)))
    bad_record, good_record = run(submit_all(redis_url, [{"data": data}, {"data": good}]))
    assert bad_record.state == State.ERROR and message in bad_record.error
    assert bad_record.error_kind == ErrorKind.USER
    assert good_record.state == State.DONE
    assert encoder.alive()


def test_an_image_the_processor_cannot_take_fails_alone_in_its_batch(encoder, redis_url, tmp_path):
    """A tall 1-pixel-wide PNG decodes (70 M pixels, under PIL's bomb limit), but resizing its short
    side to the model's 32 pixels asks torch for ~215 GB: the encode of any batch holding it fails.
    Only that item may fail, as a user error naming the image; the others of its batch are DONE."""
    huge = tmp_path / "tall.png"
    Image.new("RGB", (1, 70_000_000)).save(huge)
    goods = [{"data": data_url(draw(c, "circle", "white", random.Random(3)))} for c in ("red", "blue", "green")]
    items = [goods[0], {"data": str(huge)}, goods[1], goods[2]]

    record = run(one_batch(InvocationStore(aioredis.Redis.from_url(redis_url)), TASK.deployment_id(), items))
    assert record.state == State.DONE, record.error
    outcomes = record.item_outcomes()
    assert [o.state for o in outcomes] == [State.DONE, State.ERROR, State.DONE, State.DONE], [o.error for o in outcomes]
    bad = outcomes[1]
    assert bad.kind == ErrorKind.USER and "cannot encode" in bad.error and str(huge) in bad.error, bad.error
    assert "executor error" not in bad.error
    assert encoder.alive()


def test_invalid_input_fields_name_the_field(encoder, redis_url):
    (record,) = run(submit_all(redis_url, [{"image": "x.png"}]))
    assert record.state == State.ERROR and "data" in record.error and "Field required" in record.error


def test_metrics_on_the_given_port(encoder, redis_url):
    url = f"http://127.0.0.1:{encoder.metrics_port}/metrics"
    ids = {"deployment": TASK.deployment_id(), "executor": encoder.id}
    done = series("cornserve_executor_invocations_total", **ids, state="DONE", kind="")
    runs, batches = series("cornserve_executor_run_seconds_count", **ids), series("cornserve_executor_batch_size_count", **ids)
    before = scrape(url)
    (record,) = run(submit_all(redis_url, [{"data": data_url(draw("red", "square", "blue", random.Random(2)))}]))
    assert record.state == State.DONE
    # the executor counts right after its outcome is stored, which is also when the submitter wakes
    eventually(lambda: scrape(url)[runs] > before[runs], "the executor to count its outcome (then time it)")
    after = scrape(url)
    assert after[done] == before[done] + 1
    assert after[runs] == before[runs] + 1 and after[batches] == before[batches] + 1
    assert series("cornserve_executor_queue_depth", **ids) in after


def test_an_invocation_cancelled_while_queued_is_skipped_and_the_next_is_served(encoder, redis_url):
    """Frozen (SIGSTOP), the executor cannot start what is submitted meanwhile: the first is
    cancelled while QUEUED, and once thawed the executor must skip it and serve the second."""
    image = {"data": data_url(draw("green", "circle", "white", random.Random(5)))}

    async def scenario():
        store = InvocationStore(aioredis.Redis.from_url(redis_url))
        os.kill(encoder.process.pid, signal.SIGSTOP)
        try:
            skipped = await store.submit(TASK.deployment_id(), image, timeout_s=60)
            served = await store.submit(TASK.deployment_id(), image, timeout_s=60)
            assert await store.cancel(skipped)
        finally:
            os.kill(encoder.process.pid, signal.SIGCONT)
        served_record = await store.wait(served, 60)
        queued = [fields[b"id"].decode() for _, fields in await store.redis.xrange(queue_key(TASK.deployment_id()))]
        return await store.record(skipped), served_record, queued

    skipped, served, queued = run(scenario())
    assert skipped.state == State.CANCELLED and skipped.history == [State.CREATED, State.QUEUED, State.CANCELLED]
    assert skipped.executor == ""  # never started
    assert served.state == State.DONE and served.executor == encoder.id
    # Both reach the thawed executor in one batch (it reads the second at once after the first), so
    # the skipped one is acknowledged before the served one runs.
    assert skipped.id not in queued
    assert encoder.alive()


def test_sigterm_right_after_start_exits_and_deletes_the_liveness_key(executors, tiny_llava, redis_url):
    """Stopping lands while the background loops are mid-command (their period and the queue read's
    both start at once): they must still end, rather than leave the executor hanging."""
    process = executors.start(TASK)
    assert redis.Redis.from_url(redis_url).exists(executor_key(process.id))
    process.process.terminate()
    assert process.process.wait(timeout=60) == 0  # a hang, not a duration, is what this bound catches
    assert not redis.Redis.from_url(redis_url).exists(executor_key(process.id))
