"""The task manager: keeps each deployed unit task's executors running, and no longer than needed.

A deployment is one unit-task configuration (its `deployment_id`): equivalent unit tasks of any
workflow share it. On first use it reserves resources (refusing what does not fit), starts the
node's sidecar and the executors, and is READY once they serve. An executor that dies is restarted
(the new one takes over the dead one's queue entries); a deployment with nothing queued or running
for `idle_ttl_s` is stopped and its resources are freed. Between its task's `Replicas` bounds it
gains an executor while its backlog per executor is long, and loses one each time it has been idle
for the bounds' `idle_s` (`_scale`). The deployment's record in Redis is what clients and `cornserve
status` see.
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
from flyte_cornserve.protocol.deployments import DEPLOYMENT_EVENTS_MAXLEN, deployment_events_key, executor_key, phases_key
from flyte_cornserve.protocol.invocations import ErrorKind, InvocationStore, State, _text, queue_keys
from flyte_cornserve.task import Replicas, Resources, UnitTask, unit_task_from_json

from .backend import ExecutorBackend, ExecutorHandle, ExecutorSpec, ExecutorStartError
from .control import (
    deployments_key,
    Deployment,
    DeploymentState,
    deployment_key,
    executor_phase,
    load_deployment,
    phase_message,
)
from .resources import InsufficientResources, ResourceManager

log = logging.getLogger(__name__)

STOP_GRACE_S = 60.0
#: an executor that exits this many times within RESTART_WINDOW_S fails its deployment
RESTART_LIMIT = 5
RESTART_WINDOW_S = 300.0
#: the wait before the n-th restart within the window: RESTART_BACKOFF_S * 2**(n-1), at most RESTART_BACKOFF_MAX_S
RESTART_BACKOFF_S = 1.0
RESTART_BACKOFF_MAX_S = 30.0
#: seconds a FAILED deployment's record stays (for `cornserve status` to show why), unless undeployed or deployed again
FAILED_TTL_S = 3600


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
    #: when its executors exited (monotonic), within the restart window
    exits: list[float] = field(default_factory=list)
    #: executors added by scaling that do not serve yet, and executors being stopped by scaling
    starting: set[str] = field(default_factory=set)
    retiring: set[str] = field(default_factory=set)
    #: when (monotonic) it last had a backlog, and when scaling last changed its executors
    busy_at: float = field(default_factory=time.monotonic)
    scaled_at: float = field(default_factory=time.monotonic)
    #: why the last scale-up did not fit (logged once, not every look)
    no_room: str = ""
    #: executors that exited and are being replaced (`_watch`)
    restarting: int = 0

    @property
    def scaling(self) -> Replicas:
        return Replicas.model_validate(self.record.scaling)


class TaskManager:
    def __init__(self, client: aioredis.Redis, backend: ExecutorBackend, resources: ResourceManager,
                 idle_ttl_s: float, restart_limit: int = RESTART_LIMIT, restart_window_s: float = RESTART_WINDOW_S,
                 restart_backoff_s: float = RESTART_BACKOFF_S) -> None:
        self.redis = client
        self.restart_limit = restart_limit
        self.restart_window_s = restart_window_s
        self.restart_backoff_s = restart_backoff_s
        self.store = InvocationStore(client)
        self.backend = backend
        self.resources = resources
        self.idle_ttl_s = idle_ttl_s
        self.deployments: dict[str, ManagedDeployment] = {}
        self.abandoned = False  # the control plane was replaced: the deployments' records are another's
        #: awaited before each deployment event is published (the control plane refreshes what it shows)
        self.on_change: Callable[[], Awaitable[None]] | None = None

    # -- deploy / undeploy --------------------------------------------------------------------------

    async def deploy(self, task_json: str, replicas: int | None = None, wait: bool = True) -> Deployment:
        """Deploy the unit task (or join its existing deployment); return once it is READY, or at
        once if not `wait` (it was admitted: it fits; invocations may queue meanwhile). `replicas`
        fixes the executor count; else the task's `replicas` bounds apply (the latest request's)."""
        task = unit_task_from_json(task_json)
        scaling = Replicas.fixed(replicas) if replicas else task.replicas
        deployment_id = task.deployment_id()
        managed = self.deployments.get(deployment_id)
        if managed is None or managed.stopping:
            if managed is not None:  # an idle stop in progress: let it finish, then deploy afresh
                await asyncio.shield(managed.gone)
                return await self.deploy(task_json, replicas, wait)
            # at least one executor to start with: a deploy request means work is coming
            managed = self._admit(task, scaling, max(scaling.min, 1))
            asyncio.create_task(self._start(managed))
        elif managed.scaling != scaling:
            log.info("deployment %s (%s): replicas now %s (were %s)", deployment_id, managed.record.label,
                     scaling.model_dump(), managed.record.scaling)
            managed.record.scaling = scaling.model_dump(mode="json")
            await self._save(managed.record)
        managed.record.last_used = time.time()
        if wait:
            await asyncio.shield(managed.ready)
        return managed.record

    def _admit(self, task: UnitTask, scaling: Replicas, count: int,
               adopted: dict[str, ExecutorHandle] | None = None) -> ManagedDeployment:
        """Reserve resources for `count` executors, the `adopted` ones (still running) among them,
        all or nothing, and create the DEPLOYING record."""
        descriptor = descriptor_for(task)
        deployment_id = task.deployment_id()
        label = describe(task)
        adopted = adopted or {}
        executor_ids = [*adopted, *(_new_executor_id(deployment_id) for _ in range(count - len(adopted)))]
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
            replicas=len(executor_ids), node=nodes[0].name if nodes else self.resources.home(descriptor.resources()).name,
            message="starting executors", executors=executor_ids, created_at=now, last_used=now,
            scaling=scaling.model_dump(mode="json"),
        )
        managed = ManagedDeployment(record, task, executors=dict(adopted))
        self.deployments[deployment_id] = managed
        return managed

    async def _start(self, managed: ManagedDeployment) -> None:
        record = managed.record
        await self._save(record, with_last_used=True)
        try:
            await self.backend.ensure_sidecar(record.node)
            handles = list(managed.executors.values())  # adopted: they may serve already
            for handle in handles:
                self._watch_later(managed, handle)
            handles += [await self._launch(managed, executor_id) for executor_id in record.executors
                        if executor_id not in managed.executors]
            await asyncio.gather(*(handle.ready() for handle in handles))
        except Exception as exc:
            if self.abandoned:  # stopped by `abandon()`: the record is the new control plane's
                return
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

    async def _launch(self, managed: ManagedDeployment, executor_id: str, watch: bool = True) -> ExecutorHandle:
        record = managed.record
        handle = await self.backend.start_executor(ExecutorSpec(
            executor_id, record.id, record.task, self.resources.node_of(executor_id) or record.node,
            descriptor_for(managed.task).resources(),
        ))
        managed.executors[executor_id] = handle
        if watch:
            self._watch_later(managed, handle)
        return handle

    def _watch_later(self, managed: ManagedDeployment, handle: ExecutorHandle) -> None:
        watcher = asyncio.create_task(self._watch(managed, handle))
        managed.watchers.add(watcher)
        watcher.add_done_callback(managed.watchers.discard)

    async def _watch(self, managed: ManagedDeployment, handle: ExecutorHandle) -> None:
        """Restart the executor whenever it exits while its deployment is meant to run: after a wait
        that doubles with each exit within the restart window; the `restart_limit`-th exit within the
        window fails the deployment with the end of the executor's log. A replacement that does not
        start counts as an exit; its id never stays in the record."""
        while True:
            code = await handle.exited()
            if (managed.stopping or handle.id in managed.retiring or not managed.ready.done()
                    or managed.ready.exception() is not None):
                return  # stopped on purpose (all, or scaled down), or still starting (the start reports that)
            managed.restarting += 1  # scaling waits: this executor is being replaced, not missing
            try:
                replaced = await self._replace(managed, handle, code)
            finally:
                managed.restarting -= 1
            if replaced is None:
                return
            handle = replaced

    async def _replace(self, managed: ManagedDeployment, handle: ExecutorHandle, code: int) -> ExecutorHandle | None:
        """`_watch`'s restart of the exited `handle`: the handle to watch next (the replacement, or
        one that exited before it served), or None once there is nothing more to watch."""
        record = managed.record
        managed.executors.pop(handle.id, None)
        self.resources.release(handle.id)
        record.executors = [e for e in record.executors if e != handle.id]
        managed.starting.discard(handle.id)  # a scale-up that exited before it served
        now = time.monotonic()
        managed.exits = [t for t in managed.exits if now - t < self.restart_window_s] + [now]
        exits = len(managed.exits)
        if exits >= self.restart_limit:
            log.error("executor %s of %s (%s) exited with code %s, %d times within %g s: failing the deployment",
                      handle.id, record.id, record.label, code, exits, self.restart_window_s)
            await self._event(record, "executor-exited", f"{handle.id} code={code}")
            await self.fail(managed, f"deployment {record.id} ({record.label}) failed: its executor exited {exits} "
                                     f"times within {self.restart_window_s:g} s (last: {handle.id}, code {code}); "
                                     f"the end of its log:\n{handle.log_tail()}")
            return None
        delay = min(self.restart_backoff_s * 2 ** (exits - 1), RESTART_BACKOFF_MAX_S)
        log.warning("executor %s of %s (%s) exited with code %s; restarting it in %g s",
                    handle.id, record.id, record.label, code, delay)
        record.message = f"executor {handle.id} exited with code {code}; restarting in {delay:g} s"
        await self._save(record)
        await self._event(record, "executor-exited", f"{handle.id} code={code}")
        try:
            await asyncio.wait_for(asyncio.shield(managed.gone), delay)
        except TimeoutError:
            pass
        if managed.stopping:
            return None
        replacement = _new_executor_id(record.id)
        try:
            self.resources.reserve(replacement, descriptor_for(managed.task).resources(), f"restart of {record.id}")
            record.executors.append(replacement)
            record.restarts += 1
            record.message = f"executor {handle.id} exited with code {code}; restarted as {replacement}"
            await self._save(record)
            handle = await self._launch(managed, replacement, watch=False)
            await handle.ready()
        except Exception as exc:
            log.error("could not restart an executor of %s: %s", record.id, exc)
            if replacement not in managed.executors:  # it never started: nothing will exit
                self.resources.release(replacement)
                record.executors = [e for e in record.executors if e != replacement]
                await self._save(record)
                await self.fail(managed, f"deployment {record.id} ({record.label}) failed: could not restart "
                                         f"its executor: {exc}")
                return None
            return handle  # it exited before it served: counts as an exit
        await self._event(record, "executor-restarted", replacement)
        return handle

    async def fail(self, managed: ManagedDeployment, message: str) -> None:
        """The deployment cannot run: stop its other executors, fail what is queued (a user error,
        with `message`), and leave the record FAILED with no executors; a later deploy starts afresh."""
        managed.stopping = True
        await asyncio.gather(*(self.backend.stop_executor(h, STOP_GRACE_S) for h in list(managed.executors.values())))
        await self._teardown(managed, message, ErrorKind.USER, failed=True)

    async def recover(self) -> None:
        """Start again what Redis says is deployed, at the control plane's start: a control plane that
        died left its records. Each DEPLOYING or READY deployment keeps the executors the backend can
        adopt (pods outlive their control plane; local processes died with it: `backend.guarded`) and
        gets new ones for the rest (their queued invocations are then served; the new executors take
        over the dead ones' entries); one that cannot be started (it no longer fits, its task class is
        unknown) is FAILED and its queued invocations fail with the reason. A STOPPING one is
        finished. Executors that still heartbeat but were not adopted are not ours to stop: they are
        left running and serve the same queues until they exit."""
        for deployment_id in sorted(_text(d) for d in await self.redis.smembers(deployments_key())):
            if deployment_id in self.deployments:
                continue
            record = await load_deployment(self.redis, deployment_id)
            if record is None:
                await self.redis.srem(deployments_key(), deployment_id)
                continue
            if record.state is DeploymentState.FAILED:
                if await self.redis.ttl(deployment_key(deployment_id)) == -1:  # written before FAILED ones expired
                    await self.redis.expire(deployment_key(deployment_id), FAILED_TTL_S)
                continue
            adopted = await self._adopt(record)
            alive = [e for e in record.executors if e not in adopted and await self.redis.exists(executor_key(e))]
            if alive:
                log.warning("deployment %s (%s): executor(s) %s of the previous control plane still heartbeat; "
                            "left running", record.id, record.label, ", ".join(alive))
            if record.state is DeploymentState.STOPPING:
                await self._teardown(ManagedDeployment(record, None), f"deployment {record.id} ({record.label}) was "  # type: ignore[arg-type]
                                     f"stopped before this invocation ran", ErrorKind.RECOVERABLE)
                continue
            try:
                task = unit_task_from_json(record.task)
                scaling = Replicas.model_validate(record.scaling) if record.scaling else task.replicas
                managed = self._admit(task, scaling, max(record.replicas, scaling.min, len(adopted)), adopted)
            except Exception as exc:
                await asyncio.gather(*(self.backend.stop_executor(h, STOP_GRACE_S) for h in adopted.values()))
                log.error("deployment %s (%s) cannot be restarted: %s", record.id, record.label, exc)
                await self._teardown(ManagedDeployment(record, None), f"deployment {record.id} ({record.label}) "  # type: ignore[arg-type]
                                     f"could not be restarted after the control plane restarted: {exc}",
                                     ErrorKind.USER, failed=True)
                continue
            log.info("deployment %s (%s): %d executor(s) adopted, %d started again (the control plane restarted)",
                     record.id, record.label, len(adopted), len(managed.record.executors) - len(adopted))
            managed.record.restarts = record.restarts
            managed.record.message = "starting executors again (the control plane restarted)"
            asyncio.create_task(self._start(managed))

    async def _adopt(self, record: Deployment) -> dict[str, ExecutorHandle]:
        """The record's executors that still run and that the backend can manage again."""
        adopted = {}
        resources = Resources.model_validate(record.resources)
        for executor_id in record.executors:
            handle = await self.backend.adopt(ExecutorSpec(executor_id, record.id, record.task, record.node, resources))
            if handle is not None:
                adopted[executor_id] = handle
        return adopted

    async def undeploy(self, deployment_id: str, reason: str = "undeployed") -> bool:
        """Stop the deployment's executors (they finish what they run) and free its resources; a
        FAILED one (nothing runs) just loses its record. False if there is no such deployment."""
        managed = self.deployments.get(deployment_id)
        if managed is None:
            return await self._forget_failed(deployment_id, reason)
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

    async def _forget_failed(self, deployment_id: str, reason: str) -> bool:
        """Drop a FAILED deployment's record (its executors and queues are gone already)."""
        record = await load_deployment(self.redis, deployment_id)
        if record is None or record.state is not DeploymentState.FAILED:
            return False
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(deployment_key(deployment_id), phases_key(deployment_id))
            pipe.srem(deployments_key(), deployment_id)
            await pipe.execute()
        log.info("removed the FAILED deployment %s (%s): %s", record.id, record.label, reason)
        await self._event(record, "stopped", reason)
        return True

    async def _teardown(self, managed: ManagedDeployment, error: str, kind: ErrorKind, failed: bool = False) -> None:
        """Free the resources, drop the record (or with `failed`, leave it FAILED with `error` for
        FAILED_TTL_S), and fail what is still queued (nobody will run it)."""
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
            if failed:
                record.state, record.message, record.executors, record.phase_since = (
                    DeploymentState.FAILED, error, [], 0.0)
                mapping = record.to_redis()
                del mapping["last_used"]
                pipe.hset(deployment_key(record.id), mapping=mapping)
                pipe.expire(deployment_key(record.id), FAILED_TTL_S)
                pipe.delete(phases_key(record.id), *queues)
            else:
                pipe.delete(deployment_key(record.id), phases_key(record.id), *queues)
                pipe.srem(deployments_key(), record.id)
            await pipe.execute()
        await self._event(record, "failed" if failed else "stopped", error)
        if not managed.gone.done():
            managed.gone.set_result(None)

    # -- the periodic look -------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Keep the sidecar up, note which deployments are busy, stop those idle past the TTL, and
        drop the ids of records that expired (FAILED ones) from the deployments set."""
        now = time.time()
        await self._prune_expired()
        for managed in list(self.deployments.values()):
            record = managed.record
            if record.state is DeploymentState.DEPLOYING and managed.executors:
                await self._show_start_progress(managed)
            if managed.stopping or record.state is not DeploymentState.READY:
                continue
            await self.backend.ensure_sidecar(record.node)
            backlog = await self.store.backlog(record.id)
            if backlog:
                record.last_used = now  # queued or running work: busy
            self._scale(managed, backlog)
            stored = await self.redis.hget(deployment_key(record.id), "last_used")  # clients touch it
            if stored is not None:
                record.last_used = max(record.last_used, float(stored))
            if now - record.last_used > self.idle_ttl_s:
                asyncio.create_task(self.undeploy(record.id, f"idle for more than {self.idle_ttl_s:g} s"))

    # -- scaling on backlog -------------------------------------------------------------------------

    def _scale(self, managed: ManagedDeployment, backlog: int) -> None:
        """One step towards what the backlog asks for, within the bounds: an executor more while the
        backlog per executor is above the bounds' threshold (any backlog with none), one fewer after
        `idle_s` without work (or when the bounds were lowered). One change at a time: a scale-up
        waits for the previous executor to serve, so the backlog it takes is seen before the next."""
        scaling, count = managed.scaling, len(managed.executors)
        now = time.monotonic()
        if backlog:
            managed.busy_at = now
        if managed.starting or managed.retiring or managed.restarting:
            return
        if count < scaling.max and backlog > scaling.backlog_per_executor * count:
            self._scale_up(managed, f"backlog {backlog} for {count} executor(s)")
        elif count > scaling.max or (count > scaling.min and not backlog
                                     and now - max(managed.busy_at, managed.scaled_at) >= scaling.idle_s):
            reason = (f"above its maximum of {scaling.max}" if count > scaling.max
                      else f"idle for {scaling.idle_s:g} s")
            executor_id, handle = list(managed.executors.items())[-1]  # the newest
            managed.retiring.add(executor_id)  # now: the next look must not pick another
            asyncio.create_task(self._scale_down(managed, executor_id, handle, reason))

    def _scale_up(self, managed: ManagedDeployment, reason: str) -> None:
        """Reserve and start one more executor (in the background), if the resources allow."""
        record = managed.record
        executor_id = _new_executor_id(record.id)
        try:
            self.resources.reserve(executor_id, descriptor_for(managed.task).resources(),
                                   f"another executor of deployment {record.id} ({record.label})")
        except InsufficientResources as exc:
            if managed.no_room != str(exc):  # said once, not every look
                log.warning("deployment %s (%s) stays at %d executor(s) (%s): %s", record.id, record.label,
                            len(managed.executors), reason, exc)
                managed.no_room = str(exc)
            return
        managed.no_room = ""
        managed.starting.add(executor_id)
        record.executors.append(executor_id)
        record.replicas = len(record.executors)
        asyncio.create_task(self._bring_up(managed, executor_id, reason))

    async def _bring_up(self, managed: ManagedDeployment, executor_id: str, reason: str) -> None:
        record = managed.record
        log.info("deployment %s (%s): starting executor %s (%s)", record.id, record.label, executor_id, reason)
        try:
            await self._save(record)
            handle = await self._launch(managed, executor_id)  # its watcher restarts it if it exits
        except Exception as exc:  # it never started: nothing will exit
            log.error("deployment %s (%s): could not start another executor: %s", record.id, record.label, exc)
            managed.starting.discard(executor_id)
            self.resources.release(executor_id)
            record.executors = [e for e in record.executors if e != executor_id]
            record.replicas = len(record.executors)
            if not managed.stopping:
                await self._save(record)
            return
        if managed.stopping:  # undeployed meanwhile: its stop did not know this one
            await self.backend.stop_executor(handle, STOP_GRACE_S)
            return
        try:
            await handle.ready()
        except Exception as exc:  # it exited before it served: its watcher counts and restarts it
            log.warning("deployment %s (%s): executor %s did not start: %s", record.id, record.label, executor_id, exc)
            return
        finally:
            managed.starting.discard(executor_id)
            managed.scaled_at = time.monotonic()
        await self._event(record, "scaled-up", f"{executor_id} ({reason}); {len(managed.executors)} executor(s)")

    async def _scale_down(self, managed: ManagedDeployment, executor_id: str, handle: ExecutorHandle,
                          reason: str) -> None:
        """Stop the retiring executor gracefully (it finishes what it runs) and free what it held."""
        record = managed.record
        log.info("deployment %s (%s): stopping executor %s (%s)", record.id, record.label, executor_id, reason)
        try:
            await self.backend.stop_executor(handle, STOP_GRACE_S)
        finally:
            managed.retiring.discard(executor_id)
            managed.scaled_at = time.monotonic()
        if managed.stopping:  # undeployed meanwhile: the teardown owns the record
            return
        managed.executors.pop(executor_id, None)
        self.resources.release(executor_id)
        record.executors = [e for e in record.executors if e != executor_id]
        record.replicas = len(record.executors)
        await self._save(record)
        await self._event(record, "scaled-down", f"{executor_id} ({reason}); {len(managed.executors)} executor(s)")

    async def _prune_expired(self) -> None:
        """The deployments set keeps no id whose record expired (a FAILED one after FAILED_TTL_S)."""
        ids = [_text(d) for d in await self.redis.smembers(deployments_key())]
        ids = [d for d in ids if d not in self.deployments]  # ours are written as they change
        if not ids:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for deployment_id in ids:
                pipe.exists(deployment_key(deployment_id))
            present = await pipe.execute()
        gone = [d for d, there in zip(ids, present) if not there]
        if gone:
            await self.redis.srem(deployments_key(), *gone)

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

    async def abandon(self) -> None:
        """This control plane was replaced: stop the executors it started (they finish what they run;
        what is queued stays for the new control plane's executors) and write nothing to Redis (the
        deployments are the new one's). Executors that outlive their control plane (pods) may be the
        new one's already (adopted): they are left running (`detach`)."""
        if self.backend.executors_outlive_control_plane:
            await self.detach()
            return
        self.abandoned = True
        for managed in self.deployments.values():
            managed.stopping = True  # its watchers restart nothing
        await asyncio.gather(*(self.backend.stop_executor(handle, STOP_GRACE_S) for managed in self.deployments.values()
                               for handle in list(managed.executors.values())))
        for managed in self.deployments.values():
            if not managed.gone.done():
                managed.gone.set_result(None)
        self.deployments.clear()

    async def detach(self) -> None:
        """Stop managing: leave the executors running and the records as they are, for the next
        control plane to adopt (`recover`). For a backend whose executors outlive this process (pods),
        when its process is stopped (a pod's restart or rollout), not undeployed."""
        self.abandoned = True
        for managed in self.deployments.values():
            managed.stopping = True  # its watchers restart nothing
            for watcher in managed.watchers:
                watcher.cancel()
            if not managed.gone.done():
                managed.gone.set_result(None)
        self.deployments.clear()

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.undeploy(d, "the stack is shutting down") for d in list(self.deployments)))

    async def _event(self, record: Deployment, event: str, detail: str = "") -> None:
        """Append to the deployments' event stream (what `cornserve status` and tests can follow)."""
        if self.on_change is not None:
            await self.on_change()
        await self.redis.xadd(deployment_events_key(), {"deployment": record.id, "event": event, "detail": detail},
                              maxlen=DEPLOYMENT_EVENTS_MAXLEN, approximate=True)

    async def _save(self, record: Deployment, with_last_used: bool = False) -> None:
        """Write the record; `last_used` only at creation, afterwards clients own it (`touch`). A
        deployment that runs does not expire (its record may be an expiring FAILED one's)."""
        mapping = record.to_redis()
        if not with_last_used:
            del mapping["last_used"]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(deployment_key(record.id), mapping=mapping)
            pipe.persist(deployment_key(record.id))
            pipe.sadd(deployments_key(), record.id)
            await pipe.execute()


def _new_executor_id(deployment_id: str) -> str:
    return f"{deployment_id[:24]}-{uuid.uuid4().hex[:6]}"
