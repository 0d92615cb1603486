"""Where executors run: the `ExecutorBackend` interface and the local backend (processes here).

The task manager decides *what* runs (which deployment needs an executor, when one must be
restarted or stopped); a backend decides *how*: the local backend starts `cornserve executor` and
`cornserve sidecar` processes on this machine; the Kubernetes backend (`kubernetes_backend`)
creates a Pod per executor, beside the sidecar DaemonSet that deploy/ installs.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import sys
import threading
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass

from flyte_cornserve import launch
from flyte_cornserve.redis_server import ENV_URL
from flyte_cornserve.namespace import ENV_NAMESPACE
from flyte_cornserve.sidecar.directory import ENV_SIDECAR_ID
from flyte_cornserve.task import Resources

from . import leftovers
from .resources import GROUP_CPU, GROUP_GPU, Capacity, Node

#: how the local backend runs the project's command line in a child process
CLI = [sys.executable, "-c", "from flyte_cornserve.cli import main; main()"]
#: seconds an executor may take to serve (load its model) before it counts as failed to start
EXECUTOR_START_TIMEOUT_S = 3600.0
SIDECAR_START_TIMEOUT_S = 120.0
#: seconds a child whose control plane died has to stop (SIGTERM) before its group is SIGKILLed
ORPHAN_GRACE_S = 10.0


def guarded(command: list[str], grace_s: float = ORPHAN_GRACE_S) -> list[str]:
    """`command`, run so that it (and its process group) dies with this process (`guard.py`): start it
    with `process_group=0`. It keeps its pid and exit code."""
    return [sys.executable, str(pathlib.Path(__file__).with_name("guard.py")), str(os.getpid()), f"{grace_s:g}",
            *command]


class ExecutorStartError(RuntimeError):
    """The executor will not serve: it exited first, or (a pod) cannot be created, scheduled or started
    in time; the message says why, with the end of its log if it ran."""


class BackendSetupError(RuntimeError):
    """The backend cannot start: e.g. no cluster to run executors in, or what it needs there is missing."""


@dataclass(frozen=True)
class ExecutorSpec:
    executor_id: str
    deployment_id: str
    task_json: str  # the unit task, as `UnitTask.to_json()` writes it
    node: str
    resources: Resources


class ExecutorHandle(ABC):
    """One running executor, as its backend sees it."""

    def __init__(self, spec: ExecutorSpec) -> None:
        self.spec = spec

    @property
    def id(self) -> str:
        return self.spec.executor_id

    @abstractmethod
    async def ready(self) -> None:
        """Return once it serves its queue; raise `ExecutorStartError` if it exits first."""

    @abstractmethod
    async def exited(self) -> int:
        """Return its exit code once it has exited (for whatever reason)."""

    @abstractmethod
    def log_tail(self) -> str:
        """The last lines of its log, for error messages."""


class ExecutorBackend(ABC):
    """Runs executors and the per-node sidecars on the backend's nodes."""

    #: its executors go on running when the control plane's process ends (pods), for the next control
    #: plane to adopt; else they die with it (the local backend's children: `guarded`)
    executors_outlive_control_plane: bool = False

    @abstractmethod
    def nodes(self) -> list[Node]:
        """The nodes with their capacity and groups (read once by the resource manager)."""

    @abstractmethod
    def sidecar_id(self, node: str) -> str:
        """The id of the node's sidecar (what clients on that node set as `CORNSERVE_SIDECAR_ID`)."""

    @abstractmethod
    async def ensure_sidecar(self, node: str) -> None:
        """Make sure the node's sidecar runs (start or restart it); return once it serves."""

    @abstractmethod
    async def start_executor(self, spec: ExecutorSpec) -> ExecutorHandle:
        """Start one executor; it may still be loading its model when this returns."""

    @abstractmethod
    async def adopt(self, spec: ExecutorSpec) -> ExecutorHandle | None:
        """The executor `spec.executor_id` of a previous control plane, if it still runs and this
        backend can manage it; else None."""

    @abstractmethod
    async def stop_executor(self, handle: ExecutorHandle, grace_s: float = 60.0) -> None:
        """Stop it gracefully (finish what it runs), forcibly after `grace_s`."""

    @abstractmethod
    async def close(self) -> None:
        """Stop the sidecars. Executors are stopped by the task manager first."""

    def log_template(self) -> str:
        """Where an executor's log is, as a URI template with `{executor_id}`, `{node}`,
        `{deployment_id}`, `{pod}` (the decks' and the console's log links); "" if unknown."""
        return ""


