"""`cornserve up / down / status / deploy / undeploy`: manage the stack by hand.

`pyflyte run` starts the embedded stack on its own; these commands start it ahead of time with a
chosen capacity, show what runs (deployments, executors, queues, recent invocations), deploy a
task's executors before the first request, and stop things.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from typing import Any

import click

from flyte_cornserve.task import Task, UnitTask

from .stack import current_url, read_state, stack_dir


def _machine_memory() -> str:
    return f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2**20}Mi"


def _machine_gpus() -> int:
    return sum(1 for name in os.listdir("/dev") if name.startswith("nvidia") and name[6:].isdigit())


@click.command("up")
@click.option("--cpu", type=click.FloatRange(min=0.1), default=None,
              help="cores executors may reserve (with --backend kubernetes: across the cluster) [default: this machine's]")
@click.option("--memory", default=None, help="memory executors may reserve, e.g. 16Gi [default: this machine's]")
@click.option("--gpu", type=click.IntRange(min=0), default=None, help="GPUs executors may reserve [default: this machine's]")
@click.option("--idle-ttl", type=click.FloatRange(min=0.1), default=1800.0, show_default=True,
              help="seconds a deployment may stay idle before its executors are stopped")
@click.option("--batch-in-flight", type=click.IntRange(min=1), default=None,
              help="items of batches in flight at once, across batches: bounds the stack's memory [default: 512]")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="port of the control plane's Prometheus /metrics; 0 picks a free one (`cornserve status` shows "
                   "it). On 127.0.0.1 unless $CORNSERVE_METRICS_HOST says otherwise")
@click.option("--restart-limit", type=click.IntRange(min=1), default=5, show_default=True,
              help="an executor that exits this many times within --restart-window fails its deployment")
@click.option("--restart-window", type=click.FloatRange(min=0.1), default=300.0, show_default=True,
              help="seconds within which an executor's exits count towards --restart-limit")
@click.option("--restart-backoff", type=click.FloatRange(min=0.0), default=1.0, show_default=True,
              help="seconds before restarting an executor that exited; doubles with each exit in the window (30 s at most)")
@click.option("--foreground", is_flag=True, help="run the control plane in this process (e.g. in a container)")
@click.option("--backend", type=click.Choice(["local", "kubernetes"]), default="local", show_default=True,
              help="where executors run: processes on this machine, or pods in the cluster this runs in "
                   "(with --foreground and CORNSERVE_REDIS_URL; needs the `kubernetes` extra)")
@click.option("--k8s-namespace", envvar="POD_NAMESPACE", default=None,
              help="kubernetes: the executor pods' namespace [default: $POD_NAMESPACE, else this pod's own]")
@click.option("--executor-image", envvar="CORNSERVE_EXECUTOR_IMAGE", default=None,
              help="kubernetes: the executors' image [default: $CORNSERVE_EXECUTOR_IMAGE, else the image of this "
                   "pod, named by $POD_NAME]")
@click.option("--owner", default="cornserve-control-plane", show_default=True,
              help="kubernetes: the Deployment that owns the executor pods (deleting it deletes them); '' for none")
@click.option("--pending-timeout", type=click.FloatRange(min=1.0), default=600.0, show_default=True,
              help="kubernetes: seconds an executor pod may stay Pending (unscheduled, or pulling its image) "
                   "before its start fails")
@click.option("--executor-env", multiple=True, metavar="NAME=VALUE",
              help="kubernetes: an env variable of every executor pod (repeatable)")
@click.option("--executor-env-secret", multiple=True, metavar="SECRET",
              help="kubernetes: a Secret whose every key is an env variable of every executor pod, e.g. the object "
                   "store's credentials (repeatable)")
@click.option("--executor-service-account", default=None,
              help="kubernetes: the executor pods' ServiceAccount, e.g. one bound to a cloud role that reads datasets")
def up(cpu: float | None, memory: str | None, gpu: int | None, idle_ttl: float, batch_in_flight: int | None,
       metrics_port: int, restart_limit: int, restart_window: float, restart_backoff: float, foreground: bool,
       backend: str, k8s_namespace: str | None, executor_image: str | None, owner: str,
       pending_timeout: float, executor_env: tuple[str, ...], executor_env_secret: tuple[str, ...],
       executor_service_account: str | None) -> None:
    """Start the stack: Redis (embedded unless CORNSERVE_REDIS_URL is set) and the control plane."""
    from flyte_cornserve.redis_server import ENV_URL
    from flyte_cornserve.task import Resources

    pods = None
    if backend == "kubernetes":
        if not foreground or not os.environ.get(ENV_URL):
            raise click.UsageError("--backend kubernetes runs in the cluster: give --foreground, and the Redis the "
                                   f"executor pods reach as {ENV_URL}")
        malformed = [entry for entry in executor_env if "=" not in entry or entry.startswith("=")]
        if malformed:
            raise click.BadParameter(f"{malformed[0]!r} is not NAME=VALUE", param_hint="--executor-env")
        pods = {"namespace": k8s_namespace, "image": executor_image, "owner": owner,
                "pending_timeout_s": pending_timeout, "env": dict(entry.split("=", 1) for entry in executor_env),
                "env_secrets": executor_env_secret, "service_account": executor_service_account}

    from .batch_runner import DEFAULT_MAX_IN_FLIGHT

    memory = memory or _machine_memory()
    Resources(memory=memory)  # validates the quantity
    batch_in_flight = batch_in_flight or DEFAULT_MAX_IN_FLIGHT
    capacity_args = ["--cpu", str(cpu or os.cpu_count() or 1), "--memory", memory,
                     "--gpu", str(_machine_gpus() if gpu is None else gpu), "--idle-ttl", str(idle_ttl),
                     "--batch-in-flight", str(batch_in_flight), "--metrics-port", str(metrics_port),
                     "--restart-limit", str(restart_limit), "--restart-window", str(restart_window),
                     "--restart-backoff", str(restart_backoff)]
    restarts = {"restart_limit": restart_limit, "restart_window_s": restart_window, "restart_backoff_s": restart_backoff}
    if not foreground:
        from .stack import control_plane_alive, ensure_stack, start_daemon

        url = current_url()
        if url and control_plane_alive(url):
            click.echo(f"the stack is already up (redis {url}); `cornserve status` shows it")
            return
        if os.environ.get(ENV_URL):  # a control plane for the Redis named there
            url = start_daemon(click.echo, capacity_args)["redis"]
        else:
            url = ensure_stack(progress=click.echo, up_args=capacity_args)
        click.echo(f"the stack is up: redis {url}; logs in {stack_dir() / 'logs'}")
        return
    _serve(cpu or os.cpu_count() or 1, Resources(memory=memory).memory_bytes,
           _machine_gpus() if gpu is None else gpu, idle_ttl, batch_in_flight, metrics_port, restarts, pods)


def _serve(cpu: float, memory_bytes: int, gpu: int, idle_ttl: float, batch_in_flight: int,
           metrics_port: int = 0, restarts: dict[str, float] | None = None, pods: dict[str, Any] | None = None) -> None:
    """`pods`: run executors as pods (`KubernetesBackend.connect`'s arguments), not as processes here."""
    from flyte_cornserve.home import use_project_tmp
    from flyte_cornserve.launch import announce_ready
    from flyte_cornserve.redis_server import ENV_URL, connect_async, redis_url

    from .backend import BackendSetupError, ExecutorBackend, LocalBackend
    from .control_plane import ControlPlane
    from .resources import Capacity
    from .stack import clear_state, write_state

    if pods is not None:
        try:
            from .kubernetes_backend import KubernetesBackend
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("lightkube"):
                raise
            raise click.ClickException("--backend kubernetes needs lightkube: install flyte-cornserve[kubernetes]") from None
    use_project_tmp()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    embedded = not os.environ.get(ENV_URL)
    if embedded:  # what this daemon starts (Redis, sidecar, executors), for a `cornserve down` after a crash
        from . import leftovers

        leftovers.start_recording(stack_dir())
    url = redis_url()  # the embedded server unless CORNSERVE_REDIS_URL is set; exported to children
    logs = stack_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    async def main() -> None:
        capacity = Capacity(cpu, memory_bytes, gpu)
        try:
            backend: ExecutorBackend = (LocalBackend(url, logs, capacity) if pods is None
                                        else await KubernetesBackend.connect(capacity, **pods))
        except BackendSetupError as exc:
            raise click.ClickException(str(exc)) from None
        plane = ControlPlane(connect_async(url), backend, idle_ttl_s=idle_ttl, batch_in_flight=batch_in_flight,
                             metrics_port=metrics_port, restarts=restarts)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # pods stay for the next control plane; `cornserve down` ends them
            loop.add_signal_handler(sig, plane.request_stop, backend.executors_outlive_control_plane)

        def ready() -> None:
            log_file = logs / "control-plane.log"
            if embedded:  # how later runs find this stack
                write_state({"pid": os.getpid(), "redis_url": url, "log": str(log_file), "started_at": time.time()})
            # to whoever launched it (`ensure_stack`, a test's or benchmark's stack), if anyone did
            announce_ready(pid=os.getpid(), redis=url, log=str(log_file))

        await plane.run(on_ready=ready)

    try:
        asyncio.run(main())
    finally:
        clear_state(os.getpid())
    if embedded:  # a clean stop: the children are stopped (and the Redis is, at exit)
        leftovers.stop_recording()


@click.command("down")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="seconds to wait for a clean stop")
def down(timeout: float) -> None:
    """Stop the stack: executors finish what they run, then everything exits."""
    from . import control
    from .stack import wait_for_exit

    from .leftovers import stop_leftovers
    from .stack import state_file

    url = current_url()
    if url is None:  # no live stack; a crashed one may have left processes, arenas, its stack.json
        stopped = stop_leftovers(stack_dir())
        stale = state_file().exists()
        state_file().unlink(missing_ok=True)
        if stopped or stale:
            click.echo(f"the stack had crashed; stopped what it left running: {', '.join(stopped) or 'nothing'}")
        else:
            click.echo("no stack is running")
        return
    state = read_state()

    async def shutdown() -> None:
        await control.request(_client(url), "shutdown", 30.0)

    try:
        asyncio.run(shutdown())
    except control.ControlPlaneError as exc:
        if state is None:
            raise click.ClickException(str(exc)) from None
        os.kill(state["pid"], signal.SIGTERM)  # a daemon that no longer answers on Redis
    if state is not None and not wait_for_exit(state["pid"], timeout):
        raise click.ClickException(f"the stack (pid {state['pid']}) did not stop within {timeout:g} s")
    if state is not None:
        stop_leftovers(stack_dir())  # anything its clean stop missed
    click.echo("the stack is down")


