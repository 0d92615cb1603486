"""A batch chunk node driven over flyteidl gRPC exactly as FlytePropeller drives it: CreateTask (more
than once, with the node execution in `task_execution_metadata`), GetTask polls, DeleteTask; with the
connector service restarted between polls, and the control plane restarted mid-batch; the chunk's
live deck as headless Chromium renders it, and its outputs where Propeller reads them."""

from __future__ import annotations

import asyncio
import json
import pathlib
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from flyteidl.admin import agent_pb2
from flyteidl.core import identifier_pb2
from flyteidl.core.execution_pb2 import TaskExecution
from flytekit import FlyteContextManager
from flytekit.configuration import ImageConfig, SerializationSettings
from flytekit.core.type_engine import TypeEngine
from flytekit.models.literals import Literal, LiteralMap
from flytekit.tools.translator import get_serializable
from flytekit.types.file import FlyteFile

from cornserve_builtins.llm import LLMTask, SamplingParams
from flyte_cornserve.flyte.batch import plan_chunks
from flyte_cornserve.flyte.batch_task import BatchChunk, BatchOptions, ChunkResult, HashedChunk, fan_out
from flyte_cornserve.services.batches import BatchState, BatchStore, ItemState
from flyte_cornserve.services.dispatcher import Dispatcher
from flyte_cornserve.task import task_reference

from ..browser import rendered_dom, screenshot
from ..connector import ConnectorProcess, outputs_at
from ..html_deck import parse, read_deck
from ..stack import Stack

#: slow enough items (64 generated tokens, 16 in flight) that a batch of ITEMS takes seconds
SLOW = LLMTask(model_id="tiny-llava", sampling=SamplingParams(max_tokens=64, ignore_eos=True))
OPTIONS = BatchOptions(max_in_flight=16)
ITEMS = 160
CATEGORY = agent_pb2.TaskCategory(name="cornserve_batch", version=0)
TERMINAL = {TaskExecution.SUCCEEDED, TaskExecution.FAILED, TaskExecution.RETRYABLE_FAILED, TaskExecution.ABORTED}


@pytest.fixture(scope="module")
def chunk(tmp_path_factory: pytest.TempPathFactory) -> BatchChunk:
    """One chunk of ITEMS prompts, planned as the batch workflow's first node plans it."""
    manifest = tmp_path_factory.mktemp("manifest") / "prompts.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"p{i:03d}", "prompt": f"tell me about {i}"}) + "\n"
                                for i in range(ITEMS)))
    (planned,) = plan_chunks.task_function(task=task_reference(SLOW), chunk_size=ITEMS, manifest=FlyteFile(str(manifest)))
    return planned


def batch_task():
    return fan_out("LLMTask tiny-llava", task_reference(SLOW), OPTIONS).batch_task


def create(stub, chunk: BatchChunk, execution: str, output_prefix: pathlib.Path, attempt: int = 0, task=None) -> bytes:
    """CreateTask with the node execution (execution `execution`, node n0) Propeller sends."""
    ctx = FlyteContextManager.current_context()
    settings = SerializationSettings(ImageConfig.auto_default_image())
    template = get_serializable(OrderedDict(), settings, task or batch_task()).template.to_flyte_idl()
    literal = TypeEngine.to_literal(ctx, chunk, HashedChunk, TypeEngine.to_literal_type(HashedChunk))
    metadata = agent_pb2.TaskExecutionMetadata(task_execution_id=identifier_pb2.TaskExecutionIdentifier(
        node_execution_id=identifier_pb2.NodeExecutionIdentifier(
            node_id="n0", execution_id=identifier_pb2.WorkflowExecutionIdentifier(project="p", domain="d", name=execution)),
        retry_attempt=attempt,
    ))
    reply = stub.CreateTask(agent_pb2.CreateTaskRequest(
        template=template, inputs=LiteralMap({"chunk": literal}).to_flyte_idl(), output_prefix=str(output_prefix),
        task_execution_metadata=metadata,
    ))
    return reply.resource_meta


