"""Prometheus metrics of the long-running processes, and where each one serves them.

Every long-running process (the control plane, each executor, each sidecar) keeps its metrics in a
`CollectorRegistry` of its own (not prometheus_client's global one, so tests can run several in one
interpreter), serves them over HTTP (`serve()`: an ephemeral port on 127.0.0.1 unless told
otherwise; `CORNSERVE_METRICS_HOST=0.0.0.0` in a pod) and advertises the URL in one Redis hash,
`cornserve:metrics`:

    field: the process, e.g. `control-plane`, `executor:<executor id>`, `sidecar:<sidecar id>`
    value: {"url": "http://host:port/metrics", "pid": ..., "role": ..., "since": ..., "owner": <key>}

`owner` is the key whose existence says the process is alive (its heartbeat key). A process
advertises with each heartbeat (so an entry survives a Redis restart or a missed beat) and withdraws
on a clean exit; `list_endpoints()` drops, atomically, the entries whose owner key is gone (a
process that was killed), so a dead process is never listed.

This module knows nothing of the rest of the project: it needs prometheus_client and redis only.
The metrics of the executors and sidecars are defined here too (`ExecutorMetrics`,
`TensorCacheMetrics`, `SidecarMetrics`), so their names are in one place; the control plane's are
computed from Redis at scrape time (`flyte_cornserve.services.plane_metrics`).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from flyte_cornserve import namespace

ENV_HOST = "CORNSERVE_METRICS_HOST"
ENV_ADVERTISE_HOST = "CORNSERVE_METRICS_ADVERTISE_HOST"
DEFAULT_HOST = "127.0.0.1"
_ALL_INTERFACES = {"0.0.0.0", "::", ""}

#: seconds: latency buckets from a millisecond to ten minutes
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 600.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


# -- serving ----------------------------------------------------------------------------------------

class MetricsServer:
    """`/metrics` of one registry, served by prometheus_client's HTTP server in a daemon thread."""

    def __init__(self, registry: CollectorRegistry, port: int = 0, host: str | None = None) -> None:
        self.host = host or os.environ.get(ENV_HOST) or DEFAULT_HOST
        self._server, self._thread = start_http_server(port, self.host, registry=registry)
        self.port: int = self._server.server_address[1]
        self.url = self._url()

    def _url(self) -> str:
        """Where others scrape it: the bound address, or for all interfaces this host's address
        (`CORNSERVE_METRICS_ADVERTISE_HOST` overrides it)."""
        host = os.environ.get(ENV_ADVERTISE_HOST) or self.host
        if host in _ALL_INTERFACES:
            try:
                host = socket.gethostbyname(socket.gethostname())
            except OSError:
                host = socket.gethostname()
        if ":" in host:  # IPv6
            host = f"[{host}]"
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve(registry: CollectorRegistry, port: int = 0, host: str | None = None) -> MetricsServer:
    """Start serving `registry` on `host:port` (port 0: an ephemeral one; host: `$CORNSERVE_METRICS_HOST`
    or 127.0.0.1); the returned server knows its port and URL."""
    return MetricsServer(registry, port, host)


# -- advertising ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Endpoint:
    """Where one process serves its metrics."""

    name: str  # the field: "control-plane", "executor:<id>", "sidecar:<id>"
    url: str
    pid: int
    role: str  # "control-plane", "executor", "sidecar"
    owner: str  # the key that exists while the process lives (its heartbeat)
    since: float  # when it started serving (unix time)

    def to_json(self) -> str:
        fields = asdict(self)
        del fields["name"]
        return json.dumps(fields)

    @classmethod
    def from_json(cls, name: str, raw: str | bytes) -> Endpoint:
        fields: dict[str, Any] = json.loads(raw)
        return cls(name=name, url=fields["url"], pid=int(fields["pid"]), role=fields["role"],
                   owner=fields["owner"], since=float(fields["since"]))


def endpoint(name: str, role: str, server: MetricsServer, owner: str, since: float | None = None) -> Endpoint:
    """The endpoint of this process."""
    return Endpoint(name=name, url=server.url, pid=os.getpid(), role=role, owner=owner,
                    since=time.time() if since is None else since)


# Entries whose owner key is gone are removed in the same script that lists the others: a process
# that advertises again after its owner key came back cannot be removed by a listing that saw it dead.
_LIST = """
local alive = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local ok, info = pcall(cjson.decode, all[i + 1])
  if ok and type(info) == 'table' and type(info.owner) == 'string' and redis.call('EXISTS', info.owner) == 1 then
    alive[#alive + 1] = all[i]
    alive[#alive + 1] = all[i + 1]
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return alive
"""


