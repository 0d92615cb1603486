"""The batch runner: every item of every batch, pipelined through the deployments, in bulk.

It runs inside the control plane, as one loop over one Redis stream (`runner_stream()`) that carries
new batches, cancellations and the end of every invocation it submitted. An item's plan is a small
graph of unit-task invocations (encoder -> LLM); a node is ready once the nodes it takes outputs
from are done. Ready nodes of one unit task are sent together, as one batch invocation of up to
`micro_batch` items, to the deployment's batch queue, which its executors serve after interactive
work. So while one group of items is in the LLM, the next is in the encoder, and Redis sees a few
commands per group, not per item.

At most `max_in_flight` items are admitted at once (across batches, oldest batch first), which
bounds the memory of every process whatever the dataset's size. Recoverable failures are retried
per item (the unit task's `options.retries`, with exponential backoff); user errors end the item.
Everything needed to resume lives in Redis (see `batches`): which items were admitted, each
unfinished item's node outputs and attempts, which invocation runs which items. A restarted runner
rebuilds its state from there, checks the invocations that ended while it was away, and goes on; an
item's row is written once.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from flyte_cornserve.descriptors import descriptor_for
from flyte_cornserve.protocol.invocations import (
    MAX_BLOCK_S,
    TERMINAL,
    ErrorKind,
    InvocationStore,
    Outcome,
    Priority,
    Record,
    State,
    _text,
    invocation_key,
)
from flyte_cornserve.protocol.content import content_id, count_lookups, published_identity
from flyte_cornserve.sidecar.directory import Lookups
from flyte_cornserve.task import TensorRef, UnitTask, tensor_refs, unit_task_from_json
from flyte_cornserve.task.plan import Plan, PlanNode

from .batches import (
    active_key,
    BATCH_TTL_S,
    EVENTS_MAXLEN,
    KEPT_ERRORS,
    KEPT_SAMPLES,
    runner_stream,
    SAMPLE_EVERY_S,
    Batch,
    BatchState,
    BatchStore,
    ChunkHeader,
    ChunkItem,
    ItemState,
    ResultRow,
    StageRun,
    batch_key,
    read_chunk,
    read_chunk_header,
    write_results,
)
from .content_lookup import input_digest, with_source
from .dispatcher import Dispatcher, backoff_s, tensor_policy
from .task_manager import TaskManager, describe

log = logging.getLogger(__name__)

DEFAULT_MAX_IN_FLIGHT = 512
DEFAULT_MICRO_BATCH = 64
PROGRESS_EVERY_S = 0.25  # the longest a batch's watchers wait for news of progress
ENDED_EVENTS_TTL_S = 3600  # a finished batch's events stream (its record stays BATCH_TTL_S)
FIRST_ERRORS = 3  # how many item errors a failed batch's message quotes



@dataclass(eq=False)
class ItemRun:
    """An admitted, unfinished item: its node outputs so far, attempts per node, what runs now."""

    batch: RunningBatch
    item: ChunkItem
    started: float
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    busy: set[str] = field(default_factory=set)  # nodes in flight or waiting for their retry
    finished: bool = False

    @property
    def plan(self) -> Plan:
        assert self.item.plan is not None
        return self.item.plan

    def progress(self) -> str:
        return json.dumps({"outputs": self.outputs, "attempts": self.attempts, "started": self.started})

    def ready(self) -> list[PlanNode]:
        """Nodes whose inputs are all there, neither done nor busy."""
        return [node for node in self.plan.nodes if node.id not in self.outputs and node.id not in self.busy
                and node.input.needs <= self.outputs.keys()]


@dataclass(eq=False)
class RunningBatch:
    batch: Batch
    header: ChunkHeader
    tasks: list[UnitTask]
    ended: set[int]  # indexes whose row is written
    items: list[ChunkItem] | None = None  # read once admission reaches this batch (memory stays bounded)
    next: int = 0  # the next index to admit
    live: dict[int, ItemRun] = field(default_factory=dict)
    cancelling: bool = False
    changed: bool = False  # progress not yet announced on its events stream
    announced: float = 0.0
    sampled: float = 0.0  # when the last progress sample was recorded

    def __post_init__(self) -> None:
        # work for equal unit tasks of any batch goes out together: keyed by the task's full JSON
        self.task_keys = [task.to_json() for task in self.tasks]
        self.done, self.failed = self.batch.done, self.batch.failed  # as committed

    @property
    def id(self) -> str:
        return self.batch.id

    @property
    def size(self) -> int:
        return self.header.items

    async def load(self) -> list[ChunkItem]:
        """The chunk's items, read from its file the first time they are needed."""
        if self.items is None:
            _, self.items = await asyncio.to_thread(read_chunk, self.batch.spec.chunk)
        return self.items


