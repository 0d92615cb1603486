"""One launcher for the project's child processes (executors, the sidecar, the stack daemon, the
embedded Redis, and the stacks of benchmarks and tests).

`launch()` starts a child with its output going to a log file, waits for it to become ready, with a
start timeout, and fails early (with the end of its log) if the child exits first. Readiness is never
read from log lines: it is either

- `ReadyFile()`: the launcher sets `$CORNSERVE_READY_FILE` to a fresh path in the child's
  environment and the child, once it serves, writes JSON there atomically with `announce_ready()`
  (what it wants to tell: its address, its metrics URL...); the launcher returns it as `info`; or
- `ReadySocket(path=...)` / `ReadySocket(host=..., port=...)`: a unix or TCP socket that accepts
  connections; or
- `ReadyCommand(command)`: a command that exits 0, run with the child's environment (a Kubernetes exec
  probe, for a container run here as it is: the child's environment then names its ready file itself).

`start()` and `Launched.wait_ready()` do the two halves separately (a caller that records the pid
first, or waits in a thread). Stdlib only.
"""

from __future__ import annotations

import json
import os
import pathlib
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

ENV_READY_FILE = "CORNSERVE_READY_FILE"
LOG_TAIL_LINES = 40
_POLL_S = 0.01  # between looks at the ready file or socket; a child's exit wakes the wait at once


class LaunchError(RuntimeError):
    """The child exited before it was ready, or was not ready in time; the message ends with its log tail."""

    def __init__(self, message: str, log_tail: str, returncode: int | None) -> None:
        super().__init__(message)
        self.log_tail = log_tail
        self.returncode = returncode


@dataclass(frozen=True)
class ReadyFile:
    """Ready once the child has written `$CORNSERVE_READY_FILE` (`announce_ready()`)."""


@dataclass(frozen=True)
class ReadySocket:
    """Ready once a unix socket at `path`, or a TCP socket at `host:port`, accepts a connection."""

    path: str | os.PathLike[str] | None = None
    host: str = "127.0.0.1"
    port: int | None = None

    def accepts(self) -> bool:
        if self.path is not None:
            if not os.path.exists(self.path):
                return False
            family, address = socket.AF_UNIX, os.fspath(self.path)
        else:
            family, address = socket.AF_INET, (self.host, self.port)
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(address)
            except OSError:
                return False
        return True


@dataclass(frozen=True)
class ReadyCommand:
    """Ready once `command`, run with the child's environment every `period_s`, exits 0."""

    command: tuple[str, ...]
    period_s: float = 0.1

    def succeeds(self, env: dict[str, str]) -> bool:
        done = subprocess.run(self.command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=30)
        return done.returncode == 0


Readiness = ReadyFile | ReadySocket | ReadyCommand


def announce_ready(**info: Any) -> None:
    """In a launched child: say it serves, telling `info` (JSON) to the launcher. Writes
    `$CORNSERVE_READY_FILE` atomically (write, then rename) and removes the variable, so that what
    this process starts later does not announce in its name. Does nothing if the variable is unset
    (a child started by hand)."""
    path = os.environ.pop(ENV_READY_FILE, "")
    if not path:
        return
    partial = f"{path}.partial"
    with open(partial, "w") as out:
        json.dump(info, out)
    os.rename(partial, path)


class Launched:
    """A started child: `process`, `log_path`, `log_tail()`, and once ready the `info` it announced."""

    def __init__(self, process: subprocess.Popen, log_path: pathlib.Path, ready: Readiness,
                 ready_dir: pathlib.Path | None, what: str, env: dict[str, str]) -> None:
        self.process = process
        self.log_path = log_path
        self.what = what
        self.info: dict[str, Any] = {}
        self._ready = ready
        self._ready_dir = ready_dir
        self._env = env

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last `lines` lines of its log."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - 64 * 1024))
                data = log.read()
        except FileNotFoundError:
            return ""
        return "".join(data.decode(errors="replace").splitlines(keepends=True)[-lines:])

    def _is_ready(self) -> bool:
        if isinstance(self._ready, ReadySocket):
            return self._ready.accepts()
        if isinstance(self._ready, ReadyCommand):
            return self._ready.succeeds(self._env)
        assert self._ready_dir is not None
        try:
            self.info = json.loads((self._ready_dir / "ready.json").read_text())
        except FileNotFoundError:
            return False
        return True

    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        """Block until it is ready and return what it announced (`{}` for a socket). Raise
        `LaunchError` if it exits first, or (after killing it) if it is not ready within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        try:
            pidfd = os.pidfd_open(self.process.pid)
        except ProcessLookupError:  # already reaped (by another thread's wait)
            pidfd = None
        try:
            while True:
                if self._is_ready():
                    return self.info
                if pidfd is None or select.select([pidfd], [], [], 0)[0]:
                    code = self.process.wait()  # exited: another thread may be reaping it; this waits for that
                    if self._is_ready():  # it announced, then exited: ready all the same
                        return self.info
                    raise LaunchError(f"{self.what} exited with code {code} before it was ready; the end of its log "
                                      f"({self.log_path}):\n{self.log_tail()}", self.log_tail(), code)
                left = deadline - time.monotonic()
                if left <= 0:
                    self.kill()
                    raise LaunchError(f"{self.what} was not ready within {timeout_s:g} s (stopped); the end of its "
                                      f"log ({self.log_path}):\n{self.log_tail()}", self.log_tail(), None)
                period = self._ready.period_s if isinstance(self._ready, ReadyCommand) else _POLL_S
                select.select([pidfd], [], [], min(period, left))
        finally:
            if pidfd is not None:
                os.close(pidfd)
            if self._ready_dir is not None:
                shutil.rmtree(self._ready_dir, ignore_errors=True)
                self._ready_dir = None

    def kill(self) -> None:
        """SIGKILL it (and its process group, if it leads one) and reap it."""
        try:
            if os.getpgid(self.process.pid) == self.process.pid:
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.kill()
        except ProcessLookupError:
            pass
        self.process.wait()


def start(command: list[str], env: dict[str, str] | None, log_path: pathlib.Path, ready: Readiness,
          what: str | None = None, **popen: Any) -> Launched:
    """Start `command` with `env` (default: this process's), stdin from /dev/null and its output appended
    to `log_path`; `popen`: further `subprocess.Popen` arguments (`process_group=0`, `start_new_session`).
    Call `wait_ready()` on the result."""
    env = dict(os.environ if env is None else env)
    ready_dir = None
    if isinstance(ready, ReadyFile):
        ready_dir = pathlib.Path(tempfile.mkdtemp(prefix="cornserve-ready-"))
        env[ENV_READY_FILE] = str(ready_dir / "ready.json")
    elif isinstance(ready, ReadySocket):
        env.pop(ENV_READY_FILE, None)  # not for it: one it inherited names someone else's
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log_path, "ab") as log:
            process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       **popen)
    except BaseException:
        if ready_dir is not None:
            shutil.rmtree(ready_dir, ignore_errors=True)
        raise
    return Launched(process, log_path, ready, ready_dir, what or log_path.stem, env)


def launch(command: list[str], env: dict[str, str] | None, log_path: pathlib.Path, ready: Readiness,
           timeout_s: float, what: str | None = None, **popen: Any) -> Launched:
    """`start()`, then `wait_ready(timeout_s)`: a child that is ready (its announced `info` in `.info`)."""
    launched = start(command, env, log_path, ready, what, **popen)
    launched.wait_ready(timeout_s)
    return launched
