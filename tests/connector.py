"""`pyflyte serve connector` as FlytePropeller finds it: a gRPC service on its own port."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import grpc
from flyteidl.core import literals_pb2
from flyteidl.service import agent_pb2_grpc

from flyte_cornserve.redis_server import ENV_URL

PYFLYTE = os.path.join(os.path.dirname(sys.executable), "pyflyte")
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ConnectorProcess:
    """The connector service of a stack; ready once its gRPC channel is (a socket, not a log line).
    Each gets its own Prometheus port: `pyflyte serve connector` exits if 9090 is taken."""

    def __init__(self, redis_url: str, env: dict[str, str] | None = None, pyflyte: list[str] | None = None,
                 modules: bool = True, cwd: str | None = None) -> None:
        """`pyflyte`: how to run pyflyte (default: this environment's); `modules`: name our connector
        module with `--modules` (without, flytekit must find it through its plugins' entry point)."""
        self.redis_url = redis_url
        self.env = env or {}
        self.pyflyte = pyflyte or [PYFLYTE]
        self.modules = ["--modules", "flyte_cornserve.flyte.connector"] if modules else []
        self.cwd = cwd
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.channel: grpc.Channel | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [*self.pyflyte, "serve", "connector", "--port", str(self.port), "--prometheus_port", str(free_port()),
             *self.modules],
            env={**os.environ, **self.env, ENV_URL: self.redis_url}, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            cwd=self.cwd,
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        grpc.channel_ready_future(self.channel).result(timeout=START_TIMEOUT_S)
        self.stub = agent_pb2_grpc.AsyncAgentServiceStub(self.channel)

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def restart(self) -> None:
        """A new connector process on the same port (as a replica or a restarted pod would be)."""
        self.stop()
        self.start()


def outputs_at(resource, output_prefix: pathlib.Path) -> literals_pb2.LiteralMap:
    """A SUCCEEDED node's outputs the way Propeller reads them when `get()` returns none inline:
    `outputs.pb` under the node's output prefix."""
    assert not resource.outputs.literals, "outputs inline: Propeller would drop the node's deck"
    outputs = literals_pb2.LiteralMap()
    outputs.ParseFromString((output_prefix / "outputs.pb").read_bytes())
    return outputs
