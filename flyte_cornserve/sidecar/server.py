"""The per-node sidecar: owns the node's tensor memory and serves it to clients and other sidecars.

One process per node. It
- creates the node's arena (see `arena`) and places tensors in it for local producers (`alloc`),
  evicting CACHED tensors least-recently-released first when the memory cap is reached, and waiting
  only when everything left is PINNED (backpressure: woken by frees and new candidates, never polling);
- serves the bytes of tensors it holds to other sidecars (`read`), and pulls tensors held elsewhere
  into its own arena for local consumers (`fetch`);
- learns that a tensor became CACHED (its last pin released; a Redis list it blocks on), evicts it
  at its TTL, frees a PINNED one past `max_pinned` (an orphan) with a warning, and heartbeats its
  membership so consumers can tell it is alive;
- on start, removes what a crashed earlier incarnation with the same id left behind;
- serves Prometheus metrics (`flyte_cornserve.metrics`: tensors, bytes by path, arena, waits for room),
  advertised in Redis under `sidecar:<id>`.

Memory and directory agree: an extent is freed only once Redis confirmed that the tensor's entry is
gone, and an eviction is one Lua script that refuses a tensor pinned again meanwhile (a cache hit).
Redis is never called with the lock held.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import heapq
import hmac
import logging
import os
import pathlib
import secrets
import socket
import socketserver
import threading
import time

import redis

from .. import metrics as prom
from .allocator import ExtentAllocator
from .arena import Arena, new_arena_name, remove_stale_arenas
from .connections import ConnectionPool
from .directory import Directory, Member, TensorEntry, check_sidecar_id
from .errors import (
    AuthenticationError,
    MemoryCapExceeded,
    ProducerSidecarDead,
    ProtocolError,
    SidecarError,
    TensorIdTaken,
    TensorNotFound,
)
from . import wire

log = logging.getLogger(__name__)

HANG_UP_DRAIN_S = 0.5  # how long a broken connection's leftover input is drained before closing
HANG_UP_DRAIN_BYTES = 1 << 20
FREE_RETRY_S = 1.0  # a free or eviction that Redis did not confirm is tried again this much later


@dataclasses.dataclass(frozen=True)
class SidecarConfig:
    sidecar_id: str
    capacity: int
    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str | None = None  # how other sidecars reach this one; default: `host`
    shm_dir: pathlib.Path = pathlib.Path("/dev/shm")
    token: str = ""
    heartbeat_ttl: float = 3.0
    io_timeout: float = 30.0
    metrics_port: int | None = 0  # Prometheus /metrics (0: a free port; None: not served)


@dataclasses.dataclass
class _Holding:
    """A tensor in this sidecar's arena, PINNED (the default) or CACHED (an eviction candidate)."""

    offset: int
    nbytes: int
    size: int  # of its extent
    ttl: float
    max_pinned: float
    due: float = 0.0  # when the expiry loop looks at it: its TTL if CACHED, its orphan bound if PINNED
    cached: bool = False
    releases: int = 0  # times it became CACHED: tells an eviction refused for an old pin from a newer release
    doomed: bool = False  # freed whatever its pins (a failed put, an orphan, shutdown), retried until Redis confirms
    checksum: int | None = None  # computed on the first `read`, then reused
    freeing: bool = False  # its removal from the directory is under way: no longer served


