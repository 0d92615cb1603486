"""One chunk of a batch as a Flyte node, and the fan-out of a batch's chunks.

`CornserveBatchTask` (task type `cornserve_batch`) runs one chunk on the server side through its
connector: `create()` hands the chunk file to the control plane's batch runner and returns, `get()`
reports progress and finally the chunk's results file. Its input, a `BatchChunk`, hashes to the
digest of the chunk's content, so Flyte's cache is keyed by what the chunk holds, not where it lies.

The chunks fan out as an ArrayNode over a launch plan whose workflow is that one task. An ArrayNode
over the task itself would be the lighter graph, but FlytePropeller (1.16) keeps no plugin state for
ArrayNode sub-nodes other than Kubernetes ones, so a connector task's resource meta would be lost
between polls; over a launch plan each chunk is a child execution with its own node state, and the
console lists them. flytekit's local execution of such an ArrayNode fails when its input comes from
another node (flyte issue 6522): `ChunkFanOut.local_execute` is our own, and it runs every chunk at
once on the embedded stack, as Propeller would run them in parallel, with one progress bar.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import pathlib
import sys
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from flytekit import FlyteContextManager, LaunchPlan
from flytekit.core.workflow import ImperativeWorkflow
from flytekit.configuration import LocalConfig, SerializationSettings
from flytekit.core.array_node import ArrayNode
from flytekit.core.base_task import PythonTask, TaskMetadata
from flytekit.core.hash import HashMethod
from flytekit.core.interface import Interface
from flytekit.core.local_cache import LocalTaskCache
from flytekit.core.promise import Promise
from flytekit.core.type_engine import TypeEngine
from flytekit.models.literals import Literal as FlyteLiteral
from flytekit.models.literals import LiteralCollection, LiteralMap
from flytekit.types.file import FlyteFile
from pydantic import BaseModel, ConfigDict, Field

from flyte_cornserve.decks.render import render_chunk
from flyte_cornserve.redis_server import connect_async
from flyte_cornserve.services.batches import FINISHED, Batch, BatchSpec, BatchState, BatchStore, read_chunk
from flyte_cornserve.services.dispatcher import Dispatcher
from flyte_cornserve.services.stack import ensure_stack
from flyte_cornserve.task import unit_task_from_json
from flyte_cornserve.task.options import DEFAULT_RETRIES

from . import decks
from .progress import BatchProgress, ProgressLine

BATCH_TASK_TYPE = "cornserve_batch"
CUSTOM_SCHEMA = 1  # the version of the TaskTemplate's `custom` this code writes and reads


class BatchOptions(BaseModel):
    """How a batch runs. `retries` are the chunk node's Flyte retries (each re-runs only the items
    that did not end well); items retry on their own, per their unit tasks' `options.retries`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chunk_size: int = Field(default=500, ge=1, description="items per chunk: one Flyte node, cached as one")
    min_success_ratio: float = Field(default=0.0, ge=0.0, le=1.0,
                                     description="a chunk with fewer items succeeding fails (0: never)")
    retries: int = Field(default=DEFAULT_RETRIES, ge=0, le=10)
    cache: bool = False
    cache_version: str = ""
    concurrency: int | None = Field(default=None, ge=0, description="chunks running at once on a cluster")
    max_in_flight: int | None = Field(default=None, ge=1, description="a chunk's items in flight at most (the "
                                                                       "control plane's --batch-in-flight applies too)")
    output: Literal["jsonl", "parquet"] = "jsonl"
    image_field: str = Field(default="images", description="the input field an image of a folder goes to")
    prompt_field: str = Field(default="prompt", description="the input field the shared prompt goes to")


@dataclass
class BatchChunk:
    """A chunk file and what identifies its content."""

    rows: FlyteFile
    items: int
    digest: str  # sha256 of the chunk file
    index: int = 0


def chunk_digest(chunk: BatchChunk) -> str:
    return chunk.digest


#: a chunk whose literal hashes to its content's digest: the cache key of a chunk node
HashedChunk = Annotated[BatchChunk, HashMethod(chunk_digest)]


@dataclass
class ChunkResult:
    """A chunk's results file (JSONL, one row per item) and its counts."""

    results: FlyteFile
    items: int
    succeeded: int
    failed: int


def file_uri(file: FlyteFile) -> str:
    """Where a FlyteFile lives: its remote source if it came from a blob store, else its path."""
    return str(getattr(file, "remote_source", None) or file.path)


