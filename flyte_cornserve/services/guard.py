"""Run a command that dies with the process that started it: `python guard.py PARENT_PID GRACE_S COMMAND...`.

Run as a script (no package import: it costs ~20 ms), as the first process of a process group of its
own (the backend starts it with `process_group=0`). It forks a watcher (twice, so the command never
sees a child it did not start) and then *execs* the command, which so keeps the guard's pid and
leads the group: whoever started it sees the command's pid and exit code, as without the guard.

The watcher holds a pidfd of the parent (the control plane: a process, not a thread, unlike
`PR_SET_PDEATHSIG`) and one of the command. When the parent dies first, it sends SIGTERM to the
group (executors drain, the sidecar removes its arena, vLLM's engine core exits) and after `GRACE_S`
SIGKILLs the group (what is left, a vLLM engine core included, and itself). When the command exits
first it just exits (the backend ends what is left of the group, as before).
"""

import os
import select
import signal
import sys


def main() -> None:
    parent, grace_s, command = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
    parent_fd = os.pidfd_open(parent)
    if os.getppid() != parent:  # it died before we held its pidfd
        os._exit(70)
    me = os.getpid()
    if os.fork() == 0:  # the intermediate: forks the watcher and exits, so nobody must reap it
        if os.fork() == 0:
            _watch(parent_fd, os.pidfd_open(me), grace_s)
        os._exit(0)
    os.waitpid(-1, 0)
    os.close(parent_fd)  # pidfds are close-on-exec anyway
    os.execvp(command[0], command)


def _watch(parent_fd: int, command_fd: int, grace_s: float) -> None:
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's SIGTERM below is not for us
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.closerange(0, 3)  # hold no log pipe open
        readable, _, _ = select.select([parent_fd, command_fd], [], [])
        if command_fd in readable:
            os._exit(0)
        os.killpg(0, signal.SIGTERM)
        select.select([command_fd], [], [], grace_s)
        os.killpg(0, signal.SIGKILL)
    finally:
        os._exit(0)


if __name__ == "__main__":
    main()