class LocalProcess:
    """A child process whose output goes to a log file, ready once it writes its ready file
    (`flyte_cornserve.launch`)."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: pathlib.Path, what: str,
                 start_timeout_s: float, **leaves: str) -> None:
        """`leaves`: what it leaves behind if killed, for `leftovers.record` (a sidecar's `sidecar_id`)."""
        self._loop = asyncio.get_running_loop()
        self._ready: asyncio.Future[dict] = self._loop.create_future()
        self._exited: asyncio.Future[int] = self._loop.create_future()
        self.log_path = log_path
        self.launched = launch.start(
            guarded(command), env, log_path, launch.ReadyFile(), what,
            # its own process group: a Ctrl-C in the terminal does not reach it, and killpg ends its
            # children (also when the control plane dies: see `guarded`). Not its own session: with the kernel's autogroup scheduling a session is
            # its own CPU-share group, and executors should compete like the stack's other processes.
            process_group=0,
        )
        self.process = self.launched.process
        leftovers.record(self.process.pid, log_path.stem, **leaves)  # the embedded stack's `cornserve down` finds it
        threading.Thread(target=self._wait_ready, args=(start_timeout_s,), daemon=True,
                         name=f"ready-{log_path.stem}").start()
        threading.Thread(target=self._reap, daemon=True, name=f"reap-{log_path.stem}").start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _wait_ready(self, timeout_s: float) -> None:
        try:
            info = self.launched.wait_ready(timeout_s)
        except launch.LaunchError as exc:
            self._loop.call_soon_threadsafe(_fail, self._ready, ExecutorStartError(str(exc)))
        else:
            self._loop.call_soon_threadsafe(_resolve, self._ready, info)

    def _reap(self) -> None:
        """Once it exits, end what is left of its process group (a vLLM engine core a SIGKILL left
        behind, which would also hold its log pipe open), then report the exit."""
        code = self.process.wait()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._loop.call_soon_threadsafe(_resolve, self._exited, code)

    async def ready(self) -> dict:
        """What it announced once it serves; `ExecutorStartError` (with its log tail) if it exits first or
        does not serve within its start timeout."""
        return await asyncio.shield(self._ready)

    async def exited(self) -> int:
        return await asyncio.shield(self._exited)

    def alive(self) -> bool:
        return not self._exited.done()

    def log_tail(self) -> str:
        return self.launched.log_tail()

    async def stop(self, grace_s: float) -> None:
        if self._exited.done():
            return
        self.process.terminate()
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), grace_s)
        except asyncio.TimeoutError:
            self.process.kill()
            await asyncio.shield(self._exited)


class LocalExecutor(ExecutorHandle):
    def __init__(self, spec: ExecutorSpec, process: LocalProcess) -> None:
        super().__init__(spec)
        self.process = process

    async def ready(self) -> None:
        await self.process.ready()

    async def exited(self) -> int:
        return await self.process.exited()

    def log_tail(self) -> str:
        return self.process.log_tail()


