"""Content-addressed encoder outputs: the same image (whatever its path, or as a data: URL) is one
tensor, found again while it is in the sidecar (a hit: pinned, not encoded); two executors of one
deployment encode an image requested by both at once only once (single flight); an id claimed by an
encoder that died is taken over once its claim expires.

Two real executors of one deployment share the module's sidecar. Hits and misses are counted by the
executors' own metrics (summed over both) and seen in the sidecar's directory, never inferred from
timings.
"""

from __future__ import annotations

import collections
import io
import random
import time
import uuid

import pytest
import redis.asyncio as aioredis
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from cornserve_builtins.encoder import EncoderTask
from flyte_cornserve.executors.content_ids import output_identity
from flyte_cornserve.protocol.content import content_digest, content_id
from flyte_cornserve.executors.encoder import ENCODER_VERSION
from flyte_cornserve.models.tiny import draw
from flyte_cornserve.protocol.invocations import InvocationStore, Priority, State, TensorPolicy
from flyte_cornserve.task import TensorRef, unit_task_from_json

from ..scrape import eventually, scrape, series
from .conftest import one_batch, run
from .test_encoder import free_port, reference_embeddings, submit_all
from .test_image_limits import data_url

TASK = EncoderTask(model_id="tiny-llava")


@pytest.fixture(scope="module")
def pair(executors, tiny_llava):
    """Executors `a` and `b` of one deployment, each serving its metrics on a port of its own."""
    started = []
    for name in ("a", "b"):
        port = free_port()
        process = executors.start(TASK, name, metrics_port=port)
        process.metrics_port = port
        started.append(process)
    return started


def cache_counts(pair) -> collections.Counter:
    """Items served by a hit and by a miss, and bytes saved, summed over both executors."""
    totals: collections.Counter = collections.Counter()
    for process in pair:
        metrics = scrape(f"http://127.0.0.1:{process.metrics_port}/metrics")
        ids = {"deployment": TASK.deployment_id(), "executor": process.id}
        for result in ("hit", "miss"):
            totals[result] += metrics[series("cornserve_tensor_cache_lookups_total", **ids, result=result)]
        totals["bytes saved"] += metrics[series("cornserve_tensor_cache_bytes_saved_total", **ids)]
    return totals


def since(before: collections.Counter, pair) -> dict[str, float]:
    after = cache_counts(pair)
    return {what: after[what] - before[what] for what in ("hit", "miss", "bytes saved")}


def png(pixels, **text: str) -> bytes:
    """The pixels as PNG bytes; text chunks (`text`) give the same pixels other bytes."""
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def expected_id(model_dir, raw: bytes) -> str:
    return content_id(output_identity(TASK.model_id, TASK.modality.value, model_dir, ENCODER_VERSION), content_digest(raw))


def refs_of(records) -> list[TensorRef]:
    assert all(record.state == State.DONE for record in records), [record.error for record in records]
    return [TensorRef.model_validate(record.output["embeddings"]) for record in records]


def in_turn(redis_url: str, datas: list[str]) -> list[TensorRef]:
    """Each one encoded after the previous one ended (each alone in its batch)."""
    return [ref for data in datas for ref in refs_of(run(submit_all(redis_url, [{"data": data}])))]


def test_the_same_image_under_other_paths_or_as_a_data_url_is_one_tensor(pair, tiny_llava, sidecar_client, redis_url,
                                                                         tmp_path):
    raw = png(draw("red", "circle", "white", random.Random(101)))
    original, copy = tmp_path / "original.png", tmp_path / "elsewhere" / "copy.png"
    copy.parent.mkdir()
    original.write_bytes(raw)
    copy.write_bytes(raw)
    before = cache_counts(pair)

    refs = in_turn(redis_url, [str(original), str(copy), data_url(raw)])
    assert {ref.id for ref in refs} == {expected_id(tiny_llava, raw)}  # from the bytes, not the reference
    assert sidecar_client.directory.entry(refs[0].id).pins == 3  # one tensor, pinned once per request
    assert since(before, pair) == {"hit": 2, "miss": 1, "bytes saved": 2 * refs[0].nbytes}
    sidecar_client.release_many(refs)


