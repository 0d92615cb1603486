"""A sidecar's tensor memory: one POSIX shared-memory file, mapped once by every process that uses it.

Creating a fresh shared-memory segment per tensor costs page allocation and page faults at a
fraction of memory bandwidth, so each sidecar instead owns one arena file of `capacity` bytes in
`/dev/shm`. Producers write into it and same-node consumers read from it through their own long-lived
mapping; after the first use of a region, a put is a plain memory copy and a get maps nothing.
The file is sparse: pages are backed (with `posix_fallocate`, so a full `/dev/shm` is a clean error
instead of a SIGBUS) only up to the highest offset ever used.

Arena files are named `cornserve_<sidecar id>_<incarnation>`, so a restarting sidecar finds and
removes the ones its previous incarnation left behind.
"""

from __future__ import annotations

import math
import mmap
import os
import pathlib
import secrets
import threading

import numpy as np

PREFIX = "cornserve_"


def arena_prefix(sidecar_id: str) -> str:
    return f"{PREFIX}{sidecar_id}_"


def new_arena_name(sidecar_id: str) -> str:
    """A fresh name per incarnation, so clients never mistake a restarted sidecar's arena for the old one."""
    return f"{arena_prefix(sidecar_id)}{secrets.token_hex(4)}"


def remove_stale_arenas(shm_dir: pathlib.Path, sidecar_id: str) -> list[str]:
    """Delete the arena files of earlier incarnations of `sidecar_id`; returns their names."""
    stale = sorted(p.name for p in shm_dir.glob(f"{arena_prefix(sidecar_id)}*"))
    for name in stale:
        (shm_dir / name).unlink(missing_ok=True)
    return stale


class Arena:
    """A mapping of one arena file; the sidecar creates it, its clients attach to it by name."""

    def __init__(self, path: pathlib.Path, fd: int, owner: bool) -> None:
        self.path = path
        self.capacity = os.fstat(fd).st_size
        self._map = mmap.mmap(fd, self.capacity, flags=mmap.MAP_SHARED)
        self._fd = fd if owner else None  # only the owning sidecar backs pages
        if not owner:
            os.close(fd)
        self._backed = 0  # bytes from offset 0 known to be allocated in the shm filesystem
        self._backing = threading.Lock()

    @classmethod
    def create(cls, shm_dir: pathlib.Path, name: str, capacity: int) -> Arena:
        """The sidecar's own arena: a new sparse file of `capacity` bytes."""
        path = shm_dir / name
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.ftruncate(fd, capacity)
        return cls(path, fd, owner=True)

    @classmethod
    def attach(cls, shm_dir: pathlib.Path, name: str) -> Arena:
        """A client's mapping of its sidecar's arena."""
        return cls(shm_dir / name, os.open(shm_dir / name, os.O_RDWR), owner=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def buffer(self) -> mmap.mmap:
        return self._map

    def view(self, offset: int, nbytes: int) -> memoryview:
        return memoryview(self._map)[offset : offset + nbytes]

    def array(self, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.frombuffer(self._map, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)

    def back(self, end: int) -> None:
        """Make sure `[0, end)` is backed by shared memory; OSError(ENOSPC) if /dev/shm is full."""
        assert self._fd is not None, "only the sidecar that created an arena backs it"
        with self._backing:
            if end > self._backed:
                os.posix_fallocate(self._fd, self._backed, end - self._backed)
                self._backed = end

    def unlink(self) -> None:
        self.path.unlink(missing_ok=True)
