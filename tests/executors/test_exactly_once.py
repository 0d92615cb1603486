"""Two executors share a deployment's stream; one is SIGKILLed while holding invocations, and every
invocation still completes exactly once (the survivor takes over the dead one's pending entries), but
is not run more than `max_attempts` times in all."""

from __future__ import annotations

import os
import random
import signal

import redis
import redis.asyncio as aioredis

from cornserve_builtins.encoder import EncoderTask, Modality
from flyte_cornserve.models.tiny import draw
from flyte_cornserve.protocol.invocations import (
    GROUP,
    TERMINAL,
    ErrorKind,
    InvocationStore,
    State,
    events_key,
    queue_key,
)

from .conftest import run
from .test_encoder import data_url

TASK = EncoderTask(model_id="tiny-llava")
COUNT = 300


def test_sigkill_mid_batch_loses_and_duplicates_nothing(executors, tiny_llava, redis_url):
    victim = executors.start(TASK, "victim")
    images = [data_url(draw("red", "square", "blue", random.Random(i))) for i in range(8)]
    sync = redis.Redis.from_url(redis_url)

    async def scenario():
        store = InvocationStore(aioredis.Redis.from_url(redis_url))
        # Two attempts: what the victim was running when it died runs once more, on the survivor.
        ids = [await store.submit(TASK.deployment_id(), {"data": images[i % 8]}, timeout_s=300, max_attempts=2)
               for i in range(COUNT)]
        # Freeze the victim at a moment it holds delivered, unacknowledged entries, then kill it.
        first = await store.wait(ids[0], 120)
        assert first.state == State.DONE and first.executor == "victim"
        for next_id in ids[1:]:
            os.kill(victim.process.pid, signal.SIGSTOP)
            held = sync.xpending_range(queue_key(TASK.deployment_id()), GROUP, "-", "+", COUNT, consumername="victim")
            if held:
                queue = queue_key(TASK.deployment_id())
                held_ids = [sync.xrange(queue, p["message_id"], p["message_id"])[0][1][b"id"].decode() for p in held]
                unfinished = [i for i in held_ids if (await store.record(i)).state not in TERMINAL]
                break
            os.kill(victim.process.pid, signal.SIGCONT)
            await store.wait(next_id, 60)  # it made progress; look again
        victim.kill()
        survivor = executors.start(TASK, "survivor")
        records = [await store.wait(i, 300) for i in ids]
        return unfinished, survivor, records

    unfinished, survivor, records = run(scenario())
    assert all(r.state == State.DONE for r in records), [r.error for r in records if r.state != State.DONE]
    for record in records:
        states = [e[1][b"state"] for e in sync.xrange(events_key(record.id))]
        assert states.count(b"DONE") == 1 and b"ERROR" not in states
    # What the victim held and had not finished was taken over, run again and stored once. (What it
    # had stored but not yet acknowledged, the survivor only acknowledges.)
    assert unfinished, "the victim held no unfinished invocation when it was killed"
    by_id = {r.id: r for r in records}
    assert {by_id[i].executor for i in unfinished} == {"survivor"}
    assert {by_id[i].attempt for i in unfinished} <= {1, 2}  # 1: delivered, not yet started when it died
    assert sync.xpending(queue_key(TASK.deployment_id()), GROUP)["pending"] == 0
    assert survivor.alive()


TEXT = EncoderTask(model_id="tiny-llama", modality=Modality.TEXT)  # a deployment of its own


def test_a_reclaimed_invocation_runs_again_only_while_attempts_are_left(executors, redis_url):
    """An executor took two invocations from the queue, started them and died (its liveness key is
    gone; here it never had one). The executor that takes them over runs again only the one that
    may have a second attempt; the other ends as a recoverable ERROR saying why."""
    deployment = TEXT.deployment_id()

    async def died_while_running():
        store = InvocationStore(aioredis.Redis.from_url(redis_url))
        once = await store.submit(deployment, {"data": "a red square"}, timeout_s=300)  # max_attempts=1
        twice = await store.submit(deployment, {"data": "a blue circle"}, timeout_s=300, max_attempts=2)
        reply = await store.redis.xreadgroup(GROUP, "dead", {queue_key(deployment): ">"}, count=2)
        for entry_id, fields in reply[0][1]:
            assert await store.start(await store.load(deployment, fields[b"id"].decode(), entry_id.decode()), "dead")
        return once, twice

    once, twice = run(died_while_running())
    heir = executors.start(TEXT, "heir")

    async def outcomes():
        store = InvocationStore(aioredis.Redis.from_url(redis_url))
        return await store.wait(once, 120), await store.wait(twice, 120)

    once, twice = run(outcomes())
    assert once.state == State.ERROR and once.error_kind == ErrorKind.RECOVERABLE
    assert "executor died while running it (attempt 1 of 1)" in once.error, once.error
    assert once.history == [State.CREATED, State.QUEUED, State.RUNNING, State.RUNNING, State.ERROR]
    assert twice.state == State.DONE and twice.executor == "heir" and twice.attempt == 2
    assert twice.history == [State.CREATED, State.QUEUED, State.RUNNING, State.RUNNING, State.DONE]
    assert heir.alive()
