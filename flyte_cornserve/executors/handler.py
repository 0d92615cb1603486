"""`Handler`: what an executor hosts. The runtime feeds it batches of invocations."""

from __future__ import annotations

from abc import ABC, abstractmethod

from flyte_cornserve.services.invocations import Invocation, Outcome


class Handler(ABC):
    """Hosts one model for one deployment. `start()` loads it once; `handle()` serves batches.

    `max_batch_size` and `max_wait_s` shape the batches the runtime hands over; `max_in_flight`
    bounds how many invocations are being handled at once (>1 lets an engine with its own
    continuous batching, like vLLM, take new work while earlier invocations still run).
    """

    max_batch_size: int = 1
    max_wait_s: float = 0.0
    max_in_flight: int = 1

    async def start(self) -> None:
        """Load the model. Called once, before the first batch."""

    @abstractmethod
    async def handle(self, batch: list[Invocation]) -> list[Outcome]:
        """One outcome per invocation, in order. Bad input is that invocation's `Outcome.failed`."""

    async def stop(self) -> None:
        """Release the model. Called once, after the last batch."""
