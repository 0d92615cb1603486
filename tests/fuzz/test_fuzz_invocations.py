"""Fuzz: malformed invocation payloads written straight into a real encoder executor's Redis.

Queue entries without an id, ids with no record, records whose `input` is not JSON or is JSON of
the wrong shape, non-numeric `deadline` / `attempt` / `max_attempts`, an unknown `priority`, batch
records whose `items` count disagrees with their items. Each one ends in an ERROR naming what is
wrong (or, with no record to write, its entry is acknowledged and deleted); nothing stays pending;
and the same executor process serves a well-formed invocation afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cornserve_builtins.encoder import EncoderTask
from flyte_cornserve.protocol.invocations import (
    GROUP, TERMINAL, Priority, State, events_key, invocation_key, queue_key,
)

from ..scrape import eventually

TASK = EncoderTask(model_id="tiny-llava")
DEPLOYMENT = TASK.deployment_id()
WAIT_S = 30.0  # generous bound on one invocation's end; a hang fails the example instead of the run


@pytest.fixture(scope="module")
def encoder(executors, tiny_llava):
    return executors.start(TASK)


def _not_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return True
    return False


def _not_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return True
    return False


def _not_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return True
    return False


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
#: JSON that is not the encoder's input ({"data": <str>})
wrong_shape = json_values.filter(lambda v: not (isinstance(v, dict) and isinstance(v.get("data"), str)))

# (what to change in a well-formed record, its value)
bad_fields = st.one_of(
    st.tuples(st.just("input"), st.text(min_size=1, max_size=30).filter(_not_json)),
    st.tuples(st.just("input"), wrong_shape.map(json.dumps)),
    st.tuples(st.just("deadline"), st.text(min_size=1, max_size=12).filter(_not_float)),
    st.tuples(st.just("attempt"), st.text(min_size=1, max_size=12).filter(_not_int)),
    st.tuples(st.just("attempt"), st.sampled_from(["-1", str(2**62), str(2**64), "1" * 30])),  # past HINCRBY's range
    st.tuples(st.just("max_attempts"), st.text(min_size=1, max_size=12).filter(_not_int)),
    st.tuples(st.just("priority"), st.text(min_size=1, max_size=12).filter(lambda t: t not in {p.value for p in Priority})),
)

# a batch record: `items` says k, its input holds something else (a list of another length, or no list)
bad_batches = st.tuples(
    st.integers(1, 4),
    st.one_of(st.lists(st.just({}), max_size=6), json_values.filter(lambda v: not isinstance(v, list))),
).filter(lambda b: not (isinstance(b[1], list) and len(b[1]) == b[0]))


def _record(input_json: str, **fields) -> dict:
    now = time.time()
    return {"state": State.QUEUED.value, "deployment_id": DEPLOYMENT, "input": input_json, "deadline": repr(now + 60),
            "created_at": repr(now), "attempt": 0, "max_attempts": 1, "label": "fuzz", "notify": "", "items": "",
            "priority": Priority.INTERACTIVE.value, "route": "", **fields}


def _write(client: redis.Redis, record: dict, entry: dict, priority: Priority = Priority.INTERACTIVE) -> str:
    """What the submitter writes, by hand: the record (if any), its events, the queue entry."""
    invocation_id = uuid.uuid4().hex
    with client.pipeline(transaction=True) as pipe:
        if record:
            pipe.hset(invocation_key(invocation_id), mapping=record)
            pipe.xadd(events_key(invocation_id), {"state": State.CREATED.value})
            pipe.xadd(events_key(invocation_id), {"state": State.QUEUED.value})
        pipe.xadd(queue_key(DEPLOYMENT, priority), {k: (invocation_id if v is None else v) for k, v in entry.items()})
        pipe.execute()
    return invocation_id


@dataclasses.dataclass
class Ended:
    state: State | None  # None: not terminal within WAIT_S
    error: str
    error_kind: str


def _wait(client: redis.Redis, invocation_id: str) -> Ended:
    """Block on the invocation's events stream until a terminal state (WAIT_S at most); then its
    record's fields as they are (a malformed record does not parse as a `Record`)."""
    deadline, last = time.monotonic() + WAIT_S, "0"
    while (remaining := deadline - time.monotonic()) > 0:
        for _, entries in client.xread({events_key(invocation_id): last}, block=max(1, int(remaining * 1000))) or []:
            for entry_id, fields in entries:
                last = entry_id
                if State(fields[b"state"].decode()) in TERMINAL:
                    state, error, kind = client.hmget(invocation_key(invocation_id), ["state", "error", "error_kind"])
                    return Ended(State(state.decode()), (error or b"").decode(), (kind or b"").decode())
    return Ended(None, "", "")


