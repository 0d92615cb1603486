"""`flyte_cornserve.task` stays framework-free: no flytekit, redis or torch."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("flytekit", "redis", "torch", "flyteidl", "grpc")


def test_task_package_imports_no_framework():
    code = (
        "import sys\n"
        "import flyte_cornserve.task as t\n"
        "from cornserve_builtins.mllm import MLLMTask\n"
        "t.trace(MLLMTask(model_id='m'), {'prompt': 'p', 'images': ['a.png']})\n"
        "t.load_plugins()\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