@click.command("status")
@click.option("--invocations", "limit", type=click.IntRange(min=0), default=10, show_default=True,
              help="how many recent invocations to list")
@click.option("--batches", "batch_limit", type=click.IntRange(min=0), default=10, show_default=True,
              help="how many recent batches to list (running ones first)")
def status(limit: int, batch_limit: int) -> None:
    """Show the control plane, deployments, executors, metrics endpoints, queue depths, batches and recent invocations."""
    from rich.console import Console

    url = current_url()
    if url is None:
        click.echo("no stack is running (`cornserve up` starts one; so does the first `pyflyte run`)")
        return
    Console().print(*asyncio.run(_status_tables(url, limit, batch_limit)))


async def _status_tables(url: str, limit: int, batch_limit: int = 10) -> list[Any]:
    from rich.table import Table

    from flyte_cornserve.metrics import list_endpoints
    from flyte_cornserve.protocol.deployments import executor_key
    from flyte_cornserve.protocol.invocations import InvocationStore

    from .batches import FINISHED, BatchStore
    from .control import control_plane_info, list_deployments

    client = _client(url)
    store = InvocationStore(client)
    info = await control_plane_info(client)
    now = time.time()
    tables: list[Any] = []

    plane = Table(title=f"control plane (redis {url})")
    for column in ("pid", "host", "up for", "idle ttl", "node", "groups", "capacity", "free"):
        plane.add_column(column)
    if info is None:
        plane.add_row("-", "-", "not running", "", "", "", "", "")
    for node in (info or {}).get("nodes", []):
        plane.add_row(str(info["pid"]), info["host"], _ago(now - info["started_at"]), f"{info['idle_ttl_s']:g} s",
                      node["node"], ",".join(node["groups"]), node["capacity"], node["free"])
    tables.append(plane)

    deployments = await list_deployments(client)
    table = Table(title="deployments")
    for column in ("deployment", "task", "state", "executors", "restarts", "queued+running", "idle for", "message"):
        table.add_column(column)
    executors = Table(title="executors")
    for column in ("executor", "deployment", "pid", "host", "alive"):
        executors.add_column(column)
    for deployment in deployments:
        backlog = await store.backlog(deployment.id)
        table.add_row(deployment.id, deployment.label, deployment.state.value, _executor_count(deployment),
                      str(deployment.restarts), str(backlog), _ago(now - deployment.last_used),
                      deployment.message[:80] + (f" ({_ago(now - deployment.phase_since)})"  # a start-up phase
                                                 if deployment.phase_since else ""))
        for executor_id in deployment.executors:
            raw = await client.get(executor_key(executor_id))
            beat = json.loads(raw) if raw else {}
            executors.add_row(executor_id, deployment.id, str(beat.get("pid", "-")), beat.get("host", "-"),
                              "yes" if raw else "no (starting or gone)")
    tables += [table, executors]

    endpoints = Table(title="metrics endpoints (Prometheus)")
    for column in ("process", "pid", "url", "up for"):
        endpoints.add_column(column)
    for where in await list_endpoints(client):
        endpoints.add_row(where.name, str(where.pid), where.url, _ago(now - where.since))
    tables.append(endpoints)

    tables += await _tensor_cache_tables(client, {d.id: d.label for d in deployments})

    batches = Table(title=f"batches (last {batch_limit}, running first)")
    for column in ("batch", "task", "state", "done", "failed", "cancelled", "total", "items/s", "ETA", "message"):
        batches.add_column(column)
    recent_batches = await BatchStore(client).recent(batch_limit) if batch_limit else []
    for batch in sorted(recent_batches, key=lambda b: b.state in FINISHED):
        elapsed = (batch.finished_at or now) - (batch.started_at or now)
        rate = batch.ended / elapsed if elapsed > 0 else 0.0
        left = batch.total - batch.ended
        eta = "" if batch.state in FINISHED or rate <= 0 else _ago(left / rate)
        batches.add_row(batch.id[:12], batch.spec.label, batch.state.value, str(batch.done), str(batch.failed),
                        str(batch.cancelled), str(batch.total), f"{rate:.1f}", eta, batch.message[:60])
    tables.append(batches)

    recent = Table(title=f"recent invocations (last {limit})")
    for column in ("invocation", "task", "state", "attempt", "executor", "submitted", "took", "error"):
        recent.add_column(column)
    for record in await store.recent(limit) if limit else []:
        took = "" if record.finished_at is None else f"{(record.finished_at - record.created_at) * 1000:.0f} ms"
        recent.add_row(record.id[:12], record.label, record.state.value, str(record.attempt), record.executor,
                       _ago(now - record.created_at) + " ago", took, record.error[:80])
    tables.append(recent)
    return tables


