"""The Redis side of the sidecars: who is alive, which sidecar holds which tensor, and who waits.

Keys, under a namespace (default `cornserve`):

| key | type | what |
|---|---|---|
| `ns:sidecar:<sid>` | hash, TTL = heartbeat TTL | membership: address, host, pid, shm folder, arena, capacity; its stats (JSON) as of its last heartbeat |
| `ns:held:<sid>` | set | tensor keys the sidecar holds, to clean up after a crash |
| `ns:released:<sid>` | list | tensor keys that became CACHED (pins reached 0); the sidecar BLPOPs it |
| `ns:discard:<sid>` | list | tensor keys whose put failed; the sidecar BLPOPs it and frees them |
| `ns:entry:<key>` | hash, TTL = max_pinned + ttl + grace | the tensor: ref, holder, arena, offset, pins, ttl, max_pinned |
| `ns:ready:<key>` | stream | the entry again, once published; consumers that came early block on it (XREAD) |
| `ns:claim:<key>` | string, TTL = the claim's | who is computing the tensor for `key` now (its claimer), for single flight |

A tensor is PINNED while `pins` > 0 (releases still expected) and CACHED at 0; both are readable.
Its holder evicts a CACHED tensor (for room, or at its TTL) and frees a PINNED one only past
`max_pinned` (an orphan). The Redis TTL of its keys outlives both bounds, so it only cleans up after
a holder that died. A tensor is published only once its bytes are written. A producer that derives
ids from content claims an id before computing its tensor, so that a concurrent producer of the same
id waits for its publication instead of computing it too. Every change that must be atomic
(publish, release, pin, evict, forget, claim) is one Lua script. Waiting is always a blocking
Redis call (XREAD BLOCK, BLPOP), never a sleep.
"""

from __future__ import annotations

import json
import os
import re
import socket

import redis
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field

from .. import namespace as namespaces
from .. import redis_server
from ..task.tensor_ref import TensorRef
from .errors import SidecarError

ENV_SIDECAR_ID = "CORNSERVE_SIDECAR_ID"
#: a host's or a Kubernetes node's name (the DaemonSet's sidecars take it: dots, up to 230 characters,
#: so that an arena file's name stays under 255); no "_": it separates the id in arena file names
SIDECAR_ID_PATTERN = r"^[A-Za-z0-9.-]{1,230}$"
REDIS_GRACE_S = 60.0  # Redis expires a tensor's keys this long after its sidecar's own bound, if that sidecar died
REDIS_TIMEOUT_S = 10.0  # a stuck Redis is an error, not a hang; so blocking calls wait in shorter slices


def default_sidecar_id() -> str:
    """`$CORNSERVE_SIDECAR_ID`, else the host name: one sidecar per node."""
    return os.environ.get(ENV_SIDECAR_ID) or re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:230]


def check_sidecar_id(sidecar_id: str) -> str:
    if not re.match(SIDECAR_ID_PATTERN, sidecar_id):
        raise ValueError(f"sidecar id {sidecar_id!r} must match {SIDECAR_ID_PATTERN}")
    return sidecar_id


class Member(BaseModel):
    """A sidecar as the others find it; `arena` also names this incarnation of it."""

    model_config = ConfigDict(frozen=True)

    id: str
    address: str
    host: str
    pid: int
    shm_dir: str
    arena: str
    capacity: int


class TensorEntry(BaseModel):
    """A tensor in the directory. A cross-node copy has its own key but the original's `ref`."""

    model_config = ConfigDict(frozen=True)

    ref: TensorRef
    holder: str = Field(description="sidecar whose arena holds the bytes")
    arena: str
    offset: int = Field(ge=0)
    pins: int = Field(ge=0, description="releases still expected; at 0 the tensor is CACHED")
    ttl: float = Field(ge=0, description="seconds it stays CACHED before its holder evicts it")
    max_pinned: float = Field(gt=0, description="seconds after which its holder frees it even if PINNED")

    @property
    def redis_ttl(self) -> float:
        """How long Redis keeps its keys: longer than its holder keeps it (the keys outlive a dead holder only)."""
        return self.max_pinned + self.ttl + REDIS_GRACE_S

    def to_fields(self) -> dict[str, str]:
        fields = self.model_dump(mode="json", exclude={"ref"})
        return {"ref": self.ref.model_dump_json(), **{k: str(v) for k, v in fields.items()}}

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> TensorEntry:
        return cls.model_validate({**fields, "ref": json.loads(fields["ref"])})


