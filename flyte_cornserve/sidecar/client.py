"""What executors use: put a tensor into this node's sidecar, get one from anywhere, release it.

    client = SidecarClient()                       # the sidecar of this node
    ref = client.put(embeddings, pins=1, ttl=600)  # -> TensorRef, small enough for a Flyte literal
    tensor = client.get(ref, timeout=30)           # on any node
    client.release(ref)                            # pins 1 -> 0: CACHED, readable until evicted
    [again] = client.pin_many([ref.id])            # a later reader: its ref, pinned again (None if gone)

A tensor is PINNED while releases are still expected (`pins`) and CACHED once they came: its sidecar
keeps it for `ttl` seconds, or less when it needs the room for a put (least recently released
first). A put waits for room only while everything is pinned. A tensor pinned for over `max_pinned`
seconds is freed anyway (an orphan: its consumer never came).

Only `TensorRef`s travel through Flyte. A consumer that knows the id in advance (`put(..., id=...)`)
may `get` it before the producer has written it and is woken when it is ready. On the producer's
node, `get` returns a view of the sidecar's shared memory (no copy); elsewhere, the consumer's own
sidecar pulls the bytes from the producer's sidecar first, and the view is of that copy.

Producers that derive ids from content compute each tensor once among them (single flight):
`pin_many` finds those already put, `claim_many` elects one producer for each other id, and the
others `wait_published` for its put, then pin it.

A view from `get` is valid until you `release` it (for that, hold a pin: a CACHED tensor read
without one may be evicted under the view), and must not be written to: other consumers may be
reading the same bytes.
"""

from __future__ import annotations

import os
import pathlib
import threading
import time
import uuid
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..task.tensor_ref import TensorRef
from . import tensors, wire
from .arena import Arena
from .connections import ConnectionPool
from .directory import Directory, Member, TensorEntry, default_sidecar_id
from .errors import (
    ProducerSidecarDead,
    SidecarUnavailable,
    TensorIdTaken,
    TensorNotFound,
    TensorNotReady,
)

DEFAULT_TTL_S = 600.0  # how long a CACHED tensor stays, unless its room is needed first
DEFAULT_MAX_PINNED_S = 24 * 3600.0  # the orphan bound: a consumer that never comes cannot hold memory forever
DEFAULT_TIMEOUT_S = 60.0
WAIT_SLICE_S = 1.0  # a wait for a tensor's publication blocks in Redis calls this long, under the socket timeout
IO_TIMEOUT_S = 30.0  # on top of a request's own timeout, for the sidecar's reply


@dataclass(frozen=True)
class Transfer:
    """One tensor read or written (or found), for the deck of the invocation that did it: which, how
    big, by which path (this node's shared memory, a copy pulled from another node's sidecar, or the
    cache), how long (a call for many tensors counts its whole time against each)."""

    op: str  # "put" | "get" | "hit" (an encoder's output found stored: pinned, not put)
    id: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    path: str  # "shared memory" | "cross-node from <sidecar id>" | "cache" (a hit)
    seconds: float
    at: float  # epoch seconds, when the call began

    def to_json(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}


def _transfers(op: str, refs: list[TensorRef], paths: list[str], began: float, seconds: float) -> list[Transfer]:
    return [Transfer(op, ref.id, tuple(ref.shape), ref.dtype, ref.nbytes, path, seconds, began)
            for ref, path in zip(refs, paths, strict=True)]