@dataclass(eq=False)
class Work:
    """One node of one item, to run (attempts count from 1)."""

    run: ItemRun
    node: PlanNode
    attempt: int

    @property
    def task(self) -> UnitTask:
        return self.run.batch.tasks[self.node.task]

    @property
    def key(self) -> str:
        return self.run.batch.task_keys[self.node.task]


@dataclass(eq=False)
class Flight:
    """A submitted batch invocation and the work it carries, in item order.

    Work with equal inputs to a content-addressed task shares one of its items: `slots` says which
    item each work's outcome is (None: one item per work, in order). Work that came while the item
    was in flight `joined` it: it takes the item's output once the flight lands (not kept in Redis:
    after a restart such work is sent again, and finds the output stored)."""

    id: str
    task: UnitTask  # the routed unit task
    work: list[Work]
    slots: list[int] | None = None
    joined: dict[int, list[Entry]] = field(default_factory=dict)  # item -> work that waits for its output
    producing: dict[int, tuple[str, str]] = field(default_factory=dict)  # item -> its key in `BatchRunner.producing`

    def outcomes(self, items: list[Outcome]) -> list[Outcome] | None:
        """Each work's outcome, from the invocation's item outcomes (None if their number is wrong)."""
        if self.slots is None:  # (a flight recorded before slots: one item per work, in order)
            return items if len(items) == len(self.work) else None
        if len(self.slots) != len(self.work) or any(slot >= len(items) for slot in self.slots):
            return None
        return [items[slot] for slot in self.slots]


@dataclass(eq=False)
class Entry:
    """A work ready to send: its payload, and for a content-addressed task its input's content."""

    work: Work
    payload: dict[str, Any]
    content: bytes | str | None = None
    digest: str | None = None


@dataclass
class Changes:
    """What one step of the runner changed, written to Redis in one transaction."""

    progress: dict[int, ItemRun] = field(default_factory=dict)  # id(run) -> run
    rows: list[tuple[RunningBatch, ResultRow]] = field(default_factory=list)
    admitted: set[RunningBatch] = field(default_factory=set)
    landed: list[Flight] = field(default_factory=list)  # flights whose outcomes were taken in
    stage_runs: list[tuple[str, StageRun]] = field(default_factory=list)  # (batch id, run) for the decks
    hits: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))  # deployment -> [items, bytes]

    def __bool__(self) -> bool:
        return bool(self.progress or self.rows or self.admitted or self.landed or self.stage_runs or self.hits)


