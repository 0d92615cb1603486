"""How clients (the connector, the CLI) talk to the control plane, through Redis.

Requests go on one list that the control plane pops; each request names its own reply list, which
the client blocks on. So clients need nothing but the Redis URL, and the control plane can run in
the embedded stack's daemon or as a Kubernetes Deployment alike. Deployments are Redis hashes the
control plane writes and anyone reads (routing, `cornserve status`). JSON only, never pickle. Keys as with the default namespace (`flyte_cornserve.namespace`).

| key | type | written by | what |
|---|---|---|---|
| `cornserve:control:requests` | list | clients | requests: {id, op, args} |
| `cornserve:control:reply:<request id>` | list, TTL | control plane | the reply: {ok, error, ...} |
| `cornserve:control-plane` | string, TTL | control plane | its liveness: {pid, host, started_at, nodes} |
| `cornserve:deployments` | set | task manager | deployment ids |
| `cornserve:deployment:<id>` | hash (TTL once FAILED) | task manager | the `Deployment` record (message: the start-up phase; a FAILED one's: why, kept `task_manager.FAILED_TTL_S` = 1 h unless undeployed or deployed again) |
| `cornserve:deployment:<id>:phases` | hash, TTL | executors (`protocol.deployments.PhaseReporter`) | executor id -> its latest phase: {phase, step, at} |
| `cornserve:deployments:events` | stream | task manager; executors (phase) | {deployment, event, detail}; a `phase` event adds phase, step, executor |
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import redis.asyncio as aioredis

from flyte_cornserve.phases import END
from flyte_cornserve.namespace import key
from flyte_cornserve.protocol.deployments import deployment_events_key, phases_key
from flyte_cornserve.protocol.invocations import MAX_BLOCK_S, _text

REPLY_TTL_S = 300


def requests_key() -> str:
    return key("control", "requests")


def control_plane_key() -> str:
    """The control plane's liveness: {pid, host, started_at, token, nodes}, with a TTL it refreshes."""
    return key("control-plane")


def deployments_key() -> str:
    """The set of deployment ids."""
    return key("deployments")


def deployment_key(deployment_id: str) -> str:
    return key("deployment", deployment_id)


def reply_key(request_id: str) -> str:
    return key("control", "reply", request_id)


class ControlPlaneError(RuntimeError):
    """The control plane refused a request (e.g. a deployment that does not fit) or is not there.

    `recoverable` tells the two apart: a refusal is the request's own fault and retrying it cannot
    help (False); no control plane serving the Redis, or none answering, is trouble of the
    infrastructure that a later try may not meet (True).
    """

    def __init__(self, message: str, *, recoverable: bool = False) -> None:
        super().__init__(message)
        self.recoverable = recoverable


class DeploymentState(str, Enum):
    DEPLOYING = "DEPLOYING"  # executors starting (loading models)
    READY = "READY"  # at least one executor serves its queue
    STOPPING = "STOPPING"  # undeployed or idle past its TTL; gone once its executors stopped
    FAILED = "FAILED"  # its executors kept crashing, or it could not be restarted; the next deploy starts afresh


@dataclass
class Deployment:
    """A unit task's deployment as Redis holds it."""

    id: str
    label: str  # e.g. "LLMTask tiny-llava", for people
    task: str  # the unit task's JSON
    executor_kind: str
    resources: dict[str, Any]
    state: DeploymentState
    replicas: int = 1
    node: str = ""
    message: str = ""
    executors: list[str] = field(default_factory=list)
    restarts: int = 0
    created_at: float = 0.0
    last_used: float = 0.0
    #: while DEPLOYING: when the start-up phase the message names began (the executor's clock), else 0
    phase_since: float = 0.0
    #: its `Replicas` bounds (min, max, backlog_per_executor, idle_s); `replicas` is the executors it has now
    scaling: dict[str, Any] = field(default_factory=dict)

    def to_redis(self) -> dict[str, str]:
        fields = asdict(self)
        fields["state"] = self.state.value
        return {name: json.dumps(value) for name, value in fields.items()}

    @classmethod
    def from_redis(cls, fields: dict[bytes, bytes]) -> Deployment:
        known = {f.name for f in dataclasses.fields(cls)}  # a newer control plane may write more
        values = {name: json.loads(v) for k, v in fields.items() if (name := _text(k)) in known}
        values["state"] = DeploymentState(values["state"])
        return cls(**values)


