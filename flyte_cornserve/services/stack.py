"""The embedded stack: a private Redis, the control plane, the sidecar and executors on this machine.

With no `CORNSERVE_REDIS_URL`, the first unit task of a `pyflyte run` calls `ensure_stack()`,
which finds the running stack through `$CORNSERVE_HOME/stack/stack.json` or starts one: a detached
`cornserve up --foreground` daemon that owns the embedded Redis and the control plane, and so
outlives the run. Later runs find it warm. `cornserve down` stops it. With `CORNSERVE_REDIS_URL`
set, the stack is whatever serves that Redis (`cornserve up` there, or the cluster's).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import select
from collections.abc import Callable, Iterator
from typing import Any

import redis

from flyte_cornserve import launch
from flyte_cornserve.home import cornserve_home
from flyte_cornserve.redis_server import ENV_URL

from .backend import CLI
from .control import control_plane_key
from .leftovers import stop_leftovers

START_TIMEOUT_S = 120.0


def stack_dir() -> pathlib.Path:
    return cornserve_home() / "stack"


def state_file() -> pathlib.Path:
    return stack_dir() / "stack.json"


def read_state() -> dict[str, Any] | None:
    """The embedded stack's state (pid, redis_url, log) if its daemon is alive, else None."""
    try:
        state = json.loads(state_file().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state if process_alive(state.get("pid", 0)) else None


def process_alive(pid: int) -> bool:
    """Running, and not a zombie: a detached daemon is reaped by whoever adopted it, maybe never."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def write_state(state: dict[str, Any]) -> None:
    stack_dir().mkdir(parents=True, exist_ok=True)
    partial = state_file().with_suffix(".partial")
    partial.write_text(json.dumps(state))
    partial.rename(state_file())


def clear_state(pid: int) -> None:
    state = read_state()
    if state is None or state.get("pid") == pid:
        state_file().unlink(missing_ok=True)


def current_url() -> str | None:
    """The Redis URL of the stack in use: `CORNSERVE_REDIS_URL`, else the running embedded stack's."""
    url = os.environ.get(ENV_URL)
    if url:
        return url
    state = read_state()
    return state["redis_url"] if state else None


def control_plane_alive(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=2).exists(control_plane_key()))
    except redis.RedisError:
        return False


def ensure_stack(progress: Callable[[str], None] | None = None, up_args: list[str] | None = None) -> str:
    """The URL of a stack with a live control plane, starting the embedded one if there is none.

    Exports it as `CORNSERVE_REDIS_URL`, so what this process starts afterwards uses it too.
    """
    url = os.environ.get(ENV_URL)
    if url:
        return url  # an explicit stack: `control.request` says so clearly if nothing serves it
    with _lock():
        state = read_state()
        if state is None or not control_plane_alive(state["redis_url"]):
            if state is not None:  # a daemon without its control plane: a stale or stuck stack
                raise RuntimeError(
                    f"the embedded stack (pid {state['pid']}) does not answer; see {state.get('log')} and stop it "
                    f"with `cornserve down`"
                )
            stop_leftovers(stack_dir())  # what a crashed stack left running, its arenas
            state_file().unlink(missing_ok=True)  # and its stack.json
            state = {"redis_url": start_daemon(progress, up_args or [])["redis"]}
    os.environ[ENV_URL] = state["redis_url"]
    return state["redis_url"]


def start_daemon(progress: Callable[[str], None] | None, up_args: list[str]) -> dict[str, str]:
    """Start `cornserve up --foreground` detached; once it is ready (it writes its ready file:
    `flyte_cornserve.launch`), return what it announced: its `pid`, `redis` URL and `log`."""
    if progress is not None:
        progress("starting the embedded cornserve stack (Redis, control plane)")
    env = {**os.environ, "CORNSERVE_HOME": str(cornserve_home())}
    try:
        daemon = launch.launch([*CLI, "up", "--foreground", *up_args], env, stack_dir() / "logs" / "control-plane.log",
                               launch.ReadyFile(), START_TIMEOUT_S, "the embedded stack", start_new_session=True)
    except launch.LaunchError as exc:
        raise RuntimeError(str(exc)) from None
    return daemon.info


def wait_for_exit(pid: int, timeout_s: float) -> bool:
    """Block until process `pid` exits (pidfd: no polling); False if it is still alive after the timeout."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout_s)
        return bool(readable)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """One process at a time decides whether to start the stack (two runs starting together)."""
    stack_dir().mkdir(parents=True, exist_ok=True)
    with open(stack_dir() / "lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
