"""A private stack for benchmarks: an embedded Redis and a control plane of their own.

Executors are deployed through the control plane, exactly as a workflow run deploys them, and
everything stops on exit. The benchmark process talks to the same Redis (`CORNSERVE_REDIS_URL`)
and, for tensors, to the node's sidecar (`CORNSERVE_SIDECAR_ID`), both exported here.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading


from flyte_cornserve import redis_server
from flyte_cornserve.services.backend import CLI
from flyte_cornserve.services.control import control_plane_info
from flyte_cornserve.services.dispatcher import Dispatcher
from flyte_cornserve.sidecar.directory import ENV_SIDECAR_ID
from flyte_cornserve.task import UnitTask


class PrivateStack:
    """`with PrivateStack() as stack: stack.deploy(task, ...)`."""

    def __init__(self, cpu: int = 4) -> None:
        self.cpu = cpu
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> PrivateStack:
        self.url = redis_server.redis_url()  # embedded unless CORNSERVE_REDIS_URL is set; exported
        self.process = subprocess.Popen(
            [*CLI, "up", "--foreground", "--cpu", str(self.cpu)], env={**os.environ, redis_server.ENV_URL: self.url},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        tail: list[str] = []
        for line in self.process.stdout:
            tail = (tail + [line])[-30:]
            if "control plane ready" in line:
                break
        else:
            raise RuntimeError(f"the control plane exited with {self.process.wait()}:\n{''.join(tail)}")
        threading.Thread(target=lambda: [None for _ in self.process.stdout], daemon=True).start()
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
