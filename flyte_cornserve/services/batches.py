"""Batches: the chunk file, the results file, and the batch records in Redis.

A batch runs every item of one chunk file on the server side (`batch_runner`). The chunk file is
written where the task's code lives: a header with the table of unit tasks, then one line per item
with its traced `Plan` (or the error that kept it from being traced). The results file has one row
per item. In between, Redis holds the batch: its record (spec, state, counters), the progress of
each admitted item, which invocation runs which items, and each item's final row, so that a
restarted control plane resumes the batch and no item ends twice. This module owns those keys.

Keys (under the namespace, `cornserve:` by default; see `flyte_cornserve.namespace`):

| key | type | what |
|---|---|---|
| `batch:<id>` | hash | `spec` (JSON), `state`, `label`, `total`, `done`, `failed`, `cancelled`, `admitted`, timestamps, `message`, `retryable` |
| `batch:<id>:items` | hash | item index -> progress of an admitted, unfinished item (node outputs, attempts, start time) |
| `batch:<id>:inflight` | hash | invocation id -> the [item, node, attempt, slot] it runs (slot: which of its items serves that node; items with equal content-addressed inputs share one) |
| `batch:<id>:results` | hash | item index -> the item's final row (JSON), written once |
| `batch:<id>:events` | stream | progress and the terminal state, for watchers |
| `batch:<id>:progress` | list | `[time, done, failed]` samples, at most one per `SAMPLE_EVERY_S` (the deck's chart) |
| `batch:<id>:stages` | list | one `StageRun` per batch invocation taken in (the deck's stage latencies and overlap) |
| `batch:<id>:errors` | list | the first `KEPT_ERRORS` failed items' `[id, error]` |
| `batches` | sorted set | batch id -> creation time (listing) |
| `batches:active` | set | batches the runner must run (QUEUED, RUNNING, CANCELLING) |
| `batch-key:<key>` | string | the batch created for an idempotency key (a Flyte node execution) |
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from enum import Enum
from typing import Any

import fsspec
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field

from flyte_cornserve.namespace import key
from flyte_cornserve.protocol.invocations import _text, notify_key
from flyte_cornserve.task.plan import Plan

CHUNK_FORMAT = 1
BATCH_TTL_S = 7 * 24 * 3600  # a finished batch's record: repeated creates and gets within this find it
EVENTS_MAXLEN = 1000
SAMPLE_EVERY_S = 0.5
KEPT_SAMPLES = 2000  # the progress samples and stage runs a batch keeps (the newest)
KEPT_ERRORS = 20


def runner_stream() -> str:
    """What the runner reads: new batches, cancels, completions."""
    return notify_key("batch-runner")


def batches_key() -> str:
    return key("batches")


def active_key() -> str:
    return key("batches", "active")


def batch_key(batch_id: str, part: str = "") -> str:
    return key("batch", batch_id, *([part] if part else []))


def idempotency_key(name: str) -> str:
    return key("batch-key", name)


# -- the chunk file ---------------------------------------------------------------------------------

class ChunkHeader(BaseModel):
    """The chunk file's first line."""

    model_config = ConfigDict(extra="forbid")

    format: int = CHUNK_FORMAT
    label: str  # what runs, for people: "MLLMTask tiny-llava"
    tasks: list[dict[str, Any]]  # the unit tasks the plans index, as `UnitTask.to_json()` documents
    outputs: list[str]  # the output fields of the task, the columns of the results
    items: int = Field(ge=0)


class ChunkItem(BaseModel):
    """One item: its index in the chunk, the user's id, and its plan (or why it has none); `done`:
    outputs of plan nodes that a stage outside the batch runner computed (node id -> the output, as
    an invocation's), which the runner takes as they are."""

    model_config = ConfigDict(extra="forbid")

    i: int = Field(ge=0)
    id: str
    plan: Plan | None = None
    error: str = ""
    done: dict[str, dict[str, Any]] = Field(default_factory=dict)


def write_chunk(path: str, header: ChunkHeader, items: list[ChunkItem]) -> str:
    """Write a chunk file (any fsspec URI); return its text's content, which identifies it."""
    text = "\n".join([header.model_dump_json(), *(item.model_dump_json(exclude_defaults=True) for item in items)]) + "\n"
    with fsspec.open(path, "w") as out:
        out.write(text)
    return text


def read_chunk_header(path: str) -> ChunkHeader:
    """The chunk file's header alone (its first line)."""
    with fsspec.open(path, "r") as source:
        return _header(path, source.readline())


def read_chunk(path: str) -> tuple[ChunkHeader, list[ChunkItem]]:
    with fsspec.open(path, "r") as source:
        lines = [line for line in source.read().splitlines() if line.strip()]
    header = _header(path, lines[0] if lines else "")
    items = [ChunkItem.model_validate_json(line) for line in lines[1:]]
    if len(items) != header.items or [item.i for item in items] != list(range(len(items))):
        raise ValueError(f"chunk file {path} is incomplete: its header announces {header.items} items, it holds {len(items)}")
    return header, items