async def executor_phase(client: aioredis.Redis, deployment_id: str, executor_id: str) -> dict[str, Any] | None:
    """The executor's latest phase report ({phase, step, at}), or None if it reported none."""
    raw = await client.hget(phases_key(deployment_id), executor_id)
    return json.loads(raw) if raw else None


def phase_message(report: dict[str, Any] | None) -> tuple[str, float] | None:
    """The deployment message for an executor's latest phase report, and when that phase began:
    "loading weights" while it runs, "loading weights done" once it ended; None without a report."""
    if not report:
        return None
    if report.get("step") == END:
        return f"{report['phase']} done", 0.0
    return str(report["phase"]), float(report.get("at", 0.0))


async def load_deployment(client: aioredis.Redis, deployment_id: str) -> Deployment | None:
    fields = await client.hgetall(deployment_key(deployment_id))
    return Deployment.from_redis(fields) if fields else None


async def list_deployments(client: aioredis.Redis) -> list[Deployment]:
    found = []
    for deployment_id in sorted(_text(d) for d in await client.smembers(deployments_key())):
        deployment = await load_deployment(client, deployment_id)
        if deployment is not None:
            found.append(deployment)
    return found


def _entry_ms(entry_id: bytes | str) -> int:
    """A stream entry's time: milliseconds since the epoch on Redis's clock (one clock for all)."""
    return int(_text(entry_id).split("-")[0])


class StartProgress:
    """What a client shows of a deployment's start, from its events in order (no Redis here).

    It follows one executor (`executor`; the caller picks the deployment's first): `live(now_ms)` is
    the line that changes ("deploying LLMTask tiny-llava: loading weights (3 s)", or "starting the
    executor" before its first phase; None between two phases), `feed(event)` returns the lines that
    stay, one per phase that ended ("LLMTask tiny-llava: loading weights done in 4.2 s") and one when
    the deployment is ready. Times are stream entry times, so every machine measures with Redis's clock.
    """

    def __init__(self, label: str, started_ms: int, executor: str | None = None) -> None:
        self.label = label
        self.started_ms = started_ms
        self.executor = executor
        self.phase = ""  # the phase under way, "" if none
        self.phase_ms = 0
        self.phases_seen = 0
        self.finished = False  # ready, or stopped

    def feed(self, entry_id: bytes | str, fields: dict[str, str]) -> list[str]:
        at = _entry_ms(entry_id)
        event = fields.get("event")
        if event == "ready":
            self.finished = True
            return [f"{self.label}: ready in {max(0, at - self.started_ms) / 1000:.1f} s"]
        if event == "stopped" and self.executor is not None:  # an earlier incarnation's is no end
            self.finished = True
            return []
        if event != "phase" or fields.get("executor") != self.executor:
            return []
        phase = fields.get("phase", "")
        if fields.get("step") == END:
            began, self.phase = (self.phase_ms if self.phase == phase else None), ""
            took = f" in {(at - began) / 1000:.1f} s" if began is not None else ""
            return [f"{self.label}: {phase} done{took}"]
        self.phase, self.phase_ms = phase, at
        self.phases_seen += 1
        return []

    def live(self, now_ms: float) -> str | None:
        if self.phase:
            return f"deploying {self.label}: {self.phase} ({max(0.0, now_ms - self.phase_ms) / 1000:.0f} s)"
        if not self.phases_seen:
            return f"deploying {self.label}: starting the executor ({max(0.0, now_ms - self.started_ms) / 1000:.0f} s)"
        return None  # between two phases (moments): the next one shows next


