"""`cornserve sidecar` refuses bad configuration with a message naming it, before it holds anything."""

from __future__ import annotations

import re

import pytest

from flyte_cornserve.sidecar.cli import ByteSize


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
