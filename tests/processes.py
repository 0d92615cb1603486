"""Real `cornserve sidecar` processes, shared by the sidecar and executor tests."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import uuid

from flyte_cornserve import redis_server
from flyte_cornserve.launch import LaunchError, ReadyFile, launch
from flyte_cornserve.sidecar.arena import remove_stale_arenas
from flyte_cornserve.sidecar.client import SidecarClient
from flyte_cornserve.sidecar.directory import Directory
from flyte_cornserve.sidecar.wire import ENV_TOKEN

SHM_DIR = pathlib.Path("/dev/shm")
CLI = [sys.executable, "-c", "from flyte_cornserve.cli import main; main()"]  # `cornserve`, installed or not
START_TIMEOUT_S = 30.0


@dataclasses.dataclass
class SidecarProcess:
    """A running `cornserve sidecar`, as its ready file described it."""

    id: str
    process: subprocess.Popen
    address: str
    arena: str

    @property
    def arena_path(self) -> pathlib.Path:
        return SHM_DIR / self.arena

    def kill(self) -> None:
        """SIGKILL: the sidecar gets no chance to clean up, as in a crash."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        """SIGTERM: a clean shutdown."""
        self.process.terminate()
        assert self.process.wait(timeout=30) == 0


class Sidecars:
    """Starts sidecar processes in one namespace and stops all of them at `close()`."""

    def __init__(self, redis_url: str, namespace: str) -> None:
        self.redis_url = redis_url
        self.namespace = namespace
        self.directory = Directory.connect(redis_url, namespace)
        self._started: list[SidecarProcess] = []
        self._clients: list[SidecarClient] = []

    def start(
        self, sidecar_id: str | None = None, *, memory_cap: str = "64MiB", heartbeat_ttl: float = 1.0, token: str = ""
    ) -> SidecarProcess:
        sidecar_id = sidecar_id or f"t{uuid.uuid4().hex[:10]}"
        arguments = ["sidecar", "--id", sidecar_id, "--namespace", self.namespace, "--memory-cap", memory_cap,
                     "--heartbeat-ttl", str(heartbeat_ttl), "--log-level", "WARNING"]  # fmt: skip
        log = pathlib.Path(tempfile.gettempdir()) / f"sidecar-{sidecar_id}.log"
        try:  # ready once it writes its ready file (`flyte_cornserve.launch`), which holds its address and arena
            launched = launch(CLI + arguments, self._env(token), log, ReadyFile(), START_TIMEOUT_S, f"sidecar {sidecar_id}")
        except LaunchError as exc:
            raise AssertionError(str(exc)) from None
        sidecar = SidecarProcess(sidecar_id, launched.process, launched.info["address"], launched.info["arena"])
        self._started.append(sidecar)
        return sidecar

    def run_cli(self, *arguments: str, token: str = "") -> subprocess.CompletedProcess[str]:
        """`cornserve ARGUMENTS...` to completion (for commands that are expected to fail)."""
        return subprocess.run(CLI + list(arguments), env=self._env(token), capture_output=True, text=True, timeout=60)

    def _env(self, token: str) -> dict[str, str]:
        return {**os.environ, redis_server.ENV_URL: self.redis_url, ENV_TOKEN: token}

    def client(self, sidecar: SidecarProcess | str, *, token: str = "") -> SidecarClient:
        sidecar_id = sidecar if isinstance(sidecar, str) else sidecar.id
        client = SidecarClient(sidecar_id, redis_url=self.redis_url, namespace=self.namespace, token=token)
        self._clients.append(client)
        return client

    def close(self) -> None:
        for client in self._clients:
            client.close()
        for sidecar in self._started:
            if sidecar.process.poll() is None:
                sidecar.process.terminate()
        for sidecar in self._started:
            if sidecar.process.poll() is None:
                try:
                    sidecar.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    sidecar.kill()
        for sidecar_id in {s.id for s in self._started}:
            remove_stale_arenas(SHM_DIR, sidecar_id)  # what killed sidecars left behind
        leftover = self.directory.keys()
        if leftover:
            self.directory.redis.delete(*leftover)