def get(stub, meta: bytes):
    return stub.GetTask(agent_pb2.GetTaskRequest(task_category=CATEGORY, resource_meta=meta)).resource


def batch_id(meta: bytes) -> str:
    return json.loads(meta)["batch_id"]


async def _batch(url: str, batch: str):
    store = BatchStore(aioredis.Redis.from_url(url))
    try:
        return await store.load(batch), await store.results(batch)
    finally:
        await store.redis.aclose()


def wait_until(connector: ConnectorProcess, meta: bytes, url: str, done_at_least: int = 0, timeout_s: float = 300.0):
    """GetTask as Propeller polls, until a terminal phase or until `done_at_least` items are done."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        resource = get(connector.stub, meta)
        if resource.phase in TERMINAL:
            return resource
        if done_at_least and asyncio.run(_batch(url, batch_id(meta)))[0].done >= done_at_least:
            return resource
        time.sleep(0.2)  # Propeller's own polling interval stands in here
    raise AssertionError(f"the batch did not get there within {timeout_s} s")


def chunk_result(resource, output_prefix: pathlib.Path) -> ChunkResult:
    """The chunk node's output, read from `outputs.pb` as Propeller reads it."""
    literal = outputs_at(resource, output_prefix).literals["o0"]
    return TypeEngine.to_python_value(FlyteContextManager.current_context(), Literal.from_flyte_idl(literal), ChunkResult)


def check_every_item_ended_once(url: str, meta: bytes, resource, output_prefix: pathlib.Path) -> None:
    batch, _ = asyncio.run(_batch(url, batch_id(meta)))
    assert resource.phase == TaskExecution.SUCCEEDED, resource.message
    assert batch.state is BatchState.DONE and (batch.done, batch.failed) == (ITEMS, 0)  # each row counted once
    result = chunk_result(resource, output_prefix)
    rows = [json.loads(line) for line in pathlib.Path(result.results.download()).read_text().splitlines()]
    assert [row["id"] for row in rows] == [f"p{i:03d}" for i in range(ITEMS)]
    assert all(row["state"] == "DONE" and row["text"] for row in rows)
    assert (result.items, result.succeeded, result.failed) == (ITEMS, ITEMS, 0)


@pytest.fixture(scope="module")
def connector(stack: Stack) -> Iterator[ConnectorProcess]:
    process = ConnectorProcess(stack.url)
    yield process
    process.stop()


def test_a_repeated_create_is_the_same_batch_which_survives_a_connector_restart(connector, stack, chunk, tmp_path):
    execution = uuid.uuid4().hex[:20]
    first = create(connector.stub, chunk, execution, tmp_path)
    again = create(connector.stub, chunk, execution, tmp_path)  # Propeller's create after a timeout
    assert batch_id(again) == batch_id(first)
    wait_until(connector, first, stack.url, done_at_least=1)
    connector.restart()  # a restarted (or another) replica: it finds the batch from the metadata alone
    check_every_item_ended_once(stack.url, first, wait_until(connector, first, stack.url), tmp_path)
    other = create(connector.stub, chunk, uuid.uuid4().hex[:20], tmp_path)  # another node execution
    assert batch_id(other) != batch_id(first)
    get(connector.stub, other)
    connector.stub.DeleteTask(agent_pb2.DeleteTaskRequest(task_category=CATEGORY, resource_meta=other))


def test_delete_cancels_every_item_still_running_and_the_executors_serve_on(connector, stack, chunk, tmp_path):
    meta = create(connector.stub, chunk, uuid.uuid4().hex[:20], tmp_path)
    wait_until(connector, meta, stack.url, done_at_least=16)
    connector.stub.DeleteTask(agent_pb2.DeleteTaskRequest(task_category=CATEGORY, resource_meta=meta))
    assert wait_until(connector, meta, stack.url).phase == TaskExecution.ABORTED
    batch, rows = asyncio.run(_batch(stack.url, batch_id(meta)))
    assert batch.state is BatchState.CANCELLED
    assert len(rows) == ITEMS and len({row.i for row in rows}) == ITEMS
    states = {row.state for row in rows}
    assert states <= {ItemState.DONE, ItemState.CANCELLED} and ItemState.CANCELLED in states
    assert 0 < batch.done < ITEMS and batch.done + batch.cancelled == ITEMS

    async def serve_new_work() -> str:
        client = aioredis.Redis.from_url(stack.url)
        try:
            return (await Dispatcher(client).run(LLMTask(model_id="tiny-llava"), {"prompt": "still there?"})).text
        finally:
            await client.aclose()

    assert asyncio.run(serve_new_work())


