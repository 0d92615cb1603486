"""The invocation protocol: how a unit-task invocation travels from its submitter to an executor.

Redis holds, per invocation, a hash (state, input, deadline, output or error, executor, attempt) and
an events stream with one entry per state change; per deployment, two streams of invocation ids
(interactive work, and batch work that executors take only when no interactive work waits), read by
the deployment's executors as one consumer group. State changes go through one Lua script, so a
terminal state (DONE, ERROR, CANCELLED) is written once and never overwritten: an invocation
completes exactly once even if two executors race on it. A submitter waiting for many invocations
names one notify stream, to which the same script appends every terminal state: one blocking read
serves them all. A batch invocation carries many items (one input each) and its output one outcome
per item. See docs/protocol.md.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from flyte_cornserve.namespace import key

log = logging.getLogger(__name__)

GROUP = "executors"
RECORD_TTL_S = 24 * 3600
NOTIFY_TTL_S = 24 * 3600  # an abandoned notify stream (its reader went away) goes after this
NOTIFY_MAXLEN = 100_000
#: how many invocations `recent()` can list (the CLI's status table)
RECENT_LIMIT = 1000
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


class Priority(str, Enum):
    """Which of a deployment's queues an invocation waits in: executors serve interactive first."""

    INTERACTIVE = "interactive"
    BATCH = "batch"


def recent_key() -> str:
    """The invocations by submission time (a sorted set of the last `RECENT_LIMIT`)."""
    return key("invocations")


def counts_key() -> str:
    """Terminal states counted once per invocation: field "<deployment>|<state>|<error kind or empty>"."""
    return key("invocations", "counts")


def queue_key(deployment_id: str, priority: Priority = Priority.INTERACTIVE) -> str:
    base = key("queue", deployment_id)
    return base if priority is Priority.INTERACTIVE else f"{base}:batch"


def queue_keys(deployment_id: str) -> tuple[str, str]:
    """The deployment's queues, the one served first first."""
    return queue_key(deployment_id, Priority.INTERACTIVE), queue_key(deployment_id, Priority.BATCH)


def notify_key(name: str) -> str:
    """A stream that receives `{id, state}` when an invocation that names it ends."""
    return key("notify", name)


def invocation_key(invocation_id: str) -> str:
    return key("invocation", invocation_id)


def events_key(invocation_id: str) -> str:
    return invocation_key(invocation_id) + ":events"  # the retention scripts build it so too


@dataclass(frozen=True)
class TensorPolicy:
    """How a producer keeps the tensors an invocation puts (its unit task's `TaskOptions`).

    `cache`: content-addressed ids, so the same input is found again (else a random id, no lookup);
    `ttl_s`: how long a tensor stays as cache once its consumers released it (None: the executor's
    default)."""

    cache: bool = True
    ttl_s: float | None = None

    def to_fields(self) -> dict[str, str]:
        return {"tensor_cache": "1" if self.cache else "0", "tensor_ttl": "" if self.ttl_s is None else repr(self.ttl_s)}


@dataclass(frozen=True)
class Invocation:
    """What an executor gets: the id, the unit task's input as JSON, and the deadline (epoch seconds).

    A batch invocation has `items` (one input each) instead of `input`; its executor runs each item
    as an invocation of its own (`item_invocations()`) and stores one outcome per item. `pins` is how
    many consumers will read (and release) the tensor an item produces: one per item of a batch
    invocation (`item_pins`), else one number.
    """

    id: str
    deployment_id: str
    input: dict[str, Any]
    deadline: float | None = None
    attempt: int = 1
    max_attempts: int = 1  # an executor dying mid-run costs one attempt; past the last one it fails
    entry_id: str = ""  # the queue entry that delivered it, acknowledged once the outcome is stored
    priority: Priority = Priority.INTERACTIVE
    items: tuple[dict[str, Any], ...] | None = None
    pins: int = 1
    item_pins: tuple[int, ...] | None = None
    tensors: TensorPolicy = TensorPolicy()

    def item_invocations(self) -> list[Invocation]:
        """What a handler runs: the invocation itself, or one per item of a batch invocation."""
        if self.items is None:
            return [self]
        pins = self.item_pins or (1,) * len(self.items)
        return [Invocation(id=f"{self.id}#{k}", deployment_id=self.deployment_id, input=item, deadline=self.deadline,
                           attempt=self.attempt, max_attempts=self.max_attempts, entry_id=self.entry_id,
                           priority=self.priority, pins=pins[k], tensors=self.tensors)
                for k, item in enumerate(self.items)]

    def combine(self, outcomes: list[Outcome]) -> Outcome:
        """The outcome to store, from the outcomes of `item_invocations()` (in their order)."""
        if self.items is None:
            (outcome,) = outcomes
            return outcome
        return Outcome(output={"items": [outcome.to_json() for outcome in outcomes]})


