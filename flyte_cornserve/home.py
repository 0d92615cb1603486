"""`$CORNSERVE_HOME`: the one folder where the project keeps runtime files (default `<repo>/.cache`)."""

from __future__ import annotations

import os
import pathlib
import tempfile

ENV_HOME = "CORNSERVE_HOME"


def cornserve_home() -> pathlib.Path:
    return pathlib.Path(os.environ.get(ENV_HOME) or pathlib.Path(__file__).resolve().parents[1] / ".cache")


def use_project_tmp() -> pathlib.Path:
    """Point TMPDIR, for this process and the ones it starts, at `$CORNSERVE_HOME/tmp`."""
    tmp = cornserve_home() / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = tempfile.tempdir = str(tmp)
    return tmp