class StartFollower:
    """Follows a deployment's start on the deployments' events stream (blocking reads, in order) and
    shows it: `live(message)` for the line that changes, `note(message)` for the lines that stay.

    Create it with `begin()` *before* asking for the deployment (so no event is missed), run
    `run()` beside the request; it ends with the deployment's `ready` (or `stopped`) event, or when
    `close()` says the request ended first (refused, or already ready).
    """

    def __init__(self, client: aioredis.Redis, deployment_id: str, label: str,
                 live: Callable[[str], None], note: Callable[[str], None]) -> None:
        self.redis = client
        self.deployment_id = deployment_id
        self.live, self.note = live, note
        self.view = StartProgress(label, 0)
        self._last = "0-0"
        self._offset_ms = 0.0  # Redis's clock minus ours
        self._closing = False

    @classmethod
    async def begin(cls, client: aioredis.Redis, deployment_id: str, label: str,
                    live: Callable[[str], None], note: Callable[[str], None]) -> StartFollower:
        follower = cls(client, deployment_id, label, live, note)
        seconds, micros = await client.time()
        now_ms = seconds * 1000 + micros / 1000
        follower._offset_ms = now_ms - time.time() * 1000
        follower.view.started_ms = int(now_ms)
        current = await load_deployment(client, deployment_id)
        if current is not None and current.state is DeploymentState.DEPLOYING:
            # joining a start under way: read its events from its beginning (the creation time is the
            # control plane's clock; a few seconds' margin covers a skew, other incarnations' events
            # are told apart by their executor ids)
            follower.view.started_ms = int(current.created_at * 1000)
            follower._last = f"{max(0, int(current.created_at * 1000) - 5000)}-0"
        else:
            latest = await client.xrevrange(deployment_events_key(), count=1)
            follower._last = _text(latest[0][0]) if latest else "0-0"
        return follower

    async def run(self) -> None:
        while not self.view.finished:
            closing = self._closing  # then one last read of what is there, without waiting
            reply = await self.redis.xread({deployment_events_key(): self._last}, block=None if closing else 1000,
                                           count=1000)
            for _, entries in reply or []:
                for entry_id, raw in entries:
                    self._last = _text(entry_id)
                    fields = {_text(k): _text(v) for k, v in raw.items()}
                    if fields.get("deployment") != self.deployment_id:
                        continue
                    if fields.get("event") == "phase" and self.view.executor is None:
                        record = await load_deployment(self.redis, self.deployment_id)
                        self.view.executor = (record.executors[0] if record is not None and record.executors
                                              else fields.get("executor"))
                    for line in self.view.feed(entry_id, fields):
                        self.note(line)
                    if self.view.finished:
                        return
            if closing:
                return
            shown = self.view.live(time.time() * 1000 + self._offset_ms)
            if shown is not None:
                self.live(shown)

    def close(self) -> None:
        """The request ended: read what is there once more, then return (the current blocking read
        ends first: at most a second)."""
        self._closing = True


async def touch(client: aioredis.Redis, deployment_id: str) -> None:
    """Record use now (the idle TTL counts from the last use)."""
    await client.hset(deployment_key(deployment_id), "last_used", json.dumps(time.time()))


async def control_plane_info(client: aioredis.Redis) -> dict[str, Any] | None:
    raw = await client.get(control_plane_key())
    return json.loads(raw) if raw else None


async def request(client: aioredis.Redis, op: str, timeout_s: float,
                  progress: Callable[[float], Awaitable[None]] | None = None, **args: Any) -> dict[str, Any]:
    """Send `op` to the control plane and wait up to `timeout_s` for its reply.

    `progress(seconds_waited)`, if given, is awaited between blocking reads (each <= MAX_BLOCK_S) so
    a caller can show what the wait is for. Raises `ControlPlaneError` with the refusal's message
    (not recoverable), or a recoverable one when no control plane is there or none answers in time.
    """
    if await control_plane_info(client) is None:
        raise ControlPlaneError(
            "no cornserve control plane is serving this Redis: start one with `cornserve up` "
            "(or leave CORNSERVE_REDIS_URL unset to let `pyflyte run` start the embedded stack)", recoverable=True,
        )
    request_id = uuid.uuid4().hex
    await client.lpush(requests_key(), json.dumps({"id": request_id, "op": op, "args": args}))
    started = time.monotonic()
    while (waited := time.monotonic() - started) < timeout_s:
        reply = await client.blpop([reply_key(request_id)], timeout=min(MAX_BLOCK_S, timeout_s - waited))
        if reply is not None:
            answer = json.loads(reply[1])
            if not answer.get("ok"):
                raise ControlPlaneError(answer.get("error", "the control plane refused the request"))
            return answer
        if progress is not None:
            await progress(time.monotonic() - started)
        if await control_plane_info(client) is None:
            raise ControlPlaneError("the cornserve control plane went away before it answered", recoverable=True)
    raise ControlPlaneError(f"the control plane did not answer {op!r} within {timeout_s:g} s", recoverable=True)
