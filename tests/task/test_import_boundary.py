"""Import boundaries: `task` and `decks` stay framework-free, the executors run without the control
plane's package (`services`), and the connector and the unit task do not import each other."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

FORBIDDEN = ("flytekit", "redis", "torch", "flyteidl", "grpc")


def frameworks_imported_by(code: str) -> str:
    """Run `code` in a fresh interpreter; which of FORBIDDEN it imported."""
    check = f"\nprint(sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r})))\n"
    result = subprocess.run([sys.executable, "-c", "import sys\n" + code + check], capture_output=True, text=True,
                            check=True)
    return result.stdout.strip()


def test_task_package_imports_no_framework():
    assert frameworks_imported_by(
        "import flyte_cornserve.task as t\n"
        "from cornserve_builtins.mllm import MLLMTask\n"
        "t.trace(MLLMTask(model_id='m'), {'prompt': 'p', 'images': ['a.png']})\n"
        "t.load_plugins()\n"
    ) == "[]"


def test_decks_package_imports_no_framework():
    """A deck renders from plain data: the console's view does not depend on Redis or Flyte."""
    assert frameworks_imported_by(
        "from flyte_cornserve.decks.render import render_chunk\n"
        "from flyte_cornserve.decks.views import ChunkView\n"
        "render_chunk(ChunkView('t', 'b', 'QUEUED', 1, 0, 0, 0, 0.0, None, None, 1.0))\n"
    ) == "[]"


def modules_loaded_by(code: str, prefix: str) -> list[str]:
    """Run `code` in a fresh interpreter; the modules under `prefix` it loaded."""
    check = f"\nprint(sorted(m for m in sys.modules if m == {prefix!r} or m.startswith({prefix + '.'!r})))\n"
    result = subprocess.run([sys.executable, "-c", "import sys\n" + code + check], capture_output=True, text=True,
                            check=True)
    return ast.literal_eval(result.stdout.strip())


def test_executors_import_no_control_plane():
    """The executor side shares the protocol (`flyte_cornserve.protocol`) with the control plane,
    not the control plane's package: an executor runs without `services`."""
    assert modules_loaded_by(
        "import flyte_cornserve.executors.runtime\n"
        "import flyte_cornserve.executors.encoder\n"
        "import flyte_cornserve.executors.cli\n"
        "import flyte_cornserve.protocol.deployments\n",
        "flyte_cornserve.services",
    ) == []


def test_protocol_imports_neither_side():
    assert modules_loaded_by("import flyte_cornserve.protocol.invocations, flyte_cornserve.protocol.deployments\n",
                             "flyte_cornserve.services") == []
    assert modules_loaded_by("import flyte_cornserve.protocol.invocations, flyte_cornserve.protocol.deployments\n",
                             "flyte_cornserve.executors") == []


def _flyte_imports(module: str) -> set[str]:
    """The `flyte_cornserve.flyte` modules that `module` (a file of that package) imports, anywhere in it."""
    import flyte_cornserve.flyte

    tree = ast.parse((pathlib.Path(flyte_cornserve.flyte.__file__).parent / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                found |= {node.module} if node.module else {alias.name for alias in node.names}
            elif node.module and node.module.startswith("flyte_cornserve.flyte."):
                found.add(node.module.removeprefix("flyte_cornserve.flyte."))
            elif node.module == "flyte_cornserve.flyte":
                found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("flyte_cornserve.flyte.") for a in node.names
                      if a.name.startswith("flyte_cornserve.flyte.")}
    return found


def test_connector_and_unit_task_do_not_import_each_other():
    """The connector imports `unit_task` (its task type); a local run goes through `local_run`,
    which imports no connector."""
    assert "unit_task" in _flyte_imports("connector")
    assert "connector" not in _flyte_imports("unit_task")
    assert "connector" not in _flyte_imports("local_run")
    assert "connector" not in _flyte_imports("dispatchers")