class LocalBackend(ExecutorBackend):
    """One node, this machine: executors and its sidecar are child processes of the control plane."""

    def __init__(self, redis_url: str, logs: pathlib.Path, capacity: Capacity, namespace: str | None = None,
                 sidecar_memory_cap: str = "2GiB", node_name: str = "local") -> None:
        self.redis_url = redis_url
        self.logs = logs
        self.capacity = capacity
        self.namespace = namespace
        self.sidecar_memory_cap = sidecar_memory_cap
        self.node_name = node_name
        # unique per control plane: several stacks may share one Redis (tests, a second checkout)
        self._sidecar_id = f"{node_name}-{uuid.uuid4().hex[:8]}"
        self._sidecar: LocalProcess | None = None
        self.sidecar_info: dict = {}
        self._sidecar_lock: asyncio.Lock | None = None
        # this machine's GPUs as the control plane sees them (its own CUDA_VISIBLE_DEVICES, if set),
        # as many as its capacity declares; each GPU executor gets devices of its own
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(i) for i in range(capacity.gpu)]
        self.free_gpus: list[str] = devices[:capacity.gpu]

    def nodes(self) -> list[Node]:
        groups = {GROUP_CPU} | ({GROUP_GPU} if self.capacity.gpu > 0 else set())
        return [Node(self.node_name, self.capacity, frozenset(groups))]

    def sidecar_id(self, node: str) -> str:
        return self._sidecar_id

    def log_template(self) -> str:
        return f"file://{self.logs.resolve()}/{{executor_id}}.log"

    def _env(self) -> dict[str, str]:
        env = {**os.environ, ENV_URL: self.redis_url, ENV_SIDECAR_ID: self._sidecar_id}
        if self.namespace:
            env[ENV_NAMESPACE] = self.namespace
        return env

    async def ensure_sidecar(self, node: str) -> None:
        self._sidecar_lock = self._sidecar_lock or asyncio.Lock()
        async with self._sidecar_lock:
            if self._sidecar is not None and self._sidecar.alive():
                return
            self._sidecar = LocalProcess(
                [*CLI, "sidecar", "--id", self._sidecar_id, "--memory-cap", self.sidecar_memory_cap],
                self._env(), self.logs / f"sidecar-{self._sidecar_id}.log", f"sidecar {self._sidecar_id}",
                SIDECAR_START_TIMEOUT_S, sidecar_id=self._sidecar_id,
            )
            #: what the sidecar announced: its id, address, arena, capacity and metrics URL
            self.sidecar_info = await self._sidecar.ready()

    async def start_executor(self, spec: ExecutorSpec) -> ExecutorHandle:
        """Start an executor with `spec.resources.gpu` GPUs of its own (`CUDA_VISIBLE_DEVICES`; none
        for a CPU executor, so it never touches one), given back when it exits."""
        if spec.resources.gpu > len(self.free_gpus):
            raise ExecutorStartError(f"executor {spec.executor_id} needs {spec.resources.gpu} GPU(s); "
                                     f"{len(self.free_gpus)} free on {self.node_name}")
        gpus, self.free_gpus = self.free_gpus[:spec.resources.gpu], self.free_gpus[spec.resources.gpu:]
        command = [*CLI, "executor", "--task", spec.task_json, "--executor-id", spec.executor_id]
        try:
            process = LocalProcess(command, {**self._env(), "CUDA_VISIBLE_DEVICES": ",".join(gpus)},
                                   self.logs / f"{spec.executor_id}.log",
                                   f"executor {spec.executor_id} of deployment {spec.deployment_id}",
                                   EXECUTOR_START_TIMEOUT_S)
        except BaseException:
            self.free_gpus += gpus
            raise
        handle = LocalExecutor(spec, process)
        if gpus:
            asyncio.ensure_future(self._give_back(handle, gpus))
        return handle

    async def adopt(self, spec: ExecutorSpec) -> ExecutorHandle | None:
        """None: a previous control plane's children died with it (`guarded`), and a process this
        one did not start cannot be waited for."""
        return None

    async def _give_back(self, handle: ExecutorHandle, gpus: list[str]) -> None:
        try:
            await handle.exited()
        finally:
            self.free_gpus += gpus

    async def stop_executor(self, handle: ExecutorHandle, grace_s: float = 60.0) -> None:
        assert isinstance(handle, LocalExecutor)
        await handle.process.stop(grace_s)

    def executor_pid(self, handle: ExecutorHandle) -> int:
        assert isinstance(handle, LocalExecutor)
        return handle.process.pid

    async def close(self) -> None:
        if self._sidecar is not None:
            await self._sidecar.stop(10.0)


def _resolve(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