# -- the results -----------------------------------------------------------------------------------

class ItemState(str, Enum):
    DONE = "DONE"
    ERROR = "ERROR"
    CANCELLED = "CANCELLED"


class ResultRow(BaseModel):
    """One item's end: its output fields (DONE) or its error, how many attempts, how long."""

    model_config = ConfigDict(extra="forbid")

    i: int
    id: str
    state: ItemState
    output: dict[str, Any] | None = None
    error: str | None = None
    recoverable: bool = False  # the error may go away on a retry of the batch
    attempts: int = 0
    latency_s: float = 0.0

    def to_row(self, fields: list[str]) -> dict[str, Any]:
        """The row of the results file: id, the output fields, error (null when it succeeded),
        state, attempts, latency_s."""
        output = self.output or {}
        return {"id": self.id, **{name: output.get(name) for name in fields}, "error": self.error,
                "state": self.state.value, "attempts": self.attempts, "latency_s": round(self.latency_s, 4)}


def _header(path: str, line: str) -> ChunkHeader:
    if not line.strip():
        raise ValueError(f"chunk file {path} is empty")
    header = ChunkHeader.model_validate_json(line)
    if header.format != CHUNK_FORMAT:
        raise ValueError(f"chunk file {path} has format {header.format}; this version reads {CHUNK_FORMAT}")
    return header


def write_results(path: str, fields: list[str], rows: list[ResultRow]) -> None:
    with fsspec.open(path, "w") as out:
        for row in sorted(rows, key=lambda r: r.i):
            out.write(json.dumps(row.to_row(fields)) + "\n")


def read_results(path: str) -> Iterator[dict[str, Any]]:
    with fsspec.open(path, "r") as source:
        for line in source:
            if line.strip():
                yield json.loads(line)


# -- the batch record -------------------------------------------------------------------------------

class BatchState(str, Enum):
    QUEUED = "QUEUED"  # created; the runner has not started it
    RUNNING = "RUNNING"
    CANCELLING = "CANCELLING"  # cancelled; the runner is ending what still runs
    DONE = "DONE"  # every item ended, the results file is written
    FAILED = "FAILED"  # too many items failed (min_success_ratio), or the results could not be written
    CANCELLED = "CANCELLED"


FINISHED = frozenset({BatchState.DONE, BatchState.FAILED, BatchState.CANCELLED})


class BatchSpec(BaseModel):
    """What to run and where the results go."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chunk: str  # URI of the chunk file
    results: str  # URI the results file is written to
    items: int = Field(ge=0)
    label: str = ""
    min_success_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    max_in_flight: int | None = Field(default=None, ge=1, description="this batch's items in flight at most "
                                                                       "(the runner's own bound applies too)")


class Batch(BaseModel):
    """A batch as Redis holds it."""

    id: str
    spec: BatchSpec
    state: BatchState
    total: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    admitted: int = 0
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    message: str = ""
    retryable: bool = False  # FAILED, and a retry may do better (its failures were recoverable)

    @property
    def ended(self) -> int:
        return self.done + self.failed + self.cancelled

    def progress(self) -> str:
        """"812/1000 done, 3 failed" (what a console or a progress line shows)."""
        text = f"{self.done}/{self.total} done"
        if self.failed:
            text += f", {self.failed} failed"
        if self.cancelled:
            text += f", {self.cancelled} cancelled"
        return text

    @classmethod
    def from_redis(cls, batch_id: str, fields: dict[bytes, bytes]) -> Batch:
        values = {_text(k): _text(v) for k, v in fields.items()}
        number = lambda name: float(values[name]) if values.get(name) else None  # noqa: E731
        return cls(
            id=batch_id, spec=BatchSpec.model_validate_json(values["spec"]), state=BatchState(values["state"]),
            total=int(values.get("total") or 0), done=int(values.get("done") or 0),
            failed=int(values.get("failed") or 0), cancelled=int(values.get("cancelled") or 0),
            admitted=int(values.get("admitted") or 0), created_at=number("created_at") or 0.0,
            started_at=number("started_at"), finished_at=number("finished_at"), message=values.get("message", ""),
            retryable=values.get("retryable") == "1",
        )


class StageRun(BaseModel):
    """One batch invocation of a stage, as the runner took it in: its timing, executor, item count
    and how many of its items failed."""

    stage: str
    executor: str = ""
    created: float
    started: float | None = None
    finished: float | None = None
    items: int
    failed: int = 0


class Telemetry(BaseModel):
    """What a batch's deck shows beyond its record."""

    progress: list[tuple[float, int, int]] = []
    stages: list[StageRun] = []
    errors: list[tuple[str, str]] = []


