"""`flyte_cornserve.task` and `flyte_cornserve.decks` stay framework-free: no flytekit, redis or torch."""

from __future__ import annotations

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
