"""One live status line on stderr for long first-time steps of a local run (starting the stack,
building a tiny model, starting a vLLM engine); nothing is shown when the stack is warm."""

from __future__ import annotations

import sys
import threading
import time

from rich.console import Console
from rich.status import Status


class ProgressLine:
    def __init__(self) -> None:
        self._status: Status | None = None
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._last = ""

    def update(self, message: str) -> None:
        with self._lock:
            if self._status is None:
                console = Console(file=sys.stderr)
                if not console.is_terminal:  # a log file or CI: one plain line per new step
                    if message.split(" (")[0] != self._last.split(" (")[0]:
                        print(f"cornserve: {message}", file=sys.stderr, flush=True)
                    self._last = message
                    return
                self._status = console.status(message)
                self._status.start()
            self._status.update(f"cornserve: {message}")

    def close(self) -> None:
        with self._lock:
            if self._status is not None:
                self._status.stop()
                self._status = None
