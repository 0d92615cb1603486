"""Per-unit-task overhead of a local run on a warm stack: ours vs flytekit's stock async connector mixin.

The workflow is the 2-node caption graph (encoder -> LLM, tiny Llava) run by flytekit's local
execution, as `pyflyte run` runs it once the module is imported. Overhead per unit task = (the
workflow's wall time - the executors' own compute, RUNNING to outcome as the executors record it)
/ 2. "ours" is `CornserveTask.execute` (the dispatcher in-process, waiting on Redis events);
"stock" is the same tasks and the same connector through `AsyncConnectorExecutorMixin`, which
polls `get()` once a second. Runs alternate, ours first, on one private stack started here.

    .venv/bin/python bench/connector_overhead.py [--runs 20]
"""

from __future__ import annotations

import asyncio
import pathlib
import statistics
import sys
import time

import click

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from stack import PrivateStack  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMAGE = str(ROOT / "workflows" / "images" / "blue-circle-on-yellow.png")


@click.command()
@click.option("--runs", default=20, show_default=True, help="workflow runs per side")
def main(runs: int) -> None:
    from flyte_cornserve.home import use_project_tmp

    use_project_tmp()
    with PrivateStack() as stack:
        measure(stack, runs)


def measure(stack: PrivateStack, runs: int) -> None:
    from flytekit import workflow
    from flytekit.extend.backend.base_connector import AsyncConnectorExecutorMixin

    from cornserve_builtins.encoder import EncoderTask
    from cornserve_builtins.llm import LLMTask
    from flyte_cornserve.flyte import CornserveTask, flyte_task
    from flyte_cornserve.flyte import connector  # noqa: F401  (registers the connector the stock mixin runs)
    from flyte_cornserve.protocol.invocations import InvocationStore, State
    from flyte_cornserve.redis_server import connect_async

    encoder, llm = EncoderTask(model_id="tiny-llava"), LLMTask(model_id="tiny-llava")

    class StockMixinTask(AsyncConnectorExecutorMixin, CornserveTask):
        """The same cornserve task, executed locally the way flytekit runs any async connector task."""

    ours_encoder, ours_llm = flyte_task(encoder), flyte_task(llm)
    stock_encoder, stock_llm = StockMixinTask(encoder), StockMixinTask(llm)

    @workflow
    def ours(image: str) -> str:
        return ours_llm(prompt="Describe the image.", embeddings=[ours_encoder(data=image)])

    @workflow
    def stock(image: str) -> str:
        return stock_llm(prompt="Describe the image.", embeddings=[stock_encoder(data=image)])

    async def last_two() -> list:
        return await InvocationStore(connect_async(stack.url)).recent(2)

    print("deploying the encoder and the LLM (tiny Llava) ...", flush=True)
    stack.deploy(encoder, llm)
    for workflow_fn in (ours, stock):  # warm-up: connections, flytekit's first compile
        workflow_fn(image=IMAGE)

    samples: dict[str, list[tuple[float, float]]] = {"ours": [], "stock": []}
    captions = set()
    for run in range(runs):
        for name, workflow_fn in (("ours", ours), ("stock", stock)):
            started = time.perf_counter()
            captions.add(workflow_fn(image=IMAGE))
            wall = time.perf_counter() - started
            records = asyncio.run(last_two())
            assert all(r.state is State.DONE for r in records), records
            samples[name].append((wall, sum(r.compute_s for r in records)))
        print(f"run {run + 1}/{runs}: ours {samples['ours'][-1][0] * 1000:.0f} ms, "
              f"stock {samples['stock'][-1][0] * 1000:.0f} ms", flush=True)

    def summary(name: str) -> tuple[float, float, float]:
        walls = [wall for wall, _ in samples[name]]
        overheads = [(wall - compute) / 2 for wall, compute in samples[name]]
        computes = [compute for _, compute in samples[name]]
        return statistics.median(walls), statistics.median(computes), statistics.median(overheads)

    ours_wall, ours_compute, ours_overhead = summary("ours")
    stock_wall, stock_compute, stock_overhead = summary("stock")
    print(f"\ncaptions: {sorted(captions)}")
    print(f"{'':8} {'wall ms':>9} {'compute ms':>11} {'overhead/unit task ms':>22}")
    print(f"{'ours':8} {ours_wall * 1000:9.1f} {ours_compute * 1000:11.1f} {ours_overhead * 1000:22.1f}")
    print(f"{'stock':8} {stock_wall * 1000:9.1f} {stock_compute * 1000:11.1f} {stock_overhead * 1000:22.1f}")
    print(f"RESULT runs={runs} ours_overhead_ms={ours_overhead * 1000:.1f} stock_overhead_ms={stock_overhead * 1000:.1f} "
          f"overhead_ratio={stock_overhead / ours_overhead:.1f} ours_wall_ms={ours_wall * 1000:.1f} "
          f"stock_wall_ms={stock_wall * 1000:.1f} target_ms=50 meets_target={ours_overhead * 1000 <= 50}")


if __name__ == "__main__":
    sys.exit(main())