def _queues_drained(client: redis.Redis) -> bool:
    """Every entry of both queues acknowledged and deleted: nothing queued, nothing pending."""
    return all(client.xlen(queue_key(DEPLOYMENT, p)) == 0 for p in Priority)


def _assert_still_serving(encoder, redis_url: str, client: redis.Redis) -> None:
    assert encoder.alive()
    good = _write(client, _record(json.dumps({"data": "/no/such/image.png"})), {"id": None})
    record = _wait(client, good)  # a well-formed invocation: served (a clear user error)
    assert record.state == State.ERROR and "no such file or object: /no/such/image.png" in record.error, record
    eventually(lambda: _queues_drained(client), "the executor to acknowledge every entry", timeout=WAIT_S)
    assert encoder.alive()


FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(bad=bad_fields)
def test_a_malformed_record_ends_in_a_clear_error(encoder, redis_url, bad) -> None:
    field, value = bad
    client = redis.Redis.from_url(redis_url)
    invocation_id = _write(client, _record(json.dumps({"data": "/no/such/image.png"}), **{field: value}), {"id": None})
    record = _wait(client, invocation_id)
    assert record.state == State.ERROR and record.error_kind == "user", f"{field}={value!r}: {record}"
    if field == "input":
        assert "input" in record.error or "data" in record.error, record.error
    else:
        assert field in record.error, record.error
    assert encoder.alive()


@FUZZ
@given(bad=bad_batches, n=st.sampled_from(["count", "junk", "missing"]))
def test_a_batch_record_whose_items_disagree_ends_in_a_clear_error(encoder, redis_url, bad, n) -> None:
    count, items = bad
    client = redis.Redis.from_url(redis_url)
    entry = {"id": None, **({"n": str(count)} if n == "count" else {"n": "many"} if n == "junk" else {})}
    record = _record(json.dumps(items), items=str(count), priority=Priority.BATCH.value)
    invocation_id = _write(client, record, entry, Priority.BATCH)
    record = _wait(client, invocation_id)
    assert record.state == State.ERROR, f"items={count}, input={items!r}, n={n}: {record}"
    assert "items" in record.error, record.error
    assert encoder.alive()


@FUZZ
@given(fields=st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k != "id"), st.text(max_size=8),
                              min_size=1, max_size=3),
       with_record=st.booleans())
def test_entries_naming_no_invocation_are_acknowledged(encoder, redis_url, fields, with_record) -> None:
    """An entry without `id` (nothing to write anywhere), or whose id has no record: acknowledged and deleted."""
    client = redis.Redis.from_url(redis_url)
    if with_record:
        entry_id = client.xadd(queue_key(DEPLOYMENT), {"id": uuid.uuid4().hex, **fields})
    else:
        entry_id = client.xadd(queue_key(DEPLOYMENT), fields)
    eventually(lambda: not client.xrange(queue_key(DEPLOYMENT), entry_id, entry_id), "the entry to be dropped",
               timeout=WAIT_S)
    assert client.xpending(queue_key(DEPLOYMENT), GROUP)["pending"] == 0 or all(
        p["message_id"] != entry_id for p in client.xpending_range(queue_key(DEPLOYMENT), GROUP, "-", "+", 100))
    assert encoder.alive()


def test_the_executor_serves_well_formed_invocations_after_the_fuzzing(encoder, redis_url) -> None:
    _assert_still_serving(encoder, redis_url, redis.Redis.from_url(redis_url))