class SidecarClient:
    """A connection to the sidecar of this node (`sidecar_id`, default `$CORNSERVE_SIDECAR_ID` or the host name)."""

    def __init__(
        self,
        sidecar_id: str | None = None,
        *,
        redis_url: str | None = None,
        namespace: str | None = None,
        token: str | None = None,
    ) -> None:
        self.sidecar_id = sidecar_id or default_sidecar_id()
        self.directory = Directory.connect(redis_url, namespace)
        self.token = os.environ.get(wire.ENV_TOKEN, "") if token is None else token
        self._lock = threading.Lock()
        self._arenas: dict[str, Arena] = {}
        self._copies: dict[str, wire.Placement] = {}  # tensor id -> this node's copy of it
        self._local = self._local_member()
        self._connections = ConnectionPool(self._local.address, IO_TIMEOUT_S)

    def put(
        self,
        tensor: tensors.TensorLike,
        *,
        pins: int = 1,
        ttl: float = DEFAULT_TTL_S,
        max_pinned: float = DEFAULT_MAX_PINNED_S,
        id: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> TensorRef:
        """Copy `tensor` into this node's sidecar and return its ref.

        It is PINNED until `pins` releases came (0: CACHED at once), then CACHED for `ttl` seconds
        (0: evicted at once), or less when its room is needed; if still pinned after `max_pinned`
        seconds it is freed anyway. When everything in the sidecar is pinned and there is no room,
        waits up to `timeout`, then raises `MemoryCapExceeded`. `id` (default: a random one) lets
        consumers `get` before the put.
        """
        return self.put_many([tensor], pins=pins, ttl=ttl, max_pinned=max_pinned, ids=[id], timeout=timeout)[0]

    def put_many(
        self,
        many: list[tensors.TensorLike],
        *,
        pins: int = 1,
        ttl: float = DEFAULT_TTL_S,
        max_pinned: float = DEFAULT_MAX_PINNED_S,
        ids: list[str | None] | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        trace: list[Transfer] | None = None,
    ) -> list[TensorRef]:
        """`put` for a batch of tensors (each with the same pins, TTL and bound): one request to the
        sidecar and one round trip to Redis per `wire.MAX_ALLOC` tensors, all of them or none.
        `trace` receives one `Transfer` per tensor."""
        began, clock = time.time(), time.perf_counter()
        refs: list[TensorRef] = []
        for start in range(0, len(many), wire.MAX_ALLOC):
            part = many[start:start + wire.MAX_ALLOC]
            refs += self._put_part(part, pins, ttl, max_pinned, (ids or [None] * len(many))[start:start + len(part)], timeout)
        if trace is not None:
            trace += _transfers("put", refs, ["shared memory"] * len(refs), began, time.perf_counter() - clock)
        return refs

    def _put_part(self, part: list[tensors.TensorLike], pins: int, ttl: float, max_pinned: float,
                  ids: list[str | None], timeout: float) -> list[TensorRef]:
        arrays = [tensors.as_array(tensor) for tensor in part]
        refs = [TensorRef(id=given or uuid.uuid4().hex, shape=array.shape, dtype=dtype, nbytes=array.nbytes,
                          location=self.sidecar_id) for (array, dtype), given in zip(arrays, ids)]
        request = wire.AllocRequest(token=self.token, refs=refs, pins=pins, ttl=ttl, max_pinned=max_pinned, timeout=timeout)
        placements = self._call(request, wire.Placements, timeout).placements
        try:
            entries = []
            for (array, _), ref, placement in zip(arrays, refs, placements, strict=True):
                if ref.nbytes:
                    destination = self._arena(placement.arena).array(placement.offset, ref.shape, array.dtype)
                    np.copyto(destination, array, casting="no")
                entries.append((ref.id, TensorEntry(
                    ref=ref, holder=self.sidecar_id, arena=placement.arena, offset=placement.offset,
                    pins=pins, ttl=ttl, max_pinned=max_pinned,
                )))  # fmt: skip
            taken = [ref.id for ref, published in zip(refs, self.directory.publish_many(entries)) if not published]
            if taken:
                raise TensorIdTaken(f"tensor id {taken[0]!r} is already in use; ids must be unique while their tensors live")
        except BaseException:
            for ref in refs:
                self.directory.discard(ref.id, self.sidecar_id)
            raise
        return refs

    def pin_many(self, ids: list[str], pins: int | list[int] = 1) -> list[TensorRef | None]:
        """For each id whose tensor is in a live sidecar (PINNED or CACHED), add `pins` releases to
        expect (a list: one count per id) and return its ref; None where it is gone. A pinned tensor
        is not evicted: `get` it, then `release` it once per pin. 0 pins only looks (for an output
        that nobody in the graph reads: it stays as cache). One round trip to Redis."""
        counts = pins if isinstance(pins, list) else [pins] * len(ids)
        if len(counts) != len(ids) or any(count < 0 for count in counts):
            raise ValueError(f"pins must be 0 or more for each of the {len(ids)} ids, got {pins}")
        return self.directory.pin_many(ids, counts)

    def claim_many(self, ids: list[str], claimer: str, ttl: float) -> list[bool]:
        """Claim each id for a put by `claimer` (a name unique to one unit of work, e.g. a batch),
        for `ttl` seconds (longer than computing its tensor takes): True where the claim is
        `claimer`'s, False where another producer holds it (then `wait_published`, and pin). A
        producer that dies loses its claims at their TTL. One round trip to Redis."""
        return self.directory.claim_many(ids, claimer, ttl)

    def unclaim_many(self, ids: list[str], claimer: str) -> None:
        """Give up `claimer`'s claims on these ids (once their tensors are put, or failed). One round
        trip to Redis."""
        self.directory.unclaim_many(ids, claimer)

    def wait_published(self, id: str, timeout: float) -> bool:
        """Whether the tensor `id` is published (put), waiting up to `timeout` seconds for it."""
        return self._published(id, time.monotonic() + timeout) is not None

    def get(self, ref: TensorRef | str, *, timeout: float = DEFAULT_TIMEOUT_S) -> torch.Tensor:
        """The tensor behind `ref` (or a bare id), waiting up to `timeout` for it to be written.

        Raises `ProducerSidecarDead` as soon as the sidecar holding it stops heartbeating,
        `TensorNotFound` if it is gone (evicted, expired), `TensorNotReady` if it was not written in time.
        """
        deadline = time.monotonic() + timeout
        entry = self._wait_until_ready(ref, deadline, timeout)
        if entry.holder == self.sidecar_id:
            arena_name, offset = entry.arena, entry.offset
        else:
            copy = self._copies.get(entry.ref.id) or self._fetch(entry.ref.id, max(0.0, deadline - time.monotonic()))
            arena_name, offset = copy.arena, copy.offset
        return tensors.tensor_over(self._arena(arena_name).buffer, offset, entry.ref.shape, entry.ref.dtype)

    def get_many(self, refs: list[TensorRef], *, timeout: float = DEFAULT_TIMEOUT_S,
                 trace: list[Transfer] | None = None) -> list[torch.Tensor]:
        """`get` for many refs: one round trip to Redis for those this node holds (the usual case
        between an encoder and an LLM on one node); any other goes the way of `get`. `trace`
        receives one `Transfer` per tensor."""
        began, clock = time.time(), time.perf_counter()
        found = self.directory.lookup_many([(ref.id, ref.location or self.sidecar_id) for ref in refs])
        views, paths = [], []
        for ref, (entry, alive) in zip(refs, found, strict=True):
            if entry is not None and alive and entry.holder == self.sidecar_id:
                views.append(tensors.tensor_over(self._arena(entry.arena).buffer, entry.offset, entry.ref.shape,
                                                 entry.ref.dtype))
                paths.append("shared memory")
            else:
                views.append(self.get(ref, timeout=timeout))
                holder = entry.holder if entry is not None else (ref.location or self.sidecar_id)
                paths.append("shared memory" if holder == self.sidecar_id else f"cross-node from {holder}")
        if trace is not None:
            trace += _transfers("get", refs, paths, began, time.perf_counter() - clock)
        return views

    def release(self, ref: TensorRef | str) -> None:
        """Take one pin off the tensor (an extra release does nothing): views from `get` must not be
        used any more. At no pins left the tensor is CACHED; this node's copy of it goes."""
        self.release_many([ref])

    def release_many(self, refs: list[TensorRef | str]) -> None:
        """`release` for many tensors, in one round trip to Redis when their refs name their holders."""
        pairs: list[tuple[str, str]] = []
        for ref in refs:
            key = ref.id if isinstance(ref, TensorRef) else ref
            with self._lock:
                copy = self._copies.pop(key, None)
            if copy is not None:
                pairs.append((copy.key, self.sidecar_id))
            holder = ref.location if isinstance(ref, TensorRef) and ref.location else self.directory.holder_of(key)
            if holder is not None:
                pairs.append((key, holder))
        if pairs:
            self.directory.release_many(pairs)

    def stats(self) -> wire.Stats:
        """Memory use of this node's sidecar."""
        return self._call(wire.StatsRequest(token=self.token), wire.Stats, 0.0)

    def close(self) -> None:
        self._connections.close()
        with self._lock:
            self._arenas.clear()

    def __enter__(self) -> SidecarClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------------------

    def _wait_until_ready(self, ref: TensorRef | str, deadline: float, timeout: float) -> TensorEntry:
        key = ref.id if isinstance(ref, TensorRef) else ref
        likely_holder = ref.location if isinstance(ref, TensorRef) and ref.location else self.sidecar_id
        entry, holder_alive = self.directory.lookup(key, likely_holder)
        if entry is not None:
            if not holder_alive:
                raise ProducerSidecarDead(f"tensor {key!r}: its sidecar {entry.holder!r} stopped heartbeating; the tensor is lost")
            return entry
        if isinstance(ref, TensorRef):  # refs exist only after their put: a missing entry is gone for good
            if ref.location and not self.directory.is_alive(ref.location):
                raise ProducerSidecarDead(f"tensor {key!r}: its sidecar {ref.location!r} is not alive; the tensor is lost")
            raise TensorNotFound(f"tensor {key!r} is gone: evicted from its sidecar's cache, expired, or its sidecar restarted")
        published = self._published(key, deadline)  # a bare id, not published yet: wait for its publication
        if published is None:
            raise TensorNotReady(f"tensor {key!r} was not written within {timeout:g} s")
        return published

    def _published(self, key: str, deadline: float) -> TensorEntry | None:
        """The tensor's entry once published, waiting until `deadline` in `WAIT_SLICE_S` slices; None if it was not."""
        while (remaining := deadline - time.monotonic()) > 0:
            published = self.directory.wait_published(key, min(remaining, WAIT_SLICE_S))
            if published is not None:
                return published
        return None

    def _fetch(self, key: str, timeout: float) -> wire.Placement:
        placement = self._call(wire.FetchRequest(token=self.token, id=key, timeout=timeout), wire.Placement, timeout)
        with self._lock:
            kept = self._copies.setdefault(key, placement)
        if kept is not placement:  # another thread fetched it concurrently; keep one copy
            self.directory.release(placement.key, self.sidecar_id)
        return kept

    def _local_member(self) -> Member:
        member = self.directory.member(self.sidecar_id)
        if member is None:
            raise SidecarUnavailable(
                f"no live sidecar {self.sidecar_id!r} in Redis namespace {self.directory.namespace!r}; "
                f"start one with `cornserve sidecar --id {self.sidecar_id}`"
            )
        return member

    def _arena(self, name: str) -> Arena:
        with self._lock:
            arena = self._arenas.get(name)
            if arena is None:
                try:
                    arena = Arena.attach(pathlib.Path(self._local.shm_dir), name)
                except FileNotFoundError:
                    raise TensorNotFound(f"arena {name} of sidecar {self.sidecar_id!r} is gone; the sidecar restarted") from None
                self._arenas = {name: arena}  # an older arena belongs to a previous incarnation of the sidecar
            return arena

    def _call(self, request: wire.Request, model: type[wire.Reply], timeout: float) -> wire.Reply:
        """One request/reply with the local sidecar, over a pooled connection."""
        for attempt in range(2):
            try:
                with self._connections.connection() as sock:
                    wire.send_request(sock, request)
                    return wire.recv_reply(sock, model, timeout + IO_TIMEOUT_S)
            except ConnectionRefusedError as e:
                if attempt == 0 and self._follow_restarted_sidecar():
                    continue
                raise SidecarUnavailable(f"cannot reach sidecar {self.sidecar_id!r} at {self._local.address}: {e}") from None
            except (OSError, wire.ConnectionClosed) as e:
                raise SidecarUnavailable(f"lost the connection to sidecar {self.sidecar_id!r} at {self._local.address}: {e!r}") from None
        raise AssertionError("unreachable")

    def _follow_restarted_sidecar(self) -> bool:
        """Switch to the local sidecar's new address if it restarted; False if it did not."""
        member = self.directory.member(self.sidecar_id)
        if member is None or member.address == self._local.address:
            return False
        self._local = member
        self._connections.close()
        self._connections = ConnectionPool(member.address, IO_TIMEOUT_S)
        return True
