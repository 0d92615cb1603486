"""The Kubernetes backend: each executor is a bare Pod in the control plane's namespace.

A bare Pod (restartPolicy Never), not a Deployment: the task manager already owns an executor's
identity and its restarts (a new id after a back-off, a restart limit, the replacement reclaiming
the dead one's queue entries); a ReplicaSet would restart pods behind its back. Kubernetes places the
pods, so the resource manager sees one node, `cluster`, whose capacity is what the operator lets
executors reserve cluster-wide (`cornserve up --cpu/--memory/--gpu`). Sidecars are the DaemonSet's
(deploy/base/sidecar.yaml), one per node; executors find theirs through the downward API.

This module is the thin layer that calls the API server, through lightkube's AsyncClient (asyncio,
as the control plane is, and typed models per Kubernetes version, which the tests validate; the
official client is synchronous): create a pod, list and watch the executor pods, delete one, read a
log's tail, read the owner Deployment and this pod (its image is the executors'). Every
decision is made in `pods` (what a pod looks like, what its state means), which the tests cover; no
API server can run in the tests, so of this module only `connect`'s refusals without a cluster are
tested. It keeps one watch over the namespace's
executor pods: a list, then a watch from the list's version, again after any error and every
`RESYNC_S` (a relist also finds pods deleted while no watch ran).
"""

from __future__ import annotations

import asyncio
import logging
import os

import httpx2
from lightkube import ApiError, AsyncClient, ConfigError
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Pod

from flyte_cornserve.launch import LOG_TAIL_LINES
from flyte_cornserve.namespace import ENV_NAMESPACE

from . import pods
from .backend import (
    EXECUTOR_START_TIMEOUT_S,
    BackendSetupError,
    ExecutorBackend,
    ExecutorHandle,
    ExecutorSpec,
    ExecutorStartError,
)
from .resources import GROUP_CPU, GROUP_GPU, Capacity, Node

log = logging.getLogger(__name__)

CLUSTER = "cluster"  # the one node the resource manager sees
PENDING_TIMEOUT_S = 600.0  # GPU pools may take minutes to scale up
RESYNC_S = 300.0  # the watch is started afresh (after a list) this often
STOP_MARGIN_S = 30.0  # a stopped pod's end is awaited its grace period and this long
#: the grace period of a pod deleted at once (one that ended, or never served): 0 would remove the
#: object before its node's kubelet has stopped the container
DELETE_NOW_S = 1


class KubernetesExecutor(ExecutorHandle):
    """One executor pod, as the backend's watch sees it."""

    def __init__(self, spec: ExecutorSpec) -> None:
        super().__init__(spec)
        loop = asyncio.get_running_loop()
        self.pod = pods.pod_name(spec.executor_id)
        self.since = loop.time()  # created or adopted: its start's timeouts count from here
        self.view: pods.PodView | None = None
        self.known_from = float("inf")  # a list begun after this one must show its pod (the backend's count)
        self.timers: list[asyncio.TimerHandle] = []
        self.failing = False  # its start failed: its pod is being deleted
        self.ending = False  # it exited: its end is being recorded
        self._ready: asyncio.Future[None] = loop.create_future()
        self._exited: asyncio.Future[int] = loop.create_future()
        self._log_tail = ""

    async def ready(self) -> None:
        await asyncio.shield(self._ready)

    async def exited(self) -> int:
        return await asyncio.shield(self._exited)

    def log_tail(self) -> str:
        """The end of its log, read when its pod ended (a deleted pod's log is gone)."""
        return self._log_tail

    def settle_ready(self, error: ExecutorStartError | None = None) -> None:
        """It serves (or, with `error`, never will); the first word counts."""
        if self._ready.done():
            return
        if error is None:
            self._ready.set_result(None)
        else:
            self._ready.set_exception(error)
            self._ready.exception()  # retrieved: nobody may be waiting any more


