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


class BatchProgress:
    """A progress bar for items of a batch: done and failed counts, items/s and the time left.

    On a terminal it redraws in place; elsewhere (a log, CI) it prints a line at each tenth."""

    def __init__(self, label: str, total: int, file=sys.stderr) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.total = total
        self.console = Console(file=file)
        self._started = time.monotonic()
        self._reported = -1
        self._progress: Progress | None = None
        if self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]cornserve[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[failed]} failed"), TextColumn("{task.fields[rate]} items/s"),
                TimeRemainingColumn(), console=self.console, transient=False,
            )
            self._task = self._progress.add_task(label, total=total, failed=0, rate="-")
            self._progress.start()
        self.label = label

    def update(self, done: int, failed: int) -> None:
        ended = done + failed
        elapsed = time.monotonic() - self._started
        rate = ended / elapsed if elapsed > 0 else 0.0
        if self._progress is not None:
            self._progress.update(self._task, completed=ended, failed=failed, rate=f"{rate:.1f}")
            return
        tenth = ended * 10 // max(1, self.total)
        if tenth != self._reported:
            self._reported = tenth
            left = (self.total - ended) / rate if rate > 0 else float("nan")
            print(f"cornserve: {self.label}: {ended}/{self.total} items ended, {failed} failed, "
                  f"{rate:.1f} items/s, {left:.0f} s left", file=self.console.file, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
