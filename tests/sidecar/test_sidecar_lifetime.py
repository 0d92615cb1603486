"""Memory comes back: after the last pin is released (with no TTL), after an orphan's bound, after a
crash and restart; and a sidecar full of pinned tensors makes producers wait, then fail clearly."""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np
import pytest
import torch

from flyte_cornserve.sidecar.arena import arena_prefix
from flyte_cornserve.sidecar.errors import MemoryCapExceeded, TensorNotFound

KiB = 1024


def shm_files(sidecar) -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith(arena_prefix(sidecar.id))}


def resident_bytes(sidecar) -> int:
    """Bytes of shared memory the arena actually occupies (it is a sparse file)."""
    return os.stat(sidecar.arena_path).st_blocks * 512


def settled(client) -> bool:
    stats = client.stats()
    return stats.tensors == 0 and stats.used == 0


def test_ten_thousand_cycles_leave_memory_and_redis_keys_at_baseline(sidecars, wait_until) -> None:
    node = sidecars.start()
    client = sidecars.client(node)
    baseline_keys, baseline_files = sidecars.directory.keys(), shm_files(node)
    assert baseline_files == {node.arena}
    for i in range(10_000):
        tensor = np.full(1 + i % 64, i, dtype=np.int32)  # 4 B .. 256 B, sizes vary
        ref = client.put(tensor, ttl=0)  # evicted as soon as it is released
        view = client.get(ref)
        assert view[-1] == i
        del view
        client.release(ref)
    wait_until(lambda: settled(client), "the sidecar to free every released tensor")
    assert sidecars.directory.keys() == baseline_keys
    assert shm_files(node) == baseline_files
    stats = client.stats()
    # Memory was reused: 10,000 extents that were never reused would reach 40 MiB. (Frees are
    # asynchronous, so how many released tensors are still held at a time depends on scheduling.)
    assert stats.high_water <= 4 * 1024 * KiB
    assert resident_bytes(node) <= stats.high_water


def test_cross_node_cycles_leave_both_sidecars_at_baseline(sidecars, wait_until) -> None:
    a, b = sidecars.start(), sidecars.start()
    producer, consumer = sidecars.client(a), sidecars.client(b)
    baseline_keys = sidecars.directory.keys()
    for i in range(300):
        ref = producer.put(torch.full((1000,), float(i)), ttl=0)
        assert consumer.get(ref)[-1] == i
        consumer.release(ref)
    wait_until(lambda: settled(producer) and settled(consumer), "both sidecars to free everything")
    assert sidecars.directory.keys() == baseline_keys
    assert shm_files(a) == {a.arena} and shm_files(b) == {b.arena}


def test_a_tensor_becomes_cached_at_its_last_pin_and_goes_at_its_ttl(sidecars, wait_until) -> None:
    client = sidecars.client(sidecars.start())
    ref = client.put(torch.arange(100), pins=3, ttl=1.0)
    client.release(ref)
    client.release(ref)
    assert torch.equal(client.get(ref), torch.arange(100))  # one pin left
    assert (client.stats().pinned, client.stats().cached) == (1, 0)
    client.release(ref)
    wait_until(lambda: client.stats().cached == 1, "the sidecar to learn that the tensor is CACHED")
    assert torch.equal(client.get(ref), torch.arange(100))  # CACHED: still readable
    wait_until(lambda: settled(client), "the CACHED tensor to be evicted at its TTL")
    assert client.stats().evictions == {"lru": 0, "ttl": 1, "orphan": 0}
    with pytest.raises(TensorNotFound, match="is gone: evicted from its sidecar's cache, expired"):
        client.get(ref, timeout=5)


def test_a_tensor_pinned_past_max_pinned_is_freed_as_an_orphan(sidecars, wait_until) -> None:
    client = sidecars.client(sidecars.start())
    baseline_keys = sidecars.directory.keys()
    kept = client.put(torch.ones(10), ttl=0)
    orphan = client.put(torch.ones(1000), pins=2, ttl=600, max_pinned=0.5)
    assert torch.equal(client.get(orphan), torch.ones(1000))  # nobody ever releases it
    wait_until(lambda: client.stats().tensors == 1, "the orphan's bound to pass")
    assert client.stats().evictions == {"lru": 0, "ttl": 0, "orphan": 1}
    with pytest.raises(TensorNotFound, match="is gone"):
        client.get(orphan, timeout=5)
    assert torch.equal(client.get(kept), torch.ones(10))  # a tensor within its bound stays
    client.release(kept)
    wait_until(lambda: settled(client), "the kept tensor to be evicted")
    assert sidecars.directory.keys() == baseline_keys


def test_a_restarted_sidecar_removes_what_its_crashed_predecessor_left(sidecars) -> None:
    crashed = sidecars.start()
    client = sidecars.client(crashed)
    ref = client.put(torch.ones(1000))
    crashed.kill()
    assert shm_files(crashed) == {crashed.arena}
    assert any(ref.id in key for key in sidecars.directory.keys())
    restarted = sidecars.start(crashed.id)  # same id, same node: takes over at once
    assert shm_files(restarted) == {restarted.arena} != {crashed.arena}
    assert sidecars.directory.keys() == {f"{sidecars.namespace}:sidecar:{crashed.id}", sidecars.directory.metrics_key}
    with pytest.raises(TensorNotFound, match="is gone"):
        client.get(ref, timeout=5)
    assert restarted.address != crashed.address
    # the same client follows its sidecar to its new address and arena
    assert torch.equal(client.get(client.put(torch.arange(5))), torch.arange(5))


def test_memory_cap_applies_backpressure_when_all_is_pinned_then_fails_clearly(sidecars, wait_until) -> None:
    node = sidecars.start(memory_cap="1MiB")
    client = sidecars.client(node)
    big = torch.ones(600 * KiB // 4)  # 600 KiB: two do not fit under 1 MiB
    first = client.put(big)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        blocked = pool.submit(client.put, big * 2, timeout=30, ttl=0)
        wait_until(lambda: client.stats().waiting == 1, "the second put to wait for memory")
        assert not blocked.done()
        client.release(first)  # CACHED: the waiting put evicts it and proceeds
        second = blocked.result(timeout=30)
    assert torch.equal(client.get(second), big * 2)
    assert client.stats().evictions["lru"] == 1 and client.stats().waits == 1
    with pytest.raises(TensorNotFound):
        client.get(first, timeout=5)
    with pytest.raises(MemoryCapExceeded, match=r"no room for 614400 bytes within 0.2 s; 614400 of 1048576 bytes in use"):
        client.put(big, timeout=0.2)
    with pytest.raises(MemoryCapExceeded, match="can never fit under .* memory cap of 1048576 bytes"):
        client.put(torch.ones(2 * 1024 * KiB // 4), timeout=30)
    assert client.stats().waiting == 0
    client.release(second)
    wait_until(lambda: settled(client), "the sidecar to free the last tensor")


def test_a_batch_put_that_does_not_fit_places_nothing(sidecars, wait_until) -> None:
    node = sidecars.start(memory_cap="1MiB")
    client = sidecars.client(node)
    third = torch.ones(300 * KiB // 4)
    with pytest.raises(MemoryCapExceeded):
        client.put_many([third, third, third, third], timeout=0.2)  # 4 x 300 KiB: the fourth does not fit
    assert client.stats().used == 0  # all or nothing: the three that fitted were freed
    refs = client.put_many([third, third, third], timeout=5, ttl=0)
    client.release_many(refs)
    wait_until(lambda: settled(client), "the sidecar to free the batch")