class BatchStore:
    """Creating, reading and cancelling batches (the submitting side; the runner uses it too)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client

    async def create(self, spec: BatchSpec, key: str | None = None) -> str:
        """Create the batch (or, for a `key` seen before, find it) and hand it to the runner.

        The same key always yields the same batch: a finished one is left as it is, a failed or
        cancelled one is run again, where its items that ended in a recoverable error, or were
        cancelled, run again and the others keep their results.
        """
        batch_id = uuid.uuid4().hex
        if key is not None:
            taken = await self.redis.set(idempotency_key(key), batch_id, nx=True, ex=BATCH_TTL_S)
            if not taken:
                existing = _text(await self.redis.get(idempotency_key(key)))
                batch = await self.load(existing)
                if batch is not None:
                    if batch.state in (BatchState.FAILED, BatchState.CANCELLED):
                        await self._rerun(batch)
                    return existing
                await self.redis.set(idempotency_key(key), batch_id, ex=BATCH_TTL_S)  # its record expired
        now = time.time()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(batch_key(batch_id), mapping={
                "spec": spec.model_dump_json(), "state": BatchState.QUEUED.value, "label": spec.label,
                "total": spec.items, "done": 0, "failed": 0, "cancelled": 0, "admitted": 0, "created_at": repr(now),
            })
            pipe.zadd(batches_key(), {batch_id: now})
            pipe.sadd(active_key(), batch_id)
            pipe.xadd(runner_stream(), {"op": "start", "batch": batch_id})
            await pipe.execute()
        return batch_id

    async def _rerun(self, batch: Batch) -> None:
        """Run a failed or cancelled batch again: drop the results a retry may change."""
        results = await self.redis.hgetall(batch_key(batch.id, "results"))
        redo = [index for index, raw in results.items()
                if (row := ResultRow.model_validate_json(raw)).state is ItemState.CANCELLED or row.recoverable]
        async with self.redis.pipeline(transaction=True) as pipe:
            if redo:
                pipe.hdel(batch_key(batch.id, "results"), *redo)
            pipe.hset(batch_key(batch.id), mapping={
                "state": BatchState.QUEUED.value, "message": "", "finished_at": "", "retryable": "0", "admitted": 0,
                "done": sum(1 for raw in results.values() if ResultRow.model_validate_json(raw).state is ItemState.DONE),
                "failed": sum(1 for index, raw in results.items() if index not in redo
                              and ResultRow.model_validate_json(raw).state is ItemState.ERROR),
                "cancelled": 0,
            })
            for part in ("", "progress", "stages", "errors"):
                pipe.persist(batch_key(batch.id, part))
            pipe.sadd(active_key(), batch.id)
            pipe.xadd(runner_stream(), {"op": "start", "batch": batch.id})
            await pipe.execute()

    async def load(self, batch_id: str) -> Batch | None:
        fields = await self.redis.hgetall(batch_key(batch_id))
        return Batch.from_redis(batch_id, fields) if fields else None

    async def cancel(self, batch_id: str) -> bool:
        """Ask the runner to cancel what is left of the batch; False if it had already ended."""
        batch = await self.load(batch_id)
        if batch is None or batch.state in FINISHED or batch.state is BatchState.CANCELLING:
            return False
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(batch_key(batch_id), "state", BatchState.CANCELLING.value)
            pipe.xadd(runner_stream(), {"op": "cancel", "batch": batch_id})
            await pipe.execute()
        return True

    async def results(self, batch_id: str) -> list[ResultRow]:
        """The rows of the items that ended so far (the results hash, before the file is written)."""
        raw = await self.redis.hgetall(batch_key(batch_id, "results"))
        return sorted((ResultRow.model_validate_json(value) for value in raw.values()), key=lambda row: row.i)

    async def telemetry(self, batch_id: str) -> Telemetry:
        async with self.redis.pipeline(transaction=False) as pipe:
            for part in ("progress", "stages", "errors"):
                pipe.lrange(batch_key(batch_id, part), 0, -1)
            progress, stages, errors = await pipe.execute()
        return Telemetry(progress=[tuple(json.loads(raw)) for raw in progress],
                         stages=[StageRun.model_validate_json(raw) for raw in stages],
                         errors=[tuple(json.loads(raw)) for raw in errors])

    async def recent(self, limit: int = 20) -> list[Batch]:
        """The last `limit` batches that still have a record, newest first."""
        found = []
        for batch_id in await self.redis.zrevrange(batches_key(), 0, limit - 1):
            batch = await self.load(_text(batch_id))
            if batch is None:
                await self.redis.zrem(batches_key(), batch_id)
            else:
                found.append(batch)
        return found

    async def wait(self, batch_ids: list[str], timeout_s: float, last: dict[str, str] | None = None) -> dict[str, str]:
        """Block until one of the batches reports progress (or `timeout_s` passes); return where
        each events stream was read up to (pass it back in as `last`)."""
        last = dict(last or {})
        streams = {batch_key(b, "events"): last.get(b, "0-0") for b in batch_ids}
        reply = await self.redis.xread(streams, block=max(1, int(timeout_s * 1000)))
        for stream, entries in reply or []:
            last[_text(stream).split(":")[2]] = _text(entries[-1][0])
        return last