class CornserveBatchTask(PythonTask):
    """Flyte's view of one chunk of a batch of `label`; run by the batch connector, never in a pod."""

    def __init__(self, name: str, label: str, options: BatchOptions) -> None:
        super().__init__(
            task_type=BATCH_TASK_TYPE,
            name=name,
            interface=Interface(inputs={"chunk": HashedChunk}, outputs={"o0": ChunkResult}),
            metadata=TaskMetadata(retries=options.retries, cache=options.cache, cache_version=options.cache_version),
            enable_deck=True,  # the template's `generates_deck`: Propeller shows the deck the connector writes
        )
        self.label = label
        self.options = options

    def get_custom(self, settings: SerializationSettings) -> dict[str, Any]:
        return {"schema": CUSTOM_SCHEMA, "label": self.label, "min_success_ratio": self.options.min_success_ratio,
                "max_in_flight": self.options.max_in_flight}

    def execute(self, **kwargs: Any) -> ChunkResult:
        """Local `pyflyte run` of one chunk (the fan-out runs all of its chunks together)."""
        return run_chunks_locally(self, [kwargs["chunk"]])[0]

    def _write_decks(self, native_inputs: Any, native_outputs_as_map: Any, ctx: Any, new_user_params: Any) -> None:
        """`run_chunks_locally` has written the chunk's deck already."""


class ChunkFanOut(ArrayNode):
    """The ArrayNode over a batch's chunk launch plan, with a local execution of our own."""

    def __init__(self, launch_plan: LaunchPlan, task: CornserveBatchTask, concurrency: int | None,
                 stages: tuple[PythonTask, ...] = ()) -> None:
        super().__init__(target=launch_plan, concurrency=concurrency)
        self.batch_task = task
        self.stages = stages

    def local_execute(self, ctx: Any, **kwargs: Any) -> Promise:
        """Run every chunk that Flyte's local cache does not hold, at once; return the results."""
        value = kwargs["chunk"]
        literal = value.val if isinstance(value, Promise) else TypeEngine.to_literal(
            ctx, value, list[HashedChunk], TypeEngine.to_literal_type(list[HashedChunk]))
        elements = literal.collection.literals if literal.collection is not None else []
        task = self.batch_task
        cached = LocalConfig.auto().cache_enabled and task.metadata.cache
        outputs: list[FlyteLiteral | None] = [None] * len(elements)
        inputs = [LiteralMap(literals={"chunk": element}) for element in elements]
        if cached and not LocalConfig.auto().cache_overwrite:
            for i, input_map in enumerate(inputs):
                hit = LocalTaskCache.get(task.name, task.metadata.cache_version, input_map, ())
                outputs[i] = hit.literals["o0"] if hit is not None else None
        missing = [i for i, output in enumerate(outputs) if output is None]
        if missing:
            chunks = [TypeEngine.to_python_value(ctx, elements[i], BatchChunk) for i in missing]
            staged = frozenset(stage.unit_json for stage in self.stages)
            if self.stages:
                _prepare_stages(chunks, staged)
            for stage in self.stages:  # each chunk's Elastic job, one after another, as the chunk workflow runs it
                chunks = [stage.execute(chunk=chunk) for chunk in chunks]
            result_type = TypeEngine.to_literal_type(ChunkResult)
            for i, result in zip(missing, run_chunks_locally(task, chunks, staged)):
                outputs[i] = TypeEngine.to_literal(ctx, result, ChunkResult, result_type)
                if cached:
                    LocalTaskCache.set(task.name, task.metadata.cache_version, inputs[i], (),
                                       LiteralMap(literals={"o0": outputs[i]}))
        return Promise(var="o0", val=FlyteLiteral(collection=LiteralCollection(literals=outputs)))


def _prepare_stages(chunks: list[BatchChunk], staged: frozenset[str]) -> None:
    """Before a local run's stages: deploy the chunk's other unit tasks (which starts this machine's
    sidecar), and export the sidecar's id for the stage's processes to inherit (on a cluster, a pod's
    sidecar is its node's, through the downward API)."""
    from flyte_cornserve.services.control import control_plane_info
    from flyte_cornserve.sidecar.directory import ENV_SIDECAR_ID

    url = _deploy_ahead(chunks, staged)

    async def read() -> dict | None:
        client = connect_async(url)
        try:
            return await control_plane_info(client)
        finally:
            await client.aclose()

    info = asyncio.run(read())
    if info and info.get("sidecars"):
        os.environ.setdefault(ENV_SIDECAR_ID, next(iter(info["sidecars"].values())))


_fan_outs: dict[str, tuple[CornserveBatchTask, LaunchPlan]] = {}


def fan_out(label: str, reference: str, options: BatchOptions, stages: tuple[PythonTask, ...] = ()) -> ChunkFanOut:
    """The fan-out node for a batch of the task `reference` (one task, workflow and launch plan per
    task and options, shared by every workflow that runs such a batch). `stages`: tasks `chunk ->
    chunk` that run in each chunk's workflow before its batch node (an Elastic encoder stage)."""
    settings = options.model_dump_json(include={"retries", "cache", "cache_version", "min_success_ratio", "max_in_flight"})
    staged = "\n".join(stage.name for stage in stages)
    digest = hashlib.sha256(f"{reference}\n{settings}\n{staged}".encode()).hexdigest()[:12]
    name = f"cornserve.batch.{label.split()[0].lower()}.{digest}"
    if name not in _fan_outs:
        task = CornserveBatchTask(name, label, options)
        ctx = FlyteContextManager.current_context()
        with FlyteContextManager.with_context(ctx.with_compilation_state(None)):  # apart from the caller's workflow
            chunk_workflow = ImperativeWorkflow(name=f"{name}.chunk")
            chunk = chunk_workflow.add_workflow_input("chunk", HashedChunk)
            for stage in stages:
                chunk = chunk_workflow.add_entity(stage, chunk=chunk).outputs["o0"]
            node = chunk_workflow.add_entity(task, chunk=chunk)
            chunk_workflow.add_workflow_output("o0", node.outputs["o0"], python_type=ChunkResult)
        _fan_outs[name] = (task, LaunchPlan.get_or_create(chunk_workflow, name=f"{name}.chunk"))
    task, launch_plan = _fan_outs[name]
    return ChunkFanOut(launch_plan, task, options.concurrency, stages)


