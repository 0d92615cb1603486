"""`cornserve sidecar` refuses bad configuration with a message naming it, before it holds anything."""

from __future__ import annotations

import os
import re
import subprocess
import uuid

import pytest
import torch

from flyte_cornserve.launch import ReadyFile, start
from flyte_cornserve.redis_server import ENV_URL
from flyte_cornserve.sidecar.arena import remove_stale_arenas
from flyte_cornserve.sidecar.cli import ByteSize
from flyte_cornserve.sidecar.wire import ENV_TOKEN
from tests.processes import CLI, SHM_DIR, START_TIMEOUT_S


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1048576", 1 << 20), ("512MiB", 512 << 20), ("4GiB", 4 << 30), ("1.5 GiB", 3 << 29), ("2gb", 2 * 10**9)],
)
def test_sizes_are_parsed_with_binary_and_decimal_units(text: str, expected: int) -> None:
    assert ByteSize().convert(text, None, None) == expected


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--memory-cap", "lots"], "'lots' is not a size such as 512MiB or 4GiB"),
        (["--memory-cap", "1000TiB"], "exceed the .*-byte filesystem of /dev/shm"),
        (["--id", "has_underscore"], "sidecar id 'has_underscore' must match"),
        (["--memory-cap", "100"], "capacity 100 is smaller than one 4096-byte extent"),
        (["--host", "0.0.0.0"], "listening on '0.0.0.0' needs --advertise-host"),
    ],
)
def test_bad_configuration_is_refused(sidecars, arguments: list[str], message: str) -> None:
    result = sidecars.run_cli("sidecar", "--namespace", sidecars.namespace, *arguments)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert sidecars.directory.keys() == set()


def test_a_kubernetes_node_name_is_a_sidecar_id() -> None:
    """The DaemonSet's sidecars take their node's name (deploy/base/sidecar.yaml), dots and all."""
    from flyte_cornserve.sidecar.arena import new_arena_name
    from flyte_cornserve.sidecar.directory import check_sidecar_id

    node = "ip-10-0-1-23.us-west-2.compute.internal"
    assert check_sidecar_id(node) == node
    assert len(new_arena_name("n" * 230)) < 255  # the longest id's arena file name is a file name


# --- listening beyond loopback needs the shared token ----------------------------------------------


def run_sidecar_until_it_exits(sidecars, sidecar_id: str, *arguments: str, token: str = "") -> subprocess.CompletedProcess[str]:
    """`cornserve sidecar ARGUMENTS...`, expected to refuse to start; one that serves instead is stopped
    (by its PID) and fails the test."""
    command = CLI + ["sidecar", "--id", sidecar_id, "--namespace", sidecars.namespace, "--memory-cap", "16MiB", *arguments]
    process = subprocess.Popen(command, env={**os.environ, ENV_URL: sidecars.redis_url, ENV_TOKEN: token},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        remove_stale_arenas(SHM_DIR, sidecar_id)
        raise AssertionError(f"the sidecar started instead of refusing: {stdout!r}") from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.parametrize("arguments", [["--host", "0.0.0.0", "--advertise-host", "127.0.0.1"], ["--host", "10.255.1.2"]])
def test_listening_beyond_loopback_without_a_token_is_refused(sidecars, arguments: list[str]) -> None:
    result = run_sidecar_until_it_exits(sidecars, f"t{uuid.uuid4().hex[:10]}", *arguments)
    assert result.returncode == 2  # a usage error, like the other bad options
    assert "Traceback" not in result.stderr
    assert f"${ENV_TOKEN}" in result.stderr and "--token" in result.stderr, result.stderr
    assert f"listening on {arguments[1]!r}" in result.stderr, result.stderr
    assert sidecars.directory.keys() == set()


def test_listening_beyond_loopback_with_a_token_is_allowed(sidecars, tmp_path) -> None:
    sidecar_id = f"t{uuid.uuid4().hex[:10]}"
    command = CLI + ["sidecar", "--id", sidecar_id, "--namespace", sidecars.namespace, "--memory-cap", "16MiB",
                     "--host", "0.0.0.0", "--advertise-host", "127.0.0.1", "--log-level", "WARNING"]
    launched = start(command, {**os.environ, ENV_URL: sidecars.redis_url, ENV_TOKEN: "s3cret"}, tmp_path / "sidecar.log",
                     ReadyFile())
    process = launched.process
    try:
        assert launched.wait_ready(START_TIMEOUT_S)["id"] == sidecar_id
        client = sidecars.client(sidecar_id, token="s3cret")
        assert torch.equal(client.get(client.put(torch.ones(3))), torch.ones(3))
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
