"""The invocation protocol: how a unit-task invocation travels from its submitter to an executor.

Redis holds, per invocation, a hash (state, input, deadline, output or error, executor, attempt) and
an events stream with one entry per state change; per deployment, a stream of invocation ids that
the deployment's executors read as one consumer group. State changes go through one Lua script, so
a terminal state (DONE, ERROR, CANCELLED) is written once and never overwritten: an invocation
completes exactly once even if two executors race on it. Waiting is a blocking read of the events
stream, never a timer. See docs/protocol.md.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

GROUP = "executors"
RECORD_TTL_S = 24 * 3600
#: how many invocations `recent()` can list (the CLI's status table)
RECENT_LIMIT = 1000
RECENT_KEY = "cornserve:invocations"
#: longest single blocking read: below redis-py's default 5 s socket timeout
MAX_BLOCK_S = 2.0


class State(str, Enum):
    CREATED = "CREATED"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    ERROR = "ERROR"
    CANCELLED = "CANCELLED"


TERMINAL = frozenset({State.DONE, State.ERROR, State.CANCELLED})


class ErrorKind(str, Enum):
    USER = "user"  # bad input: retrying cannot help
    RECOVERABLE = "recoverable"  # executor died, timeout: a retry may succeed


def queue_key(deployment_id: str) -> str:
    return f"cornserve:queue:{deployment_id}"


def invocation_key(invocation_id: str) -> str:
    return f"cornserve:invocation:{invocation_id}"


def events_key(invocation_id: str) -> str:
    return f"cornserve:invocation:{invocation_id}:events"


@dataclass(frozen=True)
class Invocation:
    """What an executor gets: the id, the unit task's input as JSON, and the deadline (epoch seconds)."""

    id: str
    deployment_id: str
    input: dict[str, Any]
    deadline: float | None = None
    attempt: int = 1
    max_attempts: int = 1  # an executor dying mid-run costs one attempt; past the last one it fails
    entry_id: str = ""  # the queue entry that delivered it, acknowledged once the outcome is stored


@dataclass(frozen=True)
class Outcome:
    """The end of one invocation: an output (DONE) or an error (ERROR) of some kind."""

    output: dict[str, Any] | None = None
    error: str = ""
    kind: ErrorKind = ErrorKind.USER

    @classmethod
    def failed(cls, error: str, kind: ErrorKind = ErrorKind.USER) -> Outcome:
        return cls(error=error, kind=kind)

    @property
    def state(self) -> State:
        return State.DONE if self.output is not None else State.ERROR


@dataclass
class Record:
    """An invocation as Redis holds it, for submitters and the CLI."""

    id: str
    state: State
    deployment_id: str
    output: dict[str, Any] | None = None
    error: str = ""
    error_kind: ErrorKind | None = None
    executor: str = ""
    attempt: int = 0
    max_attempts: int = 1
    label: str = ""
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    deadline: float | None = None
    history: list[State] = field(default_factory=list)

    @property
    def compute_s(self) -> float | None:
        """Time the executor spent on it (RUNNING to outcome), None until it finished."""
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


