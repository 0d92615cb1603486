"""The task manager: keeps each deployed unit task's executors running, and no longer than needed.

A deployment is one unit-task configuration (its `deployment_id`): equivalent unit tasks of any
workflow share it. On first use it reserves resources (refusing what does not fit), starts the
node's sidecar and the executors, and is READY once they serve. An executor that dies is restarted
(the new one takes over the dead one's queue entries); a deployment with nothing queued or running
for `idle_ttl_s` is stopped and its resources are freed. The deployment's record in Redis is what
clients and `cornserve status` see.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from flyte_cornserve.descriptors import descriptor_for
from flyte_cornserve.task import UnitTask, unit_task_from_json

from .backend import ExecutorBackend, ExecutorHandle, ExecutorSpec, ExecutorStartError
from .control import (
    DEPLOYMENT_EVENTS_KEY,
    DEPLOYMENT_EVENTS_MAXLEN,
    DEPLOYMENTS_KEY,
    Deployment,
    DeploymentState,
    deployment_key,
    executor_phase,
    phase_message,
    phases_key,
)
from .invocations import ErrorKind, InvocationStore, State, _text, queue_keys
from .resources import ResourceManager

log = logging.getLogger(__name__)

STOP_GRACE_S = 60.0


def describe(task: UnitTask) -> str:
    """A short label for people: the class and its model, e.g. "LLMTask tiny-llava"."""
    model = getattr(task, "model_id", None)
    return f"{type(task).__name__} {model}" if model else type(task).__name__


@dataclass
class ManagedDeployment:
    record: Deployment
    task: UnitTask
    executors: dict[str, ExecutorHandle] = field(default_factory=dict)
    ready: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    stopping: bool = False
    watchers: set[asyncio.Task] = field(default_factory=set)
    gone: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class TaskManager:
    def __init__(self, client: aioredis.Redis, backend: ExecutorBackend, resources: ResourceManager,
                 idle_ttl_s: float) -> None:
        self.redis = client
        self.store = InvocationStore(client)
        self.backend = backend
        self.resources = resources
        self.idle_ttl_s = idle_ttl_s
        self.deployments: dict[str, ManagedDeployment] = {}
        #: awaited before each deployment event is published (the control plane refreshes what it shows)
        self.on_change: Callable[[], Awaitable[None]] | None = None

    # -- deploy / undeploy --------------------------------------------------------------------------

    async def deploy(self, task_json: str, replicas: int = 1, wait: bool = True) -> Deployment:
        """Deploy the unit task (or join its existing deployment); return once it is READY, or at
        once if not `wait` (it was admitted: it fits; invocations may queue meanwhile)."""
        task = unit_task_from_json(task_json)
        deployment_id = task.deployment_id()
        managed = self.deployments.get(deployment_id)
        if managed is None or managed.stopping:
            if managed is not None:  # an idle stop in progress: let it finish, then deploy afresh
                await asyncio.shield(managed.gone)
                return await self.deploy(task_json, replicas, wait)
            managed = self._admit(task, replicas)
            asyncio.create_task(self._start(managed))
        managed.record.last_used = time.time()
        if wait:
            await asyncio.shield(managed.ready)
        return managed.record

    def _admit(self, task: UnitTask, replicas: int) -> ManagedDeployment:
        """Reserve resources for every replica (all or nothing) and create the DEPLOYING record."""
        descriptor = descriptor_for(task)
        deployment_id = task.deployment_id()
        label = describe(task)
        executor_ids = [f"{deployment_id[:24]}-{uuid.uuid4().hex[:6]}" for _ in range(replicas)]
        nodes = []
        try:
            for executor_id in executor_ids:
                nodes.append(self.resources.reserve(executor_id, descriptor.resources(),
                                                    f"deployment {deployment_id} ({label})"))
        except Exception:
            for executor_id in executor_ids:
                self.resources.release(executor_id)
            raise
        now = time.time()
        record = Deployment(
            id=deployment_id, label=label, task=task.to_json(), executor_kind=descriptor.executor,
            resources=descriptor.resources().model_dump(mode="json"), state=DeploymentState.DEPLOYING,
            replicas=replicas, node=nodes[0].name, message="starting executors", executors=executor_ids,
            created_at=now, last_used=now,
        )
        managed = ManagedDeployment(record, task)
        self.deployments[deployment_id] = managed
        return managed

    async def _start(self, managed: ManagedDeployment) -> None:
        record = managed.record
        await self._save(record, with_last_used=True)
        try:
            await self.backend.ensure_sidecar(record.node)
            handles = [await self._launch(managed, executor_id) for executor_id in record.executors]
            await asyncio.gather(*(handle.ready() for handle in handles))
        except Exception as exc:
            message = str(exc) if isinstance(exc, ExecutorStartError) else f"{type(exc).__name__}: {exc}"
            log.error("deployment %s (%s) failed to start: %s", record.id, record.label, message)
            await self._teardown(managed, f"deployment {record.id} ({record.label}) failed to start: {message}",
                                 ErrorKind.USER)
            managed.ready.set_exception(RuntimeError(f"deployment {record.id} ({record.label}) failed to start: {message}"))
            managed.ready.exception()  # retrieved here too: nobody may be waiting
            return
        record.state, record.message, record.phase_since = DeploymentState.READY, "", 0.0
        await self._save(record)
        await self._event(record, "ready", ",".join(record.executors))
        log.info("deployment %s (%s) ready with %d executor(s)", record.id, record.label, len(handles))
        managed.ready.set_result(None)

    async def _launch(self, managed: ManagedDeployment, executor_id: str) -> ExecutorHandle:
        record = managed.record
        handle = await self.backend.start_executor(
            ExecutorSpec(executor_id, record.id, record.task, record.node, descriptor_for(managed.task).resources())
        )
        managed.executors[executor_id] = handle
        watcher = asyncio.create_task(self._watch(managed, handle))
        managed.watchers.add(watcher)
        watcher.add_done_callback(managed.watchers.discard)
        return handle

    async def _watch(self, managed: ManagedDeployment, handle: ExecutorHandle) -> None:
        """Restart the executor if it exits while its deployment is meant to run."""
        code = await handle.exited()
        if managed.stopping or not managed.ready.done() or managed.ready.exception() is not None:
            return  # stopping on purpose, or still starting (the start reports that failure)
        record = managed.record
        managed.executors.pop(handle.id, None)
        self.resources.release(handle.id)
        replacement = f"{record.id[:24]}-{uuid.uuid4().hex[:6]}"
        log.warning("executor %s of %s (%s) exited with code %s; restarting it as %s",
                    handle.id, record.id, record.label, code, replacement)
        record.executors = [replacement if e == handle.id else e for e in record.executors]
        record.restarts += 1
        record.message = f"executor {handle.id} exited with code {code}; restarted as {replacement}"
        try:
            self.resources.reserve(replacement, descriptor_for(managed.task).resources(), f"restart of {record.id}")
            await self._save(record)
            await self._event(record, "executor-exited", f"{handle.id} code={code}")
            new = await self._launch(managed, replacement)
            await new.ready()
            await self._event(record, "executor-restarted", replacement)
        except Exception as exc:
            log.error("could not restart an executor of %s: %s", record.id, exc)
            record.message = f"could not restart executor {handle.id}: {exc}"
            await self._save(record)

    async def undeploy(self, deployment_id: str, reason: str = "undeployed") -> bool:
        """Stop the deployment's executors (they finish what they run) and free its resources."""
        managed = self.deployments.get(deployment_id)
        if managed is None:
            return False
        if managed.stopping:
            await asyncio.shield(managed.gone)
            return True
        managed.stopping = True
        record = managed.record
        record.state, record.message = DeploymentState.STOPPING, reason
        await self._save(record)
        log.info("stopping deployment %s (%s): %s", record.id, record.label, reason)
        await asyncio.gather(*(self.backend.stop_executor(h, STOP_GRACE_S) for h in list(managed.executors.values())))
        await self._teardown(managed, f"deployment {record.id} ({record.label}) was stopped ({reason}) before "
                                      f"this invocation ran", ErrorKind.RECOVERABLE)
        return True

    async def _teardown(self, managed: ManagedDeployment, error: str, kind: ErrorKind) -> None:
        """Free the resources, drop the record, and fail what is still queued (nobody will run it)."""
        managed.stopping = True
        record = managed.record
        for executor_id in {*record.executors, *managed.executors}:
            self.resources.release(executor_id)
        if self.deployments.get(record.id) is managed:
            del self.deployments[record.id]
        queues = queue_keys(record.id)
        for queue in queues:
            for _, fields in await self.redis.xrange(queue):
                invocation_id = _text(fields[b"id"])
                await self.store.transition(invocation_id, State.ERROR, allowed={State.QUEUED, State.RUNNING},
                                            error=error, error_kind=kind.value, finished_at=repr(time.time()))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(deployment_key(record.id), phases_key(record.id), *queues)
            pipe.srem(DEPLOYMENTS_KEY, record.id)
            await pipe.execute()
        await self._event(record, "stopped", error)
        if not managed.gone.done():
            managed.gone.set_result(None)

    # -- the periodic look -------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Keep the sidecar up, note which deployments are busy, stop those idle past the TTL."""
        now = time.time()
        for managed in list(self.deployments.values()):
            record = managed.record
            if record.state is DeploymentState.DEPLOYING and managed.executors:
                await self._show_start_progress(managed)
            if managed.stopping or record.state is not DeploymentState.READY:
                continue
            await self.backend.ensure_sidecar(record.node)
            if await self.store.backlog(record.id):
                record.last_used = now  # queued or running work: busy
            stored = await self.redis.hget(deployment_key(record.id), "last_used")  # clients touch it
            if stored is not None:
                record.last_used = max(record.last_used, float(stored))
            if now - record.last_used > self.idle_ttl_s:
                asyncio.create_task(self.undeploy(record.id, f"idle for more than {self.idle_ttl_s:g} s"))

    async def _show_start_progress(self, managed: ManagedDeployment) -> None:
        """While executors start, the first executor's start-up phase ("loading weights") is the
        deployment's message and `phase_since` when it began (what `cornserve status` shows). The
        replicas of a deployment do the same work; the deployment is READY once all of them are."""
        record = managed.record
        shown = phase_message(await executor_phase(self.redis, record.id, record.executors[0]))
        if (shown is not None and shown != (record.message, record.phase_since)
                and record.state is DeploymentState.DEPLOYING):  # still: READY may have come meanwhile
            record.message, record.phase_since = shown
            await self.redis.hset(deployment_key(record.id), mapping={
                "message": json.dumps(record.message), "phase_since": json.dumps(record.phase_since)})

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.undeploy(d, "the stack is shutting down") for d in list(self.deployments)))

    async def _event(self, record: Deployment, event: str, detail: str = "") -> None:
        """Append to the deployments' event stream (what `cornserve status` and tests can follow)."""
        if self.on_change is not None:
            await self.on_change()
        await self.redis.xadd(DEPLOYMENT_EVENTS_KEY, {"deployment": record.id, "event": event, "detail": detail},
                              maxlen=DEPLOYMENT_EVENTS_MAXLEN, approximate=True)

    async def _save(self, record: Deployment, with_last_used: bool = False) -> None:
        """Write the record; `last_used` only at creation, afterwards clients own it (`touch`)."""
        mapping = record.to_redis()
        if not with_last_used:
            del mapping["last_used"]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(deployment_key(record.id), mapping=mapping)
            pipe.sadd(DEPLOYMENTS_KEY, record.id)
            await pipe.execute()