async def _tensor_cache_tables(client: Any, labels: dict[str, str]) -> list[Any]:
    """Content-addressed outputs per deployment (hits, misses, bytes saved) and each sidecar's memory
    by tensor state and its evictions; nothing where there is nothing to show."""
    from rich.table import Table

    from flyte_cornserve.decks.render import format_bytes
    from flyte_cornserve.protocol.content import BYTES_SAVED, HIT, MISS, cache_counts
    from flyte_cornserve.sidecar.directory import Lookups

    tables: list[Any] = []
    counts = await cache_counts(client)
    if counts:
        cache = Table(title="tensor cache (content-addressed outputs; hits include items joined before queueing)")
        for column in ("deployment", "task", "hits", "misses", "hit ratio", "saved"):
            cache.add_column(column)
        for deployment_id, count in sorted(counts.items()):
            looked_up = count[HIT] + count[MISS]
            cache.add_row(deployment_id, labels.get(deployment_id, "(not deployed)"), str(count[HIT]), str(count[MISS]),
                          f"{count[HIT] / looked_up:.0%}" if looked_up else "-", format_bytes(count[BYTES_SAVED]))
        tables.append(cache)
    sidecars = await Lookups(client).sidecar_stats()
    if sidecars:
        table = Table(title="sidecars")
        for column in ("sidecar", "tensors", "pinned", "cached", "used / capacity", "evicted lru", "evicted ttl",
                       "evicted orphan"):
            table.add_column(column)
        for sidecar_id, stats in sorted(sidecars.items()):
            evictions = stats.get("evictions", {})
            table.add_row(sidecar_id, str(stats["tensors"]), f"{stats['pinned']} ({format_bytes(stats['pinned_bytes'])})",
                          f"{stats['cached']} ({format_bytes(stats['cached_bytes'])})",
                          f"{format_bytes(stats['used'])} / {format_bytes(stats['capacity'])}",
                          *(str(evictions.get(reason, 0)) for reason in ("lru", "ttl", "orphan")))
        tables.append(table)
    return tables


