"""Invocation records written by hand or corrupted in Redis, read back by the submitter's side.

`InvocationStore.record()` raises `MalformedRecord` naming the invocation and the field (its value
shown bounded), never a bare ValueError / JSONDecodeError / KeyError; `recent()` (`cornserve status`)
lists the readable records and leaves the others out; the connector's GetTask answers FAILED with
that message and serves the next request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

import pytest
import redis
import redis.asyncio as aioredis
from flyteidl.admin import agent_pb2
from flyteidl.core.execution_pb2 import TaskExecution
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cornserve_builtins.encoder import EncoderTask
from flyte_cornserve.flyte.connector import CornserveMetadata
from flyte_cornserve.namespace import ENV_NAMESPACE
from flyte_cornserve.protocol.invocations import (
    InvocationStore,
    MalformedRecord,
    Record,
    State,
    events_key,
    invocation_key,
    recent_key,
)
from flyte_cornserve.services.cli import _status_tables

from ..connector import ConnectorProcess
from ..flyte.test_connector_grpc import CATEGORY, IMAGE, create, until_terminal
from ..stack import Stack

ENCODER = EncoderTask(model_id="tiny-llava")
TRANSFER = {"op": "put", "id": "t1", "shape": [16, 64], "dtype": "float32", "nbytes": 4096, "path": "shared memory",
            "seconds": 0.001, "at": 1.0}


def run(coroutine):
    return asyncio.run(coroutine)


def good_fields() -> dict[str, str]:
    """What a DONE invocation's record holds, as the protocol writes it."""
    now = time.time()
    return {"state": "DONE", "deployment_id": "dep-junk", "input": json.dumps({"data": "x.png"}), "deadline": repr(now + 60),
            "created_at": repr(now), "attempt": "1", "max_attempts": "1", "label": "junk", "priority": "interactive",
            "notify": "", "items": "", "route": "", "executor": "x1", "node": "n1", "started_at": repr(now),
            "finished_at": repr(now), "output": json.dumps({"text": "hi"}), "transfers": json.dumps([TRANSFER])}


def write(client: redis.Redis, fields: dict, events: tuple = ("CREATED", "QUEUED", "RUNNING", "DONE"),
          recent: bool = False) -> str:
    """A record straight into Redis (no `submit`), with its events stream."""
    invocation_id = uuid.uuid4().hex
    with client.pipeline(transaction=True) as pipe:
        pipe.hset(invocation_key(invocation_id), mapping=fields)
        for event in events:
            pipe.xadd(events_key(invocation_id), event if isinstance(event, dict) else {"state": event})
        if recent:
            pipe.zadd(recent_key(), {invocation_id: time.time()})
        pipe.execute()
    return invocation_id


def read(redis_url: str, invocation_id: str) -> Record:
    async def scenario():
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await InvocationStore(client).record(invocation_id)
        finally:
            await client.aclose()
    return run(scenario())


HUGE = "Z" * 100_000  # shown bounded in the message

# (field, its junk value (None: the field missing), what the message must name)
JUNK = [
    ("state", "BOGUS", "state"),
    ("state", None, "state"),
    ("state", HUGE, "state"),
    ("deployment_id", None, "deployment_id"),
    ("deployment_id", b"\xff\xfe", "deployment_id"),
    ("output", "not json", "output"),
    ("output", "[1, 2]", "output"),  # JSON, not an object
    ("output", b"\xff{}", "output"),
    ("output", "[" * 100_000, "output"),  # nested past json's recursion limit
    ("output", None, "output"),  # DONE without an output
    ("error_kind", "fatal", "error_kind"),
    ("attempt", "x", "attempt"),
    ("attempt", "-3", "attempt"),
    ("max_attempts", "1.5", "max_attempts"),
    ("priority", "urgent", "priority"),
    ("items", "many", "items"),
    ("created_at", "abc", "created_at"),
    ("started_at", "soon", "started_at"),
    ("finished_at", "later", "finished_at"),
    ("deadline", "never", "deadline"),
    ("transfers", "not json", "transfers"),
    ("transfers", json.dumps({"op": "put"}), "transfers"),  # not a list
    ("transfers", json.dumps([{"op": "put"}]), "transfers"),  # a transfer without its fields
    ("transfers", json.dumps([{**TRANSFER, "nbytes": "many"}]), "transfers"),
]


@pytest.mark.parametrize(("name", "value", "named"), JUNK, ids=[f"{n}={str(v)[:12]!r}" for n, v, _ in JUNK])
def test_record_names_the_malformed_field(redis_url, name, value, named) -> None:
    fields = good_fields()
    if value is None:
        del fields[name]
    else:
        fields[name] = value
    invocation_id = write(redis.Redis.from_url(redis_url), fields)
    with pytest.raises(MalformedRecord) as raised:
        read(redis_url, invocation_id)
    message = str(raised.value)
    assert invocation_id in message and named in message, message
    assert len(message) < 1000, message[:300]  # the value shown bounded, not 100 KB of it


@pytest.mark.parametrize("event", [{"state": "BOGUS"}, {"executor": "x1"}], ids=["bad-state", "no-state"])
def test_record_names_a_malformed_event(redis_url, event) -> None:
    invocation_id = write(redis.Redis.from_url(redis_url), good_fields(), events=("CREATED", event, "DONE"))
    with pytest.raises(MalformedRecord) as raised:
        read(redis_url, invocation_id)
    assert invocation_id in str(raised.value) and "event" in str(raised.value) and "state" in str(raised.value)


