"""Decompression bombs: an image whose header claims more pixels than PIL's limit fails alone.

A few-byte PNG whose IHDR declares 20000x20000 (PIL refuses it at `Image.open`:
DecompressionBombError) or 10000x10000 (over `Image.MAX_IMAGE_PIXELS`, under twice it: PIL only
warns, and would go on to decode it): in one batch with good images, on a real encoder executor,
that item is a user error saying the image is too large (its pixels, the limit) and naming it, the
others are DONE, and the executor serves on.
"""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib

import pytest
import redis.asyncio as aioredis
from PIL import Image

from cornserve_builtins.encoder import EncoderTask
from flyte_cornserve.executors.encoder import BadItem, decode_image
from flyte_cornserve.models.tiny import draw
from flyte_cornserve.protocol.invocations import ErrorKind, InvocationStore, State

from .conftest import one_batch, run

TASK = EncoderTask(model_id="tiny-llava")


def claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR then says width x height (its CRC fixed): tiny on disk."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), "red").save(buffer, "PNG")
    png = bytearray(buffer.getvalue())
    assert png[12:16] == b"IHDR"
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def good_image(color: str) -> str:
    buffer = io.BytesIO()
    Image.fromarray(draw(color, "circle", "white", random.Random(3))).save(buffer, "PNG")
    return data_url(buffer.getvalue())


@pytest.fixture(scope="module")
def encoder(executors, tiny_llava):
    return executors.start(TASK)


@pytest.mark.parametrize(("width", "height"), [(20_000, 20_000), (10_000, 10_000)])
def test_decode_image_refuses_a_bomb_without_decoding_it(tmp_path, width, height) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(claiming(width, height))
    assert path.stat().st_size < 100
    with pytest.raises(BadItem) as raised:
        decode_image(path.read_bytes(), str(path))
    message = str(raised.value)
    assert raised.value.kind is ErrorKind.USER
    assert str(path) in message and "too large" in message, message
    assert f"{width * height} pixels" in message and f"limit of {Image.MAX_IMAGE_PIXELS} pixels" in message, message


def test_a_bomb_fails_alone_in_its_batch_and_the_executor_serves_on(encoder, redis_url, tmp_path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(claiming(20_000, 20_000))
    over_limit = data_url(claiming(10_000, 10_000))
    items = [{"data": good_image("red")}, {"data": str(bomb)}, {"data": good_image("blue")}, {"data": over_limit}]

    async def scenario():
        store = InvocationStore(aioredis.Redis.from_url(redis_url))
        batch = await one_batch(store, TASK.deployment_id(), items)
        after = await store.wait(await store.submit(TASK.deployment_id(), {"data": good_image("green")},
                                                    timeout_s=120), 120)
        return batch, after

    record, after = run(scenario())
    assert record.state == State.DONE, record.error
    outcomes = record.item_outcomes()
    assert [o.state for o in outcomes] == [State.DONE, State.ERROR, State.DONE, State.ERROR], [o.error for o in outcomes]
    for outcome, source, pixels in ((outcomes[1], str(bomb), 400_000_000), (outcomes[3], over_limit[:100], 100_000_000)):
        assert outcome.kind == ErrorKind.USER, outcome
        assert "too large" in outcome.error and source in outcome.error, outcome.error
        assert f"{pixels} pixels" in outcome.error and f"limit of {Image.MAX_IMAGE_PIXELS} pixels" in outcome.error
    assert after.state == State.DONE, after.error
    assert encoder.alive()
