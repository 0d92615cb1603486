"""Executors never die silently and never lose a result: a malformed entry does not stop the reclaim
loop, two survivors take a dead executor's entries over exactly once between them, and invocations in
flight through a restart of Redis (AOF on: its data survives) all end DONE exactly once."""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio as aioredis

from cornserve_builtins.encoder import EncoderTask
from flyte_cornserve.models.tiny import draw
from flyte_cornserve.namespace import ENV_NAMESPACE
from flyte_cornserve.protocol.invocations import (
    GROUP, InvocationStore, Priority, State, events_key, invocation_key, queue_key,
)
from flyte_cornserve.redis_server import connect_async

from ..processes import Sidecars
from ..restartable_redis import RestartableRedis
from .conftest import Executors, run
from .test_encoder import data_url

TASK = EncoderTask(model_id="tiny-llava")
IMAGES = [data_url(draw("red", "square", "blue", random.Random(i))) for i in range(4)]


def _history(sync: redis.Redis, invocation_id: str) -> list[bytes]:
    return [fields[b"state"] for _, fields in sync.xrange(events_key(invocation_id))]


def test_a_malformed_orphan_entry_does_not_stop_the_reclaim_loop(executors, tiny_llava, redis_url):
    """Two dead consumers hold entries: `ghost1` a malformed one (no invocation id), `ghost2` a real
    invocation. The executor's reclaim loop meets the malformed one first; it must go on and take
    over the real one."""
    deployment = TASK.deployment_id()
    sync = redis.Redis.from_url(redis_url)
    queue = queue_key(deployment)

    async def orphans():
        store = InvocationStore(aioredis.Redis.from_url(redis_url))
        await store.ensure_queue(deployment)
        bogus = await store.redis.xadd(queue, {"bogus": "no id here"})
        assert await store.redis.xreadgroup(GROUP, "ghost1", {queue: ">"}, count=1)
        real = await store.submit(deployment, {"data": IMAGES[0]}, timeout_s=300)
        assert await store.redis.xreadgroup(GROUP, "ghost2", {queue: ">"}, count=1)
        return bogus, real

    bogus, real = run(orphans())
    keeper = executors.start(TASK, "keeper")

    async def outcome():
        return await InvocationStore(aioredis.Redis.from_url(redis_url)).wait(real, 60)

    record = run(outcome())
    assert record.state == State.DONE and record.executor == "keeper", (record.state, keeper.log.read_text()[-3000:])
    assert sync.xpending_range(queue, GROUP, bogus, bogus, 1) == []  # acknowledged: it can never be served
    assert keeper.alive()
    keeper.process.terminate()
    assert keeper.process.wait(60) == 0


ROUNDS = 3
ORPHANS = 100


def test_two_survivors_take_a_dead_executors_entries_over_exactly_once(executors, tiny_llava, redis_url):
    """Both survivors are frozen while a consumer that never heartbeats takes the queue's entries;
    they are thawed together, so both reclaim loops look at the orphans at the same moment. Each
    orphan is run by one of them, once."""
    left, right = executors.start(TASK, "left"), executors.start(TASK, "right")
    sync = redis.Redis.from_url(redis_url)
    deployment = TASK.deployment_id()
    queues = {queue_key(deployment, p): ">" for p in Priority}
    ids: list[str] = []

    async def submit(count: int) -> list[str]:
        store = InvocationStore(aioredis.Redis.from_url(redis_url))
        return [await store.submit(deployment, {"data": IMAGES[i % 4]}, timeout_s=300) for i in range(count)]

    for round_ in range(ROUNDS):
        for survivor in (left, right):
            os.kill(survivor.process.pid, signal.SIGSTOP)
        try:
            ids += run(submit(ORPHANS))
            assert sync.xreadgroup(GROUP, f"dead{round_}", queues, count=ORPHANS)
            # Thaw them once both reclaim periods (1 s, as their heartbeat's) are over: both look at once.
            deadline = time.monotonic() + 30
            while any(sync.pttl(f"cornserve:executor:{s.id}") > 1500 for s in (left, right)):
                assert time.monotonic() < deadline
                time.sleep(0.02)  # the poll's period
        finally:
            for survivor in (left, right):
                os.kill(survivor.process.pid, signal.SIGCONT)

    async def outcomes():
        store = InvocationStore(aioredis.Redis.from_url(redis_url))
        deadline = time.monotonic() + 120  # for all of them
        return [await store.wait(i, max(0.1, deadline - time.monotonic())) for i in ids]

    records = run(outcomes())
    bad = [(r.id, r.state, r.error, _history(sync, r.id)) for r in records
           if r.state != State.DONE or _history(sync, r.id).count(b"RUNNING") != 1]
    assert not bad, (len(bad), bad[:3])
    assert left.alive() and right.alive()


@pytest.fixture
def weather(monkeypatch) -> Iterator[tuple[RestartableRedis, Executors]]:
    """Its own Redis (restartable), sidecar and executor pool, all in one namespace with this process."""
    server = RestartableRedis()
    pool = Sidecars(server.url, f"test-{uuid.uuid4().hex[:10]}")
    monkeypatch.setenv(ENV_NAMESPACE, pool.namespace)
    sidecar = pool.start(memory_cap="256MiB", heartbeat_ttl=3.0)
    started = Executors(server.url, sidecar.id, pool.namespace, server.directory)
    try:
        yield server, started
    finally:
        started.close()
        pool.close()
        server.close()


COUNT = 200


def test_invocations_in_flight_through_a_redis_restart_all_end_done_once(weather, tiny_llava):
    server, pool = weather
    executor = pool.start(TASK, "weathered")
    sync = redis.Redis.from_url(server.url)

    async def submit():
        store = InvocationStore(connect_async(server.url))
        ids = [await store.submit(TASK.deployment_id(), {"data": IMAGES[i % 4]}, timeout_s=300)
               for i in range(COUNT)]
        first = await store.wait(ids[0], 120)
        assert first.state == State.DONE
        return ids

    ids = run(submit())
    unfinished = sum(sync.hget(invocation_key(i), "state") != b"DONE" for i in ids)
    server.restart()  # mid-stream: the executor is reading, running and storing
    assert unfinished, "every invocation ended before the restart: it was not mid-stream"

    async def outcomes():
        store = InvocationStore(connect_async(server.url))
        deadline = time.monotonic() + 120  # for all of them
        return [await store.wait(i, max(0.1, deadline - time.monotonic())) for i in ids]

    records = run(outcomes())
    bad = [(r.id, r.state, r.error) for r in records if r.state != State.DONE]
    assert not bad, (len(bad), bad[:3], executor.log.read_text()[-3000:])
    for record in records:
        assert _history(sync, record.id).count(b"DONE") == 1
    assert executor.alive()
