"""A batch's encoder stage as a distributed job: flytekitplugins-kfpytorch's `Elastic` task, one per
chunk, before the chunk's `cornserve_batch` node (docs/architecture.md, "The Elastic encoder stage").

`EncoderTask(..., descriptor=ElasticEncode(nnodes, nproc_per_node))` in a batch's task makes
`batch()` add this stage: `stage_task(unit)` is an Elastic task `chunk -> chunk`. Each of its
processes (ranks) reads the chunk, takes every `world`-th encoder node of the unit task (its input
needs no other node), loads the encoder with the encoder server's own code (`EncoderHandler`) and
runs those nodes through it, micro batch by micro batch, exactly as a warm executor runs a batch
invocation: content-addressed outputs put into the node's sidecar, unpinned (the batch runner pins
them for their consumers when it takes the chunk; a failed attempt's puts are freed from the ranks'
journals). Each rank writes what it got to a JSON file beside the chunk (never a pickle:
`gather_object` would pickle over the network); after a barrier, rank 0 writes the chunk again with
those outputs as its items' `done` (an item whose encode failed becomes an error row, as in the
batch runner) and returns it. The batch runner then sends only the other nodes.

The tasks are made while the workflow is compiled, one per unit task (named after its deployment
id; its JSON is the task's loader args), so a pod loads one with `stage_resolver`, not from a module.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
import uuid
from typing import Any

import flytekit
import fsspec
from flytekit import FlyteContextManager
from flytekit.core.base_task import TaskResolverMixin
from flytekit.core.tracker import TrackedInstance
from flytekit.types.file import FlyteFile

from flyte_cornserve.descriptors import descriptor_for
from flyte_cornserve.protocol.invocations import Invocation, Priority
from flyte_cornserve.redis_server import ENV_URL
from flyte_cornserve.services.batches import ChunkItem, read_chunk, write_chunk
from flyte_cornserve.services.dispatcher import tensor_policy
from flyte_cornserve.services.task_manager import describe
from flyte_cornserve.sidecar.directory import ENV_SIDECAR_ID
from flyte_cornserve.sidecar.wire import ENV_TOKEN
from flyte_cornserve.task import Task, UnitTask, unit_task_from_json
from flyte_cornserve.task.plan import PlanNode

from .batch_task import BatchChunk, HashedChunk, file_uri

log = logging.getLogger(__name__)

STAGE_KIND = "elastic"  # `ElasticEncode.kind`: a descriptor settings object that asks for this stage


def stage_settings(unit: UnitTask) -> Any | None:
    """The unit task's Elastic settings (`ElasticEncode`), or None if it runs on warm executors only."""
    descriptor = unit.descriptor
    return descriptor if getattr(descriptor, "kind", None) == STAGE_KIND else None


def elastic_units(task: Task) -> list[UnitTask]:
    """The unit tasks of `task` (itself, or a composite's task fields, recursively) that ask for an
    Elastic stage, each once, in the order found."""
    found: list[UnitTask] = []

    def visit(value: Any) -> None:
        if isinstance(value, UnitTask):
            if stage_settings(value) is not None and value not in found:
                found.append(value)
        elif isinstance(value, Task):
            for name in type(value).model_fields:
                visit(getattr(value, name))
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(task)
    return found


class StageResolver(TrackedInstance, TaskResolverMixin):
    """Loads a stage task in its pod from its loader args: the unit task's JSON."""

    def name(self) -> str:
        return "cornserve-elastic-stage"

    def load_task(self, loader_args: list[str]) -> Any:
        return stage_task(unit_task_from_json(loader_args[1]))

    def loader_args(self, settings: Any, task: Any) -> list[str]:
        return ["unit-task", task.unit_json]

    def get_all_tasks(self) -> list[Any]:
        return list(_stages.values())


stage_resolver = StageResolver()
_stages: dict[str, Any] = {}