def _flatten(fields: dict[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


_HEARTBEAT = """
local arena = redis.call('HGET', KEYS[1], 'arena')
if arena and arena ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_PUBLISH = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('XADD', KEYS[3], '*', unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[3], ARGV[2])
if ARGV[3] == '0' then redis.call('RPUSH', KEYS[4], ARGV[1]) end
return 1
"""

_RELEASE = """
if redis.call('HGET', KEYS[1], 'holder') ~= ARGV[2] then return -1 end
if tonumber(redis.call('HGET', KEYS[1], 'pins')) <= 0 then return 0 end
local left = redis.call('HINCRBY', KEYS[1], 'pins', -1)
if left == 0 then redis.call('RPUSH', KEYS[2], ARGV[1]) end
return left
"""

_PIN = """
local holder = redis.call('HGET', KEYS[1], 'holder')
if not holder or redis.call('EXISTS', ARGV[1] .. holder) == 0 then return false end
redis.call('HINCRBY', KEYS[1], 'pins', ARGV[2])
local fields = redis.call('HMGET', KEYS[1], 'max_pinned', 'ttl', 'ref')
local ms = math.floor((tonumber(fields[1]) + tonumber(fields[2]) + tonumber(ARGV[3])) * 1000)
redis.call('PEXPIRE', KEYS[1], ms)
redis.call('PEXPIRE', KEYS[2], ms)
return fields[3]
"""

_CLAIM = """
local claimer = redis.call('GET', KEYS[1])
if claimer and claimer ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_UNCLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

_EVICT = """
if redis.call('HGET', KEYS[1], 'holder') == ARGV[2] and redis.call('HGET', KEYS[1], 'arena') == ARGV[3] then
  if tonumber(redis.call('HGET', KEYS[1], 'pins')) > 0 then return 0 end
  redis.call('DEL', KEYS[1], KEYS[2])
end
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""

_FORGET = """
if redis.call('HGET', KEYS[1], 'holder') == ARGV[2] and redis.call('HGET', KEYS[1], 'arena') == ARGV[3] then
  redis.call('DEL', KEYS[1], KEYS[2])
end
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""


class Directory:
    """Typed access to the sidecar keys of one namespace."""

    def __init__(self, client: redis.Redis, namespace: str | None = None) -> None:
        if not client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("Directory needs a Redis client created with decode_responses=True")
        self.redis = client
        self.namespace = namespaces.check(namespace) if namespace else namespaces.current()
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._publish = client.register_script(_PUBLISH)
        self._release = client.register_script(_RELEASE)
        self._pin = client.register_script(_PIN)
        self._claim = client.register_script(_CLAIM)
        self._unclaim = client.register_script(_UNCLAIM)
        self._evict = client.register_script(_EVICT)
        self._forget = client.register_script(_FORGET)

    @classmethod
    def connect(cls, url: str | None = None, namespace: str | None = None) -> Directory:
        """A directory on `url` (default: the project's Redis) and `namespace` (default `$CORNSERVE_NAMESPACE`)."""
        client = redis_server.connect(url, decode_responses=True, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)
        return cls(client, namespace)

    def _key(self, kind: str, name: str) -> str:
        return f"{self.namespace}:{kind}:{name}"

    # --- membership ------------------------------------------------------------------------------

    def member(self, sidecar_id: str) -> Member | None:
        fields = self.redis.hgetall(self._key("sidecar", sidecar_id))
        return Member.model_validate(fields) if fields else None

    def is_alive(self, sidecar_id: str) -> bool:
        return bool(self.redis.exists(self._key("sidecar", sidecar_id)))

    def member_key(self, sidecar_id: str) -> str:
        """The membership key: it exists while the sidecar heartbeats."""
        return self._key("sidecar", sidecar_id)

    @property
    def metrics_key(self) -> str:
        """The hash where this namespace's sidecars advertise their metrics (`cornserve:metrics` by default)."""
        return f"{self.namespace}:metrics"

    def ensure_id_free(self, member: Member) -> None:
        """Refuse to start a second live sidecar with `member`'s id; forget a crashed one's membership."""
        existing = self.member(member.id)
        if existing is None or existing.arena == member.arena:
            return
        if existing.host != member.host or _process_exists(existing.pid):
            raise SidecarError(
                f"sidecar id {member.id!r} is already in use by pid {existing.pid} on {existing.host} "
                f"at {existing.address}; give each sidecar its own --id"
            )
        self.redis.delete(self._key("sidecar", member.id))

    def heartbeat(self, member: Member, ttl: float, stats: str = "") -> bool:
        """Join or renew the membership, with the sidecar's `stats` (JSON: its memory by tensor state,
        its evictions) as of now; False if another incarnation has taken the id over."""
        fields = {k: str(v) for k, v in member.model_dump().items()} | ({"stats": stats} if stats else {})
        key = self._key("sidecar", member.id)
        return bool(self._heartbeat(keys=[key], args=[member.arena, int(ttl * 1000), *_flatten(fields)]))

    def deregister(self, member: Member) -> None:
        key = self._key("sidecar", member.id)
        if self.redis.hget(key, "arena") == member.arena:
            self.redis.delete(key)

    # --- tensors ---------------------------------------------------------------------------------

    def publish(self, key: str, entry: TensorEntry) -> bool:
        """Enter a written tensor under `key` and wake its waiting consumers; False if the key is taken.

        A tensor published with no pins is CACHED at once: its holder is told so (`next_change`)."""
        return self.publish_many([(key, entry)])[0]

    def publish_many(self, entries: list[tuple[str, TensorEntry]]) -> list[bool]:
        """`publish` for many tensors in one round trip; for each, False if its key is taken."""
        pipe = self.redis.pipeline(transaction=False)
        for key, entry in entries:
            keys = [self._key("entry", key), self._key("held", entry.holder), self._key("ready", key),
                    self._key("released", entry.holder)]
            args = [key, int(entry.redis_ttl * 1000), entry.pins, *_flatten(entry.to_fields())]
            self._publish(keys=keys, args=args, client=pipe)
        return [bool(done) for done in pipe.execute()]

    def entry(self, key: str) -> TensorEntry | None:
        fields = self.redis.hgetall(self._key("entry", key))
        return TensorEntry.from_fields(fields) if fields else None

    def lookup(self, key: str, likely_holder: str) -> tuple[TensorEntry | None, bool]:
        """The tensor's entry (None if absent) and whether its holder is alive.

        One round trip when the holder is `likely_holder` (the ref's location, or this node).
        """
        return self.lookup_many([(key, likely_holder)])[0]

    def lookup_many(self, keys: list[tuple[str, str]]) -> list[tuple[TensorEntry | None, bool]]:
        """`lookup` for many (key, likely holder) pairs, in one round trip when each holder is the likely one."""
        pipe = self.redis.pipeline(transaction=False)
        for key, likely_holder in keys:
            pipe.hgetall(self._key("entry", key))
            pipe.exists(self._key("sidecar", likely_holder))
        replies = pipe.execute()
        found: list[tuple[TensorEntry | None, bool]] = []
        for (_, likely_holder), fields, likely_alive in zip(keys, replies[::2], replies[1::2]):
            if not fields:
                found.append((None, False))
                continue
            entry = TensorEntry.from_fields(fields)
            found.append((entry, bool(likely_alive) if entry.holder == likely_holder else self.is_alive(entry.holder)))
        return found

    def wait_published(self, key: str, timeout: float) -> TensorEntry | None:
        """The tensor's entry as published, waiting up to `timeout` for it; None if it did not come.

        The entry comes with the wake-up itself, saving a round trip. It is exact for a consumer
        that holds a pin on the tensor: until it releases it, the tensor cannot be evicted.
        """
        streams = self.redis.xread({self._key("ready", key): "0-0"}, count=1, block=max(1, int(timeout * 1000)))
        if not streams:
            return None
        [(_, [(_, fields)])] = streams
        return TensorEntry.from_fields(fields)

    def holder_of(self, key: str) -> str | None:
        return self.redis.hget(self._key("entry", key), "holder")

    def release(self, key: str, holder: str) -> int:
        """Take one pin off the tensor (never below 0); the last one makes it CACHED and tells its holder.

        Returns the pins left, or -1 if the tensor is gone.
        """
        return self.release_many([(key, holder)])[0]

    def release_many(self, keys: list[tuple[str, str]]) -> list[int]:
        """`release` for many (key, holder) pairs, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for key, holder in keys:
            self._release(keys=[self._key("entry", key), self._key("released", holder)], args=[key, holder], client=pipe)
        return [int(left) for left in pipe.execute()]

    def pin_many(self, keys: list[str], pins: list[int]) -> list[TensorRef | None]:
        """Add `pins[i]` to the tensor of `keys[i]` if it is in the directory (PINNED or CACHED) on a
        live holder, and refresh its keys' Redis TTL; its ref, or None where it is not. One round trip,
        one script per key: a pin and an eviction never interleave, so a pinned tensor is not evicted."""
        pipe = self.redis.pipeline(transaction=False)
        for key, count in zip(keys, pins, strict=True):
            self._pin(keys=[self._key("entry", key), self._key("ready", key)],
                      args=[self._key("sidecar", ""), count, REDIS_GRACE_S], client=pipe)
        return [TensorRef.model_validate_json(ref) if ref else None for ref in pipe.execute()]

    def claim_many(self, keys: list[str], claimer: str, ttl: float) -> list[bool]:
        """Claim each key for `claimer` for `ttl` seconds: SET NX with that TTL, except that a claim
        already `claimer`'s is renewed (a retried call whose reply was lost stays its). True where the
        claim is `claimer`'s, False where another holds it. One round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            self._claim(keys=[self._key("claim", key)], args=[claimer, max(1, int(ttl * 1000))], client=pipe)
        return [bool(won) for won in pipe.execute()]

    def unclaim_many(self, keys: list[str], claimer: str) -> None:
        """Delete the claims of `claimer` on these keys; another's (it took an expired one over) stays.
        One round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            self._unclaim(keys=[self._key("claim", key)], args=[claimer], client=pipe)
        pipe.execute()

    def evict(self, key: str, holder: str, arena: str) -> bool:
        """Remove a CACHED tensor that `holder` evicts from `arena`; False (nothing changed) if it is
        pinned again. Like `forget`, an entry that is not this holder's stays, and the key always leaves
        the `held` set; a Redis error leaves the caller's tensor to retry."""
        keys = [self._key("entry", key), self._key("ready", key), self._key("held", holder)]
        return bool(self._evict(keys=keys, args=[key, holder, arena]))

    def discard(self, key: str, holder: str) -> None:
        """Ask the holder to free its own allocation for `key` now, whatever its pins (a put that
        failed). An entry that another sidecar (or incarnation) holds under `key` stays: see `forget`."""
        self.redis.rpush(self._key("discard", holder), key)

    def next_change(self, sidecar_id: str, timeout: float) -> tuple[str, str] | None:
        """The next (what, key) for this sidecar, waiting up to `timeout`: what is "cached" (its last
        pin was released, or it was put with none) or "discard" (free it now)."""
        item = self.redis.blpop([self._key("released", sidecar_id), self._key("discard", sidecar_id)], timeout=timeout)
        if item is None:
            return None
        queue, key = item
        return ("cached" if queue == self._key("released", sidecar_id) else "discard"), key

    def forget(self, key: str, holder: str, arena: str) -> None:
        """Remove a tensor that `holder` frees from its arena `arena` whatever its pins: its entry only
        if that entry is this holder's (a put of the same id elsewhere never erases the original), and
        always its key from the holder's `held` set. Idempotent; a Redis error leaves the caller's
        tensor to retry."""
        keys = [self._key("entry", key), self._key("ready", key), self._key("held", holder)]
        self._forget(keys=keys, args=[key, holder, arena])

    def forget_all(self, sidecar_id: str) -> int:
        """Remove every tensor a sidecar holds, and its queues; returns how many tensors."""
        held = self.redis.smembers(self._key("held", sidecar_id))
        pipe = self.redis.pipeline()
        for key in held:
            pipe.delete(self._key("entry", key), self._key("ready", key))
        pipe.delete(self._key("held", sidecar_id), self._key("released", sidecar_id), self._key("discard", sidecar_id))
        pipe.execute()
        return len(held)

    def keys(self) -> set[str]:
        """Every key of this namespace (for diagnostics and tests)."""
        return set(self.redis.scan_iter(match=f"{self.namespace}:*", count=1000))


class Lookups:
    """The directory as a submitting side sees it (asyncio): which tensors are there, pinning them
    for consumers to come. For the dispatcher and the batch runner, which hold no tensor."""

    def __init__(self, client: aioredis.Redis, namespace: str | None = None) -> None:
        self.redis = client
        self.namespace = namespaces.check(namespace) if namespace else namespaces.current()
        self._pin = client.register_script(_PIN)

    def _key(self, kind: str, name: str) -> str:
        return f"{self.namespace}:{kind}:{name}"

    async def sidecar_stats(self) -> dict[str, dict]:
        """Each live sidecar's stats as of its last heartbeat (`cornserve status`)."""
        stats = {}
        async for member_key in self.redis.scan_iter(match=self._key("sidecar", "*"), count=1000):
            raw = await self.redis.hget(member_key, "stats")
            if raw:
                name = member_key.decode() if isinstance(member_key, bytes) else member_key
                stats[name.rpartition(":")[2]] = json.loads(raw)
        return stats

    async def pin_many(self, keys: list[str], pins: list[int]) -> list[TensorRef | None]:
        """`Directory.pin_many`: with 0 pins, whether each tensor is there (on a live holder)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, count in zip(keys, pins, strict=True):
                await self._pin(keys=[self._key("entry", key), self._key("ready", key)],
                                args=[self._key("sidecar", ""), count, REDIS_GRACE_S], client=pipe)
            found = await pipe.execute()
        return [TensorRef.model_validate_json(ref) if ref else None for ref in found]


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