def metrics_key() -> str:
    """The hash of advertised endpoints: process name -> {url, role, owner} (JSON)."""
    return namespace.key("metrics")


async def advertise(client: aioredis.Redis, where: Endpoint, key: str | None = None) -> None:
    """Publish (or refresh) where this process serves its metrics."""
    await client.hset(key or metrics_key(), where.name, where.to_json())


async def withdraw(client: aioredis.Redis, name: str, key: str | None = None) -> None:
    """Remove this process's entry (a clean exit)."""
    await client.hdel(key or metrics_key(), name)


async def list_endpoints(client: aioredis.Redis, key: str | None = None) -> list[Endpoint]:
    """The advertised endpoints of live processes, by name; entries of dead ones are removed."""
    reply = await client.eval(_LIST, 1, key or metrics_key())
    return _endpoints(reply)


def advertise_sync(client: redis.Redis, where: Endpoint, key: str | None = None) -> None:
    """`advertise` for a process that uses the synchronous client (the sidecar)."""
    client.hset(key or metrics_key(), where.name, where.to_json())


def withdraw_sync(client: redis.Redis, name: str, key: str | None = None) -> None:
    client.hdel(key or metrics_key(), name)


def list_endpoints_sync(client: redis.Redis, key: str | None = None) -> list[Endpoint]:
    return _endpoints(client.eval(_LIST, 1, key or metrics_key()))


def _endpoints(reply: list) -> list[Endpoint]:
    pairs = [_text(item) for item in reply or []]
    return sorted((Endpoint.from_json(name, raw) for name, raw in zip(pairs[::2], pairs[1::2])),
                  key=lambda e: (e.role != "control-plane", e.name))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


# -- what the executors and sidecars export ---------------------------------------------------------

class ExecutorMetrics:
    """One executor's metrics; every series carries its `deployment` and `executor`."""

    def __init__(self, deployment_id: str, executor_id: str) -> None:
        self.registry = registry = CollectorRegistry()
        ids = {"deployment": deployment_id, "executor": executor_id}
        self.labels = ids
        self.invocations = Counter(
            "cornserve_executor_invocations", "invocations whose outcome this executor stored, by terminal "
            "state and error kind (\"\" unless ERROR)", [*ids, "state", "kind"], registry=registry)
        self.aborted = Counter(
            "cornserve_executor_aborted", "invocations given up while running here because someone else ended "
            "them (state CANCELLED: cancelled, ERROR: timed out)", [*ids, "state"], registry=registry)
        self.batch_size = Histogram(
            "cornserve_executor_batch_size", "items per handle() call", list(ids), buckets=BATCH_BUCKETS,
            registry=registry).labels(**ids)
        self.queue_wait = Histogram(
            "cornserve_executor_queue_wait_seconds", "from queueing (the queue entry's id, Redis's clock) to "
            "the pick-up here", list(ids), buckets=LATENCY_BUCKETS, registry=registry).labels(**ids)
        self.latency = Histogram(
            "cornserve_executor_run_seconds", "from pick-up to the stored outcome", list(ids),
            buckets=LATENCY_BUCKETS, registry=registry).labels(**ids)
        self.in_flight = Gauge(
            "cornserve_executor_items_in_flight", "items being handled here", list(ids), registry=registry).labels(**ids)
        self.queue_depth = Gauge(
            "cornserve_executor_queue_depth", "invocations queued for the deployment, not yet delivered (at the "
            "last heartbeat)", list(ids), registry=registry).labels(**ids)
        for state in ("CANCELLED", "ERROR"):  # present from the start, at 0
            self.aborted.labels(**ids, state=state)
        for state, kind in (("DONE", ""), ("ERROR", "user"), ("ERROR", "recoverable")):
            self.invocations.labels(**ids, state=state, kind=kind)

    def ended(self, state: str, kind: str = "") -> None:
        """Count one outcome stored here; `kind` only for state ERROR."""
        self.invocations.labels(**self.labels, state=state, kind=kind if state == "ERROR" else "").inc()

    def gave_up(self, state: str) -> None:
        self.aborted.labels(**self.labels, state=state).inc()


