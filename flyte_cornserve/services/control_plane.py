"""The control plane: answers deploy / undeploy requests, runs the task manager's periodic look and
the batch runner, and serves its Prometheus metrics (`plane_metrics`; advertised in Redis under
`control-plane`, see `flyte_cornserve.metrics`).

One control plane serves one Redis (it holds `cornserve:control-plane` with a short TTL while it
lives; a second one refuses to start). One that finds the key held by another (it was frozen or cut
off from Redis past the TTL, and a second one started meanwhile) has been replaced: it stops the
executors and the sidecar it started, leaves Redis to the new one (which restarts what is deployed:
`TaskManager.recover`), and exits. It runs in the embedded stack's daemon (`cornserve up`) or,
in production, as its own service; clients reach it only through Redis (`control.request`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from prometheus_client import CollectorRegistry

from flyte_cornserve import metrics
from flyte_cornserve.protocol.invocations import MAX_BLOCK_S, _text

from .backend import ExecutorBackend
from .batch_runner import DEFAULT_MAX_IN_FLIGHT, BatchRunner
from .control import control_plane_key, REPLY_TTL_S, requests_key, reply_key
from .plane_metrics import ControlPlaneCollector
from .resources import ResourceManager
from .task_manager import TaskManager

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
RECONCILE_S = 1.0
#: refresh the liveness key only while it is ours (or gone): else return who holds it
_REFRESH = """
local current = redis.call('GET', KEYS[1])
if current and not string.find(current, ARGV[2], 1, true) then return current end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return false
"""
#: replace the control plane key only if it still holds what we read (two starting at once: one wins)
_TAKE_OVER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return false
"""