@dataclass(frozen=True)
class Outcome:
    """The end of one invocation: an output (DONE) or an error (ERROR) of some kind."""

    output: dict[str, Any] | None = None
    error: str = ""
    kind: ErrorKind = ErrorKind.USER
    #: the tensors it read or wrote (`sidecar.Transfer.to_json()`), kept in its record for its deck
    transfers: tuple[dict[str, Any], ...] = ()

    @classmethod
    def failed(cls, error: str, kind: ErrorKind = ErrorKind.USER) -> Outcome:
        return cls(error=error, kind=kind)

    @property
    def state(self) -> State:
        return State.DONE if self.output is not None else State.ERROR

    def to_json(self) -> dict[str, Any]:
        if self.output is not None:
            return {"output": self.output}
        return {"error": self.error, "kind": self.kind.value}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outcome:
        if "output" in data:
            return cls(output=data["output"])
        return cls.failed(str(data.get("error", "")), ErrorKind(data.get("kind", ErrorKind.USER.value)))


@dataclass(frozen=True)
class Event:
    """One state change of an invocation: when (from its stream entry's id), on which executor, why."""

    state: State
    at: float
    executor: str = ""
    note: str = ""


@dataclass
class Record:
    """An invocation as Redis holds it, for submitters, the CLI and the decks."""

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
    priority: Priority = Priority.INTERACTIVE
    items: int = 0  # a batch invocation's item count (its output holds one outcome per item)
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    deadline: float | None = None
    history: list[State] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    node: str = ""  # the node of the executor that ran it last
    route: str = ""  # how the dispatcher chose the deployment among the task's candidates
    transfers: list[dict[str, Any]] = field(default_factory=list)

    def item_outcomes(self) -> list[Outcome]:
        """A batch invocation's outcomes, one per item; all the invocation's error if it failed whole."""
        if self.state is State.DONE:
            return [Outcome.from_json(item) for item in (self.output or {}).get("items", [])]
        failure = Outcome.failed(self.error or f"invocation {self.id} was {self.state.value.lower()}",
                                 self.error_kind or ErrorKind.RECOVERABLE)
        return [failure] * self.items

    @property
    def compute_s(self) -> float | None:
        """Time the executor spent on it (RUNNING to outcome), None until it finished."""
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


# KEYS: invocation hash, events stream, counts hash. ARGV: new state, allowed current states
# (comma-separated), ttl seconds for terminal states (0 = keep), a note for the event (why: "" for
# none), the invocation id, then field/value pairs to set. The event carries the state, the note and
# the `executor` field if one is set. A terminal state is counted once in the counts hash and appended
# to the stream the record names in `notify` (not declared in KEYS: Redis is one instance).
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'state')
if not current then return 0 end
local allowed = false
for s in string.gmatch(ARGV[2], '[^,]+') do if s == current then allowed = true end end
if not allowed then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
local event = {'state', ARGV[1]}
for i = 6, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  if ARGV[i] == 'executor' then table.insert(event, 'executor'); table.insert(event, ARGV[i + 1]) end
end
if ARGV[4] ~= '' then table.insert(event, 'note'); table.insert(event, ARGV[4]) end
if ARGV[1] == 'RUNNING' then redis.call('HINCRBY', KEYS[1], 'attempt', 1) end
redis.call('XADD', KEYS[2], '*', unpack(event))
if tonumber(ARGV[3]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  local kind = ''
  if ARGV[1] == 'ERROR' then kind = redis.call('HGET', KEYS[1], 'error_kind') or '' end
  local deployment = redis.call('HGET', KEYS[1], 'deployment_id') or ''
  redis.call('HINCRBY', KEYS[3], deployment .. '|' .. ARGV[1] .. '|' .. kind, 1)
  local notify = redis.call('HGET', KEYS[1], 'notify')
  if notify and notify ~= '' then
    redis.call('XADD', notify, 'MAXLEN', '~', %d, '*', 'id', ARGV[5], 'state', ARGV[1])
    redis.call('EXPIRE', notify, %d)
  end
end
return 1
""" % (NOTIFY_MAXLEN, NOTIFY_TTL_S)

# Retention of ended records (see `InvocationStore.collect`). A record goes once it ended, its
# submitter collected its outcome, and it is no longer among the `RECENT_LIMIT` newest submissions;
# one nobody collected stays its `RECORD_TTL_S`.
#
# _TRIM: KEYS: the recent set. ARGV: the limit, the records' key prefix. Drops the oldest entries
# beyond the limit, and the records of those that were collected.
_TRIM = """
local overflow = redis.call('ZRANGE', KEYS[1], 0, -tonumber(ARGV[1]) - 1)
if #overflow == 0 then return 0 end
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -tonumber(ARGV[1]) - 1)
local dropped = 0
for _, id in ipairs(overflow) do
  local record = ARGV[2] .. id
  if redis.call('HGET', record, 'collected') == '1' then
    redis.call('DEL', record, record .. ':events')
    dropped = dropped + 1
  end