@pytest.fixture
def own_stack(redis_url: str, tmp_path: pathlib.Path) -> Iterator[Stack]:
    """A stack of this test alone: it restarts its control plane."""
    started = Stack(redis_url, tmp_path / "control-plane.log", "--cpu", "4", "--memory", "16Gi", "--gpu", "0")
    yield started
    started.stop()


def test_a_control_plane_restart_mid_batch_resumes_it_and_every_item_ends_once(own_stack, chunk, tmp_path):
    connector = ConnectorProcess(own_stack.url)
    try:
        meta = create(connector.stub, chunk, uuid.uuid4().hex[:20], tmp_path)
        wait_until(connector, meta, own_stack.url, done_at_least=16)
        own_stack.restart()  # stops its executors too: the new one deploys them again
        batch, _ = asyncio.run(_batch(own_stack.url, batch_id(meta)))
        assert batch.state is BatchState.RUNNING and 0 < batch.done < ITEMS  # it really was mid-batch
        check_every_item_ended_once(own_stack.url, meta, wait_until(connector, meta, own_stack.url), tmp_path)
    finally:
        connector.stop()


def test_a_node_retry_after_a_failure_reruns_only_the_items_that_did_not_succeed(connector, stack, tmp_path):
    """A chunk that must fully succeed fails (one image answers HTTP 500 through all its retries):
    RETRYABLE_FAILED. Propeller's retry of the node (a new CreateTask, attempt 1) runs the same
    batch again, and only its failed item runs: the others keep their rows."""
    from cornserve_builtins.mllm import MLLMTask
    from flyte_cornserve.models.tiny import PROMPT

    from ..media_servers import serve_http

    captioner = MLLMTask(model_id="tiny-llava")
    images = pathlib.Path(__file__).resolve().parents[2] / "workflows" / "images"
    with serve_http(images) as http:
        http.special["/blue-circle-on-yellow.png"] = 500
        manifest = tmp_path / "manifest.jsonl"
        names = sorted(path.name for path in images.iterdir())
        manifest.write_text("".join(json.dumps({"id": name, "images": [f"{http.url}{name}"], "prompt": PROMPT}) + "\n"
                                    for name in names))
        (chunk,) = plan_chunks.task_function(task=task_reference(captioner), chunk_size=100,
                                             manifest=FlyteFile(str(manifest)))
        strict = fan_out("MLLMTask tiny-llava", task_reference(captioner), BatchOptions(min_success_ratio=1.0))
        execution = uuid.uuid4().hex[:20]
        first = create(connector.stub, chunk, execution, tmp_path, task=strict.batch_task)
        failed = wait_until(connector, first, stack.url)
        assert failed.phase == TaskExecution.RETRYABLE_FAILED, failed.message
        assert f"1 of {len(names)} items failed" in failed.message and "HTTP status 500" in failed.message
        _, before = asyncio.run(_batch(stack.url, batch_id(first)))

        del http.special["/blue-circle-on-yellow.png"]  # what failed would now work
        retry = create(connector.stub, chunk, execution, tmp_path, attempt=1, task=strict.batch_task)
        assert batch_id(retry) == batch_id(first)
        done = wait_until(connector, retry, stack.url)
    assert done.phase == TaskExecution.SUCCEEDED, done.message
    batch, _ = asyncio.run(_batch(stack.url, batch_id(first)))
    assert (batch.done, batch.failed) == (len(names), 0)
    result = chunk_result(done, tmp_path)
    rows = {row["id"]: row for row in map(json.loads, pathlib.Path(result.results.download()).read_text().splitlines())}
    kept = {row.id: row for row in before if row.state is ItemState.DONE}
    assert len(kept) == len(names) - 1
    for name, row in kept.items():  # not run again: the very same row
        assert (rows[name]["text"], rows[name]["latency_s"]) == (row.output["text"], round(row.latency_s, 4))
    assert rows["blue-circle-on-yellow.png"]["state"] == "DONE" and "circle" in rows["blue-circle-on-yellow.png"]["text"]