def test_a_batch_encodes_each_distinct_image_once_with_a_pin_per_item(pair, sidecar_client, redis_url, tmp_path):
    same = png(draw("blue", "square", "yellow", random.Random(102)))
    others = [png(draw("green", "stripe", "black", random.Random(103))), png(draw("red", "square", "white", random.Random(104)))]
    path = tmp_path / "same.png"
    path.write_bytes(same)
    items = [{"data": str(path)}, {"data": data_url(others[0])}, {"data": data_url(same)}, {"data": data_url(others[1])},
             {"data": str(path)}]
    tensors = sidecar_client.stats().tensors
    before = cache_counts(pair)

    record = run(one_batch(InvocationStore(aioredis.Redis.from_url(redis_url)), TASK.deployment_id(), items))
    assert record.state == State.DONE, record.error
    refs = refs_of(record.item_outcomes())
    ids = [ref.id for ref in refs]
    assert len(set(ids)) == 3 and ids[0] == ids[2] == ids[4]
    assert {key: sidecar_client.directory.entry(key).pins for key in ids} == {ids[0]: 3, ids[1]: 1, ids[3]: 1}
    assert sidecar_client.stats().tensors == tensors + 3
    assert since(before, pair) == {"hit": 2, "miss": 3, "bytes saved": 2 * refs[0].nbytes}
    sidecar_client.release_many(refs)


def test_each_item_pins_its_tensor_once_per_consumer_and_its_ref_names_its_own_input(pair, sidecar_client, redis_url,
                                                                                     tmp_path):
    """Pins come from the submitter (an item's consumers), summed over equal items; each item's ref
    says how to compute it again from its own input (the path it named, and the content digest)."""
    raw = png(draw("white", "circle", "green", random.Random(106)))
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    first.write_bytes(raw)
    second.write_bytes(raw)
    record = run(one_batch(InvocationStore(aioredis.Redis.from_url(redis_url)), TASK.deployment_id(),
                           [{"data": str(first)}, {"data": str(second)}], pins=[2, 3]))
    refs = refs_of(record.item_outcomes())
    assert refs[0].id == refs[1].id and sidecar_client.directory.entry(refs[0].id).pins == 5
    assert [ref.source.input for ref in refs] == [str(first), str(second)]
    assert {ref.source.content for ref in refs} == {content_digest(raw)}
    assert unit_task_from_json(refs[0].source.task).deployment_id() == TASK.deployment_id()
    sidecar_client.release_many([refs[0]] * 5)


def test_with_the_tensor_cache_off_each_item_gets_a_fresh_tensor_gone_at_its_release(pair, sidecar_client, redis_url):
    """`TaskOptions(tensor_cache=False)`: no content id, no lookup (no hit, even of a stored
    tensor), and the tensor is evicted once its consumer released it (nobody could find it)."""
    image = data_url(png(draw("black", "stripe", "white", random.Random(107))))
    (cached,) = in_turn(redis_url, [image])  # stored under its content id
    before = cache_counts(pair)
    record = run(one_batch(InvocationStore(aioredis.Redis.from_url(redis_url)), TASK.deployment_id(),
                           [{"data": image}, {"data": image}], tensors=TensorPolicy(cache=False)))
    refs = refs_of(record.item_outcomes())
    assert len({cached.id, *(ref.id for ref in refs)}) == 3 and not any(ref.id.startswith("emb-") for ref in refs)
    assert since(before, pair) == {"hit": 0, "miss": 2, "bytes saved": 0}
    assert [ref.source.input for ref in refs] == ["", ""]  # a data: URL is inline: not carried
    entry = sidecar_client.directory.entry(refs[0].id)
    assert (entry.pins, entry.ttl) == (1, 0)
    sidecar_client.release_many(refs)
    eventually(lambda: sidecar_client.directory.entry(refs[0].id) is None, "the released fresh tensor to be evicted")
    assert sidecar_client.directory.entry(cached.id) is not None
    sidecar_client.release(cached)


def test_a_released_output_stays_as_cache_and_a_new_request_for_it_is_a_hit(pair, sidecar_client, redis_url):
    image = data_url(png(draw("yellow", "circle", "blue", random.Random(105))))
    (ref,) = in_turn(redis_url, [image])
    cached = sidecar_client.stats().cached
    sidecar_client.release(ref)
    assert sidecar_client.directory.entry(ref.id).pins == 0
    eventually(lambda: sidecar_client.stats().cached == cached + 1, "the sidecar to learn that the output is CACHED")
    tensors = sidecar_client.stats().tensors
    before = cache_counts(pair)

    (again,) = in_turn(redis_url, [image])
    assert again == ref
    assert sidecar_client.directory.entry(ref.id).pins == 1  # PINNED again, by the new request
    assert sidecar_client.stats().tensors == tensors  # no new tensor
    assert since(before, pair) == {"hit": 1, "miss": 0, "bytes saved": ref.nbytes}
    sidecar_client.release(again)


