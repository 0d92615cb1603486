"""Flyte's cache and the tensor cache agree: a `TensorRef` that Flyte's cache hands out after the
stack that held its tensor is gone is computed again from what the ref carries (issue 12)."""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator

import pytest
from PIL import Image

from flyte_cornserve.models import resolve_model
from flyte_cornserve.models.tiny import COLORS, SHAPES, draw
from flyte_cornserve.redis_server import ENV_URL
from flyte_cornserve.services.stack import process_alive

from ..conftest import CACHE

PYFLYTE = pathlib.Path(sys.executable).with_name("pyflyte")
CLI = [sys.executable, "-c", "from flyte_cornserve.cli import main; main()"]

WORKFLOW = """
from flytekit import workflow

from cornserve_builtins.encoder import EncoderTask
from cornserve_builtins.mllm import MLLMTask
from flyte_cornserve.flyte import call
from flyte_cornserve.task import TaskOptions

MODEL = {model!r}
captioner = MLLMTask(model_id=MODEL, encoder=EncoderTask(model_id=MODEL, options=TaskOptions({options})))


@workflow
def caption(image: str) -> str:
    return call(captioner, prompt="Describe the image.", images=[image]).text
"""


@pytest.fixture
def home() -> Iterator[pathlib.Path]:
    """An embedded stack's home of its own (short: the Redis socket lives there)."""
    folder = pathlib.Path(tempfile.mkdtemp(prefix="h", dir=CACHE))
    yield folder
    state = folder / "stack" / "stack.json"
    if state.exists() and process_alive(pid := json.loads(state.read_text())["pid"]):
        os.kill(pid, 15)  # it stops its children and Redis, while the next tests run
    shutil.rmtree(folder, ignore_errors=True)


def run(home: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A command as a user runs it: no stack URL, so the embedded stack of `home` serves it."""
    env = {k: v for k, v in os.environ.items() if k != ENV_URL} | {"CORNSERVE_HOME": str(home), "COLUMNS": "250"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def workflow_file(folder: pathlib.Path, options: str) -> pathlib.Path:
    path = folder / "cached_caption.py"
    # a model folder, so this home needs no tiny-model build of its own
    path.write_text(textwrap.dedent(WORKFLOW.format(model=str(resolve_model("tiny-llava")), options=options)))
    return path


def an_image(folder: pathlib.Path) -> pathlib.Path:
    rng = random.Random(12)
    path = folder / "shape.png"
    Image.fromarray(draw("red", rng.choice(SHAPES), "blue", rng)).save(path)
    assert "red" in COLORS and "blue" in COLORS
    return path


def test_a_cached_encoder_ref_after_cornserve_down_is_computed_again_and_captions(home, tmp_path) -> None:
    """The README's `TaskOptions(cache=True, cache_version=...)` on the encoder of an `MLLMTask`,
    run twice with the whole stack stopped between: the second run gets the encoder's ref from
    Flyte's cache, its tensor is gone with the stack, and the LLM's dispatcher computes it again
    from the ref's source: both runs caption, alike."""
    flow, image = workflow_file(tmp_path, 'cache=True, cache_version="1"'), an_image(tmp_path)

    first = run(home, str(PYFLYTE), "run", str(flow), "caption", "--image", str(image))
    assert "is gone; computing it again" not in first.stderr, first.stderr
    run(home, *CLI, "down")
    second = run(home, str(PYFLYTE), "run", str(flow), "caption", "--image", str(image))  # (`home` stops it)

    caption = first.stdout.strip().splitlines()[-1]
    assert caption and second.stdout.strip().splitlines()[-1] == caption, (first.stdout, second.stdout)
    assert "LLMTask" in second.stderr and "is gone; computing it again with EncoderTask" in second.stderr, second.stderr
    assert str(image) in second.stderr  # from the input the ref names