class TensorCacheMetrics:
    """An encoder executor's outputs found again by content id, in its executor's registry and with
    its labels. Each item with embeddings counts once: a miss if its tensor was encoded and put here
    for it, else a hit (a tensor already in a sidecar, or the one put for an equal item of its batch)."""

    def __init__(self, executor: ExecutorMetrics) -> None:
        ids = executor.labels
        lookups = Counter("cornserve_tensor_cache_lookups", "items by where their embeddings came from: hit (a "
                          "tensor already stored, or stored for an equal item of the same batch), miss (encoded "
                          "and stored for it)", [*ids, "result"], registry=executor.registry)
        self.hits, self.misses = (lookups.labels(**ids, result=result) for result in ("hit", "miss"))
        self.bytes_saved = Counter("cornserve_tensor_cache_bytes_saved", "bytes of the hits' embeddings: tensors "
                                   "not encoded and stored again", list(ids), registry=executor.registry).labels(**ids)


#: the `path` label of `cornserve_sidecar_bytes_total`
LOCAL_PUT, TCP_SERVED, TCP_FETCHED = "shared-memory", "tcp-served", "tcp-fetched"


EVICTION_REASONS = ("lru", "ttl", "orphan")  # why a sidecar removed a tensor (`cornserve_sidecar_evictions`)


class SidecarMetrics:
    """One sidecar's metrics. Counters are counted where things happen; the gauges are read at
    scrape time from `stats()` (a callable returning at least tensors, used, capacity, waiting,
    high_water, pinned_bytes, cached_bytes)."""

    def __init__(self, sidecar_id: str, stats: Callable[[], Any]) -> None:
        self.registry = registry = CollectorRegistry()
        label = {"sidecar": sidecar_id}
        self.allocated = Counter("cornserve_sidecar_tensors_allocated", "tensors placed in the arena (local puts "
                                 "and copies fetched from other sidecars)", ["sidecar"], registry=registry).labels(**label)
        self._bytes = Counter("cornserve_sidecar_bytes", "tensor bytes moved, by path: shared-memory (a local put), "
                              "tcp-served (read from here by another sidecar), tcp-fetched (pulled from another "
                              "sidecar)", ["sidecar", "path"], registry=registry)
        self.bytes = {path: self._bytes.labels(sidecar=sidecar_id, path=path) for path in (LOCAL_PUT, TCP_SERVED, TCP_FETCHED)}
        self.waits = Counter("cornserve_sidecar_alloc_waits", "allocations that waited for room (the memory cap "
                             "was reached)", ["sidecar"], registry=registry).labels(**label)
        self.wait_seconds = Counter("cornserve_sidecar_alloc_wait_seconds", "seconds allocations spent waiting for "
                                    "room", ["sidecar"], registry=registry).labels(**label)
        evictions = Counter("cornserve_sidecar_evictions", "tensors removed without a forced free, by reason: lru (a "
                            "CACHED one, for room), ttl (a CACHED one at its TTL), orphan (a PINNED one past "
                            "max_pinned)", ["sidecar", "reason"], registry=registry)
        self.evictions = {reason: evictions.labels(sidecar=sidecar_id, reason=reason) for reason in EVICTION_REASONS}
        registry.register(_SidecarGauges(sidecar_id, stats))


class _SidecarGauges(Collector):
    def __init__(self, sidecar_id: str, stats: Callable[[], Any]) -> None:
        self.sidecar_id = sidecar_id
        self.stats = stats

    def collect(self):
        stats = self.stats()
        for name, doc, value in (
            ("cornserve_sidecar_tensors", "tensors held in the arena now", stats.tensors),
            ("cornserve_sidecar_arena_used_bytes", "arena bytes in use (page-aligned extents)", stats.used),
            ("cornserve_sidecar_arena_capacity_bytes", "the arena's size: the memory cap", stats.capacity),
            ("cornserve_sidecar_arena_high_water_bytes", "highest arena offset ever used", stats.high_water),
            ("cornserve_sidecar_alloc_waiting", "allocations waiting for room now", stats.waiting),
            ("cornserve_sidecar_pinned_bytes", "arena bytes of PINNED tensors (releases still expected)", stats.pinned_bytes),
            ("cornserve_sidecar_cached_bytes", "arena bytes of CACHED tensors (evictable)", stats.cached_bytes),
        ):
            family = GaugeMetricFamily(name, doc, labels=["sidecar"])
            family.add_metric([self.sidecar_id], value)
            yield family

