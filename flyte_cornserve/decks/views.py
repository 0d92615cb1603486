"""What a node's deck shows, as plain data: built from Redis records by `flyte.decks`, rendered to
HTML by `decks.render`. Nothing here knows Redis or Flyte, so a view can be built in a test by hand.

Times are epoch seconds; durations are seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Link:
    """A link the deck shows (and the console's log links): an executor's log, a dashboard."""

    name: str
    uri: str


@dataclass(frozen=True)
class TimelineEvent:
    """One state change of an invocation (CREATED, QUEUED, RUNNING, DONE, ERROR, CANCELLED)."""

    state: str
    at: float
    executor: str = ""
    note: str = ""  # why, when it says (e.g. "attempt 2: the executor that ran it before died")


@dataclass(frozen=True)
class TensorTransfer:
    """One tensor an invocation read ("get") or wrote ("put") through the sidecar."""

    op: str
    tensor_id: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    path: str  # "shared memory" or "cross-node from <sidecar>"
    seconds: float
    at: float


@dataclass(frozen=True)
class Attempt:
    """One run of the invocation on an executor (an executor that dies costs one)."""

    number: int
    executor: str
    started_at: float
    ended_at: float | None  # None while it runs, or when the executor died and another took over
    outcome: str  # "DONE", "ERROR: <message>", "taken over: <why>", "running"


@dataclass(frozen=True)
class InvocationView:
    """One invocation of the unit task (a local run retries a recoverable failure as a new one)."""

    invocation_id: str
    state: str
    deployment_id: str
    executor: str
    node: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str = ""
    error_kind: str = ""
    timeline: list[TimelineEvent] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    transfers: list[TensorTransfer] = field(default_factory=list)

    @property
    def queue_wait_s(self) -> float | None:
        """From submission to the first pick-up by an executor."""
        return None if self.started_at is None else max(0.0, self.first_start - self.created_at)

    @property
    def first_start(self) -> float:
        running = [event.at for event in self.timeline if event.state == "RUNNING"]
        return min(running) if running else (self.started_at or self.created_at)

    @property
    def run_s(self) -> float | None:
        """From the last pick-up to the outcome."""
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, self.finished_at - self.started_at)

    @property
    def total_s(self) -> float | None:
        return None if self.finished_at is None else max(0.0, self.finished_at - self.created_at)


@dataclass(frozen=True)
class UnitNodeView:
    """The deck of a unit-task node: the unit task, how it was routed, and its invocation(s)."""

    title: str  # "LLMTask tiny-llava"
    task_class: str
    model: str
    deployment_id: str
    routing: str  # how the dispatcher chose the deployment
    invocations: list[InvocationView]  # in submission order: the last is the one that counts
    generated_at: float
    links: list[Link] = field(default_factory=list)


@dataclass(frozen=True)
class ProgressSample:
    """Items ended by a time (cumulative)."""

    at: float
    done: int
    failed: int


@dataclass(frozen=True)
class Percentiles:
    p50: float
    p90: float
    p99: float


@dataclass(frozen=True)
class StageStats:
    """One stage (a unit task of the items' plans) over the items it ran: per item, its queue wait
    (submitted to picked up), run time (picked up to outcome) and latency (submitted to outcome)."""

    name: str  # "EncoderTask tiny-llava"
    items: int
    failed: int
    queue_s: Percentiles
    run_s: Percentiles
    latency_s: Percentiles


@dataclass(frozen=True)
class StageSpan:
    """One batch invocation of a stage: when its executor ran it, for how many items."""

    stage: str
    executor: str
    started_at: float
    finished_at: float
    items: int


@dataclass(frozen=True)
class ItemError:
    item_id: str
    error: str


@dataclass(frozen=True)
class ExecutorShare:
    """Items one executor ran for one stage of the chunk."""

    executor: str
    stage: str
    items: int


@dataclass(frozen=True)
class ChunkView:
    """The deck of a batch chunk node, live while it runs."""

    title: str  # "MLLMTask tiny-llava, chunk of 100 items"
    batch_id: str
    state: str  # QUEUED, RUNNING, CANCELLING, DONE, FAILED, CANCELLED
    total: int
    done: int
    failed: int
    cancelled: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    generated_at: float
    message: str = ""
    progress: list[ProgressSample] = field(default_factory=list)
    stages: list[StageStats] = field(default_factory=list)
    spans: list[StageSpan] = field(default_factory=list)
    errors: list[ItemError] = field(default_factory=list)  # the first ones, in the order they ended
    executors: list[ExecutorShare] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)

    @property
    def ended(self) -> int:
        return self.done + self.failed + self.cancelled

    @property
    def items_per_s(self) -> float | None:
        """Items ended per second since the chunk started (until it finished, or now)."""
        if self.started_at is None:
            return None
        elapsed = (self.finished_at or self.generated_at) - self.started_at
        return self.ended / elapsed if elapsed > 0 else None

    @property
    def eta_s(self) -> float | None:
        rate = self.items_per_s
        if self.finished_at is not None or not rate:
            return None
        return (self.total - self.ended) / rate

    @property
    def overlap_s(self) -> float:
        """Seconds during which two different stages both had an invocation running: the
        pipelining at work (0 means the stages ran one after the other)."""
        by_stage: dict[str, list[tuple[float, float]]] = {}
        for span in self.spans:
            by_stage.setdefault(span.stage, []).append((span.started_at, span.finished_at))
        busy = {stage: _union(intervals) for stage, intervals in by_stage.items()}
        stages = list(busy)
        overlap: list[tuple[float, float]] = []
        for a in range(len(stages)):
            for b in range(a + 1, len(stages)):
                overlap += _intersect(busy[stages[a]], busy[stages[b]])
        return sum(end - start for start, end in _union(overlap))


def percentiles(values: list[float]) -> Percentiles:
    """p50/p90/p99 by the nearest-rank method (0s for no values)."""
    if not values:
        return Percentiles(0.0, 0.0, 0.0)
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(len(ordered) * p / 100) - 1))]

    return Percentiles(rank(50), rank(90), rank(99))


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _intersect(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(max(s1, s2), min(e1, e2)) for s1, e1 in a for s2, e2 in b if max(s1, s2) < min(e1, e2)]
