"""Warm executor vs a cold process per call (the TaskVine comparison), in one run (issue 4).

    .venv/bin/python bench/warm_vs_cold.py [--count 100]

warm: `count` encoder invocations, one after another, through one warm `cornserve executor`
      (model loaded once; its start-up is printed but not counted, as it is paid once per deployment);
      also the same `count` submitted at once (the executor batches them).
cold: `count` plain flytekit tasks, each `pyflyte run` in a fresh Python process that imports
      flytekit and torch, loads the same tiny Llava vision tower + projector and encodes one image:
      interpreter start, imports, model load, encode, what each call costs in its own pod today.
Both encode the same image file with the same loading code.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import random
import subprocess
import sys
import tempfile
import time

from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from stack import PrivateStack  # noqa: E402

from cornserve_builtins.encoder import EncoderTask  # noqa: E402
from flyte_cornserve import redis_server  # noqa: E402
from flyte_cornserve.home import use_project_tmp  # noqa: E402
from flyte_cornserve.models import resolve_model  # noqa: E402
from flyte_cornserve.models.tiny import draw  # noqa: E402
from flyte_cornserve.protocol.invocations import InvocationStore, State  # noqa: E402

BENCH = pathlib.Path(__file__).resolve().parent
PYFLYTE = pathlib.Path(sys.executable).with_name("pyflyte")


async def warm(image: str, count: int) -> tuple[float, float]:
    task = EncoderTask(model_id="tiny-llava")
    store = InvocationStore(redis_server.connect_async())
    await store.wait(await store.submit(task.deployment_id(), {"data": image}), 60)  # warm-up
    started = time.perf_counter()
    for _ in range(count):
        record = await store.wait(await store.submit(task.deployment_id(), {"data": image}), 60)
        assert record.state == State.DONE, record.error
    sequential = time.perf_counter() - started
    started = time.perf_counter()
    ids = [await store.submit(task.deployment_id(), {"data": image}) for _ in range(count)]
    records = [await store.wait(i, 120) for i in ids]
    assert all(r.state == State.DONE for r in records)
    return sequential, time.perf_counter() - started


def cold(image: str, count: int) -> float:
    started = time.perf_counter()
    for i in range(count):
        subprocess.run([str(PYFLYTE), "run", str(BENCH / "cold_encode.py"), "encode_one", "--image", image],
                       check=True, capture_output=True, cwd=BENCH.parent)
        print(f"\r  cold {i + 1}/{count}", end="", flush=True, file=sys.stderr)
    print(file=sys.stderr)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100)
    count = parser.parse_args().count
    use_project_tmp()
    resolve_model("tiny-llava")
    with tempfile.TemporaryDirectory() as scratch:
        image = pathlib.Path(scratch) / "shape.png"
        Image.fromarray(draw("red", "circle", "white", random.Random(0))).save(image)
        report(*measure(str(image), count), count)


def measure(image: str, count: int) -> tuple[float, float, float, float]:
    started = time.perf_counter()
    with PrivateStack() as stack:
        stack.deploy(EncoderTask(model_id="tiny-llava"))
        startup = time.perf_counter() - started
        warm_sequential, warm_batched = asyncio.run(warm(image, count))
    return startup, warm_sequential, warm_batched, cold(image, count)


def report(startup: float, warm_sequential: float, warm_batched: float, cold_total: float, count: int) -> None:
    print(f"{'':28}{'total s':>10}{'per call ms':>14}")
    print(f"{'warm executor, sequential':28}{warm_sequential:>10.2f}{1000 * warm_sequential / count:>14.1f}")
    print(f"{'warm executor, all at once':28}{warm_batched:>10.2f}{1000 * warm_batched / count:>14.1f}")
    print(f"{'cold process per call':28}{cold_total:>10.2f}{1000 * cold_total / count:>14.1f}")
    print(f"(warm executor start-up, paid once: {startup:.1f} s)")
    print(f"RESULT count={count} warm_s={warm_sequential:.3f} warm_batched_s={warm_batched:.3f} "
          f"cold_s={cold_total:.3f} speedup={cold_total / warm_sequential:.1f} "
          f"speedup_batched={cold_total / warm_batched:.1f} warm_startup_s={startup:.1f}")


if __name__ == "__main__":
    main()
