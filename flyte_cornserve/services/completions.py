"""`Completions`: one blocking read that waits for many invocations at once.

A submitter that waits for each invocation with a blocking read of its own holds one Redis
connection per waiting invocation; 128 at once exhaust redis-py's pool. Instead every invocation
submitted through a `Completions` names its notify stream, to which Redis appends the terminal
state (see `invocations`), and one reader resolves the waiters' futures. Register the waiter
(`expect`) before submitting: the stream is read from where it stood when the reader started, so a
completion that arrives first is not lost. The reader trims what it has read, so the stream stays
short however many invocations its submitter runs.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from flyte_cornserve.protocol.invocations import MAX_BLOCK_S, State, _text, notify_key

log = logging.getLogger(__name__)


class Completions:
    """Futures of terminal states, fed by one reader of this submitter's notify stream."""

    def __init__(self, client: aioredis.Redis, name: str | None = None) -> None:
        self.redis = client
        self.key = notify_key(name or f"submitter-{uuid.uuid4().hex}")
        self._waiting: dict[str, asyncio.Future[State]] = {}
        self._reader: asyncio.Task | None = None
        self._started = asyncio.Event()

    async def expect(self, invocation_id: str) -> asyncio.Future[State]:
        """A future for the terminal state of `invocation_id`, which is yet to be submitted."""
        if self._reader is None:
            self._reader = asyncio.create_task(self._read(), name=f"completions {self.key}")
        await self._started.wait()
        future = self._waiting.get(invocation_id)
        if future is None:
            future = self._waiting[invocation_id] = asyncio.get_running_loop().create_future()
        return future

    def forget(self, invocation_id: str) -> None:
        """Stop waiting for it (the caller gave up: cancelled, timed out)."""
        future = self._waiting.pop(invocation_id, None)
        if future is not None and not future.done():
            future.cancel()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        await self.redis.delete(self.key)

    async def _read(self) -> None:
        client = self.redis.client()  # one connection of its own for the blocking read
        last = "$"
        backoff = 0.0
        try:
            while True:
                try:
                    if last == "$":  # where the stream stands now: later completions are all seen
                        newest = await client.xrevrange(self.key, count=1)
                        last = _text(newest[0][0]) if newest else "0-0"
                        self._started.set()
                    reply = await client.xread({self.key: last}, block=int(MAX_BLOCK_S * 1000), count=1000)
                except RedisError as exc:  # Redis restarting: the waiters' own re-checks cover the gap
                    backoff = min(max(2 * backoff, 0.1), 5.0)
                    log.warning("reading completions failed (%s); retrying in %.1fs", exc, backoff)
                    await asyncio.sleep(backoff)  # the retry backoff
                    continue
                backoff = 0.0
                for _, entries in reply or []:
                    for entry_id, fields in entries:
                        last = _text(entry_id)
                        future = self._waiting.pop(_text(fields[b"id"]), None)
                        if future is not None and not future.done():
                            future.set_result(State(_text(fields[b"state"])))
                if reply:  # read: the stream (this reader's alone) keeps only what is still to come
                    try:
                        await client.xtrim(self.key, minid=last, approximate=True)
                    except RedisError:  # trimmed after the next read
                        pass
        finally:
            await client.aclose()