class SidecarServer:
    """The sidecar of one node; `start()` it, then `serve_forever()` until `shutdown()`."""

    def __init__(self, config: SidecarConfig, directory: Directory) -> None:
        check_sidecar_id(config.sidecar_id)
        self.config = config
        self.directory = directory
        self._tcp = _TCPServer((config.host, config.port), self)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._space_freed = threading.Condition(self._lock)
        self._schedule_changed = threading.Condition(self._lock)
        self._holdings: dict[str, _Holding] = {}
        self._candidates: collections.OrderedDict[str, None] = collections.OrderedDict()  # CACHED, oldest first
        self._expiries: list[tuple[float, str]] = []  # heap; stale entries (due changed, tensor freed) are skipped
        self._waiting = 0
        self._waits = 0
        self._evictions = dict.fromkeys(prom.EVICTION_REASONS, 0)
        self._allocator = ExtentAllocator(config.capacity)
        self._peers: dict[str, ConnectionPool] = {}  # address -> connections to that sidecar
        host, port = self._tcp.server_address[:2]
        self.member = Member(
            id=config.sidecar_id,
            address=f"{config.advertise_host or host}:{port}",
            host=socket.gethostname(),
            pid=os.getpid(),
            shm_dir=str(config.shm_dir),
            arena=new_arena_name(config.sidecar_id),
            capacity=self._allocator.capacity,
        )
        self.arena: Arena | None = None
        self.metrics = prom.SidecarMetrics(config.sidecar_id, self.stats)
        self._metrics_server: prom.MetricsServer | None = None
        self._metrics_since = time.time()

    def start(self) -> None:
        """Clean up after a crashed earlier incarnation, create the arena and join the membership."""
        self.directory.ensure_id_free(self.member)
        if self.config.metrics_port is not None:  # first: a port in use fails before anything is created
            self._metrics_server = prom.serve(self.metrics.registry, self.config.metrics_port)
        stale = remove_stale_arenas(self.config.shm_dir, self.config.sidecar_id)
        forgotten = self.directory.forget_all(self.config.sidecar_id)
        if stale or forgotten:
            log.warning("sidecar %s: removed %d stale arena file(s) and %d stale tensor(s)", self.config.sidecar_id, len(stale), forgotten)
        self.arena = Arena.create(self.config.shm_dir, self.member.arena, self._allocator.capacity)
        self.directory.heartbeat(self.member, self.config.heartbeat_ttl, self.stats().model_dump_json())
        if self._metrics_server is not None:
            self._advertise()
        for loop in (self._heartbeat_loop, self._release_loop, self._expiry_loop):
            threading.Thread(target=_surviving_redis_errors(loop, self._stopping), name=loop.__name__, daemon=True).start()

    @property
    def metrics_url(self) -> str | None:
        """Where it serves Prometheus metrics, once started (None if it does not)."""
        return self._metrics_server.url if self._metrics_server is not None else None

    def serve_forever(self) -> None:
        """Serve until `shutdown()`, then free everything and leave the membership."""
        try:
            self._tcp.serve_forever(poll_interval=0.1)  # how soon shutdown() takes effect
        finally:
            self._close()

    def shutdown(self) -> None:
        """Stop serving; call from another thread than `serve_forever` (e.g. a signal handler's)."""
        self._stopping.set()
        with self._lock:
            self._schedule_changed.notify_all()
        self._tcp.shutdown()

    def _close(self) -> None:
        """The arena file goes first: what follows talks to Redis, which may be gone too (an embedded
        Redis dies with the control plane that also stops this sidecar), and its retries may outlast
        the grace a stopping stack gives. Mappings of the arena stay valid until their owners unmap."""
        self._tcp.server_close()
        if self.arena is not None:
            self.arena.unlink()
        for pool in list(self._peers.values()):
            pool.close()
        with self._lock:
            keys = list(self._holdings)
        try:
            for key in keys:
                self._free(key)
            if self._metrics_server is not None:
                prom.withdraw_sync(self.directory.redis, f"sidecar:{self.config.sidecar_id}", self.directory.metrics_key)
            self.directory.deregister(self.member)
        except redis.RedisError as exc:  # its keys expire with its heartbeat: readers see it dead
            log.warning("could not leave the directory on shutdown (%s); its entries expire by themselves", exc)
        finally:
            if self._metrics_server is not None:
                self._metrics_server.close()

    # --- requests --------------------------------------------------------------------------------

    def handle_connection(self, sock: socket.socket) -> None:
        """Serve requests on one connection until the peer closes it or breaks the protocol."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            try:
                request = wire.recv_request(sock, self.config.io_timeout)
                if not hmac.compare_digest(request.token.encode(), self.config.token.encode()):
                    raise AuthenticationError("wrong or missing sidecar token")
            except wire.ConnectionClosed:
                return
            except ProtocolError as e:
                log.warning("dropping connection from %s: %s", _peer(sock), e)
                _send_error_quietly(sock, e)
                _hang_up(sock)
                return
            try:
                if isinstance(request, wire.ReadRequest):
                    self._serve_read(sock, request)
                    continue
                reply = self._dispatch(request)
            except SidecarError as e:
                wire.send_error(sock, e)
                continue
            except (redis.RedisError, ValueError) as e:
                log.exception("%s request failed", request.op)
                _send_error_quietly(sock, SidecarError(f"sidecar {self.config.sidecar_id!r} failed: {e!r}"))
                _hang_up(sock)
                return
            wire.send_reply(sock, reply)

    def _dispatch(self, request: wire.Request) -> wire.Placements | wire.Placement | wire.Stats:
        if isinstance(request, wire.AllocRequest):
            return self._alloc(request)
        if isinstance(request, wire.FetchRequest):
            return self._fetch(request)
        return self.stats()

    def stats(self) -> wire.Stats:
        with self._lock:
            cached = [holding.size for holding in self._holdings.values() if holding.cached]
            return wire.Stats(
                sidecar=self.config.sidecar_id,
                capacity=self._allocator.capacity,
                used=self._allocator.used,
                tensors=len(self._holdings),
                pinned=len(self._holdings) - len(cached),
                pinned_bytes=self._allocator.used - sum(cached),
                cached=len(cached),
                cached_bytes=sum(cached),
                waiting=self._waiting,
                waits=self._waits,
                evictions=dict(self._evictions),
                high_water=self._allocator.high_water,
            )

    def _alloc(self, request: wire.AllocRequest) -> wire.Placements:
        """Room for every tensor of the request, or for none (a failure frees what it had placed)."""
        deadline = time.monotonic() + request.timeout
        placed: list[wire.Placement] = []
        try:
            for ref in request.refs:
                offset = self._allocate(ref.id, ref.nbytes, request.ttl, request.max_pinned, max(0.0, deadline - time.monotonic()))
                placed.append(wire.Placement(key=ref.id, arena=self.arena.name, offset=offset))
        except BaseException:
            for placement in placed:
                self._free(placement.key)
            raise
        self.metrics.bytes[prom.LOCAL_PUT].inc(sum(ref.nbytes for ref in request.refs))
        return wire.Placements(placements=placed)

    def _fetch(self, request: wire.FetchRequest) -> wire.Placement:
        entry = self.directory.entry(request.id)
        if entry is None:
            raise TensorNotFound(f"tensor {request.id!r} is gone: evicted from its sidecar's cache, expired, or its sidecar restarted")
        if entry.holder == self.config.sidecar_id:
            raise SidecarError(f"tensor {request.id!r} is held by this sidecar; map it instead of fetching it")
        holder = self.directory.member(entry.holder)
        if holder is None:
            raise ProducerSidecarDead(f"tensor {request.id!r}: its sidecar {entry.holder!r} is not alive; the tensor is lost")
        key = f"{request.id}.copy.{secrets.token_hex(6)}"
        offset = self._allocate(key, entry.ref.nbytes, 0.0, entry.max_pinned, request.timeout)  # goes when its reader releases it
        try:
            self._pull(holder, entry, self.arena.view(offset, entry.ref.nbytes))
            copy = entry.model_copy(update={"holder": self.config.sidecar_id, "arena": self.arena.name, "offset": offset,
                                            "pins": 1, "ttl": 0.0})
            self.directory.publish(key, copy)
        except BaseException:
            self._free(key)
            raise
        self.metrics.bytes[prom.TCP_FETCHED].inc(entry.ref.nbytes)
        return wire.Placement(key=key, arena=self.arena.name, offset=offset)

    def _pull(self, holder: Member, entry: TensorEntry, into: memoryview) -> None:
        """Stream a tensor from the sidecar that holds it straight into `into`, validating everything."""
        ref = entry.ref
        try:
            with self._peer(holder.address).connection() as sock:
                wire.send_request(sock, wire.ReadRequest(token=self.config.token, id=ref.id))
                wire.recv_reply(sock, wire.Empty, self.config.io_timeout)
                header = wire.recv_tensor_header(sock)
                announced, expected = (header.dtype, header.shape, header.nbytes), (ref.dtype, ref.shape, ref.nbytes)
                if announced != expected:
                    raise ProtocolError(f"sidecar {holder.id!r} announced (dtype, shape, nbytes) {announced} for tensor {ref.id!r}, the directory says {expected}")
                wire.recv_tensor_payload(sock, into, header.checksum)
        except wire.ConnectionClosed:
            raise ProtocolError(f"sidecar {holder.id!r} closed the connection without replying") from None
        except OSError as e:
            raise ProducerSidecarDead(f"tensor {ref.id!r}: its sidecar {holder.id!r} at {holder.address} is unreachable ({e})") from None

    def _peer(self, address: str) -> ConnectionPool:
        with self._lock:
            pool = self._peers.get(address)
            if pool is None:
                pool = self._peers[address] = ConnectionPool(address, self.config.io_timeout)
            return pool

    def _serve_read(self, sock: socket.socket, request: wire.ReadRequest) -> None:
        entry = self.directory.entry(request.id)
        deadline = time.monotonic() + self.config.io_timeout
        with self._lock:
            holding = self._holdings.get(request.id)
            # An eviction under way is refused if the reader holds a pin: wait for Redis's answer.
            while holding is not None and holding.freeing and not holding.doomed and time.monotonic() < deadline:
                self._space_freed.wait(deadline - time.monotonic())
                holding = self._holdings.get(request.id)
            if holding is not None and (holding.freeing or holding.doomed):
                holding = None
        if entry is None or holding is None or entry.holder != self.config.sidecar_id or entry.offset != holding.offset:
            raise TensorNotFound(f"sidecar {self.config.sidecar_id!r} holds no tensor {request.id!r} (evicted, expired, or never put here)")
        payload = self.arena.view(holding.offset, holding.nbytes)
        if holding.checksum is None:
            holding.checksum = wire.checksum(payload)
        ref = entry.ref
        wire.send_reply(sock, wire.Empty())
        wire.send_tensor(sock, wire.TensorHeader(ref.dtype, ref.shape, ref.nbytes, holding.checksum), payload)
        self.metrics.bytes[prom.TCP_SERVED].inc(ref.nbytes)

    # --- memory ----------------------------------------------------------------------------------

    def _allocate(self, key: str, nbytes: int, ttl: float, max_pinned: float, timeout: float) -> int:
        """Place `nbytes` in the arena (a PINNED tensor): when the cap is reached, evict CACHED tensors
        oldest first until it fits, and only when none is left wait up to `timeout` for room."""
        size = self._allocator.size_for(nbytes)
        if size > self._allocator.capacity:
            raise MemoryCapExceeded(f"a tensor of {nbytes} bytes can never fit under sidecar {self.config.sidecar_id!r}'s memory cap of {self._allocator.capacity} bytes")
        deadline = time.monotonic() + timeout
        waited_since: float | None = None
        try:
            while True:
                with self._lock:
                    if key in self._holdings:
                        raise TensorIdTaken(f"tensor id {key!r} is already in use; ids must be unique while their tensors live")
                    offset = self._allocator.allocate(nbytes)
                    if offset is not None:
                        self._holdings[key] = holding = _Holding(offset, nbytes, size, ttl, max_pinned)
                        self._schedule_locked(key, holding, time.time() + max_pinned)
                        break
                    victim = self._oldest_candidate_locked()
                    if victim is None:  # everything is pinned (or being freed): wait for a free or a new candidate
                        if waited_since is None:
                            waited_since = time.monotonic()
                            self._waiting += 1
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise MemoryCapExceeded(
                                f"sidecar {self.config.sidecar_id!r}: no room for {nbytes} bytes within {timeout:.3g} s; "
                                f"{self._allocator.used} of {self._allocator.capacity} bytes in use and pinned, largest free extent {self._allocator.largest_free}"
                            )
                        self._space_freed.wait(remaining)
                        continue
                self._evict(victim, "lru")  # outside the lock: a Redis call
        finally:
            if waited_since is not None:
                with self._lock:
                    self._waiting -= 1
                    self._waits += 1
                self.metrics.waits.inc()
                self.metrics.wait_seconds.inc(time.monotonic() - waited_since)
        try:
            self.arena.back(offset + size)
        except OSError as e:
            self._free(key)
            raise MemoryCapExceeded(f"shared memory in {self.config.shm_dir} is full ({e}); lower the sidecar's memory cap") from None
        self.metrics.allocated.inc()
        return offset

    def _oldest_candidate_locked(self) -> str | None:
        """The least recently released CACHED tensor that is not being freed; drops stale candidates."""
        while self._candidates:
            key = next(iter(self._candidates))
            holding = self._holdings.get(key)
            if holding is not None and holding.cached and not holding.freeing and not holding.doomed:
                return key
            del self._candidates[key]  # an eviction or free under way puts it back if it fails
        return None

    def _schedule_locked(self, key: str, holding: _Holding, at: float) -> None:
        """(Re)schedule when the expiry loop looks at `holding`; earlier heap entries of it are then skipped."""
        holding.due = at
        if not self._expiries or at < self._expiries[0][0]:
            self._schedule_changed.notify()
        heapq.heappush(self._expiries, (at, key))

    def _became_cached(self, key: str) -> None:
        """Its last pin was released (or it was put with none): an eviction candidate, newest, due at its TTL."""
        with self._lock:
            holding = self._holdings.get(key)
            if holding is None or holding.doomed:
                return
            holding.cached = True
            holding.releases += 1
            self._candidates[key] = None
            self._candidates.move_to_end(key)
            self._schedule_locked(key, holding, time.time() + holding.ttl)
            self._space_freed.notify_all()  # a waiting put may evict it

    def _evict(self, key: str, reason: str, due: float | None = None) -> None:
        """Evict a CACHED tensor (only if still due at `due`, when given), if Redis agrees that it is
        still unpinned; else it is PINNED again (a hit), due at its orphan bound. A Redis error leaves
        it a candidate, retried, and is raised."""
        with self._lock:
            holding = self._holdings.get(key)
            if holding is None or holding.freeing or holding.doomed or not holding.cached or (due is not None and holding.due != due):
                return
            holding.freeing = True
            self._candidates.pop(key, None)
            releases = holding.releases
        try:
            evicted = self.directory.evict(key, self.config.sidecar_id, self.member.arena)
        except redis.RedisError:
            with self._lock:
                holding.freeing = False
                self._candidates[key] = None
                self._candidates.move_to_end(key, last=False)  # still the oldest
                self._schedule_locked(key, holding, max(holding.due, time.time() + FREE_RETRY_S))
                self._space_freed.notify_all()
            raise
        with self._lock:
            if evicted:
                self._evictions[reason] += 1
                self._remove_locked(key, holding)
            else:
                holding.freeing = False
                if holding.doomed:  # a forced free came meanwhile: the expiry loop does it now
                    self._schedule_locked(key, holding, time.time())
                elif holding.releases == releases:  # pinned again, not released since
                    holding.cached = False
                    self._schedule_locked(key, holding, time.time() + holding.max_pinned)
                # else: released again meanwhile; `_became_cached` made it a candidate again
                self._space_freed.notify_all()  # a read waiting for this eviction's outcome serves it
        if evicted:
            self.metrics.evictions[reason].inc()

    def _free(self, key: str) -> None:
        """Free a tensor whatever its pins: first remove it from the directory, so nobody finds it,
        then its extent.

        The extent is freed, and the tensor forgotten here, only once Redis has confirmed the removal:
        on a Redis error the tensor stays (Redis may still point at it) and the free is retried
        `FREE_RETRY_S` later by the expiry loop, so that no space leaks either.
        """
        with self._lock:
            holding = self._holdings.get(key)
            if holding is None:
                return
            holding.doomed = True
            if holding.freeing:
                return  # another thread is removing it; if that fails or is refused, it retries this free
            holding.freeing = True
            self._candidates.pop(key, None)
        try:
            self.directory.forget(key, self.config.sidecar_id, self.member.arena)
        except redis.RedisError as e:
            log.warning("tensor %s: Redis did not confirm its removal (%r); keeping it, retrying in %g s", key, e, FREE_RETRY_S)
            with self._lock:
                holding.freeing = False
                self._schedule_locked(key, holding, time.time() + FREE_RETRY_S)
            return
        with self._lock:
            self._remove_locked(key, holding)

    def _remove_locked(self, key: str, holding: _Holding) -> None:
        """Forget a tensor whose removal Redis confirmed, and give its extent back."""
        del self._holdings[key]
        self._candidates.pop(key, None)
        self._allocator.free(holding.offset)
        self._space_freed.notify_all()

    # --- background loops ------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self._stopping.wait(self.config.heartbeat_ttl / 3):
            if not self.directory.heartbeat(self.member, self.config.heartbeat_ttl, self.stats().model_dump_json()):
                log.error("sidecar id %s was taken over by another process; stopping", self.config.sidecar_id)
                threading.Thread(target=self.shutdown, daemon=True).start()
                return
            if self._metrics_server is not None:  # again each beat: an entry outlives a Redis restart
                self._advertise()

    def _advertise(self) -> None:
        where = prom.endpoint(f"sidecar:{self.config.sidecar_id}", "sidecar", self._metrics_server,
                              self.directory.member_key(self.config.sidecar_id), self._metrics_since)
        prom.advertise_sync(self.directory.redis, where, self.directory.metrics_key)

    def _release_loop(self) -> None:
        """Make each tensor whose last pin was released a cache candidate; free each discarded one."""
        while not self._stopping.is_set():
            change = self.directory.next_change(self.config.sidecar_id, timeout=1.0)
            if change is None:
                continue
            what, key = change
            if what == "cached":
                self._became_cached(key)
            else:
                self._free(key)

    def _expiry_loop(self) -> None:
        """Evict CACHED tensors at their TTL, free PINNED ones past their orphan bound, and retry
        removals that Redis did not confirm."""
        while not self._stopping.is_set():
            with self._lock:
                due: list[tuple[str, float]] = []
                now = time.time()
                while self._expiries and self._expiries[0][0] <= now:
                    at, key = heapq.heappop(self._expiries)
                    holding = self._holdings.get(key)
                    if holding is not None and holding.due == at and not holding.freeing:
                        due.append((key, at))
                if not due:
                    self._schedule_changed.wait(self._expiries[0][0] - now if self._expiries else None)
            for key, at in due:
                with self._lock:  # look again: a release or a refused eviction may have rescheduled it since
                    holding = self._holdings.get(key)
                    if holding is None or holding.due != at or holding.freeing:
                        continue
                    orphan = not holding.doomed and not holding.cached
                    if orphan:
                        holding.doomed = True
                        self._evictions["orphan"] += 1
                if orphan:
                    log.warning("tensor %s was pinned for over %g s (max_pinned) and never released; freeing it as an orphan",
                                key, holding.max_pinned)
                    self.metrics.evictions["orphan"].inc()
                if holding.doomed:
                    self._free(key)  # an orphan, or a retry
                    continue
                try:
                    self._evict(key, "ttl", due=at)
                except redis.RedisError as e:
                    log.warning("tensor %s: Redis did not confirm its eviction (%r); retrying in %g s", key, e, FREE_RETRY_S)


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], sidecar: SidecarServer) -> None:
        self.sidecar = sidecar
        super().__init__(address, _Handler)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            self.server.sidecar.handle_connection(self.request)  # type: ignore[attr-defined]
        except OSError as e:
            log.info("connection from %s ended: %s", _peer(self.request), e)


def _send_error_quietly(sock: socket.socket, error: SidecarError) -> None:
    try:
        wire.send_error(sock, error)
    except OSError:
        pass


def _hang_up(sock: socket.socket) -> None:
    """End a connection after an error reply so that the peer can still read that reply.

    Closing with unread bytes in the receive buffer makes the kernel send RST, which may discard the
    reply on the peer's side; so half-close, and drain (bounded in time and bytes) what the peer
    already sent before the socket is closed.
    """
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(HANG_UP_DRAIN_S)
        budget = HANG_UP_DRAIN_BYTES
        while budget > 0 and (chunk := sock.recv(min(budget, 1 << 16))):
            budget -= len(chunk)


def _peer(sock: socket.socket) -> str:
    try:
        return "%s:%s" % sock.getpeername()[:2]
    except OSError:
        return "?"


def _surviving_redis_errors(loop, stopping: threading.Event):
    """Run `loop` until stopped, restarting it a second after a Redis error (e.g. Redis restarting)."""

    def run() -> None:
        while not stopping.is_set():
            try:
                return loop()
            except redis.RedisError as e:
                log.warning("%s: %r; retrying in 1 s", loop.__name__, e)
                stopping.wait(1.0)

    return run