class KubernetesBackend(ExecutorBackend):
    executors_outlive_control_plane = True  # a control plane pod's restart leaves them for the next to adopt

    def __init__(self, client: AsyncClient, settings: pods.PodSettings, capacity: Capacity,
                 pending_timeout_s: float = PENDING_TIMEOUT_S, start_timeout_s: float = EXECUTOR_START_TIMEOUT_S) -> None:
        self.client = client
        self.settings = settings
        self.capacity = capacity
        self.pending_timeout_s = pending_timeout_s
        self.start_timeout_s = start_timeout_s
        self._executors: dict[str, KubernetesExecutor] = {}  # pod name -> handle
        self._lists = 0  # lists of the pods begun
        self._background: set[asyncio.Task] = set()
        self._watcher = asyncio.create_task(self._watch(), name="executor pods watch")

    @classmethod
    async def connect(cls, capacity: Capacity, namespace: str | None = None, image: str | None = None,
                      owner: str = "cornserve-control-plane", pending_timeout_s: float = PENDING_TIMEOUT_S,
                      env: dict[str, str] | None = None, env_secrets: tuple[str, ...] = (),
                      service_account: str | None = None) -> KubernetesBackend:
        """A backend for the cluster this process runs in (or its kubeconfig's): pods in `namespace`
        (default: the client's, this pod's own), running `image` (default: this pod's, `$POD_NAME`),
        owned by the Deployment `owner` ("" for none), with `env`, every key of the `env_secrets` and
        `service_account` (what reading datasets and writing results takes: credentials, a cloud role)."""
        try:
            client = AsyncClient(namespace=namespace)
        except ConfigError as exc:
            raise BackendSetupError(f"no Kubernetes cluster to run executors in (not in a pod, and no kubeconfig): "
                                    f"{exc}") from None
        namespace = client.namespace
        own_pod = os.environ.get("POD_NAME")
        if not image and not own_pod:
            raise BackendSetupError("the executors' image is unknown: give --executor-image, or set POD_NAME (this "
                                    "pod's name, through the downward API) to use this pod's own")
        what = f"pod {own_pod}"
        try:
            if not image:
                image = (await client.get(Pod, own_pod, namespace=namespace)).spec.containers[0].image
            what = f"the executor pods' owner, Deployment {owner} (--owner; '' for none)"
            reference = pods.owner_reference(await client.get(Deployment, owner, namespace=namespace)) if owner else None
        except httpx2.HTTPError as exc:
            raise BackendSetupError(f"cannot read {what} in namespace {namespace}: {exc}") from None
        settings = pods.PodSettings(namespace=namespace, image=image, owner=reference,
                                    cornserve_namespace=os.environ.get(ENV_NAMESPACE), extra_env=env or {},
                                    env_secrets=env_secrets, service_account=service_account)
        log.info("executors are pods in namespace %s (image %s, owner %s)", namespace, image, owner or "none")
        return cls(client, settings, capacity, pending_timeout_s)

    # -- the interface ------------------------------------------------------------------------------

    def nodes(self) -> list[Node]:
        groups = {GROUP_CPU} | ({GROUP_GPU} if self.capacity.gpu > 0 else set())
        return [Node(CLUSTER, self.capacity, frozenset(groups))]

    def sidecar_id(self, node: str) -> str:
        return "each node's own: the node's name (an executor pod's spec.nodeName)"

    async def ensure_sidecar(self, node: str) -> None:
        """Nothing to do: the sidecar DaemonSet runs one on every node, and Kubernetes restarts it."""

    async def start_executor(self, spec: ExecutorSpec) -> ExecutorHandle:
        executor = KubernetesExecutor(spec)
        self._executors[executor.pod] = executor  # before it exists: the watch may report it first
        try:
            created = await self.client.create(pods.executor_pod(spec, self.settings))
        except Exception as exc:
            del self._executors[executor.pod]
            raise ExecutorStartError(f"could not create the pod of executor {spec.executor_id} of deployment "
                                     f"{spec.deployment_id}: {exc}") from exc
        self._follow(executor, created)
        return executor

    async def adopt(self, spec: ExecutorSpec) -> ExecutorHandle | None:
        """The pod of `spec`'s executor, left by a previous control plane, if it still runs; one that
        ended is deleted."""
        found = [pod async for pod in self.client.list(Pod, namespace=self.settings.namespace, labels={
            pods.LABEL_EXECUTOR: pods.label_value(spec.executor_id)})]
        if not found:
            return None
        view = pods.read_pod(found[0])
        if pods.judge(view, spec.deployment_id, 0.0, self.pending_timeout_s, self.start_timeout_s).outcome == "exited":
            await self._delete(view.name, DELETE_NOW_S)
            return None
        executor = KubernetesExecutor(spec)
        self._executors[executor.pod] = executor
        self._follow(executor, found[0])
        return executor

    async def stop_executor(self, handle: ExecutorHandle, grace_s: float = 60.0) -> None:
        """Delete its pod: the executor gets SIGTERM (it finishes what it runs), SIGKILL after `grace_s`."""
        assert isinstance(handle, KubernetesExecutor)
        await self._delete(handle.pod, round(grace_s))
        try:
            await asyncio.wait_for(handle.exited(), grace_s + STOP_MARGIN_S)
        except TimeoutError:
            log.warning("executor pod %s was deleted but not seen gone within %g s", handle.pod, grace_s + STOP_MARGIN_S)

    async def close(self) -> None:
        """Stop watching. Executor pods stay as they are (the task manager stopped those it meant to)."""
        for executor in self._executors.values():
            for timer in executor.timers:
                timer.cancel()
        for task in {self._watcher, *self._background}:
            task.cancel()
        await asyncio.gather(self._watcher, *self._background, return_exceptions=True)
        await self.client.close()

    # -- following pods -----------------------------------------------------------------------------

    def _follow(self, executor: KubernetesExecutor, pod: Pod) -> None:
        """From its pod as created or found: judge it on every change, and at its start's deadlines."""
        executor.known_from = self._lists
        loop = asyncio.get_running_loop()
        executor.timers = [loop.call_later(timeout, self._recheck, executor)
                           for timeout in (self.pending_timeout_s, self.start_timeout_s)]
        self._see(executor, pods.read_pod(pod))

    def _recheck(self, executor: KubernetesExecutor) -> None:
        if executor.view is not None:
            self._see(executor, executor.view)

    def _see(self, executor: KubernetesExecutor, view: pods.PodView) -> None:
        executor.view = view
        waited = asyncio.get_running_loop().time() - executor.since
        verdict = pods.judge(view, executor.spec.deployment_id, waited, self.pending_timeout_s, self.start_timeout_s)
        if verdict.outcome == "ready" and not executor.failing:
            executor.settle_ready()
        elif verdict.outcome == "exited" and not executor.ending:
            executor.ending = True
            self._spawn(self._end(executor, view, verdict.exit_code))
        elif verdict.outcome == "start-failed" and not executor._ready.done() and not executor.failing:
            executor.failing = True
            self._spawn(self._abort(executor, view, verdict.reason))

    async def _abort(self, executor: KubernetesExecutor, view: pods.PodView, reason: str) -> None:
        """Its start failed: say why (with the end of its log, if it ran), delete its pod (its end then
        comes through the watch)."""
        executor._log_tail = "" if view.phase == "Pending" else await self._read_log(executor.pod)
        log.error("%s; deleting it", reason)
        executor.settle_ready(ExecutorStartError(
            reason + (f"; the end of its log:\n{executor._log_tail}" if executor._log_tail else "")))
        if not await self._delete(executor.pod, DELETE_NOW_S) and not executor.ending:
            executor.ending = True  # no watch event will come for a pod we cannot delete
            await self._end(executor, view.deleted(), pods.GONE_EXIT_CODE)

    async def _end(self, executor: KubernetesExecutor, view: pods.PodView, code: int) -> None:
        """It exited: keep the end of its log (in our log too, if it failed), remove its pod (ended pods
        would pile up: every restart is a new one), and say so."""
        if not view.gone:
            executor._log_tail = await self._read_log(executor.pod)
            if code != 0:
                log.warning("executor pod %s exited with code %d; the end of its log:\n%s", executor.pod, code,
                            executor._log_tail)
            await self._delete(executor.pod, DELETE_NOW_S)
        for timer in executor.timers:
            timer.cancel()
        executor.settle_ready(ExecutorStartError(
            f"executor {executor.id} of deployment {executor.spec.deployment_id} exited with code {code} before it "
            f"was ready; the end of its log (pod {executor.pod}):\n{executor._log_tail}"))
        self._executors.pop(executor.pod, None)
        executor._exited.set_result(code)

    async def _watch(self) -> None:
        backoff = 0.0
        while True:
            try:
                self._lists += 1
                listed_in = self._lists
                listing = self.client.list(Pod, namespace=self.settings.namespace, labels=pods.EXECUTOR_LABELS)
                current = {pod.metadata.name: pod async for pod in listing}
                for name, executor in list(self._executors.items()):
                    if name in current:
                        self._see(executor, pods.read_pod(current[name]))
                    elif executor.known_from < listed_in and executor.view is not None:
                        self._see(executor, executor.view.deleted())
                backoff = 0.0
                async with asyncio.timeout(RESYNC_S):
                    async for event, pod in self.client.watch(Pod, namespace=self.settings.namespace,
                                                              labels=pods.EXECUTOR_LABELS,
                                                              resource_version=listing.resourceVersion):
                        executor = self._executors.get(pod.metadata.name)
                        if executor is not None:
                            view = pods.read_pod(pod)
                            self._see(executor, view.deleted() if event == "DELETED" else view)
            except TimeoutError:
                continue  # resync
            except Exception as exc:  # the API server away or refusing: the pods are still there
                backoff = min(max(2 * backoff, 0.5), 30.0)
                log.warning("watching the executor pods failed (%s); again in %g s", exc, backoff)
                await asyncio.sleep(backoff)

    # -- calls --------------------------------------------------------------------------------------

    async def _delete(self, pod: str, grace_s: int) -> bool:
        """Delete the pod; True once it is deleted or gone."""
        try:
            await self.client.delete(Pod, pod, namespace=self.settings.namespace, grace_period=grace_s)
        except ApiError as exc:
            if exc.status.code == 404:
                return True
            log.error("could not delete executor pod %s: %s", pod, exc)
            return False
        except Exception as exc:
            log.error("could not delete executor pod %s: %s", pod, exc)
            return False
        return True

    async def _read_log(self, pod: str) -> str:
        try:
            return "".join([line async for line in self.client.log(
                pod, namespace=self.settings.namespace, container=pods.CONTAINER, tail_lines=LOG_TAIL_LINES)])
        except Exception as exc:  # it never started, or its pod is gone
            log.info("no log of executor pod %s: %s", pod, exc)
            return ""

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
