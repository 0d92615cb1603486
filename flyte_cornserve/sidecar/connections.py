"""Persistent TCP connections to one sidecar, reused from request to request.

A fresh connection per request would cost a handshake, a new handler thread in the sidecar and
TCP slow start on every transfer; a pooled connection is already warm.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Iterator


def connect(address: str, timeout: float) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class ConnectionPool:
    """Idle connections to `address`; one is taken per request and given back if it went well."""

    def __init__(self, address: str, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def connection(self) -> Iterator[socket.socket]:
        """A connection for one request; it is closed, not reused, if the request raised."""
        sock = self._take_idle() or connect(self.address, self.timeout)
        try:
            yield sock
        except BaseException:
            sock.close()
            raise
        with self._lock:
            self._idle.append(sock)

    def _take_idle(self) -> socket.socket | None:
        while True:
            with self._lock:
                if not self._idle:
                    return None
                sock = self._idle.pop()
            if _still_open(sock):
                return sock
            sock.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()


def _still_open(sock: socket.socket) -> bool:
    """False if the peer closed an idle connection (e.g. it restarted) since its last use.

    An idle connection has nothing to read; if it is readable, it reached EOF, failed, or holds
    stray bytes, and is not reusable in any of those cases. (A zero-timeout select, because a
    socket with a timeout waits in `recv` even with MSG_DONTWAIT.)
    """
    readable, _, _ = select.select([sock], [], [], 0)
    return not readable