end
return dropped
"""

# _COLLECT: KEYS: the recent set. ARGV: the records' key prefix, then invocation ids. Marks each ended
# record collected; one already out of the recent set goes at once.
_COLLECT = """
for i = 2, #ARGV do
  local record = ARGV[1] .. ARGV[i]
  local state = redis.call('HGET', record, 'state')
  if state == 'DONE' or state == 'ERROR' or state == 'CANCELLED' then
    if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
      redis.call('HSET', record, 'collected', '1')
    else
      redis.call('DEL', record, record .. ':events')
    end
  end
end
return 0
"""


class MalformedRecord(ValueError):
    """An invocation's record cannot be read (not written by `submit`): it can never run."""


def _shown(value: bytes | str | None) -> str:
    """A field's value for an error message: at most 200 characters, whatever its bytes."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else (value or "")
    return repr(text[:200])


def _count(value: bytes | str | None, default: int) -> int:
    """A record's attempt counter: an integer that Redis's HINCRBY can still increment."""
    number = int(_text(value) or default)
    if not 0 <= number < 2**62:
        raise ValueError(f"{number} is out of range")
    return number


def _parsed(invocation_id: str, name: str, value: Any, convert: Any) -> Any:
    """`convert(value)`, or a `MalformedRecord` naming the invocation, the field and (bounded) its value."""
    try:
        return convert(value)
    except (ValueError, TypeError, KeyError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        why = str(exc)  # bounded too: some quote the value whole ("'...' is not a valid State")
        why = why if len(why) <= 300 else f"{why[:300]}..."
        raise MalformedRecord(f"invocation {invocation_id}: its record's {name} is malformed "
                              f"({_shown(value)}: {why})") from None


def _json_of(kind: type, what: str) -> Any:
    """A converter: JSON text that must decode to a `kind` (a dict: "an object", a list: "a list")."""
    def convert(value: bytes | str) -> Any:
        data = json.loads(value)
        if not isinstance(data, kind):
            raise ValueError(f"a {type(data).__name__}, not {what}")
        return data
    return convert


#: what each of a record's `transfers` holds (`sidecar.Transfer.to_json()`), as its deck reads it
_TRANSFER_FIELDS = {"op": str, "id": str, "shape": list, "dtype": str, "nbytes": int, "path": str,
                    "seconds": (int, float), "at": (int, float)}


def _transfers(value: bytes | str) -> list[dict[str, Any]]:
    transfers = _json_of(list, "a list of transfers")(value)
    for k, transfer in enumerate(transfers):
        if not isinstance(transfer, dict):
            raise ValueError(f"transfer {k} is a {type(transfer).__name__}, not an object")
        for name, kind in _TRANSFER_FIELDS.items():
            if not isinstance(transfer.get(name), kind) or isinstance(transfer.get(name), bool):
                raise ValueError(f"transfer {k} has no {name} of the right type")
    return transfers


def _event(invocation_id: str, entry_id: bytes | str, fields: dict[bytes, bytes]) -> Event:
    """One entry of the events stream (its id, a stream entry's, says when)."""
    at = int(_text(entry_id).split("-")[0]) / 1000
    state = _parsed(invocation_id, f"event {_text(entry_id)} state", fields.get(b"state"), lambda v: State(_text(v)))
    return Event(state, at, _text(fields.get(b"executor"), lenient=True), _text(fields.get(b"note"), lenient=True))


def _read_record(invocation_id: str, fields: dict[str, bytes], entries: list[Any]) -> Record:
    """A `Record` from its hash's fields (raw values) and its events stream; each field parsed once,
    a `MalformedRecord` naming the first one that cannot be."""
    def parse(name: str, convert: Any, default: Any = None, required: bool = False) -> Any:
        if name not in fields:
            if required:
                raise MalformedRecord(f"invocation {invocation_id}: its record has no {name}")
            return default
        return _parsed(invocation_id, name, fields[name], convert)

    def optional(convert: Any) -> Any:  # "" (or absent) is no value
        return lambda value: convert(value) if _text(value) else None

    def free_text(name: str) -> str:  # shown to people: undecodable bytes do not make it unreadable
        return _text(fields.get(name), lenient=True)

    state = parse("state", lambda v: State(_text(v)), required=True)
    events = [_event(invocation_id, entry_id, entry) for entry_id, entry in entries]
    output = parse("output", optional(_json_of(dict, "an object")))
    items = parse("items", lambda v: _count(v, 0), 0)
    if state is State.DONE and output is None and not items:  # a batch's outputs go once the runner took them
        raise MalformedRecord(f"invocation {invocation_id}: its record's output is missing (its state is DONE)")
    return Record(
        id=invocation_id,
        state=state,
        deployment_id=parse("deployment_id", _text, required=True),
        output=output,
        error=free_text("error"),
        error_kind=parse("error_kind", optional(lambda v: ErrorKind(_text(v)))),
        executor=free_text("executor"),
        attempt=parse("attempt", lambda v: _count(v, 0), 0),
        max_attempts=parse("max_attempts", lambda v: _count(v, 1), 1),
        label=free_text("label"),
        priority=parse("priority", lambda v: Priority(_text(v) or Priority.INTERACTIVE.value), Priority.INTERACTIVE),
        items=items,
        created_at=parse("created_at", lambda v: _seconds(v) or 0.0, 0.0),
        started_at=parse("started_at", _seconds),
        finished_at=parse("finished_at", _seconds),
        deadline=parse("deadline", _seconds),
        history=[event.state for event in events],
        events=events,
        node=free_text("node"),
        route=free_text("route"),
        transfers=parse("transfers", optional(_transfers), []) or [],
    )


class InvocationStore:
    """Both sides of the protocol on one async Redis client."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self._transition = client.register_script(_TRANSITION)
        self._collect = client.register_script(_COLLECT)
        self._queues: set[str] = set()  # deployments whose consumer group this store has made sure of

    # -- submitter side -------------------------------------------------------------------------

    async def submit(self, deployment_id: str, input: dict[str, Any], timeout_s: float | None = None,
                     invocation_id: str | None = None, max_attempts: int = 1, label: str = "",
                     priority: Priority = Priority.INTERACTIVE, notify: str = "", route: str = "",
                     pins: int = 1, tensors: TensorPolicy = TensorPolicy()) -> str:
        """Record the invocation and queue it for the deployment; return its id.

        One transaction: an executor may read the queue entry the moment it exists, and must then
        find the record already QUEUED (history CREATED, QUEUED). `notify` names a stream
        (`notify_key`) that receives the invocation's terminal state.
        """
        invocation_id = invocation_id or uuid.uuid4().hex
        await self.ensure_queue(deployment_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            self.queue_submission(pipe, deployment_id, invocation_id, input, timeout_s=timeout_s,
                                  max_attempts=max_attempts, label=label, priority=priority, notify=notify,
                                  route=route, pins=pins, tensors=tensors)
            await pipe.execute()
        return invocation_id

    def queue_submission(self, pipe: Any, deployment_id: str, invocation_id: str, input: dict[str, Any] | None = None,
                         *, items: list[dict[str, Any]] | None = None, timeout_s: float | None = None,
                         max_attempts: int = 1, label: str = "", priority: Priority = Priority.INTERACTIVE,
                         notify: str = "", route: str = "", pins: int | list[int] = 1,
                         tensors: TensorPolicy = TensorPolicy()) -> None:
        """Add a submission to a transaction of the caller's (who may record more in it): `input`,
        or `items` for a batch invocation (then `pins` is a list, one per item).
        `ensure_queue(deployment_id)` must have run."""
        now = time.time()
        record = {
            "state": State.QUEUED.value, "deployment_id": deployment_id,
            "input": json.dumps(items if items is not None else input),
            "deadline": "" if timeout_s is None else repr(now + timeout_s), "created_at": repr(now), "attempt": 0,
            "max_attempts": max_attempts, "label": label, "priority": priority.value, "notify": notify,
            "items": "" if items is None else len(items), "route": route, "pins": json.dumps(pins),
            **tensors.to_fields(),
        }
        pipe.hset(invocation_key(invocation_id), mapping=record)
        pipe.xadd(events_key(invocation_id), {"state": State.CREATED.value})
        pipe.xadd(events_key(invocation_id), {"state": State.QUEUED.value})
        entry = {"id": invocation_id} if items is None else {"id": invocation_id, "n": len(items)}
        pipe.xadd(queue_key(deployment_id, priority), entry)
        pipe.zadd(recent_key(), {invocation_id: now})
        pipe.eval(_TRIM, 1, recent_key(), RECENT_LIMIT, invocation_key(""))  # (a Script object cannot join a sync pipe)

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
        """The invocation's record: a KeyError if there is none, a `MalformedRecord` naming the field
        if it cannot be read (written by hand, or corrupted)."""
        fields = {_text(k, lenient=True): v for k, v in (await self.redis.hgetall(invocation_key(invocation_id))).items()}
        if not fields:
            raise KeyError(f"no invocation {invocation_id!r} (never submitted, or expired)")
        return _read_record(invocation_id, fields, await self.redis.xrange(events_key(invocation_id)))

    async def recent(self, limit: int = 20) -> list[Record]:
        """The last `limit` submitted invocations that still have a record, newest first; one whose
        record cannot be read is left out (and logged), not the listing's failure."""
        records = []
        for invocation_id in await self.redis.zrevrange(recent_key(), 0, limit - 1):
            try:
                records.append(await self.record(_text(invocation_id, lenient=True)))
            except KeyError:
                await self.redis.zrem(recent_key(), invocation_id)
            except MalformedRecord as exc:
                log.warning("recent invocations: left out %s", exc)
        return records

    async def collect(self, *invocation_ids: str) -> None:
        """The submitter has the outcome of these ended invocations: their records may go once they
        fall out of the `RECENT_LIMIT` newest (so Redis holds a bounded history, not a day of them).
        Until then a repeated read (a `GetTask` again, `cornserve status`, a deck) still finds them.
        Records not yet ended are left alone."""
        if invocation_ids:
            await self._collect(keys=[recent_key()], args=[invocation_key(""), *invocation_ids])

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

    async def ensure_queue(self, deployment_id: str, again: bool = False) -> None:
        """Create the deployment's queues and their consumer group, once per store (`again` after
        Redis lost them, e.g. a restart without persistence)."""
        if deployment_id in self._queues and not again:
            return
        for queue in queue_keys(deployment_id):
            try:
                await self.redis.xgroup_create(queue, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._queues.add(deployment_id)

    async def load(self, deployment_id: str, invocation_id: str, entry_id: str) -> Invocation | None:
        """The invocation behind a queue entry, or None if it is gone (expired)."""
        fields = await self.redis.hmget(invocation_key(invocation_id),
                                        ["input", "deadline", "attempt", "max_attempts", "priority", "items", "pins",
                                         "tensor_cache", "tensor_ttl"])
        if fields[0] is None:
            return None

        def parse(name: str, value: Any, convert: Any) -> Any:
            return _parsed(invocation_id, name, value, convert)

        payload = parse("input", fields[0], json.loads)
        batch = bool(fields[5])
        if batch and (not isinstance(payload, list) or len(payload) != parse("items", fields[5], int)):
            raise MalformedRecord(f"invocation {invocation_id}: its record's items ({_shown(fields[5])}) disagrees "
                                  f"with its input (a {type(payload).__name__}, not a list of that many items)")
        if not batch and not isinstance(payload, dict):
            raise MalformedRecord(f"invocation {invocation_id}: its record's input is a {type(payload).__name__}, "
                                  f"not an object of the task's input fields")
        return Invocation(
            id=invocation_id, deployment_id=deployment_id, input={} if batch else payload,
            deadline=parse("deadline", fields[1], _seconds), attempt=parse("attempt", fields[2], lambda v: _count(v, 0)) + 1,
            max_attempts=parse("max_attempts", fields[3], lambda v: _count(v, 1)), entry_id=entry_id,
            priority=parse("priority", fields[4], lambda v: Priority(_text(v) or Priority.INTERACTIVE.value)),
            items=tuple(payload) if batch else None,
            **parse("pins", fields[6], lambda v: _pins(v, len(payload) if batch else None)),
            tensors=TensorPolicy(cache=_text(fields[7]) != "0", ttl_s=parse("tensor_ttl", fields[8], _seconds)),
        )

    async def start(self, invocation: Invocation, executor_id: str, node: str = "", note: str = "") -> bool:
        """QUEUED (or RUNNING on a dead executor) -> RUNNING here; False if cancelled or finished.
        `note` says why it runs again, when it does (its executor died)."""
        return await self.transition(
            invocation.id, State.RUNNING, allowed={State.QUEUED, State.RUNNING}, note=note, executor=executor_id,
            node=node, started_at=repr(time.time()),
        )

    async def finish(self, invocation: Invocation, outcome: Outcome) -> bool:
        """Store the outcome (first writer wins), then acknowledge the queue entry."""
        fields: dict[str, str] = {"finished_at": repr(time.time())}
        if outcome.output is not None:
            fields["output"] = json.dumps(outcome.output)
        else:
            fields |= {"error": outcome.error, "error_kind": outcome.kind.value}
        if outcome.transfers:
            fields["transfers"] = json.dumps(outcome.transfers)
        stored = await self.transition(invocation.id, outcome.state, allowed={State.RUNNING}, **fields)
        await self.acknowledge(invocation)
        return stored

    async def acknowledge(self, invocation: Invocation) -> None:
        """Done with the queue entry: acknowledge and delete it, so the stream holds only live work."""
        queue = queue_key(invocation.deployment_id, invocation.priority)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(queue, GROUP, invocation.entry_id)
            pipe.xdel(queue, invocation.entry_id)
            await pipe.execute()

    async def queue_depth(self, deployment_id: str) -> int:
        """Invocations queued for the deployment (either queue) and not yet delivered to an executor."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for queue in queue_keys(deployment_id):
                pipe.xlen(queue)
                pipe.xpending(queue, GROUP)
            interactive, interactive_pending, batch, batch_pending = await pipe.execute()
        return interactive - interactive_pending["pending"] + batch - batch_pending["pending"]

    async def backlog(self, deployment_id: str) -> int:
        """Invocations queued or running on the deployment (entries in its queues)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for queue in queue_keys(deployment_id):
                pipe.xlen(queue)
            return sum(await pipe.execute())

    async def counts(self) -> dict[tuple[str, str, str], int]:
        """Invocations that ended, by (deployment, terminal state, error kind or ""), each counted once."""
        counts = {}
        for field_name, value in (await self.redis.hgetall(counts_key())).items():
            deployment, state, kind = _text(field_name).split("|")
            counts[(deployment, state, kind)] = int(value)
        return counts

    async def transition(self, invocation_id: str, state: State, allowed: set[State], note: str = "",
                         **fields: str) -> bool:
        """Move the invocation to `state` if it is in one of `allowed`; `note` says why, on its event."""
        ttl = RECORD_TTL_S if state in TERMINAL else 0
        args = [state.value, ",".join(s.value for s in allowed), ttl, note, invocation_id]
        for name, value in fields.items():
            args += [name, value]
        keys = [invocation_key(invocation_id), events_key(invocation_id), counts_key()]
        return bool(await self._transition(keys=keys, args=args))


def _pins(value: bytes | str | None, items: int | None) -> dict[str, Any]:
    """The `pins` field as `Invocation` fields: absent (a record from before pins) is 1 per item."""
    pins = json.loads(_text(value) or "1")
    if items is None:
        if not isinstance(pins, int) or isinstance(pins, bool) or pins < 0:
            raise ValueError(f"not a count of consumers: {pins!r}")
        return {"pins": pins}
    if isinstance(pins, int) and not isinstance(pins, bool):
        pins = [pins] * items
    if (not isinstance(pins, list) or len(pins) != items
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in pins)):
        raise ValueError(f"not one count of consumers per item: {pins!r}")
    return {"item_pins": tuple(pins)}


def _seconds(value: bytes | str | None) -> float | None:
    text = _text(value)
    return float(text) if text else None


def _text(value: bytes | str | None, lenient: bool = False) -> str:
    """A field's text; `lenient`: bytes that are not UTF-8 replaced (free text, shown to people)."""
    if isinstance(value, bytes):
        return value.decode(errors="replace" if lenient else "strict")
    return value or ""
