"""The executor runtime: the loop shared by every executor.

It reads its deployment's queues as one consumer of the group, the interactive queue before the
batch queue, batches (up to `max_batch_size` items, waiting at most `max_wait_s` for a batch to
fill), keeps up to `max_in_flight` items running (a batch invocation brings many), stores each
outcome before acknowledging it, heartbeats, takes over the entries of executors whose heartbeat is
gone (running each at most `max_attempts` times in all), watches what it runs and aborts what
someone else ended meanwhile (cancelled, timed out), drains on SIGTERM, and serves /metrics
(Prometheus; advertised in Redis under `executor:<id>`, see `flyte_cornserve.metrics`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from flyte_cornserve.launch import announce_ready
from flyte_cornserve.metrics import ExecutorMetrics, MetricsServer, advertise, endpoint, serve, withdraw
from flyte_cornserve.protocol.deployments import executor_key
from flyte_cornserve.protocol.invocations import (
    GROUP,
    MAX_BLOCK_S,
    TERMINAL,
    ErrorKind,
    Invocation,
    InvocationStore,
    MalformedRecord,
    Outcome,
    Priority,
    State,
    events_key,
    queue_key,
)
from flyte_cornserve.sidecar.directory import default_sidecar_id

from .handler import Handler

log = logging.getLogger(__name__)

READ_BLOCK_MS = 1000  # a blocking read's longest wait: bounds how long SIGTERM waits for the loop
#: items of interactive work taken beyond `max_in_flight`: it need not wait for batch work to end
INTERACTIVE_RESERVE = 8


def wake_key(executor_id: str) -> str:
    """A stream only this executor's watcher reads: an entry wakes its blocking read to watch more."""
    return executor_key(executor_id) + ":wake"