def test_two_executors_requested_one_image_at_once_put_one_tensor(pair, tiny_llava, sidecar_client, redis_url):
    """Two batch invocations of 64 items, all one image, queued together: 64 items fill an executor,
    so each executor takes one. Between them they put one tensor, which every item gets."""
    raw = png(draw("green", "square", "red", random.Random(106)))
    tensors = sidecar_client.stats().tensors
    before = cache_counts(pair)

    async def scenario():
        store = InvocationStore(aioredis.Redis.from_url(redis_url))
        await store.ensure_queue(TASK.deployment_id())
        ids = [uuid.uuid4().hex for _ in range(2)]
        async with store.redis.pipeline(transaction=True) as pipe:
            for invocation_id in ids:
                store.queue_submission(pipe, TASK.deployment_id(), invocation_id, items=[{"data": data_url(raw)}] * 64,
                                       timeout_s=120, priority=Priority.BATCH)
            await pipe.execute()
        return [await store.wait(invocation_id, 120) for invocation_id in ids]

    records = run(scenario())
    assert {record.executor for record in records} == {"a", "b"}
    refs = [ref for record in records for ref in refs_of(record.item_outcomes())]
    assert len(refs) == 128 and {ref.id for ref in refs} == {expected_id(tiny_llava, raw)}
    assert sidecar_client.directory.entry(refs[0].id).pins == 128
    assert sidecar_client.stats().tensors == tensors + 1
    assert since(before, pair) == {"hit": 127, "miss": 1, "bytes saved": 127 * refs[0].nbytes}
    sidecar_client.release_many(refs)


def test_an_encoder_waiting_on_a_claim_takes_the_claimers_tensor(pair, tiny_llava, sidecar_client, redis_url):
    """Another encoder claimed the image's id and puts its tensor (here a marker) while this request
    runs: the request gets that tensor, pinned, and nothing is encoded."""
    raw = png(draw("red", "stripe", "yellow", random.Random(107)))
    key = expected_id(tiny_llava, raw)
    assert sidecar_client.claim_many([key], "another-encoder", ttl=60) == [True]
    marker = torch.full((16, 64), 7.0)
    before = cache_counts(pair)

    async def scenario():
        store = InvocationStore(aioredis.Redis.from_url(redis_url))
        invocation_id = await store.submit(TASK.deployment_id(), {"data": data_url(raw)}, timeout_s=120)
        sidecar_client.put(marker, id=key, pins=0)
        sidecar_client.unclaim_many([key], "another-encoder")
        return await store.wait(invocation_id, 120)

    (ref,) = refs_of([run(scenario())])
    assert ref.id == key and sidecar_client.directory.entry(key).pins == 1
    assert torch.equal(sidecar_client.get(ref), marker)
    assert since(before, pair) == {"hit": 1, "miss": 0, "bytes saved": ref.nbytes}
    sidecar_client.release(ref)


def test_an_id_claimed_by_an_encoder_that_died_is_taken_over_when_its_claim_expires(pair, tiny_llava, sidecar_client,
                                                                                   redis_url):
    raw = png(draw("blue", "stripe", "white", random.Random(108)))
    key = expected_id(tiny_llava, raw)
    claimed_at = time.monotonic()
    assert sidecar_client.claim_many([key], "an-encoder-that-died", ttl=3.0) == [True]  # and never puts
    before = cache_counts(pair)

    (ref,) = in_turn(redis_url, [data_url(raw)])
    assert time.monotonic() - claimed_at >= 3.0  # it waited for the claim: it cannot end before the expiry
    assert ref.id == key and sidecar_client.directory.entry(key).pins == 1
    assert since(before, pair) == {"hit": 0, "miss": 1, "bytes saved": 0}
    assert not sidecar_client.directory.redis.exists(f"{sidecar_client.directory.namespace}:claim:{key}")  # given up
    sidecar_client.release(ref)


def test_the_embeddings_of_a_hit_equal_a_fresh_encode_of_the_same_pixels(pair, tiny_llava, sidecar_client, redis_url):
    pixels = draw("green", "circle", "yellow", random.Random(109))
    raw = png(pixels)
    miss, hit, fresh = in_turn(redis_url, [data_url(raw), data_url(raw), data_url(png(pixels, note="other bytes"))])
    assert miss.id == hit.id != fresh.id  # the same pixels under other bytes: another id, encoded again
    got, again = sidecar_client.get(hit).clone(), sidecar_client.get(fresh).clone()
    assert torch.equal(got, again)
    torch.testing.assert_close(got, reference_embeddings(tiny_llava, pixels), rtol=1e-5, atol=1e-5)
    sidecar_client.release_many([miss, hit, fresh])