class BatchRunner:
    def __init__(self, client: aioredis.Redis, tasks: TaskManager, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 micro_batch: int = DEFAULT_MICRO_BATCH) -> None:
        self.redis = client
        self.store = InvocationStore(client)
        self.batch_store = BatchStore(client)
        self.dispatcher = Dispatcher(client)  # its routing among a task's candidates
        self.tasks = tasks
        self.max_in_flight = max_in_flight
        self.micro_batch = micro_batch
        self.batches: dict[str, RunningBatch] = {}  # in admission order
        self.flights: dict[str, Flight] = {}
        self.ready: dict[str, list[Work]] = defaultdict(list)  # unit task JSON -> work to send
        self.producing: dict[tuple[str, str], tuple[Flight, int]] = {}  # (deployment, digest) -> item in flight
        self.lookups = Lookups(client)
        self.in_flight = 0  # admitted items not yet ended
        self.changes = Changes()
        self._timers: list[tuple[float, int, str, Any]] = []  # (due, tiebreak, kind, what)
        self._tiebreak = itertools.count()
        self._stopping = asyncio.Event()

    def request_stop(self) -> None:
        self._stopping.set()

    # -- the loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until `request_stop()`. Redis errors are waited out: the state is all in Redis."""
        reader = self.redis.client()  # a connection of its own for the blocking read
        backoff = 0.0
        cursor: str | None = None
        try:
            while not self._stopping.is_set():
                try:
                    if cursor is None:  # (re)start: read on from the stream's end, after catching up
                        cursor = await self._stream_end(reader)
                        await self._resume()
                        await self._advance()
                    due = self._timers[0][0] - time.monotonic() if self._timers else MAX_BLOCK_S
                    block_ms = max(1, int(min(MAX_BLOCK_S, max(0.0, due)) * 1000))
                    reply = await reader.xread({runner_stream(): cursor}, block=block_ms, count=10_000)
                    entries = [(entry_id, fields) for _, found in reply or [] for entry_id, fields in found]
                    if entries:
                        cursor = _text(entries[-1][0])
                    await self._take(entries)
                    await self._advance()
                    if entries:  # read: what is before the cursor is of no more use
                        await self.redis.xtrim(runner_stream(), minid=cursor)
                    backoff = 0.0
                except Exception as exc:  # Redis went away, or a bug: start over from what Redis holds
                    backoff = min(max(2 * backoff, 0.2), 5.0)
                    if isinstance(exc, RedisError):
                        log.warning("batch runner: Redis failed (%s); resuming from Redis in %.1fs", exc, backoff)
                    else:
                        log.exception("batch runner failed; resuming from Redis in %.1fs", backoff)
                    self._forget_all()
                    cursor = None
                    await asyncio.sleep(backoff)  # the retry backoff
        finally:
            await reader.aclose()

    async def _stream_end(self, reader: aioredis.Redis) -> str:
        newest = await reader.xrevrange(runner_stream(), count=1)
        return _text(newest[0][0]) if newest else "0-0"

    def _forget_all(self) -> None:
        """Drop what is held in memory; `_resume` rebuilds it from Redis."""
        self.batches.clear()
        self.flights.clear()
        self.producing.clear()
        self.ready.clear()
        self._timers.clear()
        self.changes = Changes()
        self.in_flight = 0

    async def _take(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Take in what the stream brought: new batches, cancellations, ended invocations."""
        ended: list[str] = []
        for _, fields in entries:
            op = _text(fields.get(b"op"))
            if op == "start":
                await self._start(_text(fields[b"batch"]))
            elif op == "cancel":
                await self._cancel(_text(fields[b"batch"]))
            elif b"id" in fields:
                ended.append(_text(fields[b"id"]))
        if ended:
            await self._complete(ended)

    async def _advance(self) -> None:
        """Retry what is due, admit items, record it all, send the ready work, end finished batches.

        The outcomes taken in are recorded before new work goes out: a crash in between leaves
        items whose next node is ready and not in flight, which a restart sends (once)."""
        await self._fire_timers()
        while await self._admit():  # items that ended as they were admitted made room: admit again now
            await self._commit()
        await self._commit()
        await self._flush()
        await self._commit()
        await self._finish_batches()
        await self._announce()

    # -- batches ---------------------------------------------------------------------------------

    async def _start(self, batch_id: str) -> RunningBatch | None:
        """Load a batch that does not run here yet (a new one, or one to resume)."""
        if batch_id in self.batches:
            return self.batches[batch_id]
        batch = await self.batch_store.load(batch_id)
        if batch is None or batch.state not in (BatchState.QUEUED, BatchState.RUNNING, BatchState.CANCELLING):
            await self.redis.srem(active_key(), batch_id)
            return None
        try:
            header = await asyncio.to_thread(read_chunk_header, batch.spec.chunk)
            tasks = [unit_task_from_json(task) for task in header.tasks]
        except Exception as exc:  # an unreadable chunk, a unit task not installed here: the batch fails
            await self._end_batch(batch, BatchState.FAILED, f"cannot run batch {batch_id}: {exc}")
            return None
        ended = {int(index) for index in await self.redis.hkeys(batch_key(batch_id, "results"))}
        running = RunningBatch(batch, header, tasks, ended, next=batch.admitted)
        self.batches[batch_id] = running
        if batch.state is BatchState.QUEUED:
            now = time.time()
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(batch_key(batch_id), mapping={"state": BatchState.RUNNING.value, "started_at": repr(now)})
                self._sample(pipe, batch_id, now, batch.done, batch.failed)  # where its progress chart starts
                await pipe.execute()
        log.info("batch %s (%s): %d items, %d ended before", batch_id, batch.spec.label, header.items, len(ended))
        return running

    async def _resume(self) -> None:
        """Rebuild every active batch from Redis: its unfinished items, what runs for them."""
        orphans: list[str] = []
        for raw in sorted(await self.redis.smembers(active_key())):
            running = await self._start(_text(raw))
            if running is None:
                continue
            progress = await self.redis.hgetall(batch_key(running.id, "items"))
            items = await running.load() if progress else []
            for index, raw_progress in progress.items():
                index = int(index)
                if index in running.ended or index >= len(items):
                    continue
                state = json.loads(raw_progress)
                running.live[index] = ItemRun(running, items[index], state["started"], state["outputs"],
                                              {node: int(n) for node, n in state["attempts"].items()})
                self.in_flight += 1
            for invocation_id, triples in (await self.redis.hgetall(batch_key(running.id, "inflight"))).items():
                invocation_id = _text(invocation_id)
                flight = self.flights.setdefault(invocation_id, Flight(invocation_id, running.tasks[0], []))
                for index, node_id, attempt, *slot in json.loads(triples):
                    run = running.live.get(index)
                    if run is not None:
                        node = next(n for n in run.plan.nodes if n.id == node_id)
                        run.busy.add(node_id)
                        flight.work.append(Work(run, node, attempt))
                        flight.task = flight.work[0].task
                        if slot:
                            flight.slots = (flight.slots or []) + slot
                orphans.append(invocation_id)
            for run in running.live.values():
                self._queue_ready(run)
            if running.batch.state is BatchState.CANCELLING:
                await self._cancel(running.id)
        if orphans:  # those that ended while no runner listened are taken in now
            states = await self._states(orphans)
            await self._complete([i for i, state in zip(orphans, states) if state is None or state in TERMINAL])

    async def _states(self, invocation_ids: list[str]) -> list[State | None]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for invocation_id in invocation_ids:
                pipe.hget(invocation_key(invocation_id), "state")
            return [State(_text(s)) if s else None for s in await pipe.execute()]

    async def _cancel(self, batch_id: str) -> None:
        """End every item of the batch that has not ended as CANCELLED; cancel its invocations."""
        running = self.batches.get(batch_id) or await self._start(batch_id)
        if running is None:
            return
        running.cancelling = True
        for flight in list(self.flights.values()):
            if flight.work and all(work.run.batch is running for work in flight.work):
                await self.store.cancel(flight.id)  # its executor aborts it
        now = time.time()
        for run in list(running.live.values()):
            self._end_item(run, self._row(run, ItemState.CANCELLED, error="cancelled", at=now))
        for item in (await running.load())[running.next:]:
            if item.i not in running.ended:
                running.ended.add(item.i)
                self.changes.rows.append((running, ResultRow(i=item.i, id=item.id, state=ItemState.CANCELLED,
                                                             error="cancelled")))
        running.next = running.size
        self.changes.admitted.add(running)
        await self._commit()

    async def _finish_batches(self) -> None:
        for running in list(self.batches.values()):
            if running.live or running.next < running.size:
                continue
            del self.batches[running.id]
            batch = await self.batch_store.load(running.id)
            if batch is None:
                continue
            if running.cancelling:
                await self._end_batch(batch, BatchState.CANCELLED, f"cancelled: {batch.progress()}")
                continue
            rows = await self.batch_store.results(running.id)
            try:
                await asyncio.to_thread(write_results, batch.spec.results, running.header.outputs, rows)
            except Exception as exc:
                await self._end_batch(batch, BatchState.FAILED,
                                      f"could not write the results to {batch.spec.results}: {exc}", retryable=True)
                continue
            failed = [row for row in rows if row.state is not ItemState.DONE]
            ratio = (len(rows) - len(failed)) / len(rows) if rows else 1.0
            if ratio < batch.spec.min_success_ratio:
                quoted = "; ".join(f"{row.id}: {row.error}" for row in failed[:FIRST_ERRORS])
                await self._end_batch(
                    batch, BatchState.FAILED,
                    f"{len(failed)} of {len(rows)} items failed: the success ratio {ratio:.2f} is below "
                    f"min_success_ratio {batch.spec.min_success_ratio:g}. First errors: {quoted}",
                    retryable=any(row.recoverable for row in failed),
                )
            else:
                await self._end_batch(batch, BatchState.DONE, batch.progress(), drop_results=True)

    async def _end_batch(self, batch: Batch, state: BatchState, message: str, retryable: bool = False,
                         drop_results: bool = False) -> None:
        log.info("batch %s (%s) %s: %s", batch.id, batch.spec.label, state.value, message)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(batch_key(batch.id), mapping={"state": state.value, "message": message,
                                                    "finished_at": repr(time.time()), "retryable": int(retryable)})
            pipe.srem(active_key(), batch.id)
            pipe.delete(batch_key(batch.id, "items"), batch_key(batch.id, "inflight"))
            if drop_results:  # the results file holds them, and a batch that is DONE never runs again
                pipe.delete(batch_key(batch.id, "results"))
            pipe.xadd(batch_key(batch.id, "events"), {"state": state.value}, maxlen=EVENTS_MAXLEN, approximate=True)
            pipe.expire(batch_key(batch.id, "events"), ENDED_EVENTS_TTL_S)  # its watchers have had the news
            self._sample(pipe, batch.id, time.time(), batch.done, batch.failed)
            for part in ("", "results", "progress", "stages", "errors"):
                pipe.expire(batch_key(batch.id, part), BATCH_TTL_S)
            await pipe.execute()

    @staticmethod
    def _sample(pipe: Any, batch_id: str, at: float, done: int, failed: int) -> None:
        """A progress sample, for the batch's deck (the newest KEPT_SAMPLES stay)."""
        pipe.rpush(batch_key(batch_id, "progress"), json.dumps([round(at, 3), done, failed]))
        pipe.ltrim(batch_key(batch_id, "progress"), -KEPT_SAMPLES, -1)

    async def _announce(self) -> None:
        """Tell each batch's watchers of its progress, at most every PROGRESS_EVERY_S."""
        now = time.monotonic()
        due = [b for b in self.batches.values() if b.changed and now - b.announced >= PROGRESS_EVERY_S]
        if not due:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for running in due:
                running.changed, running.announced = False, now
                pipe.xadd(batch_key(running.id, "events"), {"progress": len(running.ended)},
                          maxlen=EVENTS_MAXLEN, approximate=True)
            await pipe.execute()

    # -- items -----------------------------------------------------------------------------------

    async def _admit(self) -> bool:
        """Admit items, oldest batch first, while fewer than `max_in_flight` are admitted. True if
        some ended as they were admitted (all their outputs given by a stage, or constants): their
        room is free again, and waiting for the next stream read to use it would cost seconds."""
        now = time.time()
        ended_at_once = False
        for running in self.batches.values():
            if self.in_flight >= self.max_in_flight:
                return ended_at_once
            if running.cancelling or running.next >= running.size:
                continue
            try:
                items = await running.load()
            except Exception as exc:  # the chunk file went away or is damaged: the batch fails
                del self.batches[running.id]
                await self._end_batch(running.batch, BatchState.FAILED, f"cannot read chunk {running.batch.spec.chunk}: {exc}")
                return ended_at_once
            self.changes.admitted.add(running)
            given: list[ItemRun] = []  # items with outputs a stage computed: pinned first, then queued
            cap = running.batch.spec.max_in_flight or self.max_in_flight
            while running.next < running.size and self.in_flight < self.max_in_flight and len(running.live) < cap:
                item = items[running.next]
                running.next += 1
                if item.i in running.ended:
                    continue
                if item.plan is None:  # it could not be traced: its row says why
                    running.ended.add(item.i)
                    running.changed = True
                    self.changes.rows.append((running, ResultRow(i=item.i, id=item.id, state=ItemState.ERROR,
                                                                 error=item.error or "no plan")))
                    continue
                run = ItemRun(running, item, now, outputs={**item.done})  # a stage outside computed these
                running.live[item.i] = run
                self.in_flight += 1
                self.changes.progress[id(run)] = run
                if item.done:
                    given.append(run)
                elif run.plan.nodes:
                    self._queue_ready(run)
                else:  # nothing to run: the output is all constants
                    self._item_done(run)
                    ended_at_once = True
            if given:
                await self._pin_given(given)
                for run in given:
                    if len(run.outputs) < len(run.plan.nodes):
                        self._queue_ready(run)
                    else:
                        self._item_done(run)
                        ended_at_once = True
        return ended_at_once

    async def _pin_given(self, runs: list[ItemRun]) -> None:
        """Pin the tensors of the outputs a stage computed (it stored them unpinned: a stage that fails
        holds nothing) once per consumer node, as a warm producer's are; a node whose tensor is gone
        (evicted since) loses its output and is sent again."""
        wanted: list[tuple[ItemRun, str, TensorRef, int]] = []
        for run in runs:
            for node in run.plan.nodes:
                output = run.item.done.get(node.id)
                if output is None:
                    continue
                task = run.batch.tasks[node.task]
                for ref in tensor_refs(descriptor_for(task).decode_response(output)):
                    wanted.append((run, node.id, ref, consumers(run.plan, node.id)))
        if not wanted:
            return
        found = await self.lookups.pin_many([ref.id for _, _, ref, _ in wanted], [pins for *_, pins in wanted])
        for (run, node_id, ref, _), pinned in zip(wanted, found, strict=True):
            if pinned is None:
                log.warning("batch %s item %s: the tensor %s a stage computed for %s is gone; computing it again",
                            run.batch.id, run.item.id, ref.id, node_id)
                run.outputs.pop(node_id, None)

    def _queue_ready(self, run: ItemRun) -> None:
        for node in run.ready():
            run.busy.add(node.id)
            work = Work(run, node, run.attempts.get(node.id, 0) + 1)
            self.ready[work.key].append(work)

    async def _flush(self) -> None:
        """Send the ready work: up to `micro_batch` items per invocation, per unit task. Work whose
        output was found stored ends at once and makes its next nodes ready: they go out in the next
        round, once what ended is recorded (as outcomes taken in are, before new work goes out)."""
        while self.ready:
            ready, self.ready = self.ready, defaultdict(list)
            for works in ready.values():
                works = [work for work in works if not work.run.finished]
                if works:
                    await self._send(works)
            await self._commit()

    async def _send(self, works: list[Work]) -> None:
        task = works[0].task
        try:
            target = await self.dispatcher.route(task)
            deployment = await self.tasks.deploy(target.to_json(), wait=False)
        except Exception as exc:  # the deployment is refused (it does not fit): these items fail
            for work in works:
                self._settle(work, Outcome.failed(f"{exc}"), task)
            return
        descriptor = descriptor_for(target)
        input_model, _ = target.io_models()
        entries = []
        for work in works:
            try:
                request = input_model.model_validate(work.node.input.fill(work.run.outputs))
            except ValueError as exc:  # an upstream output that does not fit this input
                self._settle(work, Outcome.failed(f"invalid input: {exc}"), task)
                continue
            content = descriptor.input_content(request) if task.options.tensor_cache else None
            entries.append(Entry(work, descriptor.encode_request(request), content))
        if any(entry.content is not None for entry in entries):
            groups = await self._by_content(target, deployment, entries)
        else:
            groups = [[entry] for entry in entries]
        for start in range(0, len(groups), self.micro_batch):
            await self._queue(target, deployment.id, groups[start:start + self.micro_batch])

    async def _by_content(self, target: UnitTask, deployment: Any, entries: list[Entry]) -> list[list[Entry]]:
        """Entries of a content-addressed task: those whose output is in flight join it, those whose
        output is stored take it (pinned for their consumers), the others are grouped by input
        content (one item per group). Returns the groups to send."""
        digests = await asyncio.to_thread(
            lambda: [None if entry.content is None else input_digest(entry.content) for entry in entries])
        groups: list[list[Entry]] = []
        by_digest: dict[str, list[Entry]] = {}
        for entry, digest in zip(entries, digests, strict=True):
            entry.digest = digest
            if digest is None:
                groups.append([entry])
            elif (producing := self.producing.get((deployment.id, digest))) is not None:
                flight, slot = producing
                flight.joined.setdefault(slot, []).append(entry)
            else:
                by_digest.setdefault(digest, []).append(entry)
        identity = await published_identity(self.redis, deployment.executors) if by_digest else None
        if identity is not None:
            found = await self.lookups.pin_many([content_id(identity, digest) for digest in by_digest],
                                                [sum(map(self._consumers, group)) for group in by_digest.values()])
            for digest, ref in zip(list(by_digest), found, strict=True):
                if ref is not None:
                    self._take_stored(target, by_digest.pop(digest), ref)
        return groups + list(by_digest.values())

    @staticmethod
    def _consumers(entry: Entry) -> int:
        return consumers(entry.work.run.plan, entry.work.node.id)

    def _take_stored(self, target: UnitTask, entries: list[Entry], ref: TensorRef) -> None:
        """Each entry's output is the stored tensor `ref` (already pinned for them)."""
        descriptor, producer = descriptor_for(target), target.compact_json()  # once: this runs per item
        for entry in entries:
            output = descriptor.response_for(with_source(ref, producer, entry.content, entry.digest))
            self._settle(entry.work, Outcome(output=output), target)
        self._count_hits(target, len(entries), ref)

    def _count_hits(self, target: UnitTask, items: int, ref: TensorRef) -> None:
        """Items served here without an item of their own (`protocol.content.cache_counts_key`)."""
        counted = self.changes.hits[target.deployment_id()]
        counted[0] += items
        counted[1] += items * ref.nbytes

    async def _queue(self, target: UnitTask, deployment_id: str, groups: list[list[Entry]]) -> None:
        """Send one batch invocation: an item per group of entries (their tensor pinned for all their consumers)."""
        task = groups[0][0].work.task
        sent = [entry.work for group in groups for entry in group]
        slots = [slot for slot, group in enumerate(groups) for _ in group]
        invocation_id = uuid.uuid4().hex
        timeout = task.options.timeout
        await self.store.ensure_queue(deployment_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            self.store.queue_submission(
                pipe, deployment_id, invocation_id, items=[group[0].payload for group in groups],
                timeout_s=timeout.total_seconds() if timeout is not None else None,
                label=describe(target), priority=Priority.BATCH, notify=runner_stream(),
                pins=[sum(map(self._consumers, group)) for group in groups], tensors=tensor_policy(task.options),
            )
            by_batch: dict[str, list] = defaultdict(list)
            for work, slot in zip(sent, slots, strict=True):
                by_batch[work.run.batch.id].append([work.run.item.i, work.node.id, work.attempt, slot])
            for batch_id, triples in by_batch.items():
                pipe.hset(batch_key(batch_id, "inflight"), invocation_id, json.dumps(triples))
            await pipe.execute()
        flight = self.flights[invocation_id] = Flight(invocation_id, target, sent, slots)
        for slot, group in enumerate(groups):
            if group[0].digest is not None:
                flight.producing[slot] = key = (deployment_id, group[0].digest)
                self.producing[key] = (flight, slot)
        if timeout is not None:
            self._timer(time.monotonic() + timeout.total_seconds(), "deadline", (invocation_id, timeout.total_seconds()))

    async def _complete(self, invocation_ids: list[str]) -> None:
        """Take in the outcomes of ended invocations (ids this runner did not send are ignored)."""
        flights = [self.flights.pop(i) for i in dict.fromkeys(invocation_ids) if i in self.flights]
        for flight in flights:
            try:
                record = await self.store.record(flight.id)
            except KeyError:  # expired: whatever it ran is lost
                record = None
            items = record.item_outcomes() if record is not None else []
            outcomes = flight.outcomes(items)
            if outcomes is None:
                why = "is gone" if record is None else f"returned {len(items)} outcomes for more or fewer items"
                items = [Outcome.failed(f"invocation {flight.id} {why}", ErrorKind.RECOVERABLE)] * len(flight.work)
                outcomes = items
            for work, outcome in zip(flight.work, outcomes):
                self._settle(work, outcome, flight.task)
            await self._land_joined(flight, items)
            self.changes.landed.append(flight)
            if record is not None:
                self._note_stage_run(flight, record, outcomes)

    async def _land_joined(self, flight: Flight, items: list[Outcome]) -> None:
        """The work that joined the flight's items takes their outputs (pinned for it), or their errors;
        the work that shared an item counts as hits."""
        for slot, key in flight.producing.items():
            if self.producing.get(key, (None,))[0] is flight:
                del self.producing[key]
            shared = flight.slots.count(slot) - 1 if flight.slots is not None and slot < len(items) else 0
            if shared and (ref := self._ref_of(flight.task, items[slot])) is not None:
                self._count_hits(flight.task, shared, ref)
        for slot, entries in flight.joined.items():
            outcome = items[slot] if slot < len(items) else Outcome.failed("no outcome", ErrorKind.RECOVERABLE)
            if outcome.output is not None:
                ref = self._ref_of(flight.task, outcome)  # None if invalid: `_settle` says so, for each entry
                if ref is not None:
                    (pinned,) = await self.lookups.pin_many([ref.id], [sum(map(self._consumers, entries))])
                    if pinned is not None:
                        self._take_stored(flight.task, entries, pinned)
                        continue
                    outcome = Outcome.failed(f"the output of invocation {flight.id} was evicted before it could be "
                                             f"pinned for this item", ErrorKind.RECOVERABLE)
            for entry in entries:
                self._settle(entry.work, outcome, flight.task)

    @staticmethod
    def _ref_of(task: UnitTask, outcome: Outcome) -> TensorRef | None:
        """The output tensor of a content-addressed task's outcome; None if it has none (an error, invalid)."""
        if outcome.output is None:
            return None
        try:
            refs = tensor_refs(descriptor_for(task).decode_response(outcome.output))
        except ValueError:
            return None
        return refs[0] if len(refs) == 1 else None

    def _note_stage_run(self, flight: Flight, record: Record, outcomes: list[Outcome]) -> None:
        """Keep the invocation's timing per batch it served, for the batches' decks."""
        per_batch: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for work, outcome in zip(flight.work, outcomes):
            counts = per_batch[work.run.batch.id]
            counts[0] += 1
            counts[1] += outcome.output is None
        for batch_id, (items, failed) in per_batch.items():
            self.changes.stage_runs.append((batch_id, StageRun(
                stage=describe(flight.task), executor=record.executor, created=record.created_at,
                started=record.started_at, finished=record.finished_at, items=items, failed=failed)))

    def _settle(self, work: Work, outcome: Outcome, task: UnitTask) -> None:
        """One node of one item ended: go on with the item, retry the node, or end the item."""
        run = work.run
        if run.finished:  # cancelled meanwhile
            return
        run.busy.discard(work.node.id)
        run.attempts[work.node.id] = work.attempt
        run.batch.changed = True
        if outcome.output is not None:
            try:
                output = descriptor_for(task).decode_response(outcome.output).model_dump(mode="json")
            except ValueError as exc:
                outcome = Outcome.failed(f"its executor answered with an invalid output: {exc}")
            else:
                run.outputs[work.node.id] = output
                if len(run.outputs) == len(run.plan.nodes):
                    self._item_done(run)
                else:
                    self._queue_ready(run)
                    self.changes.progress[id(run)] = run
                return
        if outcome.kind is ErrorKind.RECOVERABLE and work.attempt <= work.task.options.retries:
            run.busy.add(work.node.id)
            self._timer(time.monotonic() + backoff_s(work.attempt), "retry", Work(run, work.node, work.attempt + 1))
            self.changes.progress[id(run)] = run
            return
        self._end_item(run, self._row(run, ItemState.ERROR, error=f"{describe(task)} ({work.node.id}): {outcome.error}",
                                      recoverable=outcome.kind is ErrorKind.RECOVERABLE))

    def _item_done(self, run: ItemRun) -> None:
        self._end_item(run, self._row(run, ItemState.DONE, output=run.plan.output.fill(run.outputs)))

    def _row(self, run: ItemRun, state: ItemState, output: dict | None = None, error: str | None = None,
             recoverable: bool = False, at: float | None = None) -> ResultRow:
        return ResultRow(i=run.item.i, id=run.item.id, state=state, output=output, error=error, recoverable=recoverable,
                         attempts=max(run.attempts.values(), default=0), latency_s=(at or time.time()) - run.started)

    def _end_item(self, run: ItemRun, row: ResultRow) -> None:
        run.finished = True
        run.batch.live.pop(run.item.i, None)
        run.batch.ended.add(run.item.i)
        run.batch.changed = True
        self.in_flight -= 1
        self.changes.progress.pop(id(run), None)
        self.changes.rows.append((run.batch, row))

    # -- timers ----------------------------------------------------------------------------------

    def _timer(self, due: float, kind: str, what: Any) -> None:
        heapq.heappush(self._timers, (due, next(self._tiebreak), kind, what))

    async def _fire_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, kind, what = heapq.heappop(self._timers)
            if kind == "retry" and not what.run.finished:
                self.ready[what.key].append(what)  # still busy: it goes out with the next flush
            elif kind == "deadline" and what[0] in self.flights:
                await self.store.time_out(what[0], what[1])  # its end comes back through the stream

    # -- persistence -----------------------------------------------------------------------------

    async def _commit(self) -> None:
        """Write what this step changed, in one transaction: admitted counts, item progress, rows
        (each once), counters, and the flights whose outcomes were taken in."""
        changes, self.changes = self.changes, Changes()
        if not changes:
            return
        counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        async with self.redis.pipeline(transaction=True) as pipe:
            for running in changes.admitted:
                pipe.hset(batch_key(running.id), "admitted", running.next)
            by_batch: dict[str, dict[str, str]] = defaultdict(dict)
            for run in changes.progress.values():
                if not run.finished:
                    by_batch[run.batch.id][str(run.item.i)] = run.progress()
            for batch_id, progress in by_batch.items():
                pipe.hset(batch_key(batch_id, "items"), mapping=progress)
            for running, row in changes.rows:
                pipe.hset(batch_key(running.id, "results"), str(row.i), row.model_dump_json())
                pipe.hdel(batch_key(running.id, "items"), str(row.i))
                counts[running.id][{ItemState.DONE: "done", ItemState.ERROR: "failed",
                                    ItemState.CANCELLED: "cancelled"}[row.state]] += 1
                if row.state is ItemState.ERROR and running.failed < KEPT_ERRORS:
                    pipe.rpush(batch_key(running.id, "errors"), json.dumps([row.id, row.error]))
                    pipe.ltrim(batch_key(running.id, "errors"), 0, KEPT_ERRORS - 1)
                running.done += row.state is ItemState.DONE
                running.failed += row.state is ItemState.ERROR
            for batch_id, fields in counts.items():
                for name, count in fields.items():
                    pipe.hincrby(batch_key(batch_id), name, count)
            now = time.time()
            for running in {running for running, _ in changes.rows}:
                if now - running.sampled >= SAMPLE_EVERY_S:
                    running.sampled = now
                    self._sample(pipe, running.id, now, running.done, running.failed)
            for batch_id, stage_run in changes.stage_runs:
                pipe.rpush(batch_key(batch_id, "stages"), stage_run.model_dump_json(exclude_none=True))
                pipe.ltrim(batch_key(batch_id, "stages"), -KEPT_SAMPLES, -1)
            for flight in changes.landed:
                for batch_id in {work.run.batch.id for work in flight.work}:
                    pipe.hdel(batch_key(batch_id, "inflight"), flight.id)
            for deployment_id, (items, nbytes) in changes.hits.items():
                count_lookups(pipe, deployment_id, hits=items, bytes_saved=nbytes)
            await pipe.execute()
        if changes.landed:  # taken in: only the record's timing stays, as history (`collect`)
            async with self.redis.pipeline(transaction=False) as pipe:
                for flight in changes.landed:
                    pipe.hdel(invocation_key(flight.id), "input", "output")
                await pipe.execute()
            await self.store.collect(*(flight.id for flight in changes.landed))


def consumers(plan: Plan, node_id: str) -> int:
    """How many nodes of the plan read the output of node `node_id`: the pins its tensor gets."""
    return sum(node_id in node.input.needs for node in plan.nodes)