def test_a_running_chunks_deck_is_live_and_the_final_one_holds_progress_stages_and_errors(connector, stack, tmp_path):
    """The deck Propeller shows while the chunk runs (rewritten at each GetTask) as Chromium renders
    it, at two polls; then, after SUCCEEDED, the deck and `outputs.pb` under the output prefix."""
    items, bad = 120, {17: "bad-a", 60: "bad-b", 101: "bad-c"}  # rows with an empty prompt: their own errors
    manifest = tmp_path / "prompts.jsonl"
    manifest.write_text("".join(json.dumps({"id": bad.get(i, f"p{i:03d}"), "prompt": "" if i in bad else f"tell {i}"})
                                + "\n" for i in range(items)))
    (planned,) = plan_chunks.task_function(task=task_reference(SLOW), chunk_size=items, manifest=FlyteFile(str(manifest)))
    prefix = tmp_path / "n0"
    meta = create(connector.stub, planned, uuid.uuid4().hex[:20], prefix)

    wait_until(connector, meta, stack.url, done_at_least=8)
    assert get(connector.stub, meta).phase == TaskExecution.RUNNING  # this poll rewrote the deck
    first = shutil.copy(prefix / "deck.html", tmp_path / "deck-first.html")
    done_then = asyncio.run(_batch(stack.url, batch_id(meta)))[0].done  # at least what the first deck shows
    wait_until(connector, meta, stack.url, done_at_least=done_then + 16)
    get(connector.stub, meta)
    second = shutil.copy(prefix / "deck.html", tmp_path / "deck-second.html")

    counters = []
    for deck_file in (first, second):  # as the console's browser shows them
        page = parse(rendered_dom(pathlib.Path(deck_file)))
        counters.append({name: page.text_of(name) for name in ("items-done", "items-failed", "items-total",
                                                                     "chunk-state")})
        assert screenshot(pathlib.Path(deck_file), pathlib.Path(deck_file).with_suffix(".png")).read_bytes()[:8] \
            == b"\x89PNG\r\n\x1a\n"
    assert counters[0]["chunk-state"] == "RUNNING" and counters[0]["items-total"] == str(items)
    assert 8 <= int(counters[0]["items-done"]) < int(counters[1]["items-done"])
    assert int(counters[0]["items-failed"]) <= int(counters[1]["items-failed"]) <= len(bad)

    resource = wait_until(connector, meta, stack.url)
    assert resource.phase == TaskExecution.SUCCEEDED, resource.message
    result = chunk_result(resource, prefix)
    assert (result.items, result.succeeded, result.failed) == (items, items - len(bad), len(bad))
    deck = read_deck(prefix / "deck.html")
    assert (deck.text_of("items-done"), deck.text_of("items-failed")) == (str(items - len(bad)), str(len(bad)))
    chart = deck.by_id("progress-chart")
    assert chart.tag == "svg" and len(chart.find_all("polyline", "done")[0].attrs["points"].split()) >= 2
    (stage,) = deck.rows("stages")
    assert stage[0] == "LLMTask tiny-llava" and int(stage[1]) == items - len(bad)
    p50, p90, p99 = (float(cell) for cell in stage[-3:])  # latency percentiles, ms
    assert 0 < p50 <= p90 <= p99
    errors = deck.rows("errors", "error")
    assert [row[0] for row in errors] == list(bad.values()) and all("prompt" in row[1] for row in errors)
    assert [row[2] for row in deck.rows("executors", "executor")] == [str(items - len(bad))]
