"""A redis-server the test owns and restarts for real: same unix socket, same folder, AOF on, so its
data survives the restart (as a production Redis with persistence would)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import tempfile
import time

import redis

from flyte_cornserve.home import cornserve_home
from flyte_cornserve.redis_server import redis_server_binary

_START_TIMEOUT_S = 30.0


class RestartableRedis:
    def __init__(self) -> None:
        # under $CORNSERVE_HOME: pytest's tmp_path can be too deep for a unix socket path
        self.directory = pathlib.Path(tempfile.mkdtemp(prefix="rr-", dir=cornserve_home()))
        self.socket = self.directory / "redis.sock"
        self.url = f"unix://{self.socket}"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self, socket: pathlib.Path | None = None) -> None:
        command = [redis_server_binary(), "--port", "0", "--unixsocket", str(socket or self.socket),
                   "--unixsocketperm", "700", "--dir", str(self.directory), "--save", "",
                   "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no",
                   "--logfile", str(self.directory / "redis.log")]  # fmt: skip
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + _START_TIMEOUT_S
        client = redis.Redis(unix_socket_path=str(socket or self.socket))
        while True:  # until it answers (it may reply LOADING while it replays the AOF)
            try:
                client.ping()
                break
            except (redis.ConnectionError, redis.BusyLoadingError):
                assert self.process.poll() is None, f"redis-server exited with {self.process.returncode}"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.01)  # the poll's period
        client.close()

    def stop(self) -> None:
        """SIGTERM: Redis writes and fsyncs its AOF and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            assert self.process.wait(30) == 0

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
