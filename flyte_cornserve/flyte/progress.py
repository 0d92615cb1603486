"""What a local run shows on stderr of its long first-time steps (starting the stack, a deployment's
start-up phases: building a tiny model, loading weights, starting a vLLM engine); nothing is shown
when the stack is warm."""

from __future__ import annotations

import re
import sys
import threading
import time

from rich.console import Console
from rich.markup import escape
from rich.status import Status

#: the running time at the end of a live message, " (3 s)"
_ELAPSED = re.compile(r" \(\d+ s\)$")


class ProgressLine:
    """`update(message)` (or calling it) shows what is under way now; `note(message)` prints a line
    that stays, such as a start-up phase that ended and how long it took.

    On a terminal the current step is a live status line, redrawn in place under the notes (a note
    clears it: the step it showed has ended, the next update draws the next one). Anywhere
    else (a log file, CI, a captured stderr) each new step is one plain line, printed once and
    without its running time, and each note a line after it, so the sequence reads in order.
    """

    def __init__(self) -> None:
        self._console: Console | None = None
        self._status: Status | None = None
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._last = ""

    def __call__(self, message: str) -> None:
        self.update(message)

    def _terminal(self) -> Console | None:
        """The console when stderr is a terminal, else None (plain lines)."""
        if self._console is None:
            self._console = Console(file=sys.stderr)
        return self._console if self._console.is_terminal else None

    def update(self, message: str) -> None:
        with self._lock:
            console = self._terminal()
            if console is None:  # a log file or CI: one plain line per new step
                step = _ELAPSED.sub("", message)
                if step != self._last:
                    print(f"cornserve: {step}", file=sys.stderr, flush=True)
                    self._last = step
                return
            if self._status is None:
                self._status = console.status(f"cornserve: {escape(message)}")
                self._status.start()
            else:
                self._status.update(f"cornserve: {escape(message)}")

    def note(self, message: str) -> None:
        with self._lock:
            console = self._terminal()
            if console is None:
                print(f"cornserve: {message}", file=sys.stderr, flush=True)
            else:  # what the live line showed has ended: the note replaces it, the next step brings a new one
                if self._status is not None:
                    self._status.stop()
                    self._status = None
                console.print(f"cornserve: {message}", markup=False, highlight=False)

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
            left = f"{(self.total - ended) / rate:.0f} s" if rate > 0 else "unknown time"
            print(f"cornserve: {self.label}: {ended}/{self.total} items ended, {failed} failed, "
                  f"{rate:.1f} items/s, {left} left", file=self.console.file, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