def stage_task(unit: UnitTask) -> Any:
    """The Elastic task that runs `unit`'s nodes of a chunk (one per unit task, shared)."""
    from flytekitplugins.kfpytorch import Elastic

    ElasticStage = _stage_class()
    unit_json = unit.to_json()
    name = f"cornserve.elastic.{unit.deployment_id()}"
    if name in _stages:
        return _stages[name]
    settings = stage_settings(unit)
    if settings is None:
        raise ValueError(f"{describe(unit)} asks for no Elastic stage (its descriptor is {unit.descriptor!r})")

    def encode_stage(chunk: HashedChunk) -> HashedChunk:
        return run_rank(unit_json, chunk)

    encode_stage.__name__ = encode_stage.__qualname__ = name.replace(".", "_").replace("-", "_")
    config = Elastic(nnodes=settings.nnodes, nproc_per_node=settings.nproc_per_node,
                     max_restarts=settings.max_restarts,
                     monitor_interval=1,  # the agent's look at its ranks: kfpytorch's 5 s is a 5 s tail per chunk
                     start_method="spawn",  # a fresh interpreter per rank: no forked torch or Redis state
                     increase_shared_mem=False)  # its /dev/shm is the node's (`stage_pod_template`)
    ctx = FlyteContextManager.current_context()
    with FlyteContextManager.with_context(ctx.with_compilation_state(None)):  # else the calling workflow's resolver
        stage = ElasticStage(name, unit_json, task_config=config, task_function=encode_stage,
                             pod_template=stage_pod_template())
    _stages[name] = stage
    return stage


class JournaledStore:
    """The node's sidecar as the encoder handler uses it (`executors.encoder.TensorStore`), the ids of
    each put written to this rank's journal first (flushed to disk): if the stage fails, its launching
    process frees what the attempt stored (`discard_attempt`), a killed rank's puts included."""

    def __init__(self, store: Any, journal: pathlib.Path) -> None:
        self.store = store
        self.journal = journal

    def put_many(self, tensors: list[Any], *, pins: int, ttl: float, ids: list[str | None] | None = None,
                 trace: list[Any] | None = None) -> list[Any]:
        chosen = [given or uuid.uuid4().hex for given in (ids or [None] * len(tensors))]
        with self.journal.open("a") as out:
            out.write(json.dumps(chosen) + "\n")
            out.flush()
            os.fsync(out.fileno())
        return self.store.put_many(tensors, pins=pins, ttl=ttl, ids=chosen, trace=trace)

    def pin_many(self, ids: list[str], pins: int | list[int] = 1) -> list[Any]:
        return self.store.pin_many(ids, pins)

    def claim_many(self, ids: list[str], claimer: str, ttl: float) -> list[bool]:
        return self.store.claim_many(ids, claimer, ttl)

    def unclaim_many(self, ids: list[str], claimer: str) -> None:
        self.store.unclaim_many(ids, claimer)

    def wait_published(self, id: str, timeout: float) -> bool:
        return self.store.wait_published(id, timeout)


def journals(run_id: str, agent_pid: int) -> pathlib.Path:
    """Where the ranks of one launch keep their put journals: on their machine (each pod's agent
    frees what its own ranks stored), by torch elastic's run id and the launching process."""
    return pathlib.Path(tempfile.gettempdir()) / "cornserve-elastic" / f"{run_id}-{agent_pid}"


def discard_attempt(folder: pathlib.Path) -> int:
    """Free the tensors the journals in `folder` name that nobody holds (an attempt that failed:
    they are unpinned, and no chunk refers to them); returns how many. The folder goes."""
    from flyte_cornserve.sidecar.directory import Directory

    ids = []
    for journal in folder.glob("*.puts"):
        for line in journal.read_text().splitlines():
            try:
                ids += json.loads(line)
            except json.JSONDecodeError:  # the line a killed rank was writing
                continue
    freed = 0
    if ids:
        directory = Directory.connect()
        for tensor_id in ids:
            entry = directory.entry(tensor_id)
            if entry is not None and entry.pins == 0:
                directory.discard(tensor_id, entry.holder)
                freed += 1
    shutil.rmtree(folder, ignore_errors=True)
    return freed