class ExecutorRuntime:
    def __init__(self, client: aioredis.Redis, deployment_id: str, handler: Handler, executor_id: str | None = None,
                 heartbeat_s: float = 1.0, metrics_port: int | None = None) -> None:
        self.redis = client
        self.store = InvocationStore(client)
        self.deployment_id = deployment_id
        self.handler = handler
        self.executor_id = executor_id or f"{socket.gethostname()}-{os.getpid()}"
        self.node = default_sidecar_id()  # the node it runs on, as its sidecar names it
        self.heartbeat_s = heartbeat_s
        self.metrics = ExecutorMetrics(deployment_id, self.executor_id)
        handler.instrument(self.metrics)
        self.metrics_port = metrics_port  # None: an ephemeral port (the bound one once serving)
        self._metrics_server: MetricsServer | None = None
        self._metrics_name = f"executor:{self.executor_id}"  # its field in the metrics hash
        self._metrics_since = time.time()
        self._stopping = asyncio.Event()
        self._closing = asyncio.Event()  # run() is ending: its background loops return
        self._in_flight = 0  # items reserved by a read and not yet finished
        self._capacity = asyncio.Condition()
        self._running: set[asyncio.Task] = set()
        self._held: set[str] = set()  # ids of the entries its batches hold now
        # The watcher: admitted invocations' events streams (id -> last entry read), those it found
        # ended by someone else (id -> that state) until their batch lets go of them, and those
        # inside `handler.handle()` right now (only those are passed to `handler.abort()`).
        self._watched: dict[str, str] = {}
        self._ended: dict[str, State] = {}
        self._handling: set[str] = set()
        self._items: dict[str, list[str]] = {}  # invocation id -> the ids its items are handled under
        self._watch_more = asyncio.Event()  # wakes an idle watcher (nothing watched)
        self._watch_reading = False  # the watcher's blocking read is (about to be) under way
        self._wake_last = "0-0"

    def request_stop(self) -> None:
        """Stop taking work; invocations already running finish and are stored (graceful drain)."""
        self._stopping.set()
        asyncio.ensure_future(self._notify_capacity())  # wake what waits for room, to see the stop

    async def _notify_capacity(self) -> None:
        async with self._capacity:
            self._capacity.notify_all()

    async def run(self) -> None:
        await self.store.ensure_queue(self.deployment_id)
        # first: a port in use fails before the model loads
        self._metrics_server = serve(self.metrics.registry, self.metrics_port or 0)
        self.metrics_port = self._metrics_server.port
        await self.handler.start()
        await self._heartbeat_once()  # also advertises the metrics endpoint
        background = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._reclaim()),
                      asyncio.create_task(self._watch()), asyncio.create_task(self._listen_interactive())]
        log.info("executor %s serving %s", self.executor_id, self.deployment_id)
        announce_ready(executor_id=self.executor_id, metrics_port=self.metrics_port)  # to its launcher, if any
        try:
            await self._consume()
            if self._running:
                await asyncio.wait(self._running)
        finally:
            # Cancelling alone is not enough: redis-py 8 sometimes swallows a cancellation that
            # lands mid-command, and the task would go on. Each loop also returns once it sees this.
            self._closing.set()
            self._watch_more.set()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self.redis.delete(executor_key(self.executor_id), wake_key(self.executor_id))
            await withdraw(self.redis, self._metrics_name)
            await self.handler.stop()
            self._metrics_server.close()

    async def _consume(self) -> None:
        backoff = 0.0
        while not self._stopping.is_set():
            free = await self._wait_for_capacity()
            try:
                entries = await self._read(free)
            except RedisError as exc:  # Redis restarting or unreachable: keep the model, retry
                if "NOGROUP" in str(exc):  # Redis lost the queues (restarted without its data)
                    await self._ensure_queues()
                    continue
                backoff = min(max(2 * backoff, 0.1), 5.0)
                log.warning("reading the queue failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                continue
            backoff = 0.0
            if entries:
                self._in_flight += sum(entry.items for entry in entries)
                self._spawn(entries)

    async def _listen_interactive(self) -> None:
        """While the executor is full, a blocking read of the interactive queue alone, on a
        connection of its own, takes up to INTERACTIVE_RESERVE more items: interactive work does not
        wait for a batch invocation to end. (The main loop takes interactive work first too, once
        there is room.)"""
        client = self.redis.client()
        queue = queue_key(self.deployment_id)
        backoff = 0.0
        try:
            while not self._stopping.is_set() and not self._closing.is_set():
                async with self._capacity:
                    await self._capacity.wait_for(lambda: self._stopping.is_set() or (
                        self.handler.max_in_flight <= self._in_flight < self.handler.max_in_flight + INTERACTIVE_RESERVE))
                if self._stopping.is_set():
                    return
                try:
                    entries = _entries(await client.xreadgroup(GROUP, self.executor_id, {queue: ">"}, count=1,
                                                               block=READ_BLOCK_MS))
                except Exception as exc:  # Redis away (beyond the client's retries), or a bug: go on
                    backoff = _next_backoff(backoff)
                    _log_failure("reading the interactive queue", exc, backoff)
                    await asyncio.sleep(backoff)
                    continue
                backoff = 0.0
                if entries:
                    self._in_flight += sum(entry.items for entry in entries)
                    self._spawn(entries)
        finally:
            await client.aclose()

    async def _ensure_queues(self) -> None:
        try:
            await self.store.ensure_queue(self.deployment_id, again=True)
        except RedisError as exc:
            log.warning("re-creating the queues failed (%s)", exc)

    async def _wait_for_capacity(self) -> int:
        async with self._capacity:
            await self._capacity.wait_for(lambda: self._in_flight < self.handler.max_in_flight)
            return self.handler.max_in_flight - self._in_flight

    async def _release(self, count: int = 1) -> None:
        async with self._capacity:
            self._in_flight -= count
            self._capacity.notify_all()

    async def _read(self, free: int) -> list[Entry]:
        """Entries worth up to `free` items, interactive ones first: whatever is queued now, else
        block (up to READ_BLOCK_MS, then the loop looks at SIGTERM) for the first, then, after
        `max_wait_s` for more to arrive, what is queued by then. (The window is a sleep, not a
        blocking read: Redis times blocked reads out only at its cron's pace, every 100 ms.)"""
        want = min(free, self.handler.max_batch_size)
        entries = await self._take(want)
        if not entries:
            entries = await self._take(1, block_ms=READ_BLOCK_MS)
            if not entries:
                return entries
            if self.handler.max_wait_s > 0:
                await asyncio.sleep(self.handler.max_wait_s)  # the batching window itself
            if (room := want - sum(e.items for e in entries)) > 0:
                entries += await self._take(room)
        return entries

    async def _take(self, room: int, block_ms: int | None = None) -> list[Entry]:
        """Entries from the interactive queue (up to `room` of them), then from the batch queue
        while there is room (a batch entry may bring many items). With `block_ms`, wait that long
        for the first entry of either queue."""
        interactive, batch = queue_key(self.deployment_id), queue_key(self.deployment_id, Priority.BATCH)
        if block_ms is not None:
            reply = await self.redis.xreadgroup(GROUP, self.executor_id, {interactive: ">", batch: ">"},
                                                count=1, block=block_ms)
            return self._hold(_entries(reply))
        entries = self._hold(_entries(await self.redis.xreadgroup(GROUP, self.executor_id, {interactive: ">"}, count=room)))
        room -= len(entries)
        while room > 0:
            more = self._hold(_entries(await self.redis.xreadgroup(GROUP, self.executor_id, {batch: ">"}, count=1)))
            if not more:
                break
            entries += more
            room -= more[0].items
        return entries

    def _hold(self, entries: list[Entry]) -> list[Entry]:
        """Held from the moment they are read (the batching window may keep them a while before they
        are spawned): reclaim must not take them for entries lost on the way."""
        self._held.update(entry.id for entry in entries)
        return entries

    def _spawn(self, entries: list[Entry]) -> None:
        task = asyncio.create_task(self._run_batch(entries))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        ids = {entry.id for entry in entries}
        self._held |= ids
        task.add_done_callback(lambda _: self._held.difference_update(ids))

    async def _run_batch(self, entries: list[Entry]) -> None:
        started = time.monotonic()
        unreleased = sum(entry.items for entry in entries)
        batch: list[Invocation] = []
        try:
            for entry in entries:
                try:
                    invocation = await self._retrying(f"loading invocation {entry.invocation_id}", lambda e=entry: self.store.load(
                        self.deployment_id, e.invocation_id, e.id))
                except MalformedRecord as exc:  # it can never run: an ERROR saying why, then its entry is dropped
                    log.error("%s", exc)
                    await self._retrying(f"failing {entry.invocation_id}", lambda e=entry, m=str(exc): self.store.transition(
                        e.invocation_id, State.ERROR, allowed={State.CREATED, State.QUEUED, State.RUNNING}, error=m,
                        error_kind=ErrorKind.USER.value, finished_at=repr(time.time())))
                    invocation = None
                if invocation is None:  # expired, or a malformed entry: nothing to run, ever
                    await self._retrying(f"dropping entry {entry.id}", lambda e=entry: self._drop(e))
                if invocation is None or not await self._admit(invocation):
                    unreleased -= entry.items
                    await self._release(entry.items)
                    continue
                batch.append(invocation)
                self._observe_queue_wait(invocation)
            if not batch:
                return
            items = {invocation.id: invocation.item_invocations() for invocation in batch}
            count = sum(len(parts) for parts in items.values())
            self.metrics.in_flight.inc(count)
            await self._start_watching(batch)
            live = [invocation for invocation in batch if invocation.id not in self._ended]  # ended meanwhile
            work = [item for invocation in live for item in items[invocation.id]]
            ids = {item.id for item in work}
            outcomes: list[Outcome] = []
            if work:
                for invocation in live:
                    self._items[invocation.id] = [item.id for item in items[invocation.id]]
                self._handling |= ids  # the watcher runs only once handle() awaits: it has them by then
                try:
                    outcomes = await self._handle(work)
                except Exception as exc:  # a handler bug must not take the executor down
                    log.exception("handler failed on a batch of %d", len(work))
                    outcomes = [Outcome.failed(f"executor error: {type(exc).__name__}: {exc}", ErrorKind.RECOVERABLE)] * len(work)
                finally:
                    self._handling -= ids
                    for invocation in live:
                        self._items.pop(invocation.id, None)
            for invocation in batch:  # stop watching before any outcome of ours is written
                self._watched.pop(invocation.id, None)
            by_item = dict(zip((item.id for item in work), outcomes, strict=True))
            for invocation in batch:
                parts = items[invocation.id]
                ended = self._ended.pop(invocation.id, None)
                if ended is not None:  # someone else ended it (and it was aborted): nothing to store
                    await self._retrying(f"acknowledging {invocation.id}", lambda i=invocation: self.store.acknowledge(i))
                else:
                    outcome = invocation.combine([by_item[item.id] for item in parts])
                    if await self._finish(invocation, outcome):
                        self.metrics.ended(outcome.state.value, outcome.kind.value)
                        self.metrics.latency.observe(time.monotonic() - started)
                    else:
                        log.info("invocation %s ended elsewhere as it finished here; its outcome is dropped", invocation.id)
                self.metrics.in_flight.dec(len(parts))
                unreleased -= len(parts)
                await self._release(len(parts))
        except Exception:
            log.exception("batch bookkeeping failed; its entries stay pending for a reclaim")
        finally:
            for invocation in batch:
                self._watched.pop(invocation.id, None)
                self._ended.pop(invocation.id, None)
            if unreleased:
                await self._release(unreleased)

    async def _handle(self, work: list[Invocation]) -> list[Outcome]:
        """The handler's outcomes for `work`, handed over `max_batch_size` items at a time."""
        size = max(1, self.handler.max_batch_size)
        outcomes: list[Outcome] = []
        for start in range(0, len(work), size):
            self.metrics.batch_size.observe(len(work[start:start + size]))
            outcomes += await self.handler.handle(work[start:start + size])
        return outcomes

    def _observe_queue_wait(self, invocation: Invocation) -> None:
        """Time queued, from the queue entry's id (milliseconds when Redis added it) to now; first
        attempts only (a reclaimed entry keeps its id)."""
        if invocation.attempt == 1 and invocation.entry_id:
            queued_ms = int(invocation.entry_id.partition("-")[0])
            self.metrics.queue_wait.observe(max(0.0, time.time() - queued_ms / 1000))

    async def _admit(self, invocation: Invocation) -> bool:
        """Mark it RUNNING here, unless it was cancelled, already finished, is past its deadline, or
        has had all its attempts (each executor that died while running it took one)."""
        if invocation.deadline is not None and time.time() > invocation.deadline:
            if await self._retrying(f"starting {invocation.id}", lambda: self.store.start(invocation, self.executor_id)):
                if await self._finish(invocation, Outcome.failed("timed out before it ran", ErrorKind.RECOVERABLE)):
                    self.metrics.ended(State.ERROR.value, ErrorKind.RECOVERABLE.value)
            else:
                await self._retrying(f"acknowledging {invocation.id}", lambda: self.store.acknowledge(invocation))
            return False
        note = "" if invocation.attempt <= 1 else (
            f"attempt {invocation.attempt}: the executor that ran it before stopped heartbeating (died)")
        if not await self._retrying(f"starting {invocation.id}", lambda: self.store.start(
                invocation, self.executor_id, node=self.node, note=note)):
            await self._retrying(f"acknowledging {invocation.id}", lambda: self.store.acknowledge(invocation))
            return False
        if invocation.attempt > 1 and invocation.attempt > invocation.max_attempts:
            ran = invocation.attempt - 1
            log.warning("invocation %s: an executor died while running it, attempt %d of %d; not running it again",
                        invocation.id, ran, invocation.max_attempts)
            if await self._finish(invocation, Outcome.failed(
                f"executor died while running it (attempt {ran} of {invocation.max_attempts}); no attempt left",
                ErrorKind.RECOVERABLE,
            )):
                self.metrics.ended(State.ERROR.value, ErrorKind.RECOVERABLE.value)
            return False
        return True

    async def _retrying(self, what: str, operation):
        """`await operation()` until Redis takes it (a blip outlasting the client's own retries): what
        this executor holds (an outcome, an entry it must acknowledge) is never dropped on an error.
        Reclaim does not take a live executor's entries, so nobody else would store them."""
        backoff = 0.0
        while True:
            try:
                return await operation()
            except RedisError as exc:
                backoff = _next_backoff(backoff)
                log.warning("%s failed (%s); retrying in %.1fs", what, exc, backoff)
                await asyncio.sleep(backoff)  # the retry's backoff

    async def _finish(self, invocation: Invocation, outcome: Outcome) -> bool:
        """Store the outcome (retrying until Redis takes it); True if it is ours that was stored. A try
        whose reply was lost may have stored it: a later try then finds it terminal, with our outcome."""
        tries = 0

        async def finish() -> bool:
            nonlocal tries
            tries += 1
            if await self.store.finish(invocation, outcome):
                return True
            if tries == 1:
                return False
            try:  # stored by an earlier try, or ended elsewhere?
                record = await self.store.record(invocation.id)
            except KeyError:  # expired meanwhile
                return False
            return record.state == outcome.state and record.executor == self.executor_id

        return await self._retrying(f"storing the outcome of {invocation.id}", finish)

    async def _drop(self, entry: Entry) -> None:
        """Acknowledge and delete an entry that has nothing to run (its queue: either of them)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for priority in Priority:
                pipe.xack(queue_key(self.deployment_id, priority), GROUP, entry.id)
                pipe.xdel(queue_key(self.deployment_id, priority), entry.id)
            await pipe.execute()

    # -- the watcher: aborting what someone else ended ------------------------------------------------

    async def _start_watching(self, batch: list[Invocation]) -> None:
        """Watch the batch's events streams (from their start: nothing written meanwhile is missed)."""
        for invocation in batch:
            self._watched[invocation.id] = "0-0"
        if not self._watch_reading:
            self._watch_more.set()  # idle or between reads: it takes the new ones on its next read
            return
        # Its blocking read names the streams it watched before: an entry in its wake stream ends it.
        # Reading that stream from the last entry it saw, it cannot miss one added before it blocks.
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(wake_key(self.executor_id), {"n": len(batch)}, maxlen=1, approximate=False)
                pipe.pexpire(wake_key(self.executor_id), int(self.heartbeat_s * 3000))
                await pipe.execute()
        except RedisError as exc:  # it watches them from its next read (at most MAX_BLOCK_S away)
            log.warning("waking the watcher failed (%s)", exc)

    async def _watch(self) -> None:
        """One blocking XREAD, on a connection of its own, over the events streams of every invocation
        in flight here; one that ends in a state someone else wrote (we write ours only after we stop
        watching it) is given up and its handler work aborted."""
        client = self.redis.client()  # holds one connection of the pool for itself
        backoff = 0.0
        try:
            while not self._closing.is_set():
                if not self._watched:
                    self._watch_more.clear()
                    await self._watch_more.wait()
                    continue
                self._watch_reading = True
                try:
                    watched = {events_key(i): i for i in self._watched}
                    streams = {key: self._watched[i] for key, i in watched.items()}
                    streams[wake_key(self.executor_id)] = self._wake_last
                    reply = await client.xread(streams, block=int(MAX_BLOCK_S * 1000))
                except Exception as exc:  # Redis restarting or unreachable
                    backoff = _next_backoff(backoff)
                    _log_failure("watching invocations", exc, backoff)
                    await asyncio.sleep(backoff)  # the retry's backoff
                    continue
                finally:
                    self._watch_reading = False
                backoff = 0.0
                ended: dict[str, State] = {}
                for key, entries in reply or []:
                    key = _text(key)
                    if key not in watched:  # the wake stream
                        self._wake_last = _text(entries[-1][0])
                        continue
                    invocation_id = watched[key]
                    if invocation_id not in self._watched:
                        continue  # no longer in flight (its batch is storing its own outcome)
                    for entry_id, fields in entries:
                        self._watched[invocation_id] = _text(entry_id)  # past it, even if it is malformed
                        try:
                            state = State(_text(fields[b"state"]))
                        except (KeyError, ValueError):
                            log.error("ignored a malformed event of invocation %s: %r", invocation_id, fields)
                            continue
                        if state in TERMINAL:
                            ended[invocation_id] = state
                if ended:
                    await self._abort(ended)
        finally:
            await client.aclose()

    async def _abort(self, ended: dict[str, State]) -> None:
        running = []
        for invocation_id, state in ended.items():
            del self._watched[invocation_id]
            self._ended[invocation_id] = state
            self.metrics.gave_up(state.value)
            log.warning("invocation %s ended elsewhere (%s) while running here: aborting it", invocation_id, state.value)
            running += [item for item in self._items.get(invocation_id, ()) if item in self._handling]
        if running:
            try:
                await self.handler.abort(running)
            except Exception:  # a handler bug must not stop the watcher
                log.exception("handler failed to abort %s", running)

    async def _heartbeat_once(self) -> None:
        info = {"deployment_id": self.deployment_id, "pid": os.getpid(), "host": socket.gethostname(),
                "output_identity": self.handler.output_identity}
        await self.redis.set(executor_key(self.executor_id), json.dumps(info), px=int(self.heartbeat_s * 3000))
        self.metrics.queue_depth.set(await self.store.queue_depth(self.deployment_id))
        if self._metrics_server is not None:  # again each beat: an entry outlives a Redis restart
            await advertise(self.redis, endpoint(self._metrics_name, "executor", self._metrics_server,
                                                 executor_key(self.executor_id), self._metrics_since))

    async def _closed_within(self, seconds: float) -> bool:
        """Wait `seconds` (a period: the heartbeat's, not a race workaround), or less if `run()` is
        ending; True if it is."""
        try:
            await asyncio.wait_for(self._closing.wait(), seconds)
            return True
        except TimeoutError:
            return False

    async def _heartbeat(self) -> None:
        while not await self._closed_within(self.heartbeat_s):
            try:
                await self._heartbeat_once()
            except Exception as exc:  # Redis away beyond the client's retries, or a bug: the next beat
                _log_failure("heartbeat", exc)  # (its period is the backoff)

    async def _reclaim(self) -> None:
        backoff = 0.0
        while not await self._closed_within(self.heartbeat_s + backoff):  # its period, plus the backoff
            if self._stopping.is_set():
                return
            try:
                await self._reclaim_once()
                backoff = 0.0
            except Exception as exc:
                backoff = _next_backoff(backoff)
                _log_failure("looking for dead executors", exc, backoff)

    async def _reclaim_once(self) -> None:
        """Take over entries held by consumers whose heartbeat expired (they died mid-invocation)."""
        for priority in Priority:
            queue = queue_key(self.deployment_id, priority)
            # Its own entries that no batch holds: delivered by a read whose reply a dropped
            # connection lost (the client's retry then read past them). Nobody else would run them.
            mine = await self.redis.xpending_range(queue, GROUP, "-", "+", 1000, consumername=self.executor_id,
                                                   idle=self._claim_idle_ms())
            lost = [p["message_id"] for p in mine if _text(p["message_id"]) not in self._held]
            if lost:
                claimed = await self.redis.xclaim(queue, GROUP, self.executor_id, self._claim_idle_ms(), lost)
                entries = [_entry(i, f) for i, f in claimed if _text(i) not in self._held]
                log.warning("found %d entries delivered here and lost on the way (Redis blip): running them", len(entries))
                for entry in entries:
                    self._in_flight += entry.items
                    self._spawn([entry])
            for consumer in await self.redis.xinfo_consumers(queue, GROUP):
                name = _text(consumer["name"])
                if name == self.executor_id or await self.redis.exists(executor_key(name)):
                    continue
                pending = await self.redis.xpending_range(queue, GROUP, "-", "+", 1000, consumername=name)
                if pending:
                    ids = [p["message_id"] for p in pending]
                    # Exclusive: claiming resets an entry's idle time, so of two executors that saw
                    # these pending at once, only the first gets them (the other's XCLAIM skips them).
                    claimed = await self.redis.xclaim(queue, GROUP, self.executor_id, self._claim_idle_ms(), ids)
                    entries = [_entry(i, f) for i, f in claimed]
                    log.warning("took over %d invocations of dead executor %s", len(entries), name)
                    for entry in entries:
                        self._in_flight += entry.items
                        self._spawn([entry])  # a malformed or deleted one is just acknowledged
                if not await self.redis.xpending_range(queue, GROUP, "-", "+", 1, consumername=name):
                    await self.redis.xgroup_delconsumer(queue, GROUP, name)  # (it would drop what it holds)

    def _claim_idle_ms(self) -> int:
        """The idle time an entry of a dead executor must have to be claimed: shorter than any such
        entry's (it was delivered before the executor's last beat, 3 periods before its key expired,
        or at most one period after), longer than the gap between two executors' XPENDING and XCLAIM."""
        return int(self.heartbeat_s * 1000)


def install_signal_handlers(runtime: ExecutorRuntime) -> None:
    """SIGTERM/SIGINT drain and stop; SIGUSR1 logs where every task of the loop is waiting."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runtime.request_stop)
    loop.add_signal_handler(signal.SIGUSR1, _log_tasks)


def _log_tasks() -> None:
    for task in asyncio.all_tasks():
        lines, awaited = [], task.get_coro()
        while awaited is not None:  # follow the chain of awaits down to where it is suspended
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None) or getattr(awaited, "ag_frame", None)
            if frame is not None:
                lines.append(f"\n    {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None) or getattr(awaited, "ag_await", None)
        log.warning("task %s%s", task.get_name(), "".join(lines))


@dataclass(frozen=True)
class Entry:
    """A queue entry: its id, the invocation it delivers, and how many items that brings."""

    id: str
    invocation_id: str
    items: int = 1


def _entries(reply) -> list[Entry]:
    return [_entry(entry_id, fields) for _, entries in (reply or []) for entry_id, fields in entries]


def _entry(entry_id: bytes | str, fields: dict | None) -> Entry:
    """A queue entry; a malformed one (or one deleted meanwhile) names no invocation: its batch just
    acknowledges it."""
    try:
        invocation_id = _text(fields[b"id"])
    except (KeyError, TypeError, ValueError, AttributeError):
        log.error("a malformed queue entry %s: %r; acknowledging it", _text(entry_id), fields)
        return Entry(_text(entry_id), "")
    try:  # `n` only counts items in flight: the record says what runs (a bad record ends in an ERROR)
        return Entry(_text(entry_id), invocation_id, int(fields.get(b"n", 1)))
    except (TypeError, ValueError):
        log.error("queue entry %s of %s has a malformed item count %r", _text(entry_id), invocation_id, fields.get(b"n"))
        return Entry(_text(entry_id), invocation_id)


def _next_backoff(previous: float) -> float:
    return min(max(2 * previous, 0.1), 5.0)


def _log_failure(what: str, exc: Exception, backoff: float | None = None) -> None:
    """A Redis error is weather (a warning); anything else is a bug, logged with its traceback."""
    then = "" if backoff is None else f"; retrying in {backoff:.1f}s"
    if isinstance(exc, RedisError):
        log.warning("%s failed (%s)%s", what, exc, then)
    else:
        log.error("%s failed%s", what, then, exc_info=exc)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