def test_free_text_that_is_not_utf8_still_reads(redis_url) -> None:
    """A label or an error is only shown: bytes that are not UTF-8 do not make the record unreadable."""
    fields = good_fields() | {"label": b"caf\xe9", "error": b"\xff oops"}
    record = read(redis_url, write(redis.Redis.from_url(redis_url), fields))
    assert record.state is State.DONE and record.output == {"text": "hi"} and record.transfers == [TRANSFER]
    assert record.label == "caf\ufffd" and record.error == "\ufffd oops"
    assert record.history == [State.CREATED, State.QUEUED, State.RUNNING, State.DONE]


def test_a_batch_invocation_whose_outputs_the_runner_took_still_reads(redis_url) -> None:
    """Regression: the batch runner deletes a landed batch invocation's input and output (its items'
    outputs are in the batch's rows by then); such a DONE record was taken for malformed, so
    `recent()` hid every batch invocation from `cornserve status`."""
    fields = good_fields() | {"items": "64", "priority": "batch"}
    del fields["output"], fields["input"]
    record = read(redis_url, write(redis.Redis.from_url(redis_url), fields))
    assert record.state is State.DONE and record.items == 64 and record.output is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(good_fields())),
       value=st.binary(max_size=40) | st.text(max_size=40).map(str.encode))
def test_any_junk_in_any_field_reads_or_is_malformed(redis_url, name, value) -> None:
    """Whatever bytes a field holds: a Record, or a MalformedRecord naming that field."""
    invocation_id = write(redis.Redis.from_url(redis_url), good_fields() | {name: value})
    try:
        record = read(redis_url, invocation_id)
    except MalformedRecord as exc:
        assert name in str(exc) and invocation_id in str(exc), str(exc)
    else:
        assert record.id == invocation_id and record.state in State


def test_recent_and_status_leave_out_malformed_records(redis_url, monkeypatch, caplog) -> None:
    monkeypatch.setenv(ENV_NAMESPACE, f"malformed-{uuid.uuid4().hex[:8]}")  # a recent set of its own
    client = redis.Redis.from_url(redis_url)
    good_before = write(client, good_fields(), recent=True)
    bad = [write(client, good_fields() | {"state": "BOGUS"}, recent=True),
           write(client, good_fields() | {"output": "not json"}, recent=True),
           write(client, good_fields(), events=("CREATED", {"state": "??"}), recent=True)]
    good_after = write(client, good_fields() | {"state": "ERROR", "error": "boom", "error_kind": "user"}, recent=True)

    async def scenario():
        aclient = aioredis.Redis.from_url(redis_url)
        try:
            return await InvocationStore(aclient).recent(10)
        finally:
            await aclient.aclose()

    with caplog.at_level(logging.WARNING, logger="flyte_cornserve.protocol.invocations"):
        records = run(scenario())
    assert [r.id for r in records] == [good_after, good_before]
    for invocation_id in bad:
        assert any(invocation_id in message for message in caplog.messages), (invocation_id, caplog.messages)
        assert client.zscore(recent_key(), invocation_id) is not None  # left out of the listing, not lost

    tables = run(_status_tables(redis_url, 10, batch_limit=0))
    (recent,) = [t for t in tables if str(t.title).startswith("recent invocations")]
    shown = list(recent.columns[0].cells)
    assert shown == [good_after[:12], good_before[:12]]


@pytest.fixture(scope="module")
def connector(stack: Stack):
    process = ConnectorProcess(stack.url)
    try:
        yield process
    finally:
        process.stop()


def get(stub, invocation_id: str):
    meta = CornserveMetadata(invocation_id=invocation_id, task=ENCODER.to_json()).encode()
    return stub.GetTask(agent_pb2.GetTaskRequest(task_category=CATEGORY, resource_meta=meta)).resource


@pytest.mark.parametrize(("fields", "named"), [
    ({"state": "BOGUS"}, "state"),
    ({"output": "not json"}, "output"),
    ({"attempt": "x"}, "attempt"),
    ({"created_at": "abc"}, "created_at"),
    ({"transfers": "[{]"}, "transfers"),
], ids=lambda v: str(v)[:20])
def test_get_of_a_malformed_record_fails_clearly_and_the_connector_serves_on(connector, stack, tmp_path, fields,
                                                                            named) -> None:
    invocation_id = write(stack.sync_client(), good_fields() | fields)
    resource = get(connector.stub, invocation_id)  # a gRPC error would raise here
    assert resource.phase == TaskExecution.FAILED, resource.message
    assert invocation_id in resource.message and named in resource.message and "malformed" in resource.message
    assert "EncoderTask tiny-llava" in resource.message
    assert connector.process.poll() is None


def test_get_of_an_output_that_does_not_fit_the_task_fails_clearly(connector, stack) -> None:
    invocation_id = write(stack.sync_client(), good_fields() | {"output": json.dumps({"text": "not embeddings"})})
    resource = get(connector.stub, invocation_id)
    assert resource.phase == TaskExecution.FAILED, resource.message
    assert invocation_id in resource.message and "output" in resource.message and "embeddings" in resource.message


def test_the_connector_serves_a_well_formed_invocation_after_malformed_ones(connector, stack, tmp_path) -> None:
    assert get(connector.stub, write(stack.sync_client(), good_fields() | {"state": "BOGUS"})).phase == TaskExecution.FAILED
    done, _ = until_terminal(connector.stub, create(connector.stub, ENCODER, {"data": IMAGE}, {"data": str}, tmp_path))
    assert done.phase == TaskExecution.SUCCEEDED, done.message
    assert connector.process.poll() is None