# KEYS: invocation hash, events stream. ARGV: new state, allowed current states (comma-separated),
# ttl seconds for terminal states (0 = keep), then field/value pairs to set.
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'state')
if not current then return 0 end
local allowed = false
for s in string.gmatch(ARGV[2], '[^,]+') do if s == current then allowed = true end end
if not allowed then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[1] == 'RUNNING' then redis.call('HINCRBY', KEYS[1], 'attempt', 1) end
redis.call('XADD', KEYS[2], '*', 'state', ARGV[1])
if tonumber(ARGV[3]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
return 1
"""


class InvocationStore:
    """Both sides of the protocol on one async Redis client."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self._transition = client.register_script(_TRANSITION)

    # -- submitter side -------------------------------------------------------------------------

    async def submit(self, deployment_id: str, input: dict[str, Any], timeout_s: float | None = None,
                     invocation_id: str | None = None, max_attempts: int = 1, label: str = "") -> str:
        """Record the invocation and queue it for the deployment; return its id.

        One transaction: an executor may read the queue entry the moment it exists, and must then
        find the record already QUEUED (history CREATED, QUEUED).
        """
        invocation_id = invocation_id or uuid.uuid4().hex
        await self.ensure_queue(deployment_id)
        now = time.time()
        record = {
            "state": State.QUEUED.value, "deployment_id": deployment_id, "input": json.dumps(input),
            "deadline": "" if timeout_s is None else repr(now + timeout_s), "created_at": repr(now), "attempt": 0,
            "max_attempts": max_attempts, "label": label,
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(invocation_key(invocation_id), mapping=record)
            pipe.xadd(events_key(invocation_id), {"state": State.CREATED.value})
            pipe.xadd(events_key(invocation_id), {"state": State.QUEUED.value})
            pipe.xadd(queue_key(deployment_id), {"id": invocation_id})
            pipe.zadd(RECENT_KEY, {invocation_id: now})
            pipe.zremrangebyrank(RECENT_KEY, 0, -RECENT_LIMIT - 1)
            await pipe.execute()
        return invocation_id

    async def wait(self, invocation_id: str, timeout_s: float) -> Record:
        """Block until the invocation reaches a terminal state or `timeout_s` passes; return its record."""
        deadline = time.monotonic() + timeout_s
        last = "0"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return await self.record(invocation_id)
            block_ms = max(1, int(min(remaining, MAX_BLOCK_S) * 1000))
            reply = await self.redis.xread({events_key(invocation_id): last}, block=block_ms)
            for _, entries in reply:
                for entry_id, fields in entries:
                    last = entry_id
                    if State(_text(fields[b"state"])) in TERMINAL:
                        return await self.record(invocation_id)

    async def record(self, invocation_id: str) -> Record:
        fields = {_text(k): _text(v) for k, v in (await self.redis.hgetall(invocation_key(invocation_id))).items()}
        if not fields:
            raise KeyError(f"no invocation {invocation_id!r} (never submitted, or expired)")
        events = await self.redis.xrange(events_key(invocation_id))
        return Record(
            id=invocation_id,
            state=State(fields["state"]),
            deployment_id=fields["deployment_id"],
            output=json.loads(fields["output"]) if fields.get("output") else None,
            error=fields.get("error", ""),
            error_kind=ErrorKind(fields["error_kind"]) if fields.get("error_kind") else None,
            executor=fields.get("executor", ""),
            attempt=int(fields.get("attempt", 0)),
            max_attempts=int(fields.get("max_attempts") or 1),
            label=fields.get("label", ""),
            created_at=float(fields.get("created_at") or 0.0),
            started_at=_seconds(fields.get("started_at")),
            finished_at=_seconds(fields.get("finished_at")),
            deadline=_seconds(fields.get("deadline")),
            history=[State(_text(f[b"state"])) for _, f in events],
        )

    async def recent(self, limit: int = 20) -> list[Record]:
        """The last `limit` submitted invocations that still have a record, newest first."""
        records = []
        for invocation_id in await self.redis.zrevrange(RECENT_KEY, 0, limit - 1):
            try:
                records.append(await self.record(_text(invocation_id)))
            except KeyError:
                await self.redis.zrem(RECENT_KEY, invocation_id)
        return records

    async def cancel(self, invocation_id: str) -> bool:
        """Mark a not yet finished invocation CANCELLED; its executor skips or aborts it."""
        return await self.transition(
            invocation_id, State.CANCELLED, allowed={State.CREATED, State.QUEUED, State.RUNNING},
            finished_at=repr(time.time()),
        )

    async def time_out(self, invocation_id: str, timeout_s: float) -> bool:
        """The deadline passed before an outcome: a recoverable ERROR; its executor aborts it."""
        return await self.transition(
            invocation_id, State.ERROR, allowed={State.CREATED, State.QUEUED, State.RUNNING},
            error=f"timed out: no result within the {timeout_s:g} s timeout", error_kind=ErrorKind.RECOVERABLE.value,
            finished_at=repr(time.time()),
        )

    # -- executor side ----------------------------------------------------------------------------

    async def ensure_queue(self, deployment_id: str) -> None:
        try:
            await self.redis.xgroup_create(queue_key(deployment_id), GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def load(self, deployment_id: str, invocation_id: str, entry_id: str) -> Invocation | None:
        """The invocation behind a queue entry, or None if it is gone (expired)."""
        fields = await self.redis.hmget(invocation_key(invocation_id), ["input", "deadline", "attempt", "max_attempts"])
        if fields[0] is None:
            return None
        return Invocation(
            id=invocation_id, deployment_id=deployment_id, input=json.loads(fields[0]),
            deadline=_seconds(fields[1]), attempt=int(fields[2] or 0) + 1, max_attempts=int(fields[3] or 1),
            entry_id=entry_id,
        )

    async def start(self, invocation: Invocation, executor_id: str) -> bool:
        """QUEUED (or RUNNING on a dead executor) -> RUNNING here; False if cancelled or finished."""
        return await self.transition(
            invocation.id, State.RUNNING, allowed={State.QUEUED, State.RUNNING}, executor=executor_id,
            started_at=repr(time.time()),
        )

    async def finish(self, invocation: Invocation, outcome: Outcome) -> bool:
        """Store the outcome (first writer wins), then acknowledge the queue entry."""
        fields: dict[str, str] = {"finished_at": repr(time.time())}
        if outcome.output is not None:
            fields["output"] = json.dumps(outcome.output)
        else:
            fields |= {"error": outcome.error, "error_kind": outcome.kind.value}
        stored = await self.transition(invocation.id, outcome.state, allowed={State.RUNNING}, **fields)
        await self.acknowledge(invocation)
        return stored

    async def acknowledge(self, invocation: Invocation) -> None:
        """Done with the queue entry: acknowledge and delete it, so the stream holds only live work."""
        queue = queue_key(invocation.deployment_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(queue, GROUP, invocation.entry_id)
            pipe.xdel(queue, invocation.entry_id)
            await pipe.execute()

    async def queue_depth(self, deployment_id: str) -> int:
        """Invocations queued for the deployment and not yet delivered to an executor."""
        queue = queue_key(deployment_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(queue)
            pipe.xpending(queue, GROUP)
            length, pending = await pipe.execute()
        return length - pending["pending"]

    async def transition(self, invocation_id: str, state: State, allowed: set[State], **fields: str) -> bool:
        ttl = RECORD_TTL_S if state in TERMINAL else 0
        args = [state.value, ",".join(s.value for s in allowed), ttl]
        for name, value in fields.items():
            args += [name, value]
        return bool(await self._transition(keys=[invocation_key(invocation_id), events_key(invocation_id)], args=args))


def _seconds(value: bytes | str | None) -> float | None:
    text = _text(value)
    return float(text) if text else None


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")
