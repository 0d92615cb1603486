"""The fuzz suites reuse the executor tests' fixtures (a module's sidecar and executors on the
session's Redis) and the session's shared stack (tests/conftest.py)."""

from tests.executors.conftest import executors, module_sidecar, sidecar_pool, sidecar_client, tiny_llava  # noqa: F401