class ControlPlane:
    def __init__(self, client: aioredis.Redis, backend: ExecutorBackend, idle_ttl_s: float = 1800.0,
                 batch_in_flight: int = DEFAULT_MAX_IN_FLIGHT, metrics_port: int = 0,
                 restarts: dict[str, float] | None = None) -> None:
        """`restarts`: the task manager's restart_limit, restart_window_s, restart_backoff_s."""
        self.redis = client
        self.metrics_port = metrics_port  # 0: a free port; the bound one once serving
        self._metrics: metrics.MetricsServer | None = None
        self._metrics_since = time.time()
        self.backend = backend
        self.resources = ResourceManager(backend.nodes())
        self.tasks = TaskManager(client, backend, self.resources, idle_ttl_s, **(restarts or {}))
        self.tasks.on_change = self._publish
        self.batches = BatchRunner(client, self.tasks, max_in_flight=batch_in_flight)
        self._stopping = asyncio.Event()
        self._handlers: set[asyncio.Task] = set()
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(),
                     "idle_ttl_s": idle_ttl_s, "batch_in_flight": batch_in_flight, "nodes": self.resources.usage(),
                     "sidecars": {node: backend.sidecar_id(node) for node in self.resources.nodes},
                     "executor_log": backend.log_template(), "token": uuid.uuid4().hex}
        self._superseded = False  # another control plane took the liveness key (this one was frozen or cut off)
        self._keep_executors = False

    def request_stop(self, keep_executors: bool = False) -> None:
        """Stop serving; then stop every deployment, or with `keep_executors` (a backend whose
        executors outlive this process) leave them running for the next control plane to adopt."""
        self._keep_executors = keep_executors
        self._stopping.set()

    async def run(self, on_ready=None) -> None:
        """Serve until `request_stop()` (or a `shutdown` request); then stop every deployment."""
        if not await self.redis.set(control_plane_key(), json.dumps(self.info), nx=True, px=int(HEARTBEAT_S * 3000)):
            other = await self.redis.get(control_plane_key())
            if not (other is not None and _dead_here(other)
                    and await self.redis.eval(_TAKE_OVER, 1, control_plane_key(), other, json.dumps(self.info),
                                              int(HEARTBEAT_S * 3000))):
                raise RuntimeError(f"another cornserve control plane already serves this Redis: {other!r}")
            log.warning("took over from a control plane that died on this host: %s", other)
        try:  # what the Redis says was deployed: executors that no longer run are started again
            await self.tasks.recover()
        except BaseException:
            await self.redis.delete(control_plane_key())
            raise
        registry = CollectorRegistry()
        registry.register(ControlPlaneCollector(self.redis, asyncio.get_running_loop()))
        try:
            self._metrics = metrics.serve(registry, self.metrics_port)
        except BaseException:
            await self.redis.delete(control_plane_key())
            raise
        self.metrics_port = self._metrics.port
        await self._advertise()
        background = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._reconcile()),
                      asyncio.create_task(self.batches.run(), name="batch runner")]
        log.info("control plane ready (pid %d, nodes %s)", os.getpid(), self.resources.usage())
        if on_ready is not None:
            on_ready()
        try:
            await self._serve()
        finally:
            self.batches.request_stop()  # its state is in Redis: a later control plane resumes its batches
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if self._superseded:  # the deployments, the key and the entry are the other one's: only our children stop
                await self.tasks.abandon()
            elif self._keep_executors:  # e.g. the pod restarts: the next control plane adopts them
                await self.tasks.detach()
            else:
                await self.tasks.stop_all()
            await self.backend.close()
            if not self._superseded:
                await metrics.withdraw(self.redis, "control-plane")
                await self.redis.delete(control_plane_key())
            self._metrics.close()
            log.info("control plane stopped" + (" (replaced: the executors and the sidecar it started are stopped)"
                                                if self._superseded else ""))

    async def _serve(self) -> None:
        backoff = 0.0
        while not self._stopping.is_set():
            try:
                popped = await self.redis.blpop([requests_key()], timeout=min(MAX_BLOCK_S, 1.0))
            except RedisError as exc:  # Redis away beyond the client's retries: weather, wait and go on
                backoff = min(max(2 * backoff, 0.1), 5.0)
                log.warning("reading control requests failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)  # the retry's backoff
                continue
            backoff = 0.0
            if popped is None:
                continue
            if not await self._still_ours():  # popped by a replaced control plane: the new one answers it
                await self.redis.lpush(requests_key(), popped[1])  # back at the head: the next one popped
                return
            try:
                request = json.loads(popped[1])
            except json.JSONDecodeError:
                log.error("dropped a malformed control request: %r", popped[1][:200])
                continue
            handler = asyncio.create_task(self._answer(request))
            self._handlers.add(handler)
            handler.add_done_callback(self._handlers.discard)

    async def _answer(self, request: dict) -> None:
        op, args = request.get("op"), request.get("args") or {}
        try:
            if op == "deploy":
                replicas = int(args["replicas"]) if args.get("replicas") else None  # None: the task's bounds
                deployment = await self.tasks.deploy(args["task"], replicas, bool(args.get("wait", True)))
                reply = {"ok": True, "deployment": deployment.id, "state": deployment.state.value}
            elif op == "undeploy":
                found = await self.tasks.undeploy(args["deployment_id"], "undeployed on request")
                reply = {"ok": True, "found": found}
            elif op == "shutdown":
                self.request_stop()
                reply = {"ok": True}
            else:
                reply = {"ok": False, "error": f"unknown control request {op!r}"}
        except Exception as exc:  # refusals and failures go back to the caller, the control plane lives on
            log.warning("control request %s failed: %s", op, exc)
            reply = {"ok": False, "error": str(exc)}
        if request.get("id"):
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.lpush(reply_key(request["id"]), json.dumps(reply))
                    pipe.expire(reply_key(request["id"]), REPLY_TTL_S)
                    await pipe.execute()
            except RedisError as exc:  # the caller times out and may ask again
                log.warning("replying to control request %s failed: %s", op, exc)

    # Both loops also end on `_stopping`: redis-py 8 can swallow a cancellation that lands mid-command.

    async def _heartbeat(self) -> None:
        while not self._stopping.is_set():
            await asyncio.sleep(HEARTBEAT_S)  # the heartbeat period (also the backoff after a failure)
            try:
                await self._publish()
            except RedisError as exc:  # Redis away beyond the client's retries: the next beat
                log.warning("control plane heartbeat failed (%s)", exc)
            except Exception:  # a bug: logged, the heartbeat goes on
                log.exception("control plane heartbeat failed")

    async def _publish(self) -> None:
        """Refresh the liveness key, with the nodes' current usage, if it is still ours (or gone, as
        after a Redis outage longer than its TTL). Held by another control plane (it started while
        this one was frozen or could not reach Redis): this one stops its children and exits, leaving
        that one's key and deployments be."""
        if self._superseded:
            return
        self.info["nodes"] = self.resources.usage()
        other = await self.redis.eval(_REFRESH, 1, control_plane_key(), json.dumps(self.info), self.info["token"],
                                      int(HEARTBEAT_S * 3000))
        if other:
            self._replaced(other)
            return
        await self._advertise()  # again each beat: the entry outlives a Redis restart

    async def _still_ours(self) -> bool:
        """Whether the liveness key is still this control plane's (or gone, as in a Redis outage);
        if another holds it, this one was replaced and stops (`_replaced`)."""
        if self._superseded:
            return False
        try:
            current = await self.redis.get(control_plane_key())
        except RedisError:
            return True  # cannot tell: the heartbeat decides once Redis answers
        if current is not None and self.info["token"] not in _text(current):
            self._replaced(current)
        return not self._superseded

    def _replaced(self, other: bytes | str) -> None:
        if self._superseded:  # the heartbeat and a look found it at once
            return
        self._superseded = True
        log.error("this control plane (pid %d) was replaced: another control plane holds this Redis (%s), which "
                  "happens when this one was frozen or could not reach Redis for longer than its liveness key's TTL; "
                  "stopping the executors and the sidecar it started, and exiting", os.getpid(), _text(other))
        self.request_stop()

    async def _advertise(self) -> None:
        if self._metrics is not None:
            await metrics.advertise(self.redis, metrics.endpoint("control-plane", "control-plane", self._metrics,
                                                                 control_plane_key(), self._metrics_since))

    async def _reconcile(self) -> None:
        while not self._stopping.is_set():
            await asyncio.sleep(RECONCILE_S)  # the look's period: liveness and idle TTLs are checked this often
            try:
                if not await self._still_ours():  # a replaced one changes no deployment
                    return
                await self.tasks.reconcile()
            except Exception:
                log.exception("reconcile failed; trying again next period")


def _dead_here(holder: bytes) -> bool:
    """The control plane key names a process of this host that no longer runs (it crashed less than
    the key's TTL ago): a new control plane need not wait for the key to expire."""
    from .stack import process_alive

    try:
        info = json.loads(holder)
        return info["host"] == socket.gethostname() and not process_alive(int(info["pid"]))
    except (ValueError, KeyError, TypeError):
        return False
