"""Named start-up phases: what an executor is doing while it starts, for the people waiting on it.

Code that starts a model marks each long step, with no idea of where it is reported::

    with phase("loading weights"):
        model = AutoModel.from_pretrained(path)

The process that runs it decides, once, where phases go (`set_reporter`): `cornserve executor`
reports them to Redis (`protocol.deployments.PhaseReporter`: the deployment's message and its events);
anywhere else (tests, `cornserve models build-tiny`, a notebook) a phase reports nothing.

A phase reports its beginning and, if its block returns, its end (a failing block ends the executor,
whose log says why). Phases follow one another; they do not nest. A reporter that fails is logged and
otherwise ignored: a phase is information, never a reason for a start to fail.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

# The phases the project's executors report, in the order they happen.
DOWNLOADING_MODEL = "downloading the model"  # a Hugging Face model not in the node's cache (models/hub.py)
BUILDING_MODEL = "building the model"  # or: a tiny model built here on first use (models/resolve.py)
LOADING_WEIGHTS = "loading weights"  # the encoder's model, into this process
STARTING_ENGINE = "starting the engine"  # vLLM: its engine core and worker processes (they load the weights)

BEGIN, END = "begin", "end"

#: reporter(phase, step): step is BEGIN or END
Reporter = Callable[[str, str], None]

_reporter: Reporter | None = None


def set_reporter(reporter: Reporter | None) -> None:
    """Where this process's phases go from now on (None: nowhere)."""
    global _reporter
    _reporter = reporter


def _report(name: str, step: str) -> None:
    reporter = _reporter
    if reporter is None:
        return
    try:
        reporter(name, step)
    except Exception as exc:  # noqa: BLE001 (information only: the start goes on)
        log.warning("could not report phase %r %s: %s", name, step, exc)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Report `name` as begun, run the block, report it as ended."""
    log.info("phase: %s", name)
    _report(name, BEGIN)
    yield
    _report(name, END)
