"""The decks of cornserve nodes: views built from what Redis holds, and files written the way
FlytePropeller reads them.

Propeller shows a node's deck when the task template says `generates_deck`: at
`<output_prefix>/deck.html`, on the node's events in every phase (so a file the connector rewrites
on each `get()` is a live view), and, at the end, only if the node succeeded and its outputs were
read from `<output_prefix>/outputs.pb` (not inline in `get()`'s answer). So the connectors write
both files under the output prefix `create()` received and answer `outputs=None`.

Log links: `CORNSERVE_LOG_LINKS` (JSON, name -> URI template with `{executor_id}`, `{node}`,
`{deployment_id}`, `{pod}`) for executors' logs in Kubernetes or a log system, and
`CORNSERVE_DASHBOARD_URL` (a template too) for a metrics dashboard. Without them, the control
plane's own template (a local executor's log file) is used.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from flytekit import FlyteContextManager
from flytekit.models.literals import LiteralMap

from flyte_cornserve.decks.views import (
    Attempt,
    ChunkView,
    ExecutorShare,
    InvocationView,
    ItemError,
    Link,
    ProgressSample,
    StageSpan,
    StageStats,
    TensorTransfer,
    TimelineEvent,
    UnitNodeView,
    percentiles,
)
from flyte_cornserve.protocol.invocations import TERMINAL, InvocationStore, Record, State
from flyte_cornserve.services.batches import Batch, BatchStore
from flyte_cornserve.services.control import control_plane_info
from flyte_cornserve.services.task_manager import describe
from flyte_cornserve.task import UnitTask

DECK_TITLE = "Cornserve"  # the name of a local run's deck among the task's flytekit decks
DECK_NAME = "deck.html"
OUTPUTS_NAME = "outputs.pb"
LOG_LINKS_ENV = "CORNSERVE_LOG_LINKS"
DASHBOARD_ENV = "CORNSERVE_DASHBOARD_URL"


# -- unit nodes ---------------------------------------------------------------------------------------

def invocation_view(record: Record) -> InvocationView:
    """One invocation's timeline, attempts and tensor traffic, from its record."""
    # an event's time is its stream entry's, in whole milliseconds: never before the submission
    timeline = [TimelineEvent(e.state.value, max(e.at, record.created_at), e.executor, e.note) for e in record.events]
    attempts: list[Attempt] = []
    for k, event in enumerate(record.events):
        if event.state is not State.RUNNING:
            continue
        later = record.events[k + 1:]
        takeover = next((e for e in later if e.state is State.RUNNING), None)
        end = next((e for e in later if e.state in TERMINAL), None)
        if takeover is not None and (end is None or takeover.at <= end.at):
            attempts.append(Attempt(len(attempts) + 1, event.executor, event.at, None,
                                    f"taken over: {takeover.note or 'its executor stopped'}"))
        elif end is not None:
            outcome = end.state.value + (f": {record.error}" if record.error else "")
            attempts.append(Attempt(len(attempts) + 1, event.executor, event.at, end.at, outcome))
        else:
            attempts.append(Attempt(len(attempts) + 1, event.executor, event.at, None, "running"))
    transfers = [TensorTransfer(t["op"], t["id"], tuple(t["shape"]), t["dtype"], int(t["nbytes"]), t["path"],
                                float(t["seconds"]), float(t["at"])) for t in record.transfers]
    return InvocationView(
        invocation_id=record.id, state=record.state.value, deployment_id=record.deployment_id,
        executor=record.executor, node=record.node, created_at=record.created_at, started_at=record.started_at,
        finished_at=record.finished_at, error=record.error,
        error_kind=record.error_kind.value if record.error_kind else "", timeline=timeline, attempts=attempts,
        transfers=transfers,
    )


async def unit_view(store: InvocationStore, task: UnitTask, invocation_ids: list[str],
                    links: list[Link] | None = None) -> UnitNodeView:
    """The deck of a unit node whose invocations (a local run's retries are new ones) are these."""
    records = [await store.record(i) for i in invocation_ids]
    last = records[-1]
    return UnitNodeView(
        title=describe(task), task_class=type(task).__name__, model=str(getattr(task, "model_id", "") or ""),
        deployment_id=last.deployment_id, routing=last.route, invocations=[invocation_view(r) for r in records],
        generated_at=time.time(), links=links or [],
    )


def failure_summary(record: Record) -> str:
    """What a failed node's message adds (no deck shows for it): where and how it ran."""
    runs = [e for e in record.events if e.state is State.RUNNING]
    where = f" on {record.executor}" if record.executor else ""
    queued = f", queued {runs[0].at - record.created_at:.2f} s" if runs else ", never picked up"
    return f"[{len(runs)} attempt(s){where}{queued}]"


# -- batch chunk nodes --------------------------------------------------------------------------------

