"""A consumer may ask for a tensor before the producer has written it: it blocks on Redis (no
polling) and gets the tensor as soon as it is published, on the producer's node or another one."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

from flyte_cornserve.sidecar.errors import TensorNotReady


def blocked_readers(sidecars) -> int:
    """Redis connections blocked in XREAD right now: consumers waiting for a tensor."""
    return sum(1 for c in sidecars.directory.redis.client_list() if c["cmd"] == "xread" and "b" in c["flags"])


def test_consumers_waiting_before_the_put_get_the_tensor(sidecars, wait_until) -> None:
    a, b = sidecars.start(), sidecars.start()
    producer = sidecars.client(a)
    same_node, other_node = sidecars.client(a), sidecars.client(b)
    tensor = torch.linspace(-1, 1, 4096, dtype=torch.float32).reshape(64, 64)
    before = blocked_readers(sidecars)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(lambda c=c: c.get("image-embedding.7", timeout=30).clone()) for c in (same_node, other_node)]
        wait_until(lambda: blocked_readers(sidecars) == before + 2, "both consumers to block in Redis")
        assert not any(f.done() for f in waiting)
        ref = producer.put(tensor, id="image-embedding.7", pins=2, ttl=0)
        results = [f.result(timeout=30) for f in waiting]
    assert all(torch.equal(r, tensor) for r in results)
    same_node.release(ref)
    other_node.release(ref)
    wait_until(lambda: producer.stats().tensors == 0, "the tensor (ttl 0) to be evicted after both releases")


def test_a_tensor_nobody_writes_times_out_with_a_clear_error(sidecars) -> None:
    client = sidecars.client(sidecars.start())
    with pytest.raises(TensorNotReady, match="tensor 'never-written' was not written within 0.3 s"):
        client.get("never-written", timeout=0.3)
