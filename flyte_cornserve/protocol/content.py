"""Content addressing, as both sides compute it: the executor that produces a tensor, and the
submitting side (the batch runner) that looks it up before it queues any work.

A tensor's id hashes the producing deployment's *output identity* (what changes its outputs: the
executor computes it and publishes it in its heartbeat, `executor_key`) and the *digest* of the
input's content (xxh3-128 of the bytes: an image's, or a text's UTF-8). The same content under
another path or URL has the same digest, so its tensor is found again.

xxh3 is fast, and accidental collisions are negligible; it is not cryptographic, so it does not
stand against collisions crafted by someone who submits inputs to the same deployment.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis
import xxhash

from flyte_cornserve.namespace import key
from flyte_cornserve.protocol.deployments import executor_key
from flyte_cornserve.task import TensorSource
from flyte_cornserve.task.tensor_ref import MAX_SOURCE_INPUT, MAX_SOURCE_TASK


def content_digest(content: bytes) -> str:
    """The digest of an input's content: xxh3-128, hex."""
    return xxhash.xxh3_128_hexdigest(content)


def content_id(identity: str, digest: str) -> str:
    """The id of the output of the deployment with output identity `identity` for the input whose
    content has `digest`."""
    return "emb-" + xxhash.xxh3_128_hexdigest(f"{identity}\0{digest}".encode())


def is_inline(reference: str) -> bool:
    """Whether an image reference carries its bytes (a data: URL) instead of naming where they are."""
    return reference.startswith("data:")  # as `executors.media` reads it


def tensor_source(producer_json: str, reference: str | None, digest: str) -> TensorSource | None:
    """How to compute a tensor again: the producer (`UnitTask.compact_json()`), the input's
    reference (None, or one that is inline data or too long, leaves it empty: such an input cannot
    be read again) and its digest. None if the producer's JSON does not fit in a ref."""
    if len(producer_json) > MAX_SOURCE_TASK:
        return None
    if reference is None or is_inline(reference) or len(reference) > MAX_SOURCE_INPUT:
        reference = ""
    return TensorSource(task=producer_json, input=reference, content=digest)


async def published_identity(client: aioredis.Redis, executor_ids: list[str]) -> str | None:
    """The output identity a deployment's executors publish in their heartbeats: the first live
    one's (equal on every node with the same model files), or None (none live, or not content-addressed)."""
    for executor_id in executor_ids:
        raw = await client.get(executor_key(executor_id))
        if raw:
            identity = json.loads(raw).get("output_identity")
            if identity:
                return identity
    return None


#: the fields of `cache_counts_key()` per deployment: items served from a stored (or joined) output,
#: items whose output was computed, and the bytes of the hits' outputs
HIT, MISS, BYTES_SAVED = "hit", "miss", "bytes_saved"


def cache_counts_key() -> str:
    """Items of content-addressed deployments by where their output came from: a hash, field
    `<deployment>|<hit, miss or bytes_saved>`, counted by the executors (what they looked up) and by
    the batch runner (what it found, or joined, before queueing anything); read by `cornserve status`
    and exported by the control plane's metrics. One field per deployment and result."""
    return key("tensor-cache", "counts")


def count_lookups(pipe: Any, deployment_id: str, hits: int = 0, misses: int = 0, bytes_saved: int = 0) -> None:
    """Add to the counts, in a pipeline of the caller's (sync or asyncio)."""
    for result, count in ((HIT, hits), (MISS, misses), (BYTES_SAVED, bytes_saved)):
        if count:
            pipe.hincrby(cache_counts_key(), f"{deployment_id}|{result}", count)


async def cache_counts(client: aioredis.Redis) -> dict[str, dict[str, int]]:
    """deployment -> {hit, miss, bytes_saved} (absent ones at 0)."""
    counts: dict[str, dict[str, int]] = {}
    for field_name, value in (await client.hgetall(cache_counts_key())).items():
        field_name = field_name.decode() if isinstance(field_name, bytes) else field_name
        deployment, _, result = field_name.rpartition("|")
        counts.setdefault(deployment, {HIT: 0, MISS: 0, BYTES_SAVED: 0})[result] = int(value)
    return counts
