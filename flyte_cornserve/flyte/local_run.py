"""A cornserve task in a local `pyflyte run`: `CornserveTask.execute()` calls `run_locally()`.

The same dispatcher as the connector's, in-process, waiting on Redis for the outcome instead of
flytekit's 1 s polling, and enforcing the timeout and retries itself because flytekit's local mode
does not. The node's deck (every invocation submitted for it) goes to the run's decks.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import click
from flytekit import Deck, FlyteContextManager

from flyte_cornserve.decks.render import render_unit
from flyte_cornserve.services.control import ControlPlaneError
from flyte_cornserve.services.dispatcher import InvocationFailed, Submission
from flyte_cornserve.services.stack import ensure_stack
from flyte_cornserve.services.task_manager import describe
from flyte_cornserve.task import TaskInputError, UnitTask

from . import decks
from .dispatchers import shared_dispatcher
from .progress import ProgressLine

log = logging.getLogger(__name__)


class _BackgroundLoop:
    """One event loop thread per process: local task executions reuse its Redis connections."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="cornserve-connector").start()

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()


_background: _BackgroundLoop | None = None
_background_lock = threading.Lock()


class LocalRunFailed(click.ClickException, RuntimeError):
    """A cornserve task of a local run failed (its invocation, or the control plane's answer).

    A `click.ClickException`, because `pyflyte run` prints one of those as the single line
    `Error: <message>` and exits with 1, where for any other exception it prints a traceback whose
    frames are this package's, which tell a user nothing the message does not. flytekit prefixes a
    failed task's `args` with the task's name; the message printed is the one given here."""


def run_locally(unit_task: UnitTask, inputs: dict[str, Any]) -> Any:
    """Run one invocation for a local `pyflyte run`; return its outputs as the task's Python values.
    Its deck (every invocation submitted for it: retries are new ones) goes to the local run's
    decks, which `CornserveTask` writes once the task returns."""
    global _background
    with _background_lock:
        _background = _background or _BackgroundLoop()
    progress = ProgressLine()
    submitted: list[Submission] = []
    try:
        ensure_stack(progress.update)
        output = _background.run(_dispatcher_run(unit_task, inputs, progress, submitted.append))
    except KeyboardInterrupt:
        if submitted:  # stop the executor's work on it, then let the interrupt through
            _background.run(_cancel(submitted[-1].invocation_id))
        raise
    except (InvocationFailed, TaskInputError) as exc:  # its message names the task (and the invocation, the error)
        raise LocalRunFailed(str(exc)) from None
    except ControlPlaneError as exc:
        raise LocalRunFailed(f"{describe(unit_task)}: {exc}") from None
    finally:
        progress.close()
        if submitted:
            _add_deck(unit_task, submitted)
    values = [getattr(output, name) for name in type(output).model_fields]
    return values[0] if len(values) == 1 else tuple(values)


def _add_deck(unit_task: UnitTask, submitted: list[Submission]) -> None:
    """The node's deck, as a flytekit `Deck` of the running task (written if the task enables decks)."""
    params = FlyteContextManager.current_context().user_space_params
    if params is None or not params.enable_deck:
        return
    try:
        html = _background.run(_local_deck(submitted[-1].task, [s.invocation_id for s in submitted]))
    except Exception as exc:  # the deck is a view: the run's outcome stands without it
        log.warning("could not build the deck of %s: %s", describe(unit_task), exc)
        return
    Deck(decks.DECK_TITLE, html)


async def _local_deck(task: UnitTask, invocation_ids: list[str]) -> str:
    dispatcher = await shared_dispatcher()
    record = await dispatcher.store.record(invocation_ids[-1])
    links = await decks.log_links(dispatcher.redis, decks.executors_of(record))
    return render_unit(await decks.unit_view(dispatcher.store, task, invocation_ids, links))


async def _dispatcher_run(unit_task: UnitTask, inputs: dict[str, Any], progress, on_submit) -> Any:
    return await (await shared_dispatcher()).run(unit_task, inputs, progress=progress, on_submit=on_submit)


async def _cancel(invocation_id: str) -> None:
    await (await shared_dispatcher()).cancel(invocation_id)