def _executor_count(deployment) -> str:
    """"2", or "2 (0-4)" when it scales between bounds."""
    count, bounds = str(len(deployment.executors)), deployment.scaling
    if bounds and bounds["min"] != bounds["max"]:
        count += f" ({bounds['min']}-{bounds['max']})"
    return count


@click.command("deploy")
@click.argument("target")
@click.option("--replicas", type=click.IntRange(min=1), default=None,
              help="executors per deployment, fixed [default: the task's `replicas` bounds, scaled on backlog]")
def deploy(target: str, replicas: int | None) -> None:
    """Deploy TARGET's unit tasks now: `module:attr` or `path.py:attr` naming a task, or a unit task's JSON."""
    from .stack import ensure_stack

    tasks = unit_tasks_in(load_task(target))
    url = ensure_stack(progress=click.echo)
    results = asyncio.run(_deploy_all(url, tasks, replicas))
    for task, outcome in zip(tasks, results):
        if isinstance(outcome, Exception):
            raise click.ClickException(str(outcome))
        click.echo(f"{outcome}  {type(task).__name__} ready")


async def _deploy_all(url: str, tasks: list[UnitTask], replicas: int | None) -> list[Any]:
    from . import control
    from .dispatcher import DEPLOY_TIMEOUT_S

    client = _client(url)
    requests = [control.request(client, "deploy", DEPLOY_TIMEOUT_S, task=task.to_json(), replicas=replicas)
                for task in tasks]
    replies = await asyncio.gather(*requests, return_exceptions=True)
    return [reply if isinstance(reply, Exception) else reply["deployment"] for reply in replies]


