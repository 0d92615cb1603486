"""The control plane's Prometheus metrics: read from Redis when Prometheus scrapes.

Everything here is the state Redis already holds (deployment records, executor heartbeats, queues,
the terminal-state counts the invocation protocol keeps, the active batches), so the numbers are
right whichever process changed them and survive a control plane restart. A scrape costs a few
Redis commands per deployment and per active batch, run on the control plane's event loop with its
client (the HTTP server calls `collect()` from its own thread).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from flyte_cornserve.protocol.content import BYTES_SAVED, HIT, MISS, cache_counts
from flyte_cornserve.protocol.deployments import executor_key
from flyte_cornserve.protocol.invocations import InvocationStore, _text

from .batches import active_key, FINISHED, Batch, BatchState, BatchStore
from .control import Deployment, DeploymentState, list_deployments

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT_S = 10.0
SERVING, STARTING = "serving", "starting"


@dataclass
class Snapshot:
    deployments: list[Deployment] = field(default_factory=list)
    serving: set[str] = field(default_factory=set)  # executors with a live heartbeat
    queue_depth: dict[str, int] = field(default_factory=dict)
    counts: dict[tuple[str, str, str], int] = field(default_factory=dict)
    batches: list[Batch] = field(default_factory=list)  # the active ones
    tensor_cache: dict[str, dict[str, int]] = field(default_factory=dict)  # `protocol.content.cache_counts`


async def snapshot(client: aioredis.Redis) -> Snapshot:
    """What the metrics are made of, read from Redis."""
    store = InvocationStore(client)
    deployments = await list_deployments(client)
    executors = [e for d in deployments for e in d.executors]
    async with client.pipeline(transaction=False) as pipe:
        for executor_id in executors:
            pipe.exists(executor_key(executor_id))
        pipe.smembers(active_key())
        *alive, active = await pipe.execute()
    depths = await asyncio.gather(*(store.queue_depth(d.id) for d in deployments))
    batches = BatchStore(client)
    loaded = await asyncio.gather(*(batches.load(_text(b)) for b in sorted(active)))
    return Snapshot(
        deployments=deployments,
        serving={e for e, up in zip(executors, alive) if up},
        queue_depth={d.id: depth for d, depth in zip(deployments, depths)},
        counts=await store.counts(),
        batches=[b for b in loaded if b is not None and b.state not in FINISHED],
        tensor_cache=await cache_counts(client),
    )


def families(state: Snapshot) -> list[GaugeMetricFamily | CounterMetricFamily]:
    """The metric families of a snapshot (every state of a fixed set is present, at 0 if need be)."""
    deployments = GaugeMetricFamily("cornserve_deployments", "deployments by state", labels=["state"])
    for value in DeploymentState:
        deployments.add_metric([value.value], sum(1 for d in state.deployments if d.state is value))
    info = GaugeMetricFamily("cornserve_deployment_info", "1 per deployment: its task label and executor kind",
                             labels=["deployment", "label", "executor_kind"])
    executors = GaugeMetricFamily("cornserve_executors", "executors of each deployment: serving (heartbeating), or "
                                  "starting (not heartbeating yet, or exited and being replaced)",
                                  labels=["deployment", "state"])
    restarts = CounterMetricFamily("cornserve_deployment_restarts", "executors of the deployment restarted after "
                                   "they exited (from 0 when it is deployed again)", labels=["deployment"])
    depth = GaugeMetricFamily("cornserve_queue_depth", "invocations queued for the deployment (interactive and "
                              "batch queues), not yet delivered to an executor", labels=["deployment"])
    for d in state.deployments:
        info.add_metric([d.id, d.label, d.executor_kind], 1)
        up = sum(1 for e in d.executors if e in state.serving)
        executors.add_metric([d.id, SERVING], up)
        executors.add_metric([d.id, STARTING], len(d.executors) - up)
        restarts.add_metric([d.id], d.restarts)
        depth.add_metric([d.id], state.queue_depth.get(d.id, 0))
    invocations = CounterMetricFamily("cornserve_invocations", "invocations that reached a terminal state, each "
                                      "counted once, by deployment, state and error kind (\"\" unless ERROR)",
                                      labels=["deployment", "state", "kind"])
    for (deployment, terminal, kind), count in sorted(state.counts.items()):
        invocations.add_metric([deployment, terminal, kind], count)
    batches = GaugeMetricFamily("cornserve_batches_active", "batches being run, by state", labels=["state"])
    for value in (BatchState.QUEUED, BatchState.RUNNING, BatchState.CANCELLING):
        batches.add_metric([value.value], sum(1 for b in state.batches if b.state is value))
    items = GaugeMetricFamily("cornserve_batch_items", "items of the batches being run, by state (pending: not "
                              "ended yet)", labels=["state"])
    for name, count in (("done", sum(b.done for b in state.batches)), ("failed", sum(b.failed for b in state.batches)),
                        ("cancelled", sum(b.cancelled for b in state.batches)),
                        ("pending", sum(max(0, b.total - b.ended) for b in state.batches))):
        items.add_metric([name], count)
    lookups = CounterMetricFamily("cornserve_tensor_cache_items", "items of a content-addressed deployment by where "
                                  "their output came from: hit (stored, or shared with an equal item), miss "
                                  "(computed for it); the executors' and the batch runner's", labels=["deployment", "result"])
    saved = CounterMetricFamily("cornserve_tensor_cache_saved_bytes", "bytes of the hits' outputs: not computed and "
                                "stored again", labels=["deployment"])
    for deployment, count in sorted(state.tensor_cache.items()):
        for result in (HIT, MISS):
            lookups.add_metric([deployment, result], count[result])
        saved.add_metric([deployment], count[BYTES_SAVED])
    return [deployments, info, executors, restarts, depth, invocations, batches, items, lookups, saved]


class ControlPlaneCollector(Collector):
    """Reads a `snapshot()` at each scrape, on `loop` (the control plane's) with `client`."""

    def __init__(self, client: aioredis.Redis, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.loop = loop

    def collect(self):
        try:
            state = asyncio.run_coroutine_threadsafe(snapshot(self.client), self.loop).result(SCRAPE_TIMEOUT_S)
        except Exception as exc:  # Redis unreachable, or the control plane stopping: an empty scrape
            log.warning("reading the metrics from Redis failed: %r", exc)
            return
        yield from families(state)
