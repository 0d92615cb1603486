"""`cornserve up / deploy / status / undeploy / down` on an embedded stack of its own.

No CORNSERVE_REDIS_URL: `up` starts the detached daemon with its private Redis, exactly as the first
`pyflyte run` would; it lives in a home of its own, so the developer's stack is never touched.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from cornserve_builtins.encoder import EncoderTask
from flyte_cornserve.models import resolve_model
from flyte_cornserve.services.stack import process_alive

from ..conftest import CACHE

CLI = [sys.executable, "-c", "from flyte_cornserve.cli import main; main()"]


@pytest.fixture
def home() -> Iterator[pathlib.Path]:
    folder = pathlib.Path(tempfile.mkdtemp(prefix="h", dir=CACHE))  # short: the Redis socket lives here
    yield folder
    state = folder / "stack" / "stack.json"
    if state.exists() and process_alive(pid := json.loads(state.read_text())["pid"]):
        os.kill(pid, 15)  # a failed test must not leave its daemon behind
    shutil.rmtree(folder, ignore_errors=True)


def cornserve(home: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CORNSERVE_REDIS_URL"}
    env |= {"CORNSERVE_HOME": str(home), "COLUMNS": "250"}
    done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"cornserve {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def test_up_deploy_status_undeploy_down(home: pathlib.Path) -> None:
    # a model folder, so this home needs no tiny-model build of its own
    task = EncoderTask(model_id=str(resolve_model("tiny-llava")))

    assert "the stack is up" in cornserve(home, "up", "--cpu", "2", "--memory", "4Gi").stdout
    state = json.loads((home / "stack" / "stack.json").read_text())
    assert "already up" in cornserve(home, "up").stdout

    deployed = cornserve(home, "deploy", task.to_json()).stdout
    assert f"{task.deployment_id()}  EncoderTask ready" in deployed

    shown = cornserve(home, "status").stdout
    assert task.deployment_id() in shown and "READY" in shown and "cpu=2 memory=4Gi gpu=0" in shown
    assert "cpu=1 memory=2Gi gpu=0" in shown  # what is left once the encoder (1 cpu, 2Gi) reserved its share
    endpoint = r"│\s*(\S+)\s*│\s*(\d+)\s*│\s*(http://127\.0\.0\.1:\d+/metrics)\s*│"
    listed = {name.split(":")[0]: (int(pid), url) for name, pid, url in re.findall(endpoint, shown)}
    assert set(listed) == {"control-plane", "executor", "sidecar"}, shown  # where each process serves metrics
    assert listed["control-plane"][0] == state["pid"]  # the daemon runs the control plane

    assert f"{task.deployment_id()}  stopped" in cornserve(home, "undeploy", task.deployment_id()).stdout
    assert task.deployment_id() not in cornserve(home, "status").stdout

    assert "the stack is down" in cornserve(home, "down").stdout
    assert not process_alive(state["pid"])
    assert not (home / "stack" / "stack.json").exists()
    assert "no stack is running" in cornserve(home, "status").stdout
