"""The launcher (`flyte_cornserve/launch.py`) with real child processes."""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import sys
import tempfile

import pytest

from flyte_cornserve.home import cornserve_home
from flyte_cornserve.launch import ENV_READY_FILE, LaunchError, ReadyCommand, ReadyFile, ReadySocket, launch, start

ANNOUNCE = "from flyte_cornserve.launch import announce_ready; "


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_child_that_writes_its_ready_file_is_ready_with_what_it_announced(tmp_path: pathlib.Path) -> None:
    code = ANNOUNCE + "import os, sys; print('starting', flush=True); announce_ready(address='here:1'); " \
                      f"print({ENV_READY_FILE!r} in os.environ, flush=True); import signal; signal.pause()"
    child = launch(python(code), None, tmp_path / "child.log", ReadyFile(), timeout_s=60)
    try:
        assert child.info == {"address": "here:1"}
        assert child.process.poll() is None
        assert child.log_tail().startswith("starting\n")
    finally:
        child.process.terminate()
        child.process.wait()
    assert child.log_tail() == "starting\nFalse\n"  # announcing removes the variable (grandchildren don't see it)


def test_a_child_that_exits_before_it_is_ready_fails_with_its_log_tail(tmp_path: pathlib.Path) -> None:
    code = "import sys; [print('line', i) for i in range(100)]; print('no model here', file=sys.stderr); sys.exit(3)"
    with pytest.raises(LaunchError, match="exited with code 3 before it was ready") as caught:
        launch(python(code), None, tmp_path / "child.log", ReadyFile(), timeout_s=60, what="the child")
    assert caught.value.returncode == 3
    assert caught.value.log_tail.endswith("line 99\nno model here\n")
    assert "line 59\n" not in caught.value.log_tail  # only the tail
    assert "no model here" in str(caught.value)


def test_a_child_that_never_becomes_ready_is_stopped_at_the_timeout(tmp_path: pathlib.Path) -> None:
    child = start(python("import sys; print('loading', flush=True); import signal; signal.pause()"), None,
                  tmp_path / "child.log", ReadyFile(), process_group=0)
    with pytest.raises(LaunchError, match="not ready within 0.5 s") as caught:
        child.wait_ready(0.5)
    assert caught.value.returncode is None
    assert child.process.returncode is not None  # killed and reaped
    assert "loading" in caught.value.log_tail


def test_a_socket_is_ready_once_it_accepts(tmp_path: pathlib.Path) -> None:
    # a unix socket's path has at most 107 bytes: pytest's tmp_path may be deeper than that
    short = pathlib.Path(tempfile.mkdtemp(prefix="launch-", dir=cornserve_home()))
    path = short / "s.sock"
    code = ("import socket, sys, time; s = socket.socket(socket.AF_UNIX); "
            f"s.bind({str(path)!r}); s.listen(); print('listening', flush=True); s.accept(); import signal; signal.pause()")
    child = launch(python(code), None, tmp_path / "child.log", ReadySocket(path=path), timeout_s=60)
    try:
        assert child.info == {}
        assert child.process.poll() is None
    finally:
        child.kill()
        shutil.rmtree(short, ignore_errors=True)


def test_a_tcp_socket_that_nobody_opens_times_out(tmp_path: pathlib.Path) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: refuses connections
        child = start(python("import sys; import signal; signal.pause()"), None, tmp_path / "child.log",
                      ReadySocket(port=port))
        with pytest.raises(LaunchError, match="not ready within"):
            child.wait_ready(0.3)


def test_a_command_is_ready_once_it_succeeds_with_the_childs_own_environment(tmp_path: pathlib.Path) -> None:
    """A Kubernetes exec probe: the child's environment names its ready file; the launcher keeps it."""
    ready_file = tmp_path / "ready"
    code = ANNOUNCE + "import signal; announce_ready(serving=True); signal.pause()"
    probe = ReadyCommand(("sh", "-c", f'test -s "${ENV_READY_FILE}"'))
    child = launch(python(code), {**os.environ, ENV_READY_FILE: str(ready_file)}, tmp_path / "child.log",
                   probe, timeout_s=60)
    try:
        assert child.process.poll() is None
        assert ready_file.read_text() == '{"serving": true}'
    finally:
        child.kill()
