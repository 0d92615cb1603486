"""The project's Redis: an embedded private server by default, the external one when configured."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
import redis

from flyte_cornserve import redis_server
from flyte_cornserve.home import cornserve_home


def _running(pid: int) -> bool:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def short_home() -> Iterator[pathlib.Path]:
    """A home inside the project's cache: pytest's tmp_path can be too deep for a unix socket path."""
    home = pathlib.Path(tempfile.mkdtemp(prefix="h", dir=cornserve_home()))
    yield home
    shutil.rmtree(home, ignore_errors=True)


def test_embedded_redis_serves_on_a_private_unix_socket_and_stops(short_home: pathlib.Path) -> None:
    server = redis_server.EmbeddedRedis(home=short_home).start()
    try:
        assert server.url.startswith("unix://")
        assert server.socket_path.parent.parent == short_home
        assert server.socket_path.parent.stat().st_mode & 0o777 == 0o700
        client = redis_server.connect(server.url)
        assert client.ping()
        assert client.config_get("save")["save"] == ""  # no persistence
        pid = server.process.pid
    finally:
        server.stop()
    assert not _running(pid)
    assert not server.socket_path.parent.exists()
    with pytest.raises(redis.ConnectionError):
        redis_server.connect(server.url).ping()


def test_too_long_socket_path_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    deep = tmp_path / ("d" * 100)
    with pytest.raises(RuntimeError, match="CORNSERVE_HOME"):
        redis_server.EmbeddedRedis(home=deep).start()
    assert list(deep.iterdir()) == []


def test_configured_url_is_used_as_is(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(redis_server.ENV_URL, redis_url)
    assert redis_server.redis_url() == redis_url
    client = redis_server.connect(decode_responses=True)
    assert client.ping()


def test_unconfigured_process_starts_its_own_server_exports_it_and_stops_it_on_exit() -> None:
    script = (
        "import os; from flyte_cornserve import redis_server as r\n"
        "url = r.redis_url()\n"
        "assert os.environ[r.ENV_URL] == url and r.redis_url() == url\n"
        "assert r.connect().ping()\n"
        "print(r._embedded.process.pid, r._embedded.socket_path.parent)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != redis_server.ENV_URL}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60, check=True)
    pid, folder = out.stdout.split()
    assert not _running(int(pid))
    assert not pathlib.Path(folder).exists()


def test_a_restarted_embedded_redis_keeps_its_data(short_home: pathlib.Path) -> None:
    server = redis_server.EmbeddedRedis(home=short_home).start()
    try:
        assert redis_server.connect(server.url).config_get("appendonly")["appendonly"] == "yes"
        redis_server.connect(server.url).set("kept", "across the restart")
        before = server.process.pid
        server.restart()
        assert server.process.pid != before and not _running(before)
        assert redis_server.connect(server.url).get("kept") == b"across the restart"
    finally:
        server.stop()
