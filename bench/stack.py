"""A local stack for benchmarks: Redis, one sidecar and executors as processes on this machine."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid

from flyte_cornserve import redis_server
from flyte_cornserve.sidecar.directory import ENV_SIDECAR_ID
from flyte_cornserve.task import UnitTask

CLI = [sys.executable, "-c", "from flyte_cornserve.cli import main; main()"]


class LocalStack:
    """`with LocalStack() as stack: stack.start_executor(task)`; everything stops on exit."""

    def __init__(self) -> None:
        self.sidecar_id = f"bench-{uuid.uuid4().hex[:6]}"
        self.processes: list[subprocess.Popen[str]] = []

    def __enter__(self) -> LocalStack:
        redis_server.redis_url()  # embedded unless CORNSERVE_REDIS_URL is set; exported to children
        os.environ[ENV_SIDECAR_ID] = self.sidecar_id
        self._start([*CLI, "sidecar", "--id", self.sidecar_id, "--memory-cap", "1GiB"], "sidecar ready")
        return self

    def start_executor(self, task: UnitTask) -> subprocess.Popen[str]:
        executor_id = f"bench-{uuid.uuid4().hex[:6]}"
        return self._start([*CLI, "executor", "--task", task.to_json(), "--executor-id", executor_id],
                           f"executor {executor_id} serving")

    def _start(self, command: list[str], ready: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.processes.append(process)
        tail: list[str] = []
        for line in process.stdout:
            tail = (tail + [line])[-30:]
            if ready in line:
                threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
                return process
        raise RuntimeError(f"{command[3]} exited with {process.wait()}:\n{''.join(tail)}")

    def __exit__(self, *exc: object) -> None:
        for process in reversed(self.processes):
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
