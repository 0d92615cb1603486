"""How clients (the connector, the CLI) talk to the control plane, through Redis.

Requests go on one list that the control plane pops; each request names its own reply list, which
the client blocks on. So clients need nothing but the Redis URL, and the control plane can run in
the embedded stack's daemon or as a Kubernetes Deployment alike. Deployments are Redis hashes the
control plane writes and anyone reads (routing, `cornserve status`). JSON only, never pickle.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import redis.asyncio as aioredis

from .invocations import MAX_BLOCK_S, _text

REQUESTS_KEY = "cornserve:control:requests"
CONTROL_PLANE_KEY = "cornserve:control-plane"  # liveness of the control plane: {pid, host, started_at}
DEPLOYMENTS_KEY = "cornserve:deployments"  # set of deployment ids
DEPLOYMENT_EVENTS_KEY = "cornserve:deployments:events"  # stream: {deployment, event, detail}
DEPLOYMENT_EVENTS_MAXLEN = 1000
REPLY_TTL_S = 300


def deployment_key(deployment_id: str) -> str:
    return f"cornserve:deployment:{deployment_id}"


def reply_key(request_id: str) -> str:
    return f"cornserve:control:reply:{request_id}"


class ControlPlaneError(RuntimeError):
    """The control plane refused a request (e.g. a deployment that does not fit) or is not there."""


class DeploymentState(str, Enum):
    DEPLOYING = "DEPLOYING"  # executors starting (loading models)
    READY = "READY"  # at least one executor serves its queue
    STOPPING = "STOPPING"  # undeployed or idle past its TTL; gone once its executors stopped


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

    def to_redis(self) -> dict[str, str]:
        fields = asdict(self)
        fields["state"] = self.state.value
        return {name: json.dumps(value) for name, value in fields.items()}

    @classmethod
    def from_redis(cls, fields: dict[bytes, bytes]) -> Deployment:
        values = {_text(k): json.loads(v) for k, v in fields.items()}
        values["state"] = DeploymentState(values["state"])
        return cls(**values)


async def load_deployment(client: aioredis.Redis, deployment_id: str) -> Deployment | None:
    fields = await client.hgetall(deployment_key(deployment_id))
    return Deployment.from_redis(fields) if fields else None


async def list_deployments(client: aioredis.Redis) -> list[Deployment]:
    found = []
    for deployment_id in sorted(_text(d) for d in await client.smembers(DEPLOYMENTS_KEY)):
        deployment = await load_deployment(client, deployment_id)
        if deployment is not None:
            found.append(deployment)
    return found


async def touch(client: aioredis.Redis, deployment_id: str) -> None:
    """Record use now (the idle TTL counts from the last use)."""
    await client.hset(deployment_key(deployment_id), "last_used", json.dumps(time.time()))


async def control_plane_info(client: aioredis.Redis) -> dict[str, Any] | None:
    raw = await client.get(CONTROL_PLANE_KEY)
    return json.loads(raw) if raw else None


async def request(client: aioredis.Redis, op: str, timeout_s: float,
                  progress: Callable[[float], Awaitable[None]] | None = None, **args: Any) -> dict[str, Any]:
    """Send `op` to the control plane and wait up to `timeout_s` for its reply.

    `progress(seconds_waited)`, if given, is awaited between blocking reads (each <= MAX_BLOCK_S) so
    a caller can show what the wait is for. Raises `ControlPlaneError` with the refusal's message.
    """
    if await control_plane_info(client) is None:
        raise ControlPlaneError(
            "no cornserve control plane is serving this Redis: start one with `cornserve up` "
            "(or leave CORNSERVE_REDIS_URL unset to let `pyflyte run` start the embedded stack)"
        )
    request_id = uuid.uuid4().hex
    await client.lpush(REQUESTS_KEY, json.dumps({"id": request_id, "op": op, "args": args}))
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
            raise ControlPlaneError("the cornserve control plane went away before it answered")
    raise ControlPlaneError(f"the control plane did not answer {op!r} within {timeout_s:g} s")