def stage_pod_template() -> Any:
    """What a stage's pods need to reach their node's sidecar, as an executor pod has it
    (`services/pods.py`): the node's IPC namespace and /dev/shm, the sidecar's id from
    `spec.nodeName`, the Redis URL and the sidecars' token from their Secrets (which must exist in the
    namespace the workflow's pods run in)."""
    from flytekit import PodTemplate
    from kubernetes.client import (
        V1Container,
        V1EnvVar,
        V1EnvVarSource,
        V1HostPathVolumeSource,
        V1ObjectFieldSelector,
        V1PodSpec,
        V1SecretKeySelector,
        V1Volume,
        V1VolumeMount,
    )

    def secret(name: str, secret_name: str, key: str) -> V1EnvVar:
        return V1EnvVar(name=name, value_from=V1EnvVarSource(secret_key_ref=V1SecretKeySelector(name=secret_name, key=key)))

    env = [secret(ENV_URL, "cornserve-redis", "url"),
           V1EnvVar(name=ENV_SIDECAR_ID, value_from=V1EnvVarSource(field_ref=V1ObjectFieldSelector(field_path="spec.nodeName"))),
           secret(ENV_TOKEN, "cornserve-sidecar-token", "token")]
    container = V1Container(name="primary", env=env, volume_mounts=[V1VolumeMount(name="shm", mount_path="/dev/shm")])
    shm = V1Volume(name="shm", host_path=V1HostPathVolumeSource(path="/dev/shm", type="Directory"))
    return PodTemplate(pod_spec=V1PodSpec(host_ipc=True, containers=[container], volumes=[shm]),
                       primary_container_name="primary")


@functools.cache
def _stage_class():
    """`ElasticStage`, made on first use: the plugin (and torch) load only for batches that have a stage."""
    from flytekitplugins.kfpytorch.task import PytorchElasticFunctionTask

    class ElasticStage(PytorchElasticFunctionTask):
        """kfpytorch's Elastic task, named for the unit task it runs and loaded by `stage_resolver`."""

        def __init__(self, name: str, unit_json: str, **kwargs: Any) -> None:
            super().__init__(task_resolver=stage_resolver, **kwargs)
            self._name = name
            self.unit_json = unit_json

        @property
        def name(self) -> str:
            return self._name  # not prefixed with where it was made (a generated task has no module of its own)

        def execute(self, **kwargs: Any) -> Any:
            """The plugin's run of the ranks; a rank killed by a signal fails the stage as recoverable.
            A failed attempt's outputs are freed (their journals); a successful one's are the chunk's."""
            from flytekit.exceptions.user import FlyteRecoverableException, FlyteUserRuntimeException

            folder = journals(flytekit.current_context().execution_id.name, os.getpid())  # as the ranks name it
            try:
                result = super().execute(**kwargs)
            except BaseException as exc:
                freed = discard_attempt(folder)
                log.warning("%s failed; freed the %d tensors it had stored", self.name, freed)
                killed = killed_rank(exc.value) if isinstance(exc, FlyteUserRuntimeException) else None
                if killed is None:
                    raise
                raise FlyteRecoverableException(
                    f"{self.name}: {killed}; the stage is retried (Flyte's retries), every rank again") from exc
            shutil.rmtree(folder, ignore_errors=True)
            return result

    return ElasticStage


def killed_rank(error: BaseException) -> str | None:
    """The first failed rank of torch elastic's `ChildFailedError`, in words, if a signal killed it
    (preemption, the OOM killer, a node drained): such a failure is the infrastructure's, and the
    stage is retried. kfpytorch counts a rank's failure as recoverable only if the rank wrote its
    `recoverable_error` file, which a killed rank cannot. None for anything else (an exception in a
    rank is the code's or the data's: a user error)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if not isinstance(error, ChildFailedError):
        return None
    rank, failure = error.get_first_failure()
    if failure.exitcode >= 0:
        return None
    return f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) was killed by {failure.signal_name()}"


# -- in each rank -------------------------------------------------------------------------------------

def run_rank(unit_json: str, chunk: BatchChunk) -> BatchChunk | None:
    """This rank's share of the chunk's nodes of the unit task; rank 0 returns the chunk with every
    rank's outputs in it."""
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    unit = unit_task_from_json(unit_json)
    header, items = read_chunk(file_uri(chunk.rows))
    mine = stage_nodes(header.tasks, items, unit)[rank::world]
    folder = _shared_folder(chunk)
    with fsspec.open(f"{folder}/rank-{rank}.json", "w") as out:
        json.dump(encode_nodes(unit, mine), out)
    if world > 1:
        dist.init_process_group("gloo")
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
    if rank != 0:
        return None
    results: dict[str, dict[str, Any]] = {}
    for other in range(world):
        with fsspec.open(f"{folder}/rank-{other}.json", "r") as part:
            results.update(json.load(part))
    merged = merge(items, unit, results)
    path = f"{folder}/chunk.jsonl"
    text = write_chunk(path, header, merged)
    return BatchChunk(rows=FlyteFile(path), items=chunk.items, digest=hashlib.sha256(text.encode()).hexdigest(),
                      index=chunk.index)