# -- running chunks on the embedded stack -------------------------------------------------------------

async def _write_decks(store: BatchStore, batches: list[Batch], folder: pathlib.Path) -> None:
    """A local run's chunk decks, one file per chunk, and where they are."""
    paths = []
    for k, batch in enumerate(batches):
        path = folder / f"deck-{k:05d}.html"
        view = await decks.chunk_view(store, batch)
        links = await decks.chunk_links(store.redis, view)
        path.write_text(render_chunk(dataclasses.replace(view, links=links)))
        paths.append(path)
    if paths:
        where = f"file://{paths[0]}" if len(paths) == 1 else f"file://{folder}/deck-*.html ({len(paths)} chunks)"
        print(f"cornserve: {batches[0].spec.label}: deck at {where}", file=sys.stderr, flush=True)


def run_chunks_locally(task: CornserveBatchTask, chunks: list[BatchChunk],
                       staged: frozenset[str] = frozenset()) -> list[ChunkResult]:
    """Run the chunks on this machine's stack (started if needed) and wait for all of them, with a
    progress bar; Ctrl-C cancels them. Raises if one fails (below its min_success_ratio). `staged`:
    the unit tasks (JSON) whose nodes a stage ran: not deployed ahead."""
    url = _deploy_ahead(chunks, staged)
    ctx = FlyteContextManager.current_context()
    folder = pathlib.Path(ctx.file_access.get_random_local_directory())
    results = [str(folder / f"results-{chunk.index:05d}.jsonl") for chunk in chunks]
    specs = [BatchSpec(chunk=file_uri(chunk.rows), results=path, items=chunk.items, label=task.label,
                       min_success_ratio=task.options.min_success_ratio, max_in_flight=task.options.max_in_flight)
             for chunk, path in zip(chunks, results)]
    batches = asyncio.run(_run(url, specs, folder))
    failed = [batch for batch in batches if batch.state is not BatchState.DONE]
    if failed:
        raise RuntimeError(f"{task.label}: chunk batch {failed[0].id} {failed[0].state.value.lower()}: {failed[0].message}")
    return [ChunkResult(results=FlyteFile(path), items=batch.total, succeeded=batch.done, failed=batch.failed + batch.cancelled)
            for path, batch in zip(results, batches)]


def _deploy_ahead(chunks: list[BatchChunk], staged: frozenset[str]) -> str:
    """This machine's stack (started if needed) with the unit tasks of the chunks deployed, but those
    in `staged`, on a progress line; its Redis URL."""
    line = ProgressLine()
    try:
        url = ensure_stack(line.update)
        asyncio.run(_deploy([file_uri(chunk.rows) for chunk in chunks[:1]], url, line, staged))
    finally:
        line.close()
    return url


async def _deploy(chunk_files: list[str], url: str, progress, staged: frozenset[str] = frozenset()) -> None:
    """Deploy the unit tasks a chunk uses before it starts, showing what starts (the batch itself
    would wait for them silently); not those in `staged` (a stage ran their nodes)."""
    dispatcher = Dispatcher(connect_async(url))
    for chunk_file in chunk_files:
        header, _ = await asyncio.to_thread(read_chunk, chunk_file)
        for task in header.tasks:
            unit = unit_task_from_json(task)
            if unit.to_json() not in staged:
                await dispatcher.deploy(await dispatcher.route(unit), progress)


async def _run(url: str, specs: list[BatchSpec], folder: pathlib.Path) -> list[Batch]:
    """Run the chunks as batches; once they end, write their decks into `folder`."""
    store = BatchStore(connect_async(url))
    ids = [await store.create(spec) for spec in specs]
    progress = BatchProgress(specs[0].label if specs else "batch", sum(spec.items for spec in specs), file=sys.stderr)
    last: dict[str, str] = {}
    try:
        while True:
            batches = [await store.load(batch_id) for batch_id in ids]
            progress.update(sum(b.done for b in batches if b), sum(b.failed + b.cancelled for b in batches if b))
            if all(b is None or b.state in FINISHED for b in batches):
                ended = [b for b in batches if b is not None]
                await _write_decks(store, ended, folder)
                return ended
            last = await store.wait(ids, timeout_s=2.0, last=last)
    except asyncio.CancelledError:  # Ctrl-C: the batches stop too
        for batch_id in ids:
            await store.cancel(batch_id)
        raise
    finally:
        progress.close()
        await store.redis.aclose()
