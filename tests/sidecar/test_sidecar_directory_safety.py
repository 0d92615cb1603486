"""The sidecar's local bookkeeping and the Redis directory never diverge: an eviction that Redis fails is
kept and retried (no arena space leaks, nothing freed that Redis may still point at), and a put that
loses a race for an id on another node leaves the original's entry and bytes alone."""

from __future__ import annotations

import pytest
import torch

from flyte_cornserve.sidecar.errors import TensorIdTaken


def break_held_set(sidecars, sidecar_id: str, *must_exist: str) -> None:
    """Make the sidecar's next directory removals fail: its `held` set becomes a string, so the SREM of
    a removal fails with WRONGTYPE (a real Redis error) after the entry's keys were deleted (neither a
    transaction nor a script rolls back), which also tells the test that the removal was tried.

    Atomically checks that the entries `must_exist` are still there, i.e. not freed yet."""
    held = f"{sidecars.namespace}:held:{sidecar_id}"
    pipe = sidecars.directory.redis.pipeline(transaction=True)
    for key in must_exist:
        pipe.exists(f"{sidecars.namespace}:entry:{key}")
    pipe.delete(held)
    pipe.set(held, "not a set")
    *present, _, _ = pipe.execute()
    assert all(present), "the tensors were freed before the test could break Redis; the test proves nothing"


def repair_held_set(sidecars, sidecar_id: str) -> None:
    sidecars.directory.redis.delete(f"{sidecars.namespace}:held:{sidecar_id}")


def entry_exists(sidecars, key: str) -> bool:
    return bool(sidecars.directory.redis.exists(f"{sidecars.namespace}:entry:{key}"))


def test_an_eviction_whose_removal_redis_fails_is_retried_and_frees_the_space(sidecars, wait_until) -> None:
    node = sidecars.start()
    client = sidecars.client(node)
    baseline = client.stats()
    ref = client.put(torch.arange(4096, dtype=torch.float32), ttl=0)
    assert client.stats().used > baseline.used
    break_held_set(sidecars, node.id, ref.id)
    client.release(ref)  # the last pin, no TTL: the sidecar evicts it from Redis, then frees it
    wait_until(lambda: not entry_exists(sidecars, ref.id), "the sidecar to try removing the tensor")
    assert client.stats().used > baseline.used  # Redis did not confirm the removal: the space is not free yet
    repair_held_set(sidecars, node.id)
    wait_until(lambda: client.stats().used == baseline.used, "the space to be freed once Redis works again")
    assert client.stats().tensors == baseline.tensors
    assert sidecars.directory.redis.sismember(f"{sidecars.namespace}:held:{node.id}", ref.id) == 0


def test_expiries_whose_removal_redis_fails_are_retried_and_free_the_space(sidecars, wait_until) -> None:
    node = sidecars.start()
    client = sidecars.client(node)
    baseline = client.stats()
    refs = client.put_many([torch.full((1000,), i, dtype=torch.int64) for i in range(3)], pins=0, ttl=3.0)  # CACHED, expire together
    break_held_set(sidecars, node.id, *(ref.id for ref in refs))
    wait_until(lambda: not all(entry_exists(sidecars, ref.id) for ref in refs), "the sidecar to try removing an expired tensor")
    repair_held_set(sidecars, node.id)
    wait_until(lambda: client.stats().used == baseline.used, "the space of all three to be freed once Redis works again")
    assert client.stats().tensors == baseline.tensors
    assert not any(entry_exists(sidecars, ref.id) for ref in refs)


def test_a_duplicate_id_on_another_node_fails_and_leaves_the_original_intact(sidecars, wait_until) -> None:
    a_node, b_node = sidecars.start(), sidecars.start()
    a, b = sidecars.client(a_node), sidecars.client(b_node)
    original = torch.arange(256, dtype=torch.int32)
    ref = a.put(original, id="shared-id", pins=2, ttl=0)
    b_baseline = b.stats()
    with pytest.raises(TensorIdTaken, match="'shared-id' is already in use"):
        b.put_many([torch.zeros(512, dtype=torch.int32), torch.ones(8)], ids=["shared-id", "fresh-id"])
    wait_until(lambda: b.stats().used == b_baseline.used, "node B to free what it placed for the refused put")
    entry = sidecars.directory.entry("shared-id")
    assert entry is not None and entry.holder == a_node.id and entry.pins == 2
    assert sidecars.directory.entry("fresh-id") is None  # a batch is put all or nothing
    assert torch.equal(a.get(ref), original)
    assert torch.equal(b.get(ref), original)  # pulled from A: the original bytes
    a.release(ref)
    b.release(ref)
    wait_until(lambda: a.stats().used == 0 and b.stats().used == b_baseline.used, "both nodes to free the tensor")
