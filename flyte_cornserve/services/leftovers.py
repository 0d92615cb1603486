"""What the embedded stack started, recorded so that a crashed stack's survivors can be stopped.

The one owner of the files `$CORNSERVE_HOME/stack/processes-<daemon pid>`: the embedded stack's
daemon (`cornserve up --foreground` without `CORNSERVE_REDIS_URL`) calls `start_recording()`, which
writes its own line first; from then on the code that starts a child (the backend's `LocalProcess`,
the embedded Redis) calls `record()`, which appends one JSON line per child: pid, process group,
start time (field 22 of /proc/<pid>/stat, in clock ticks since boot: with the pid, it names one
process, so a recycled pid is never taken for it), what it is, and what it leaves behind if killed
(a sidecar's shared-memory arenas, the embedded Redis' folder). In any other process `record()` does
nothing (tests' stacks on a shared Redis, executors).

Normally the guard watcher of each child (`guard.py`) ends it when the daemon dies. Where that did
not happen (the watcher was killed too), `stop_leftovers()` (called by `cornserve down` and by
`ensure_stack()` before it starts a new stack) stops, for each file whose daemon no longer runs,
what of it is still alive: SIGTERM to each recorded group's processes, SIGKILL after a grace period,
each through a pidfd opened and then checked against the recorded start time. Then it removes the
arenas, the Redis folder and the file.
"""

from __future__ import annotations

import json
import os
import pathlib
import select
import shutil
import signal
import time
from typing import Any

PREFIX = "processes-"
SHM_DIR = pathlib.Path("/dev/shm")
GRACE_S = 10.0

_recording: pathlib.Path | None = None


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None if there is no such process (or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])  # fields[0] is field 3 (state)


def _group_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rpartition(")")[2].split()[2])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def start_recording(folder: pathlib.Path) -> None:
    """Record from now on what this process (the embedded stack's daemon) starts."""
    global _recording
    folder.mkdir(parents=True, exist_ok=True)
    _recording = folder / f"{PREFIX}{os.getpid()}"
    _recording.write_text(json.dumps({"daemon": os.getpid(), "start": start_time(os.getpid())}) + "\n")


def stop_recording() -> None:
    """A clean exit: everything recorded has been stopped; forget it."""
    global _recording
    if _recording is not None:
        _recording.unlink(missing_ok=True)
        _recording = None


def record(pid: int, what: str, **leaves: Any) -> None:
    """Note a child started by this process, in its own process group (`pid` leads it); no-op unless
    recording. `leaves`: `sidecar_id` (its arenas) or `directory` (a folder to remove)."""
    if _recording is None:
        return
    line = json.dumps({"pid": pid, "pgid": pid, "start": start_time(pid), "what": what, **leaves})
    with open(_recording, "a") as out:  # one short append per line: whole lines, never interleaved
        out.write(line + "\n")


def stop_leftovers(folder: pathlib.Path, grace_s: float = GRACE_S) -> list[str]:
    """Stop what the dead stacks recorded in `folder` left running; return what was stopped ("redis pid 123")."""
    stopped: list[str] = []
    for path in sorted(folder.glob(f"{PREFIX}*")):
        try:
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, json.JSONDecodeError):
            continue
        if not lines or "daemon" not in lines[0]:
            continue
        daemon = lines[0]
        if daemon["start"] is not None and start_time(daemon["daemon"]) == daemon["start"]:
            continue  # its daemon still runs: it owns its children
        children = lines[1:]
        stopped += _stop(children, grace_s)
        for child in children:
            if child.get("sidecar_id"):
                from flyte_cornserve.sidecar.arena import remove_stale_arenas

                remove_stale_arenas(SHM_DIR, child["sidecar_id"])
            if child.get("directory"):
                shutil.rmtree(child["directory"], ignore_errors=True)
        path.unlink(missing_ok=True)
    return stopped


def _members(child: dict[str, Any]) -> list[int]:
    """The live processes of the child's group that it started (or itself): none if its group id
    now belongs to another process (the leader's pid was recycled)."""
    pgid, started = child["pgid"], child["start"]
    if started is None:
        return []
    leader = start_time(pgid)
    if leader is not None and leader != started:
        return []  # another process has that pid (and so, if it leads a group, that group id)
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _group_of(int(entry)) == pgid:
            begun = start_time(int(entry))
            if begun is not None and begun >= started:
                members.append(int(entry))
    return members


def _stop(children: list[dict[str, Any]], grace_s: float) -> list[str]:
    """SIGTERM every live member of the children's groups, SIGKILL those alive after `grace_s`."""
    held: dict[int, tuple[int, str]] = {}  # pidfd -> (pid, what)
    for child in children:
        for pid in _members(child):
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            begun = start_time(pid)  # checked after the pidfd is held: from here on it names this process
            if begun is None or begun < child["start"] or _group_of(pid) != child["pgid"]:  # gone, or recycled
                os.close(fd)
                continue
            held[fd] = (pid, child["what"] if pid == child["pid"] else f"{child['what']}'s child")
    try:
        for fd in held:
            _signal(fd, signal.SIGTERM)
        alive = set(held)
        deadline = time.monotonic() + grace_s
        while alive and (left := deadline - time.monotonic()) > 0:
            exited, _, _ = select.select(list(alive), [], [], left)
            alive -= set(exited)
        for fd in alive:
            _signal(fd, signal.SIGKILL)
        deadline = time.monotonic() + grace_s
        while alive and (left := deadline - time.monotonic()) > 0:
            exited, _, _ = select.select(list(alive), [], [], left)
            alive -= set(exited)
        return [f"{what} pid {pid}" for pid, what in held.values()]
    finally:
        for fd in held:
            os.close(fd)


def _signal(fd: int, sig: int) -> None:
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        pass
