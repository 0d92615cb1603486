"""Keep everything a test writes (TMPDIR, HOME for flytekit's local state) inside the project's .cache."""

from __future__ import annotations

import os
import pathlib
import tempfile

import pytest
from collections.abc import Iterator

from flyte_cornserve.redis_server import ENV_URL

from .media_servers import S3Server, serve_s3
from .stack import Stack

PROJECT = pathlib.Path(__file__).resolve().parents[1]
CACHE = pathlib.Path(os.environ.get("CORNSERVE_HOME", PROJECT / ".cache"))


@pytest.fixture(autouse=True, scope="session")
def _project_owned_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("home")
    os.environ["HOME"] = str(home)
    os.environ.setdefault("CORNSERVE_HOME", str(CACHE))


def pytest_configure(config: pytest.Config) -> None:
    # pytest's numbered temp folders (safe for concurrent runs) then live under the project's .cache.
    tmp = CACHE / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = str(tmp)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """`CORNSERVE_REDIS_URL` if set (tests then also run against that external server), else a private
    embedded redis-server for this test session, exported so child processes share it."""
    from flyte_cornserve.redis_server import ENV_URL, EmbeddedRedis

    if os.environ.get(ENV_URL):
        yield os.environ[ENV_URL]
        return
    with EmbeddedRedis() as server:
        os.environ[ENV_URL] = server.url
        try:
            yield server.url
        finally:
            del os.environ[ENV_URL]


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """An S3 API server (moto) for the session; the shared stack's executors read from it."""
    with serve_s3() as server:
        yield server


@pytest.fixture(scope="session")
def stack(redis_url: str, s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The shared stack: room for several executors (this is accounting, not a limit of the machine),
    10,000 batch items in flight, and executors whose credentials reach the session's S3 server."""
    started = Stack(redis_url, tmp_path_factory.mktemp("stack") / "control-plane.log",
                    "--cpu", "8", "--memory", "32Gi", "--gpu", "0", "--batch-in-flight", "10000", env=s3.env)
    yield started
    started.stop()


@pytest.fixture
def use_stack(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """Local workflow runs in this test go to `stack` (as `pyflyte run` would with the URL set)."""
    monkeypatch.setenv(ENV_URL, stack.url)
    return stack