@click.command("undeploy")
@click.argument("target")
def undeploy(target: str) -> None:
    """Stop a deployment: TARGET is a deployment id (see `cornserve status`) or a task as for `deploy`."""
    from . import control

    url = current_url()
    if url is None:
        raise click.ClickException("no stack is running")
    ids = [target] if ":" not in target and not target.startswith("{") else [
        task.deployment_id() for task in unit_tasks_in(load_task(target))
    ]

    async def stop_all() -> list[dict]:
        client = _client(url)
        return [await control.request(client, "undeploy", 300.0, deployment_id=i) for i in ids]

    for deployment_id, reply in zip(ids, asyncio.run(stop_all())):
        click.echo(f"{deployment_id}  {'stopped' if reply['found'] else 'was not deployed'}")


def load_task(target: str) -> Task:
    """A task from `module:attr`, `path/to/file.py:attr` or a unit task's JSON."""
    import importlib
    import pathlib
    import sys

    from flyte_cornserve.task import unit_task_from_json

    if target.lstrip().startswith("{"):
        return unit_task_from_json(target)
    source, _, attr = target.rpartition(":")
    if not source or not attr:
        raise click.BadParameter(f"{target!r}: expected module:attr, path.py:attr or a unit task's JSON")
    if source.endswith(".py"):  # as pyflyte does: the file's folder on sys.path, imported by name
        path = pathlib.Path(source).resolve()
        if not path.is_file():
            raise click.BadParameter(f"no file {source}")
        sys.path.insert(0, str(path.parent))
        source = path.stem
    module = importlib.import_module(source)
    task = getattr(module, attr, None)
    if not isinstance(task, Task):
        raise click.BadParameter(f"{target!r} is not a task (got {type(task).__name__})")
    return task


def unit_tasks_in(task: Task) -> list[UnitTask]:
    """The unit tasks a task is made of: itself, or those among a composite's fields, one per deployment."""
    if isinstance(task, UnitTask):
        return [task]
    found: dict[str, UnitTask] = {}
    for name in type(task).model_fields:
        value = getattr(task, name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, Task):
                for unit in unit_tasks_in(item):
                    found.setdefault(unit.deployment_id(), unit)
    return list(found.values())


def _client(url: str):
    from flyte_cornserve.redis_server import connect_async

    return connect_async(url)


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
