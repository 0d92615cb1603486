"""`cornserve executor --task <unit task JSON>`: run one persistent executor for a deployment."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import socket

import click

from flyte_cornserve import phases
from flyte_cornserve.descriptors import TaskExecutionDescriptor, descriptor_for
from flyte_cornserve.models.resolve import ModelNotFoundError
from flyte_cornserve.task import unit_task_from_json

from .handler import Handler

#: executor kind (a descriptor's `executor`) -> the handler class that hosts it
HANDLERS = {
    "encoder": "flyte_cornserve.executors.encoder:EncoderHandler",
    "vllm": "flyte_cornserve.executors.vllm_engine:VLLMHandler",
}


def make_handler(descriptor: TaskExecutionDescriptor, store) -> Handler:
    try:
        module, _, name = HANDLERS[descriptor.executor].partition(":")
    except KeyError:
        raise click.UsageError(f"no executor of kind {descriptor.executor!r}; known: {sorted(HANDLERS)}") from None
    return getattr(importlib.import_module(module), name)(descriptor, store)


@click.command("executor")
@click.option("--task", "task_json", required=True, help="the unit task, as UnitTask.to_json() writes it")
@click.option("--executor-id", default=None, help="consumer name in the deployment's group (default host-pid)")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="serve Prometheus /metrics on PORT [default: a free port]; on 127.0.0.1 unless "
                   "$CORNSERVE_METRICS_HOST says otherwise; advertised in Redis (`cornserve status` lists it)")
def executor(task_json: str, executor_id: str | None, metrics_port: int | None) -> None:
    """Serve one deployment: load the model once, then take invocations from its queue until SIGTERM."""
    from flyte_cornserve.protocol.deployments import PhaseReporter
    from flyte_cornserve.redis_server import connect_async, redis_url
    from flyte_cornserve.sidecar.client import SidecarClient

    from .runtime import ExecutorRuntime, install_signal_handlers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    task = unit_task_from_json(task_json)
    descriptor = descriptor_for(task)
    executor_id = executor_id or f"{socket.gethostname()}-{os.getpid()}"  # the runtime's default too
    # the start-up phases the handler marks (`with phase(...)`) become the deployment's message
    reporter = PhaseReporter(redis_url(), task.deployment_id(), executor_id)
    phases.set_reporter(reporter)

    async def serve() -> None:
        runtime = ExecutorRuntime(
            connect_async(redis_url()), task.deployment_id(), make_handler(descriptor, SidecarClient()),
            executor_id=executor_id, metrics_port=metrics_port,
        )
        install_signal_handlers(runtime)
        await runtime.run()

    try:
        asyncio.run(serve())
    except ModelNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        phases.set_reporter(None)
        reporter.close()