async def chunk_view(store: BatchStore, batch: Batch, links: list[Link] | None = None) -> ChunkView:
    """The live deck of a batch chunk: progress over time, per-stage latencies, overlap, errors."""
    telemetry = await store.telemetry(batch.id)
    by_stage: dict[str, list] = {}
    for run in telemetry.stages:
        by_stage.setdefault(run.stage, []).append(run)
    stages, spans, shares = [], [], {}
    for name, runs in by_stage.items():
        queue, busy, latency = [], [], []
        for run in runs:
            if run.started is not None and run.finished is not None:
                queue += [run.started - run.created] * run.items
                busy += [run.finished - run.started] * run.items
                latency += [run.finished - run.created] * run.items
                spans.append(StageSpan(name, run.executor, run.started, run.finished, run.items))
            key = (run.executor, name)
            shares[key] = shares.get(key, 0) + run.items
        stages.append(StageStats(name, sum(r.items for r in runs), sum(r.failed for r in runs),
                                 percentiles(queue), percentiles(busy), percentiles(latency)))
    progress = [ProgressSample(at, done, failed) for at, done, failed in telemetry.progress]
    now = time.time()
    if batch.state.value in ("RUNNING", "CANCELLING") and (not progress or progress[-1].at < now):
        progress.append(ProgressSample(now, batch.done, batch.failed))  # the chart reaches the present
    return ChunkView(
        title=f"{batch.spec.label or 'batch'}, chunk of {batch.total} items", batch_id=batch.id,
        state=batch.state.value, total=batch.total, done=batch.done, failed=batch.failed, cancelled=batch.cancelled,
        created_at=batch.created_at, started_at=batch.started_at, finished_at=batch.finished_at,
        generated_at=now, message=batch.message, progress=progress,
        stages=stages, spans=spans, errors=[ItemError(item, error) for item, error in telemetry.errors],
        executors=[ExecutorShare(executor, stage, items) for (executor, stage), items in sorted(shares.items())],
        links=links or [],
    )


# -- links --------------------------------------------------------------------------------------------

def executors_of(record: Record) -> list[tuple[str, str, str]]:
    """(executor, node, deployment) of each executor that ran the invocation."""
    ran = [event.executor for event in record.events if event.executor]
    return [(executor, record.node, record.deployment_id) for executor in dict.fromkeys(ran)]


async def log_links(client: Any, executors: list[tuple[str, str, str]]) -> list[Link]:
    """Links to the logs of these (executor id, node, deployment id) and to the dashboard."""
    templates = _configured_templates()
    if not templates:
        info = await control_plane_info(client) or {}
        if info.get("executor_log"):
            templates = {"executor log": info["executor_log"]}
    links = []
    for executor, node, deployment in dict.fromkeys(executors):
        values = {"executor_id": executor, "node": node, "deployment_id": deployment, "pod": executor}
        for name, template in templates.items():
            links.append(Link(f"{name} ({executor})", template.format(**values)))
    dashboard = os.environ.get(DASHBOARD_ENV, "")
    if dashboard:
        deployment = executors[0][2] if executors else ""
        links.append(Link("metrics dashboard", dashboard.format(deployment_id=deployment)))
    return links


async def chunk_links(client: Any, view: ChunkView) -> list[Link]:
    """Links to the logs of the executors that served a chunk."""
    return await log_links(client, [(share.executor, "", "") for share in view.executors])


def _configured_templates() -> dict[str, str]:
    raw = os.environ.get(LOG_LINKS_ENV, "")
    if not raw:
        return {}
    templates = json.loads(raw)
    if not isinstance(templates, dict) or not all(isinstance(v, str) for v in templates.values()):
        raise ValueError(f"{LOG_LINKS_ENV} must be a JSON object of name -> URI template, not {raw!r}")
    return templates


def deck_link(prefix: str) -> list[Link]:
    """A link to the deck itself where it is a local file (a local Propeller, tests): the console
    opens object-store decks on its own."""
    if not prefix or ("://" in prefix and not prefix.startswith("file://")):
        return []
    path = prefix.removeprefix("file://")
    return [Link("deck", f"file://{os.path.abspath(join(path, DECK_NAME))}")]


# -- files under the output prefix ------------------------------------------------------------------

def join(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('/')}/{name}"


async def write_file(uri: str, data: bytes, content_type: str = "") -> None:
    """Write through flytekit's data persistence (its configured object-store credentials)."""
    def write() -> None:
        fs = FlyteContextManager.current_context().file_access.get_filesystem_for_path(uri)
        parent = uri.rsplit("/", 1)[0]
        if "://" not in uri or uri.startswith("file://"):
            fs.makedirs(parent, exist_ok=True)
        with fs.open(uri, "wb", **({"ContentType": content_type} if content_type and uri.startswith("s3") else {})) as out:
            out.write(data)

    await asyncio.to_thread(write)


async def write_deck(prefix: str, html: str) -> str:
    uri = join(prefix, DECK_NAME)
    await write_file(uri, html.encode(), "text/html")
    return uri


async def write_outputs(prefix: str, outputs: LiteralMap) -> str:
    """`outputs.pb` as Propeller's output reader reads it: a serialized flyteidl LiteralMap."""
    uri = join(prefix, OUTPUTS_NAME)
    await write_file(uri, outputs.to_flyte_idl().SerializeToString())
    return uri