def stage_nodes(tasks: list[dict[str, Any]], items: list[ChunkItem], unit: UnitTask) -> list[tuple[ChunkItem, PlanNode]]:
    """The (item, node) pairs of the chunk that run `unit` and need no other node's output, in item order."""
    wanted = json.loads(unit.to_json())
    indices = {index for index, task in enumerate(tasks) if task == wanted}
    return [(item, node) for item in items if item.plan is not None and not item.done
            for node in item.plan.nodes if node.task in indices and not node.input.needs]


def encode_nodes(unit: UnitTask, nodes: list[tuple[ChunkItem, PlanNode]]) -> dict[str, dict[str, Any]]:
    """Run the nodes through the encoder server's handler, loaded here: `<item>/<node>` -> {"output"}
    or {"error"}."""
    from flyte_cornserve.executors.encoder import EncoderHandler
    from flyte_cornserve.metrics import ExecutorMetrics
    from flyte_cornserve.sidecar.client import SidecarClient

    results: dict[str, dict[str, Any]] = {}
    if not nodes:
        return results
    descriptor = descriptor_for(unit)
    settings = stage_settings(unit)

    folder = journals(os.environ.get("TORCHELASTIC_RUN_ID", "local"), os.getppid())  # the agent's
    folder.mkdir(parents=True, exist_ok=True)
    journal = folder / f"rank-{os.environ.get('RANK', '0')}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}.puts"

    async def encode() -> None:
        handler = EncoderHandler(descriptor, JournaledStore(SidecarClient(), journal))
        # its counters, as an executor's (not served: the job's processes are short-lived; the tensor
        # cache's hit and miss counts go to Redis as an executor's do)
        handler.instrument(ExecutorMetrics(unit.deployment_id(), f"elastic-rank-{os.environ.get('RANK', '0')}"))
        await handler.start()
        try:
            for start in range(0, len(nodes), settings.micro_batch):
                part = nodes[start:start + settings.micro_batch]
                # unpinned: the batch runner pins them for their consumers when it takes the chunk, so a
                # stage that fails (a rank killed) holds nothing: what it stored is cache, which expires
                batch = [Invocation(id=f"{item.i}/{node.id}", deployment_id=unit.deployment_id(),
                                    input=node.input.fill({}), priority=Priority.BATCH, pins=0,
                                    tensors=tensor_policy(unit.options))
                         for item, node in part]
                for invocation, outcome in zip(batch, await handler.handle(batch), strict=True):
                    if outcome.output is not None:
                        results[invocation.id] = {"output": descriptor.decode_response(outcome.output).model_dump(mode="json")}
                    else:
                        results[invocation.id] = {"error": outcome.error}
        finally:
            await handler.stop()

    asyncio.run(encode())
    return results


def merge(items: list[ChunkItem], unit: UnitTask, results: dict[str, dict[str, Any]]) -> list[ChunkItem]:
    """The items with the stage's outputs as `done`; one whose encode failed is an error row."""
    merged = []
    for item in items:
        done, error = dict(item.done), ""
        for node in item.plan.nodes if item.plan is not None else ():
            result = results.get(f"{item.i}/{node.id}")
            if result is None:
                continue
            if "output" in result:
                done[node.id] = result["output"]
            elif not error:
                error = f"{describe(unit)} ({node.id}): {result['error']}"
        merged.append(item.model_copy(update={"plan": None, "error": error, "done": {}}) if error
                      else item.model_copy(update={"done": done}))
    return merged


def _shared_folder(chunk: BatchChunk) -> str:
    """Where the ranks of this attempt meet: under the task's raw output prefix (the same for every
    rank of the job), by the chunk's digest and the job's run."""
    prefix = str(flytekit.current_context().raw_output_prefix).rstrip("/")
    run = os.environ.get("TORCHELASTIC_RUN_ID", "local")
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"{prefix}/cornserve-elastic/{chunk.digest[:16]}/{run}-{restart}"
