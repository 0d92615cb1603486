"""Keep everything a test writes (TMPDIR, HOME for flytekit's local state) inside the project's .cache."""

from __future__ import annotations

import os
import pathlib

import pytest

PROJECT = pathlib.Path(__file__).resolve().parents[1]
CACHE = pathlib.Path(os.environ.get("CORNSERVE_HOME", PROJECT / ".cache"))


@pytest.fixture(autouse=True, scope="session")
def _project_owned_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("home")
    os.environ["HOME"] = str(home)
    os.environ.setdefault("CORNSERVE_HOME", str(CACHE))


def pytest_configure(config: pytest.Config) -> None:
    tmp = CACHE / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(tmp)
    if not config.option.basetemp:
        config.option.basetemp = str(tmp / "pytest")
