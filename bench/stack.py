"""A private stack for benchmarks: an embedded Redis and a control plane of their own.

Executors are deployed through the control plane, exactly as a workflow run deploys them, and
everything stops on exit. The benchmark process talks to the same Redis (`CORNSERVE_REDIS_URL`)
and, for tensors, to the node's sidecar (`CORNSERVE_SIDECAR_ID`), both exported here.
"""

from __future__ import annotations

import asyncio
import os
import subprocess


from flyte_cornserve import redis_server
from flyte_cornserve.home import cornserve_home
from flyte_cornserve.launch import ReadyFile, launch
from flyte_cornserve.services.backend import CLI
from flyte_cornserve.services.control import control_plane_info
from flyte_cornserve.services.dispatcher import Dispatcher
from flyte_cornserve.sidecar.directory import ENV_SIDECAR_ID
from flyte_cornserve.task import UnitTask


START_TIMEOUT_S = 300.0


class PrivateStack:
    """`with PrivateStack() as stack: stack.deploy(task, ...)`."""

    def __init__(self, cpu: int = 4) -> None:
        self.cpu = cpu
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> PrivateStack:
        self.url = redis_server.redis_url()  # embedded unless CORNSERVE_REDIS_URL is set; exported
        log = cornserve_home() / "bench" / f"control-plane-{os.getpid()}.log"
        # ready once it writes its ready file (`flyte_cornserve.launch`); its output goes to `log`
        self.process = launch([*CLI, "up", "--foreground", "--cpu", str(self.cpu)],
                              {**os.environ, redis_server.ENV_URL: self.url}, log, ReadyFile(), START_TIMEOUT_S,
                              "the control plane").process
        info = asyncio.run(control_plane_info(redis_server.connect_async(self.url)))
        os.environ[ENV_SIDECAR_ID] = next(iter(info["sidecars"].values()))
        return self

    def deploy(self, *tasks: UnitTask) -> None:
        """Deploy the tasks (in parallel) and return once their executors serve."""

        async def deploy_all() -> None:
            dispatcher = Dispatcher(redis_server.connect_async(self.url))
            await asyncio.gather(*(dispatcher.deploy(task) for task in tasks))

        asyncio.run(deploy_all())

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()  # the control plane stops its executors and the sidecar first
            self.process.wait(timeout=120)
