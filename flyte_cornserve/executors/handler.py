"""`Handler`: what an executor hosts. The runtime feeds it batches of invocations."""

from __future__ import annotations

from abc import ABC, abstractmethod

from flyte_cornserve.metrics import ExecutorMetrics
from flyte_cornserve.protocol.invocations import Invocation, Outcome


class Handler(ABC):
    """Hosts one model for one deployment. `start()` loads it once; `handle()` serves batches.

    `max_batch_size` and `max_wait_s` shape the batches the runtime hands over; `max_in_flight`
    bounds how many invocations are being handled at once (>1 lets an engine with its own
    continuous batching, like vLLM, take new work while earlier invocations still run). Both count
    items: each item of a batch invocation reaches `handle()` as an invocation of its own, with
    the priority of the queue it came from.
    """

    max_batch_size: int = 1
    max_wait_s: float = 0.0
    max_in_flight: int = 1
    #: for a handler whose outputs are content-addressed, their output identity
    #: (`protocol.content`), once started: its executor's heartbeat publishes it, so that the
    #: submitting side can compute the ids of outputs and look them up before queueing work
    output_identity: str = ""

    def instrument(self, metrics: ExecutorMetrics) -> None:
        """Add this handler's own metrics to its executor's (`metrics.registry`, with `metrics.labels`).
        The runtime calls it once, before `start()`."""

    async def start(self) -> None:
        """Load the model. Called once, before the first batch."""

    @abstractmethod
    async def handle(self, batch: list[Invocation]) -> list[Outcome]:
        """One outcome per invocation, in order. Bad input is that invocation's `Outcome.failed`."""

    async def abort(self, invocation_ids: list[str]) -> None:
        """Stop work on these invocations of a running `handle()` call, if you can: someone else
        ended them meanwhile (cancelled, or timed out), so their outcomes will be dropped.

        The runtime calls it at most once per invocation, from another task of the same event loop,
        only while `handle()` runs for them and has reached its first `await` (so a `handle()` that
        notes its batch before awaiting anything sees every abort). It must return promptly (not
        wait for the work to stop). `handle()` must still return one outcome per invocation (any,
        e.g. `Outcome.failed`), the sooner the better: that frees their places in `max_in_flight`.
        The default does nothing: the batch runs to its end, which suits handlers whose batches are
        short. (Invocations ended before `handle()` got them are not handed to it at all.)
        """

    async def stop(self) -> None:
        """Release the model. Called once, after the last batch."""
