"""`$CORNSERVE_HOME`: the one folder where the project keeps runtime files (default `<repo>/.cache`)."""

from __future__ import annotations

import os
import pathlib

ENV_HOME = "CORNSERVE_HOME"


def cornserve_home() -> pathlib.Path:
    return pathlib.Path(os.environ.get(ENV_HOME) or pathlib.Path(__file__).resolve().parents[1] / ".cache")
