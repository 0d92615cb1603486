"""Real `cornserve sidecar` processes for the sidecar tests, on the session's Redis (the `redis_url`
fixture of tests/conftest.py: embedded, or the external one named by `CORNSERVE_REDIS_URL`).

Each test gets its own Redis namespace, so tests never see each other's keys, even on an external
Redis. Every process a test starts is stopped by its fixture, by PID, and the shared memory of
sidecars that a test killed is removed afterwards.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest


from tests.processes import Sidecars


def _new_namespace() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def sidecars(redis_url: str) -> Iterator[Sidecars]:
    """Sidecars of this test only."""
    started = Sidecars(redis_url, _new_namespace())
    yield started
    started.close()


@pytest.fixture(scope="module")
def module_sidecars(redis_url: str) -> Iterator[Sidecars]:
    """Sidecars shared by the tests of one module (for tests that leave them as they found them)."""
    started = Sidecars(redis_url, _new_namespace())
    yield started
    started.close()


def _wait_until(condition: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    """Wait for a condition that another process makes true; fail the test if it never does."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def wait_until() -> Callable[..., None]:
    """`wait_until(condition, what, timeout=15)`: a bounded wait for another process's doing."""
    return _wait_until
