"""A tensor whose sidecar died is lost: consumers get `ProducerSidecarDead` naming that sidecar,
well before their own timeout (which would raise `TensorNotReady` instead)."""

from __future__ import annotations

import pytest
import torch

from flyte_cornserve.sidecar.errors import ProducerSidecarDead, SidecarUnavailable, TensorNotFound

TIMEOUT_S = 60.0  # generous: the errors below must come from liveness, never from this timeout


def test_crashed_producer_sidecar_fails_a_cross_node_get(sidecars) -> None:
    a, b = sidecars.start(heartbeat_ttl=1.0), sidecars.start()
    ref = sidecars.client(a).put(torch.ones(1000))
    consumer = sidecars.client(b)
    a.kill()  # SIGKILL: no cleanup, its membership lingers in Redis until the heartbeat TTL
    with pytest.raises(ProducerSidecarDead, match=f"its sidecar '{a.id}'"):
        consumer.get(ref, timeout=TIMEOUT_S)
    assert consumer.stats().used == 0  # the copy B had reserved was given back


def test_crashed_producer_sidecar_fails_a_same_node_get_once_its_heartbeat_lapses(sidecars, wait_until) -> None:
    a = sidecars.start(heartbeat_ttl=1.0)
    client = sidecars.client(a)
    ref = client.put(torch.ones(1000))
    a.kill()
    assert a.arena_path.exists()  # its shared memory is still there, but nobody owns it any more
    wait_until(lambda: not sidecars.directory.is_alive(a.id), "the crashed sidecar's heartbeat to lapse")
    with pytest.raises(ProducerSidecarDead, match=f"its sidecar '{a.id}' stopped heartbeating"):
        client.get(ref, timeout=TIMEOUT_S)


def test_stopped_producer_sidecar_frees_everything_and_fails_later_gets(sidecars) -> None:
    a, b = sidecars.start(), sidecars.start()
    ref = sidecars.client(a).put(torch.ones(1000))
    a.stop()  # SIGTERM: frees its tensors, removes its arena and leaves the membership
    assert not a.arena_path.exists()
    assert sidecars.directory.keys() == {f"{sidecars.namespace}:sidecar:{b.id}", sidecars.directory.metrics_key}
    assert sidecars.directory.redis.hkeys(sidecars.directory.metrics_key) == [f"sidecar:{b.id}"]  # a withdrew
    with pytest.raises(ProducerSidecarDead, match=f"its sidecar '{a.id}' is not alive"):
        sidecars.client(b).get(ref, timeout=TIMEOUT_S)


def test_a_consumer_without_a_live_local_sidecar_is_told_how_to_start_one(sidecars) -> None:
    with pytest.raises(SidecarUnavailable, match="start one with `cornserve sidecar --id nobody-here`"):
        sidecars.client("nobody-here")


def test_a_second_sidecar_with_a_live_id_is_refused(sidecars) -> None:
    a = sidecars.start()
    second = sidecars.run_cli("sidecar", "--id", a.id, "--namespace", sidecars.namespace)
    assert second.returncode == 1
    assert f"sidecar id '{a.id}' is already in use by pid {a.process.pid}" in second.stderr
    assert sidecars.client(a).stats().sidecar == a.id  # the first one is unharmed
    assert a.arena_path.exists()


def test_an_evicted_tensor_is_not_found_rather_than_dead(sidecars, wait_until) -> None:
    a = sidecars.start()
    client = sidecars.client(a)
    ref = client.put(torch.ones(10), ttl=0)
    client.release(ref)  # CACHED with no TTL left: evicted at once
    wait_until(lambda: client.stats().tensors == 0, "the sidecar to evict the released tensor")
    with pytest.raises(TensorNotFound, match="is gone: evicted from its sidecar's cache"):
        client.get(ref, timeout=TIMEOUT_S)
