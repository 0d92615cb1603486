"""The batch connector: how Flyte runs a `cornserve_batch` node (one chunk of a batch).

FlytePropeller calls `create()` with a short deadline, again after a timeout, and again on a node
retry; then `get()` every 10-30 s, from whichever connector replica. So the connector keeps no
state: `create()` hands the chunk to the batch runner through Redis, keyed by the node execution
(execution and node id, not the retry attempt), so a repeated create finds the same batch and a
retry after a failure re-runs only the items that did not end well; `get()` reads the batch's
record and rewrites the chunk's deck under the output prefix (the console's live view), and at the
end writes `outputs.pb` there too (Propeller reads the outputs from it and keeps the deck);
`delete()` (on abort) cancels every item still running.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from flyteidl.core.execution_pb2 import TaskExecution, TaskLog
from flytekit import FlyteContextManager
from flytekit.core.type_engine import TypeEngine
from flytekit.extend.backend.base_connector import AsyncConnectorBase, ConnectorRegistry, Resource, ResourceMeta
from flytekit.models.literals import LiteralMap
from flytekit.models.task import TaskTemplate
from flytekit.types.file import FlyteFile

from flyte_cornserve.decks.render import render_chunk

from flyte_cornserve.redis_server import connect_async
from flyte_cornserve.services.batches import Batch, BatchSpec, BatchState, BatchStore
from flyte_cornserve.services.control import control_plane_info
from flyte_cornserve.services.stack import ensure_stack

from . import decks
from .batch_task import BATCH_TASK_TYPE, CUSTOM_SCHEMA, BatchChunk, ChunkResult, file_uri

RESULTS_NAME = "cornserve-results.jsonl"


@dataclass
class BatchMetadata(ResourceMeta):
    """What Flyte keeps between calls: the batch."""

    batch_id: str = ""
    output_prefix: str = ""  # where the outputs and the deck go ("": outputs inline, no deck)


class CornserveBatchConnector(AsyncConnectorBase):
    name = "Cornserve Batch Connector"

    def __init__(self) -> None:
        super().__init__(task_type_name=BATCH_TASK_TYPE, metadata_type=BatchMetadata)

    async def create(self, task_template: TaskTemplate, output_prefix: str | None = None,
                     inputs: LiteralMap | None = None, task_execution_metadata: Any = None,
                     **kwargs: Any) -> BatchMetadata:
        custom = task_template.custom or {}
        if int(custom.get("schema", 0)) != CUSTOM_SCHEMA:
            raise ValueError(f"cornserve_batch task template schema {custom.get('schema')!r}: this connector "
                             f"reads schema {CUSTOM_SCHEMA}; register the workflow with this flyte-cornserve")
        if inputs is None or "chunk" not in inputs.literals:
            raise ValueError("a cornserve_batch task takes one input, `chunk`")
        chunk = await TypeEngine.async_to_python_value(FlyteContextManager.current_context(), inputs.literals["chunk"],
                                                       BatchChunk)
        spec = BatchSpec(chunk=file_uri(chunk.rows), results=f"{(output_prefix or '').rstrip('/')}/{RESULTS_NAME}",
                         items=chunk.items, label=str(custom.get("label", "")),
                         min_success_ratio=float(custom.get("min_success_ratio", 0.0)),
                         max_in_flight=int(custom["max_in_flight"]) if custom.get("max_in_flight") else None)
        batch_id = await (await _store()).create(spec, key=node_execution_key(task_execution_metadata))
        return BatchMetadata(batch_id=batch_id, output_prefix=output_prefix or "")

    async def get(self, resource_meta: BatchMetadata, **kwargs: Any) -> Resource:
        store = await _store()
        batch = await store.load(resource_meta.batch_id)
        if batch is None:
            return Resource(phase=TaskExecution.FAILED, message=f"batch {resource_meta.batch_id} is gone (expired)")
        prefix = resource_meta.output_prefix
        view = await decks.chunk_view(store, batch)
        links = await decks.chunk_links(store.redis, view) + decks.deck_link(prefix)
        log_links = [TaskLog(uri=link.uri, name=link.name) for link in links]
        if prefix:  # rewritten on every poll: the console's live view of the chunk
            await decks.write_deck(prefix, render_chunk(dataclasses.replace(view, links=links)))
        if batch.state is BatchState.DONE:
            result = ChunkResult(results=FlyteFile(batch.spec.results), items=batch.total, succeeded=batch.done,
                                 failed=batch.failed + batch.cancelled)
            outputs = await TypeEngine._dict_to_literal_map(FlyteContextManager.current_context(), {"o0": result},
                                                            {"o0": ChunkResult})
            if not prefix:
                return Resource(phase=TaskExecution.SUCCEEDED, message=batch.progress(), outputs=outputs,
                                log_links=log_links)
            await decks.write_outputs(prefix, outputs)
            return Resource(phase=TaskExecution.SUCCEEDED, message=batch.progress(), log_links=log_links)
        if batch.state is BatchState.FAILED:  # no deck shows for a failed node: the message says it all
            return Resource(phase=TaskExecution.RETRYABLE_FAILED if batch.retryable else TaskExecution.FAILED,
                            message=failure_message(batch, view), log_links=log_links)
        if batch.state is BatchState.CANCELLED:
            return Resource(phase=TaskExecution.ABORTED, message=batch.message, log_links=log_links)
        if batch.state is BatchState.QUEUED:
            waiting = "" if await control_plane_info(store.redis) else " (no cornserve control plane is running)"
            return Resource(phase=TaskExecution.QUEUED, message=f"queued: {batch.progress()}{waiting}",
                            log_links=log_links)
        return Resource(phase=TaskExecution.RUNNING, message=batch.progress(), log_links=log_links)

    async def delete(self, resource_meta: BatchMetadata, **kwargs: Any) -> None:
        await (await _store()).cancel(resource_meta.batch_id)


def failure_message(batch: Batch, view: Any) -> str:
    """A failed chunk's message: why, its counts, and its first errors with their items."""
    message = batch.message
    if batch.progress() not in message:
        message += f" ({batch.progress()} of {batch.total})"
    if view.errors and "First errors" not in message:
        message += ". First errors: " + "; ".join(f"{e.item_id}: {e.error}" for e in view.errors[:3])
    return message


def node_execution_key(metadata: Any) -> str | None:
    """`project:domain:execution:node` of the node execution Propeller runs (None outside Propeller)."""
    try:
        node = metadata.task_execution_id.node_execution_id
        execution = node.execution_id
        parts = [execution.project, execution.domain, execution.name, node.node_id]
    except AttributeError:
        return None
    return json.dumps(parts) if execution.name and node.node_id else None


_stores: dict[tuple[asyncio.AbstractEventLoop, str], BatchStore] = {}


async def _store() -> BatchStore:
    """One Redis client per event loop and stack."""
    key = (asyncio.get_running_loop(), ensure_stack())
    if key not in _stores:
        _stores[key] = BatchStore(connect_async(key[1]))
    return _stores[key]


ConnectorRegistry.register(CornserveBatchConnector(), override=True)
