"""The one lifetime model: PINNED -> CACHED -> evicted. A full sidecar evicts unpinned tensors least
recently released first instead of making puts wait, never evicts a pinned one, and keeps its memory
and the Redis directory in agreement; a pin from a hit protects a CACHED tensor again. For producers
of content-addressed ids: a pin count per id, claims that elect one producer per id, and a put under
an id already taken that says so (`TensorIdTaken`)."""

from __future__ import annotations

import pytest
import torch

from flyte_cornserve.sidecar.allocator import ExtentAllocator
from flyte_cornserve.sidecar.errors import MemoryCapExceeded, TensorIdTaken, TensorNotFound

KiB = 1024


def tensor(kib: int, value: float) -> torch.Tensor:
    return torch.full((kib * KiB // 4,), value, dtype=torch.float32)


def assert_memory_and_directory_agree(sidecars, node, client, expected: set[str]) -> None:
    """The tensors the sidecar holds are exactly `expected`, in its `held` set and as entries naming
    it, and its used bytes are their extents' sizes."""
    held = sidecars.directory.redis.smembers(f"{sidecars.namespace}:held:{node.id}")
    entries = {key.split(":", 2)[2]: sidecars.directory.entry(key.split(":", 2)[2])
               for key in sidecars.directory.keys() if key.startswith(f"{sidecars.namespace}:entry:")}
    assert held == expected
    assert {key for key, entry in entries.items() if entry.holder == node.id} == expected
    stats = client.stats()
    assert stats.tensors == len(expected)
    sizes = ExtentAllocator(stats.capacity).size_for
    assert stats.used == sum(sizes(entries[key].ref.nbytes) for key in expected)
    assert stats.pinned_bytes + stats.cached_bytes == stats.used


def test_a_full_sidecar_evicts_unpinned_tensors_oldest_first_and_never_a_pinned_one(sidecars, wait_until) -> None:
    node = sidecars.start(memory_cap="1MiB")  # ten 100 KiB tensors fit
    client = sidecars.client(node)
    pinned = [client.put(tensor(100, i), id=f"pinned-{i}") for i in range(3)]
    released = [client.put(tensor(100, 10 + i), id=f"released-{i}") for i in range(4)]
    client.release_many(released)  # CACHED in this order
    unpinned = [client.put(tensor(100, 20 + i), id=f"unpinned-{i}", pins=0) for i in range(3)]  # CACHED at once, after them
    wait_until(lambda: client.stats().cached == 7, "the sidecar to learn that seven tensors are CACHED")
    assert (client.stats().pinned, client.stats().waits) == (3, 0)

    fresh = [client.put(tensor(100, 30 + i), id=f"fresh-{i}", timeout=0) for i in range(4)]  # no room: each evicts one
    stats = client.stats()
    assert (stats.waits, stats.evictions["lru"], stats.cached) == (0, 4, 3)
    for ref in released:  # the oldest four went
        with pytest.raises(TensorNotFound, match="evicted"):
            client.get(ref, timeout=5)
    for i, ref in enumerate(unpinned):  # the newer CACHED ones stayed, readable
        assert torch.equal(client.get(ref), tensor(100, 20 + i))
    assert_memory_and_directory_agree(sidecars, node, client, {r.id for r in pinned + unpinned + fresh})

    more = [client.put(tensor(100, 40 + i), id=f"more-{i}", timeout=0) for i in range(3)]
    stats = client.stats()
    assert (stats.waits, stats.evictions["lru"], stats.cached, stats.pinned) == (0, 7, 0, 10)
    with pytest.raises(MemoryCapExceeded, match="bytes in use and pinned"):  # nothing left to evict
        client.put(tensor(100, 99), timeout=0.2)
    for i, ref in enumerate(pinned):
        assert torch.equal(client.get(ref), tensor(100, i))
    assert_memory_and_directory_agree(sidecars, node, client, {r.id for r in pinned + fresh + more})


def test_a_tensor_with_two_pins_is_evictable_only_after_the_second_release(sidecars, wait_until) -> None:
    node = sidecars.start(memory_cap="1MiB")
    client = sidecars.client(node)
    shared = client.put(tensor(400, 1), pins=2)
    client.release(shared)
    assert sidecars.directory.entry(shared.id).pins == 1
    other = client.put(tensor(400, 2))
    with pytest.raises(MemoryCapExceeded):  # the first release left it PINNED: not evicted for room
        client.put(tensor(400, 3), timeout=0.2)
    assert torch.equal(client.get(shared), tensor(400, 1))
    assert client.stats().evictions["lru"] == 0
    client.release(shared)
    wait_until(lambda: client.stats().cached == 1, "the sidecar to learn that the tensor is CACHED")
    third = client.put(tensor(400, 3), timeout=0)  # now it is evicted for room, without waiting
    assert (client.stats().evictions["lru"], client.stats().waits) == (1, 1)  # the one wait: the refused put above
    with pytest.raises(TensorNotFound):
        client.get(shared, timeout=5)
    assert_memory_and_directory_agree(sidecars, node, client, {other.id, third.id})


def test_a_pin_protects_a_cached_tensor_again_until_released(sidecars, wait_until) -> None:
    node = sidecars.start(memory_cap="1MiB")
    client = sidecars.client(node)
    hit = client.put(tensor(400, 1))
    client.release(hit)
    wait_until(lambda: client.stats().cached == 1, "the sidecar to learn that the tensor is CACHED")
    assert client.pin_many([hit.id, "never-put"]) == [hit, None]
    assert sidecars.directory.entry(hit.id).pins == 1
    client.put(tensor(400, 2))
    with pytest.raises(MemoryCapExceeded):  # its eviction is refused: it was pinned again
        client.put(tensor(400, 3), timeout=0.2)
    stats = client.stats()
    assert (stats.evictions["lru"], stats.cached, stats.pinned) == (0, 0, 2)  # the sidecar learned it is PINNED
    assert torch.equal(client.get(hit), tensor(400, 1))
    client.release(hit)
    wait_until(lambda: client.stats().cached == 1, "the sidecar to learn that the tensor is CACHED again")
    client.put(tensor(400, 3), timeout=0)
    assert client.stats().evictions["lru"] == 1
    assert client.pin_many([hit.id]) == [None]  # evicted: a miss


def test_a_pin_on_a_tensor_of_a_dead_sidecar_is_a_miss(sidecars, wait_until) -> None:
    dead, alive = sidecars.start(heartbeat_ttl=1.0), sidecars.start()
    ref = sidecars.client(dead).put(tensor(4, 1), pins=0)
    client = sidecars.client(alive)
    assert client.pin_many([ref.id]) == [ref]
    dead.kill()
    wait_until(lambda: not sidecars.directory.is_alive(dead.id), "the killed sidecar's heartbeat to lapse")
    assert client.pin_many([ref.id]) == [None]


def test_extra_releases_never_take_pins_below_zero(sidecars) -> None:
    client = sidecars.client(sidecars.start())
    ref = client.put(tensor(4, 1), pins=1)
    for _ in range(3):
        client.release(ref)
    assert sidecars.directory.entry(ref.id).pins == 0
    [pinned] = client.pin_many([ref.id])
    assert pinned == ref and sidecars.directory.entry(ref.id).pins == 1  # one pin is one: no debt from the extras
    client.release_many([ref, ref])
    assert sidecars.directory.entry(ref.id).pins == 0
    assert torch.equal(client.get(ref), tensor(4, 1))  # CACHED, still readable


def test_pins_are_counted_per_id_and_a_taken_id_is_refused_by_its_kind(sidecars) -> None:
    client = sidecars.client(sidecars.start())
    a, b = client.put(tensor(4, 1), pins=0), client.put(tensor(4, 2), pins=0)
    assert client.pin_many([a.id, "never-put", b.id], [2, 1, 3]) == [a, None, b]
    assert (sidecars.directory.entry(a.id).pins, sidecars.directory.entry(b.id).pins) == (2, 3)
    with pytest.raises(ValueError, match="0 or more for each of the 2 ids"):
        client.pin_many([a.id, b.id], [1])
    with pytest.raises(ValueError, match="0 or more"):
        client.pin_many([a.id], [-1])
    assert client.pin_many([a.id], 0) == [a] and sidecars.directory.entry(a.id).pins == 2  # 0 pins: only a look
    with pytest.raises(TensorIdTaken, match="already in use"):  # refused by the sidecar, carried by its code
        client.put(tensor(4, 3), id=a.id)
    assert torch.equal(client.get(a), tensor(4, 1))


def test_a_claim_is_its_claimers_until_given_up_or_expired(sidecars, wait_until) -> None:
    client = sidecars.client(sidecars.start())
    assert client.claim_many(["x", "y"], "first", ttl=60) == [True, True]
    assert client.claim_many(["x"], "first", ttl=60) == [True]  # its own again (a retried call): still its
    assert client.claim_many(["x", "y", "z"], "second", ttl=60) == [False, False, True]
    client.unclaim_many(["x", "z"], "second")  # gives up z; x is not its to give up
    assert client.claim_many(["x", "z"], "third", ttl=60) == [False, True]
    client.unclaim_many(["x"], "first")
    assert client.claim_many(["x"], "third", ttl=60) == [True]
    assert client.claim_many(["w"], "died", ttl=0.2) == [True]
    wait_until(lambda: client.claim_many(["w"], "alive", ttl=60) == [True], "the claim of one that died to expire")
