"""The invocation protocol on a real Redis server: states, exactly-once outcomes, blocking waits."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from flyte_cornserve.namespace import ENV_NAMESPACE
from flyte_cornserve.protocol import invocations
from flyte_cornserve.protocol.invocations import (
    ErrorKind,
    InvocationStore,
    Outcome,
    State,
    events_key,
    invocation_key,
    queue_key,
)


def run(coroutine):
    return asyncio.run(coroutine)


async def store_for(redis_url: str) -> InvocationStore:
    return InvocationStore(aioredis.Redis.from_url(redis_url))


async def take(store: InvocationStore, deployment: str, consumer: str):
    reply = await store.redis.xreadgroup("executors", consumer, {queue_key(deployment): ">"}, count=1, block=1000)
    ((_, [(entry_id, fields)]),) = reply
    return await store.load(deployment, fields[b"id"].decode(), entry_id.decode())


def test_submit_queues_and_an_executor_completes_it_once(redis_url):
    async def scenario():
        store = await store_for(redis_url)
        deployment = f"dep-{uuid.uuid4().hex[:8]}"
        invocation_id = await store.submit(deployment, {"prompt": "hi"}, timeout_s=60)
        assert (await store.record(invocation_id)).history == [State.CREATED, State.QUEUED]
        assert await store.queue_depth(deployment) == 1

        invocation = await take(store, deployment, "executor-a")
        assert invocation.input == {"prompt": "hi"} and invocation.deadline is not None
        assert await store.queue_depth(deployment) == 0  # delivered, in flight
        assert await store.start(invocation, "executor-a")
        assert await store.finish(invocation, Outcome(output={"text": "hello"}))
        # A second executor that also ran it (it was presumed dead) cannot overwrite the outcome.
        assert await store.start(invocation, "executor-b") is False
        assert await store.finish(invocation, Outcome(output={"text": "other"})) is False

        record = await store.record(invocation_id)
        assert record.state == State.DONE and record.output == {"text": "hello"}
        assert record.executor == "executor-a" and record.attempt == 1
        assert record.history == [State.CREATED, State.QUEUED, State.RUNNING, State.DONE]
        pending = await store.redis.xpending(queue_key(deployment), "executors")
        assert pending["pending"] == 0  # acknowledged once stored
        assert await store.redis.xlen(queue_key(deployment)) == 0  # and gone from the queue

    run(scenario())


def test_errors_keep_their_kind(redis_url):
    async def scenario():
        store = await store_for(redis_url)
        deployment = f"dep-{uuid.uuid4().hex[:8]}"
        invocation_id = await store.submit(deployment, {})
        invocation = await take(store, deployment, "e")
        await store.start(invocation, "e")
        await store.finish(invocation, Outcome.failed("executor died", ErrorKind.RECOVERABLE))
        record = await store.record(invocation_id)
        assert (record.state, record.error, record.error_kind) == (State.ERROR, "executor died", ErrorKind.RECOVERABLE)

    run(scenario())


def test_a_cancelled_invocation_is_not_started(redis_url):
    async def scenario():
        store = await store_for(redis_url)
        deployment = f"dep-{uuid.uuid4().hex[:8]}"
        invocation_id = await store.submit(deployment, {})
        assert await store.cancel(invocation_id)
        invocation = await take(store, deployment, "e")
        assert await store.start(invocation, "e") is False
        assert await store.cancel(invocation_id) is False  # already terminal
        assert (await store.record(invocation_id)).state == State.CANCELLED

    run(scenario())


def test_wait_returns_when_the_outcome_is_stored(redis_url):
    async def scenario():
        store = await store_for(redis_url)
        deployment = f"dep-{uuid.uuid4().hex[:8]}"
        invocation_id = await store.submit(deployment, {})
        waiter = asyncio.create_task(store.wait(invocation_id, timeout_s=30))
        invocation = await take(store, deployment, "e")
        await store.start(invocation, "e")
        assert not waiter.done()
        await store.finish(invocation, Outcome(output={"ok": True}))
        record = await asyncio.wait_for(waiter, 30)
        assert record.state == State.DONE and record.output == {"ok": True}

    run(scenario())


def test_wait_gives_up_at_its_timeout_with_the_current_state(redis_url):
    async def scenario():
        store = await store_for(redis_url)
        invocation_id = await store.submit(f"dep-{uuid.uuid4().hex[:8]}", {})
        record = await store.wait(invocation_id, timeout_s=0.2)
        assert record.state == State.QUEUED

    run(scenario())


def test_unknown_invocation_is_a_clear_error(redis_url):
    with pytest.raises(KeyError, match="no invocation 'nope'"):
        run(InvocationStore(aioredis.Redis.from_url(redis_url)).record("nope"))


def test_an_executor_that_sees_the_entry_finds_the_invocation_queued(redis_url):
    """Regression: the entry and the QUEUED state appear together, or a fast executor drops it."""

    async def scenario():
        store = await store_for(redis_url)
        deployment = f"dep-{uuid.uuid4().hex[:8]}"
        await store.ensure_queue(deployment)
        reader = aioredis.Redis.from_url(redis_url)
        seen = asyncio.create_task(
            reader.xreadgroup("executors", "fast", {queue_key(deployment): ">"}, count=1, block=2000)
        )
        await asyncio.sleep(0)  # let the read reach Redis before submitting
        invocation_id = await store.submit(deployment, {})
        ((_, [(entry_id, _)]),) = await seen
        invocation = await store.load(deployment, invocation_id, entry_id.decode())
        assert await store.start(invocation, "fast")

    for _ in range(20):
        run(scenario())


def test_a_collected_record_goes_once_newer_invocations_push_it_out_of_the_recent_ones(redis_url, monkeypatch):
    monkeypatch.setenv(ENV_NAMESPACE, f"retention-{uuid.uuid4().hex[:8]}")  # a recent set of its own
    monkeypatch.setattr(invocations, "RECENT_LIMIT", 3)

    async def scenario():
        store = await store_for(redis_url)
        deployment = f"dep-{uuid.uuid4().hex[:8]}"
        collected, uncollected, running = [await store.submit(deployment, {"n": n}) for n in range(3)]
        for _ in range(3):
            invocation = await take(store, deployment, "executor-a")
            assert await store.start(invocation, "executor-a")
            if invocation.id != running:
                assert await store.finish(invocation, Outcome(output={"n": invocation.input["n"]}))
        await store.collect(collected, running)  # `running` has not ended: collecting it does nothing
        assert (await store.record(collected)).output == {"n": 0}  # still among the recent: a repeated read finds it

        newer = [await store.submit(deployment, {"n": n}) for n in range(3, 6)]  # the first three fall out
        assert await store.redis.exists(invocation_key(collected), events_key(collected)) == 0
        assert (await store.record(uncollected)).state is State.DONE  # nobody has its outcome yet: kept ...
        assert 0 < await store.redis.ttl(invocation_key(uncollected)) <= invocations.RECORD_TTL_S  # ... for its TTL
        assert (await store.record(running)).state is State.RUNNING
        await store.collect(uncollected)  # collected once out of the recent ones: it goes at once
        with pytest.raises(KeyError):
            await store.record(uncollected)
        assert [r.id for r in await store.recent(10)] == newer[::-1]

    run(scenario())
