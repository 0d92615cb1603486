"""Chaos: one fault per run, injected mid-batch, and what every item and process made of it.

    .venv/bin/python bench/chaos.py [--items 1000] [--faults executor,control-plane,sidecar,connector,redis]
    .venv/bin/python bench/chaos.py --faults executor,retries-spent [--item-retries 1]

Each run starts a stack of its own: a redis-server the bench owns (unix socket, AOF on: restarted for
real), `cornserve up --foreground` on it, and `pyflyte serve connector`. One batch chunk of `--items`
texts for the text encoder (`EncoderTask(modality="text")`, tiny Llava's text model: the cheapest item
that still goes through an executor *and* the sidecar, whose arena holds each item's embedding) is
driven over gRPC as FlytePropeller drives it: CreateTask with the node execution in
`task_execution_metadata`, GetTask polls, a node retry (a new CreateTask, next attempt) on
RETRYABLE_FAILED, a repeated CreateTask after a connector restart. Once a fifth of the items ended
(read from the batch's events stream in Redis), one fault:

  executor       SIGKILL the encoder's executor (the control plane starts a replacement)
  control-plane  SIGKILL `cornserve up`, then a new one on the same Redis (it resumes the batch)
  sidecar        SIGKILL the node's sidecar (the control plane's task manager restarts it)
  connector      SIGKILL `pyflyte serve connector`, a new one on the same port, CreateTask again
  redis          SIGTERM the redis-server (AOF written) and start it again on the same socket

and, only when named in `--faults` (not a default one), a fault that repeats:

  retries-spent  (from the batch's start, not after a fifth: a small batch may be over by then)
                 SIGKILL the executor running a batch invocation; then, each time an executor (a
                 replacement) runs items of a killed invocation again, SIGKILL it too, until those
                 items spent their retries (the unit task's `options.retries`: `--item-retries`,
                 1 unless given). Each kill costs the items it hits one attempt (a batch invocation
                 is submitted with max_attempts 1: the executor that takes it over fails it,
                 recoverably), so an item hit on its last attempt must end in ERROR, once, with a
                 recoverable error that says its executor died; every other item DONE. Checked
                 besides: the items in ERROR are exactly those hit on their last attempt
                 (`misfiled`), and each hit invocation ended ERROR of kind recoverable (its record).
                 At most RESTART_LIMIT - 1 kills: one more would fail the deployment.

Checked per run: every item ended exactly once (the results file's rows: lost = items without a
row, duplicates = rows beyond one per item + the batch's counters beyond the rows + successful
outcomes the runner took in beyond `done`), no process of the stack left once it is stopped
(orphans: processes whose environment names this run's Redis socket, after a bounded wait on
their pidfds), no `/dev/shm` arena of the run's sidecars left, and recovery: from the fault to the
moment the batch takes in the first item done by a batch invocation that started after the fault
(if every remaining item was already under way then, to the batch's last item).

Last line: `RESULT faults=F items=N lost=L duplicated=D orphans=O` (sums over the runs; a
retries-spent run counts in them like the others, its ERROR rows are meant).
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import select
import signal
import sys
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import click
import grpc
import redis

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("CORNSERVE_HOME", str(ROOT / ".cache"))

from flyteidl.admin import agent_pb2  # noqa: E402
from flyteidl.core import identifier_pb2  # noqa: E402
from flyteidl.core.execution_pb2 import TaskExecution  # noqa: E402
from flytekit import FlyteContextManager  # noqa: E402
from flytekit.configuration import ImageConfig, SerializationSettings  # noqa: E402
from flytekit.core.type_engine import TypeEngine  # noqa: E402
from flytekit.models.literals import LiteralMap  # noqa: E402
from flytekit.tools.translator import get_serializable  # noqa: E402
from flytekit.types.file import FlyteFile  # noqa: E402

from cornserve_builtins.encoder import EncoderTask, Modality  # noqa: E402
from flyte_cornserve.flyte.batch import plan_chunks  # noqa: E402
from flyte_cornserve.flyte.batch_task import BatchChunk, BatchOptions, HashedChunk, fan_out  # noqa: E402
from flyte_cornserve.services.batches import Batch, StageRun, batch_key, read_results  # noqa: E402
from flyte_cornserve.services.dispatcher import Dispatcher  # noqa: E402
from flyte_cornserve.services.task_manager import RESTART_LIMIT  # noqa: E402
from flyte_cornserve.protocol.invocations import invocation_key  # noqa: E402
from flyte_cornserve.task import task_reference  # noqa: E402
from flyte_cornserve.task.options import TaskOptions  # noqa: E402
from flyte_cornserve.task.tensor_ref import TensorRef  # noqa: E402
from tests.connector import ConnectorProcess  # noqa: E402
from tests.restartable_redis import RestartableRedis  # noqa: E402
from tests.stack import Stack  # noqa: E402

FAULTS = ("executor", "control-plane", "sidecar", "connector", "redis")
EXTRA_FAULTS = ("retries-spent",)  # run only when named
RETRIES_SPENT_ITEM_RETRIES = 1  # the unit task's retries in a retries-spent run, unless given
TASK = EncoderTask(model_id="tiny-llava", modality=Modality.TEXT)
LABEL = "EncoderTask tiny-llava"
CATEGORY = agent_pb2.TaskCategory(name="cornserve_batch", version=0)
TERMINAL = {TaskExecution.SUCCEEDED, TaskExecution.FAILED, TaskExecution.RETRYABLE_FAILED, TaskExecution.ABORTED}
NODE_RETRIES = 3  # the chunk node's `retries` (BatchOptions' default), as Propeller applies them
RUN_TIMEOUT_S = 600.0
KILL_POLL_S = 0.005  # how often the retries-spent fault looks for the invocations it is after
GRPC_TIMEOUT_S = 20.0  # Propeller's own deadline on a connector call
EXIT_WAIT_S = 20.0  # what a stopped stack's processes get to end (the guards' SIGKILL comes after 10 s)
SHM = pathlib.Path("/dev/shm")


# --- driving the chunk node as Propeller does --------------------------------------------------------

def text_of(i: int) -> str:
    return f"chaos item number {i}"


def plan(items: int, work: pathlib.Path, unit=TASK) -> BatchChunk:
    manifest = work / "texts.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"t{i:05d}", "data": text_of(i)}) + "\n" for i in range(items)))
    (chunk,) = plan_chunks.task_function(task=task_reference(unit), chunk_size=items, manifest=FlyteFile(str(manifest)))
    return chunk


def create(stub, chunk: BatchChunk, execution: str, prefix: pathlib.Path, attempt: int, unit=TASK) -> bytes:
    ctx = FlyteContextManager.current_context()
    task = fan_out(LABEL, task_reference(unit), BatchOptions()).batch_task
    template = get_serializable(OrderedDict(), SerializationSettings(ImageConfig.auto_default_image()), task)
    literal = TypeEngine.to_literal(ctx, chunk, HashedChunk, TypeEngine.to_literal_type(HashedChunk))
    metadata = agent_pb2.TaskExecutionMetadata(task_execution_id=identifier_pb2.TaskExecutionIdentifier(
        node_execution_id=identifier_pb2.NodeExecutionIdentifier(
            node_id="n0", execution_id=identifier_pb2.WorkflowExecutionIdentifier(project="p", domain="d", name=execution)),
        retry_attempt=attempt))
    return stub.CreateTask(agent_pb2.CreateTaskRequest(
        template=template.template.to_flyte_idl(), inputs=LiteralMap({"chunk": literal}).to_flyte_idl(),
        output_prefix=str(prefix), task_execution_metadata=metadata), timeout=GRPC_TIMEOUT_S).resource_meta


def batch_id_of(meta: bytes) -> str:
    return json.loads(meta)["batch_id"]


# --- the stack's processes ---------------------------------------------------------------------------

def stack_processes(marker: str) -> list[tuple[int, str]]:
    """(pid, start time) of every process whose environment names `marker` (this run's Redis socket):
    the control plane, its sidecar, executors and guard watchers, the connector."""
    found = []
    needle = marker.encode()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        pid = int(entry)
        if pid == os.getpid():
            continue
        try:
            if needle in pathlib.Path(f"/proc/{pid}/environ").read_bytes():
                found.append((pid, _start_time(pid)))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return found


def _start_time(pid: int) -> str:
    return pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]


def alive(pid: int, start: str) -> bool:
    try:
        return _start_time(pid) == start
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_all_exit(processes: list[tuple[int, str]], timeout_s: float) -> list[tuple[int, str]]:
    """Wait (pidfds, no polling) until each has exited or `timeout_s` passed; the ones still running."""
    deadline = time.monotonic() + timeout_s
    left = []
    for pid, start in processes:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if not alive(pid, start):
                continue
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                left.append((pid, start))
        finally:
            os.close(fd)
    return left


class Tracker(threading.Thread):
    """Samples the stack's processes while the run goes on: how many pids it started in all."""

    def __init__(self, marker: str) -> None:
        super().__init__(daemon=True)
        self.marker = marker
        self.seen: set[tuple[int, str]] = set()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.25):
            self.seen.update(stack_processes(self.marker))


# --- one run -----------------------------------------------------------------------------------------

@dataclass
class Outcome:
    fault: str
    items: int
    phase: str = ""
    done: int = 0
    errors: int = 0
    duplicates: int = 0
    lost: int = 0
    orphans: int = 0
    shm_left: int = 0
    recovery_s: float | None = None
    mid_batch: bool = False
    ended_at_fault: int = 0
    node_retries: int = 0
    grpc_errors: int = 0
    pids: int = 0
    notes: list[str] = field(default_factory=list)
    error_messages: list[str] = field(default_factory=list)
    bad_outputs: int = 0  # DONE rows whose output is not an embedding of the item's text
    # the retries-spent fault only
    item_retries: int | None = None  # the unit task's `options.retries` (None: its default)
    kills: int = 0
    hit: int = 0  # items a kill hit at least once
    spent_ids: list[str] = field(default_factory=list, repr=False)  # items a kill hit on their last attempt
    misfiled: int = 0  # ERROR rows of items not spent, plus spent items without an ERROR row
    unexplained: int = 0  # spent items whose row is not: the recoverable error of the invocation that hit them last, after retries + 1 attempts
    error_kinds: dict[str, int] = field(default_factory=dict)  # the hit invocations' ends: "STATE/kind" -> count
    error_rows: dict[str, str] = field(default_factory=dict, repr=False)  # id -> error of each ERROR row


class RepeatedKills(threading.Thread):
    """The retries-spent fault: SIGKILL the executor running a batch invocation, then each executor
    that runs items of a killed invocation again (their next attempt), until items were hit on their
    last attempt (`needed` = retries + 1), or `max_kills` were spent.

    A kill hits the batch's invocations still RUNNING on the executor once it is gone (a dead
    executor changes nothing more): `hits` is, per item index, the highest node attempt a kill hit.
    When every item being chased ended meanwhile (a retry ran and finished between two looks), the
    chase starts over from any running invocation, if the kills left allow a whole chase."""

    def __init__(self, url: str, batch: str, needed: int, max_kills: int) -> None:
        super().__init__(daemon=True)
        self.url, self.batch, self.needed, self.max_kills = url, batch, needed, max_kills
        self.hits: dict[int, int] = {}
        self.last_hit: dict[int, str] = {}  # item index -> the invocation that hit it last
        self.hit_invocations: list[str] = []
        self.killed: list[str] = []  # executor ids
        self.notes: list[str] = []
        self.last_kill_at: float | None = None  # epoch seconds
        self.stopped = threading.Event()

    def spent(self) -> set[int]:
        return {i for i, attempt in self.hits.items() if attempt >= self.needed}

    def run(self) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=5)
        try:
            while not self.stopped.is_set() and not self.spent() and len(self.killed) < self.max_kills:
                try:
                    victim = self._victim(client)
                    if victim is not None:
                        self._kill(client, victim)
                        continue
                except redis.RedisError as exc:
                    self.notes.append(f"retries-spent fault: {type(exc).__name__}")
                self.stopped.wait(KILL_POLL_S)  # the next look (a poll: nothing tells of an invocation starting)
        except Exception as exc:  # a bug of the fault's own: the run's notes say so (and nothing is spent)
            self.notes.append(f"retries-spent fault failed: {exc!r}")
        finally:
            client.close()

    def _running(self, client: redis.Redis) -> list[tuple[str, str, list]]:
        """(invocation, executor, [[item, node, attempt, slot], ...]) of the batch's invocations RUNNING now."""
        inflight = {k.decode(): json.loads(v) for k, v in client.hgetall(batch_key(self.batch, "inflight")).items()}
        pipe = client.pipeline(transaction=False)
        for invocation in inflight:
            pipe.hmget(invocation_key(invocation), "state", "executor")
        running = []
        for (invocation, triples), (state, executor) in zip(inflight.items(), pipe.execute()):
            if state == b"RUNNING" and executor:
                running.append((invocation, executor.decode(), triples))
        return running

    def _victim(self, client: redis.Redis) -> str | None:
        """The executor to kill now, if any."""
        chased = {i: attempt for i, attempt in self.hits.items() if attempt < self.needed}
        if chased:  # those that ended (DONE: a retry slipped through) are chased no more
            ended = client.hmget(batch_key(self.batch, "results"), [str(i) for i in chased])
            chased = {i: attempt for (i, attempt), row in zip(chased.items(), ended) if row is None}
        fresh = not chased and len(self.killed) + self.needed <= self.max_kills
        if not chased and not fresh:
            return None
        for invocation, executor, triples in self._running(client):
            if executor in self.killed or invocation in self.hit_invocations:
                continue
            if fresh or any(chased.get(i) == attempt - 1 for i, _, attempt, *_ in triples):
                return executor
        return None

    def _kill(self, client: redis.Redis, executor: str) -> None:
        info = client.get(f"cornserve:executor:{executor}")
        self.killed.append(executor)
        if info is None:  # gone meanwhile (it stopped heartbeating)
            return
        try:
            kill(json.loads(info)["pid"])
        except ProcessLookupError:
            return
        self.last_kill_at = time.time()
        for invocation, on, triples in self._running(client):
            if on == executor:
                self.hit_invocations.append(invocation)
                for i, _, attempt, *_ in triples:
                    if attempt > self.hits.get(i, 0):
                        self.hits[i], self.last_hit[i] = attempt, invocation


class Run:
    def __init__(self, fault: str, items: int, work: pathlib.Path, item_retries: int | None = None) -> None:
        self.fault, self.items, self.work = fault, items, work
        self.outcome = Outcome(fault, items)
        self.sidecars: set[str] = set()
        if fault == "retries-spent" and item_retries is None:
            item_retries = RETRIES_SPENT_ITEM_RETRIES
        self.outcome.item_retries = item_retries
        self.task = TASK if item_retries is None else TASK.model_copy(update={"options": TaskOptions(retries=item_retries)})
        self.killer: RepeatedKills | None = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.stack.url, socket_timeout=5)

    def note_sidecars(self) -> None:
        info = self.client().get("cornserve:control-plane")
        if info:
            self.sidecars.update(json.loads(info)["sidecars"].values())

    def execute(self) -> Outcome:
        self.work.mkdir(parents=True, exist_ok=True)
        chunk = plan(self.items, self.work, self.task)
        self.redis = RestartableRedis()
        marker = str(self.redis.socket)
        tracker = Tracker(marker)
        tracker.start()
        self.stack = self.connector = None
        try:
            self.stack = Stack(self.redis.url, self.work / "control-plane.log", "--cpu", "4", "--memory", "16Gi",
                               "--gpu", "0")
            self.note_sidecars()
            self.connector = ConnectorProcess(self.stack.url)

            async def deploy() -> None:
                client = self.stack.client()
                try:
                    await Dispatcher(client).deploy(TASK)
                finally:
                    await client.aclose()

            asyncio.run(deploy())  # warm, so that the fault lands mid-batch, not mid-deployment
            self.drive(chunk)
        finally:
            if self.killer is not None:
                self.killer.stopped.set()
                self.killer.join()
            if self.connector is not None:
                self.connector.stop()
            if self.stack is not None:
                self.note_sidecars_quietly()
                self.stack.stop()
            tracker.stopped.set()
            tracker.join()
            left = wait_all_exit(stack_processes(marker), EXIT_WAIT_S)
            left += [p for p in wait_all_exit(sorted(tracker.seen), 0.0) if p not in left]
            self.outcome.pids = len(tracker.seen)
            self.outcome.orphans = len(left)
            for pid, start in left:  # ours: end them, after counting them
                self.outcome.notes.append(f"orphan {pid}: {_cmdline(pid)}")
                if alive(pid, start):
                    os.kill(pid, signal.SIGKILL)
            arenas = [path for sid in self.sidecars for path in SHM.glob(f"cornserve_{sid}_*")]
            self.outcome.shm_left = len(arenas)
            for arena in arenas:
                arena.unlink(missing_ok=True)
            self.redis.close()
        return self.outcome

    def note_sidecars_quietly(self) -> None:
        try:
            self.note_sidecars()
        except redis.RedisError:
            pass

    def drive(self, chunk: BatchChunk) -> None:
        out = self.outcome
        execution, prefix, attempt = uuid.uuid4().hex[:20], self.work / "n0", 0
        meta = create(self.connector.stub, chunk, execution, prefix, attempt, self.task)
        batch = batch_id_of(meta)
        self.batch = batch
        threshold = max(1, self.items // 5)
        if self.fault == "retries-spent":  # from the start: it is after the batch's invocations while they run
            client = self.client()
            out.ended_at_fault = record_ended(client, batch)
            client.close()
            self.inject(meta, chunk, execution, prefix, attempt)
        last_event, fault_at, seen_stages = "0-0", None, 0
        deadline = time.monotonic() + RUN_TIMEOUT_S
        resource = None
        while time.monotonic() < deadline:
            try:
                resource = self.connector.stub.GetTask(agent_pb2.GetTaskRequest(task_category=CATEGORY,
                                                                                resource_meta=meta),
                                                       timeout=GRPC_TIMEOUT_S).resource
            except grpc.RpcError as exc:  # Propeller retries a failing call on its next round
                out.grpc_errors += 1
                out.notes.append(f"GetTask: {exc.code().name}")
                resource = None
            if resource is not None and resource.phase in TERMINAL:
                if resource.phase == TaskExecution.RETRYABLE_FAILED and attempt < NODE_RETRIES:
                    attempt += 1  # the node's retry: a new CreateTask, the same node execution
                    out.node_retries += 1
                    out.notes.append(f"node retry {attempt}: {resource.message[:200]}")
                    meta = create(self.connector.stub, chunk, execution, prefix, attempt, self.task)
                    assert batch_id_of(meta) == batch, "a node retry made another batch"
                    continue
                break
            try:  # progress: block on the batch's events stream (at most Propeller's poll interval)
                client = self.client()
                reply = client.xread({batch_key(batch, "events"): last_event}, block=500)
                for _, entries in reply or []:
                    last_event = entries[-1][0].decode()
                record = Batch.from_redis(batch, client.hgetall(batch_key(batch)))
                if fault_at is not None and out.recovery_s is None:
                    runs = client.lrange(batch_key(batch, "stages"), seen_stages, -1)
                    seen_stages += len(runs)
                    for raw in runs:
                        run = StageRun.model_validate_json(raw)
                        if run.started and run.started >= fault_at and run.items > run.failed:
                            out.recovery_s = time.time() - fault_at  # when the batch took it in
                            break
                    if out.recovery_s is None and record_ended(client, batch) >= self.items:
                        out.recovery_s = time.time() - fault_at  # no work started after it: the end
                client.close()
            except redis.RedisError as exc:
                out.notes.append(f"reading progress: {type(exc).__name__}")
                continue
            if fault_at is None and self.killer is None and record.ended >= threshold:
                out.ended_at_fault = record.ended
                out.mid_batch = record.ended < self.items
                fault_at = time.time()
                meta = self.inject(meta, chunk, execution, prefix, attempt) or meta
        else:
            out.notes.append(f"no terminal phase within {RUN_TIMEOUT_S:g} s")
        if fault_at is not None and out.recovery_s is None:  # the batch ended before a look after the fault
            client = self.client()
            ends = [run.finished for run in map(StageRun.model_validate_json, client.lrange(batch_key(batch, "stages"), 0, -1))
                    if run.finished and run.finished >= fault_at and run.items > run.failed]
            client.close()
            if ends:
                out.recovery_s = min(ends) - fault_at
                out.notes.append("recovery from the first item's end after the fault (the batch ended meanwhile)")
        if self.killer is not None:  # the batch ended: no more kills
            self.killer.stopped.set()
            self.killer.join()
            out.notes += self.killer.notes
            out.mid_batch = self.killer.last_kill_at is not None  # a kill hit a running invocation of the batch
            if self.killer.last_kill_at is not None:  # recovery: from the last kill to the first item done after it
                fault_at = self.killer.last_kill_at
                client = self.client()
                ends = [run.finished for run in map(StageRun.model_validate_json, client.lrange(batch_key(batch, "stages"), 0, -1))
                        if run.finished and run.started and run.started >= fault_at and run.items > run.failed]
                client.close()
                out.recovery_s = min(ends) - fault_at if ends else None
        out.phase = TaskExecution.Phase.Name(resource.phase) if resource is not None else "?"
        if resource is not None and resource.phase != TaskExecution.SUCCEEDED:
            out.notes.append(f"{out.phase}: {resource.message[:300]}")
        self.count(batch, prefix)

    def inject(self, meta: bytes, chunk: BatchChunk, execution: str, prefix: pathlib.Path, attempt: int) -> bytes | None:
        client = self.client()
        if self.fault == "executor":
            executors = json.loads(client.hget(f"cornserve:deployment:{TASK.deployment_id()}", "executors"))
            pid = json.loads(client.get(f"cornserve:executor:{executors[0]}"))["pid"]
            kill(pid)
        elif self.fault == "sidecar":
            (sidecar,) = json.loads(client.get("cornserve:control-plane"))["sidecars"].values()
            kill(int(client.hget(f"cornserve:sidecar:{sidecar}", "pid")))
        elif self.fault == "control-plane":
            self.stack.process.kill()
            self.stack.process.wait()
            self.stack._start()  # a new control plane on the same Redis
            self.note_sidecars()
        elif self.fault == "connector":
            self.connector.process.kill()
            self.connector.process.wait()
            self.connector.channel.close()
            self.connector.start()  # a new connector on the same port
            again = create(self.connector.stub, chunk, execution, prefix, attempt, self.task)  # Propeller's create again
            if batch_id_of(again) != batch_id_of(meta):
                self.outcome.notes.append("the repeated CreateTask made another batch")
            return again
        elif self.fault == "redis":
            self.redis.restart()
        elif self.fault == "retries-spent":
            needed = self.task.options.retries + 1  # a recoverable failure on attempt `needed` ends the item
            self.killer = RepeatedKills(self.stack.url, self.batch, needed, RESTART_LIMIT - 1)
            self.killer.start()
        client.close()
        return None

    def count(self, batch: str, prefix: pathlib.Path) -> None:
        out = self.outcome
        client = self.client()
        record = Batch.from_redis(batch, client.hgetall(batch_key(batch)))
        stages = [StageRun.model_validate_json(raw) for raw in client.lrange(batch_key(batch, "stages"), 0, -1)]
        client.close()
        path = pathlib.Path(record.spec.results)
        if path.exists():
            rows = list(read_results(str(path)))
        else:  # not written (the batch did not finish): the rows Redis holds
            rows = [json.loads(raw) for raw in self.client().hvals(batch_key(batch, "results"))]
            out.notes.append("no results file: rows from Redis")
        ids = [row["id"] for row in rows]
        unique = set(ids)
        out.done = sum(row["state"] == "DONE" for row in rows)
        out.errors = sum(row["state"] == "ERROR" for row in rows)
        out.error_messages = sorted({str(row.get("error"))[:160] for row in rows if row["state"] == "ERROR"})[:3]
        out.lost = len({f"t{i:05d}" for i in range(self.items)} - unique)
        succeeded_outcomes = sum(run.items - run.failed for run in stages)  # one unit task per item
        out.duplicates = ((len(ids) - len(unique)) + max(0, record.ended - len(unique))
                          + max(0, succeeded_outcomes - record.done))
        if (record.done, record.failed) != (out.done, out.errors):
            out.notes.append(f"counters {record.done} done {record.failed} failed != rows {out.done}/{out.errors}")
        out.bad_outputs = self.check_outputs(rows)
        out.error_rows = {row["id"]: str(row.get("error")) for row in rows if row["state"] == "ERROR"}
        if self.killer is not None:
            self.count_kills(rows)

    def check_outputs(self, rows: list[dict]) -> int:
        """DONE rows whose output is not an embedding of the item's text: a valid tensor reference
        (shape, dtype and size agree), float, non-empty, one tensor of its own per item, of the same
        dtype and width (last dimension) as every other, and of the same shape as those of texts that
        tokenize alike (here: of equal length, "chaos item number <i>")."""
        bad, tensors, shapes, kinds = 0, set(), {}, set()
        for row in rows:
            if row["state"] != "DONE":
                continue
            try:
                ref = TensorRef.model_validate(row["embeddings"])
            except (KeyError, TypeError, ValueError):
                bad += 1
                continue
            kinds.add((ref.dtype, ref.shape[-1] if ref.shape else None))
            length = len(text_of(int(row["id"][1:])))
            if (not ref.shape or min(ref.shape) < 1 or not ref.dtype.startswith(("float", "bfloat")) or len(kinds) > 1
                    or ref.id in tensors or shapes.setdefault(length, ref.shape) != ref.shape):
                bad += 1
            tensors.add(ref.id)
        return bad

    def count_kills(self, rows: list[dict]) -> None:
        """What the retries-spent fault hit, and whether exactly the items hit on their last attempt
        ended in ERROR, each with the recoverable error of the invocation that hit it last."""
        out, killer = self.outcome, self.killer
        out.kills = len(killer.killed)
        out.hit = len(killer.hits)
        spent = sorted(killer.spent())
        out.spent_ids = [f"t{i:05d}" for i in spent]
        client = self.client()
        pipe = client.pipeline(transaction=False)
        for invocation in killer.hit_invocations:
            pipe.hmget(invocation_key(invocation), "state", "error", "error_kind")
        ends = {invocation: tuple((v or b"").decode() for v in fields)
                for invocation, fields in zip(killer.hit_invocations, pipe.execute())}
        client.close()
        kinds: dict[str, int] = {}
        for state, _, kind in ends.values():
            kinds[f"{state}/{kind}"] = kinds.get(f"{state}/{kind}", 0) + 1
        out.error_kinds = kinds
        errors = set(out.error_rows)
        out.misfiled = len(errors ^ set(out.spent_ids))
        attempts = {row["id"]: row.get("attempts") for row in rows}
        for i, item in zip(spent, out.spent_ids):
            state, error, kind = ends.get(killer.last_hit[i], ("", "", ""))
            row_error = out.error_rows.get(item, "")
            if not (state == "ERROR" and kind == "recoverable" and error and row_error.endswith(f": {error}")
                    and attempts.get(item) == killer.needed):
                out.unexplained += 1
                out.notes.append(f"{item}: row error {row_error[:120]!r} after {attempts.get(item)} attempts, "
                                 f"its last hit ended {state}/{kind}: {error[:120]!r}")
        if not spent:
            out.notes.append(f"no item spent its retries: {out.kills} kills hit {out.hit} items "
                             f"(attempts hit: {sorted(set(killer.hits.values()))})")


def record_ended(client: redis.Redis, batch: str) -> int:
    return Batch.from_redis(batch, client.hgetall(batch_key(batch))).ended


def kill(pid: int) -> None:
    """SIGKILL and wait until it is gone (a pidfd: no polling)."""
    fd = os.pidfd_open(pid)
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        select.select([fd], [], [], 30.0)
    finally:
        os.close(fd)


def _cmdline(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
    except OSError:
        return "?"


# --- the report --------------------------------------------------------------------------------------

def report(outcomes: list[Outcome]) -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"chaos: one fault per run, {outcomes[0].items if outcomes else 0} items each")
    for column in ("fault", "items", "done", "errors", "duplicates", "lost", "orphans", "recovery s"):
        table.add_column(column, justify="left" if column == "fault" else "right")
    for o in outcomes:
        table.add_row(o.fault, str(o.items), str(o.done), str(o.errors), str(o.duplicates), str(o.lost),
                      str(o.orphans + o.shm_left), "n/a" if o.recovery_s is None else f"{o.recovery_s:.2f}")
    console = Console(width=120)
    console.print(table)
    for o in outcomes:
        console.print(f"{o.fault}: phase {o.phase}, fault after {o.ended_at_fault} items ended "
                      f"(mid-batch: {o.mid_batch}), node retries {o.node_retries}, GetTask errors {o.grpc_errors}, "
                      f"stack pids seen {o.pids}, orphans {o.orphans}, /dev/shm arenas left {o.shm_left}")
        if o.fault == "retries-spent":
            console.print(f"  item retries {o.item_retries}: {o.kills} executor kills hit {o.hit} items, "
                          f"{len(o.spent_ids)} on their last attempt; ERROR rows not those: {o.misfiled}, "
                          f"without their invocation's recoverable error: {o.unexplained}; hit invocations "
                          f"ended {o.error_kinds}; DONE rows with a wrong output: {o.bad_outputs}")
        for message in o.error_messages:
            console.print(f"  error row: {message}")
        for note in dict.fromkeys(o.notes):
            console.print(f"  note: {note}")
    return (f"RESULT faults={len(outcomes)} items={outcomes[0].items if outcomes else 0} "
            f"lost={sum(o.lost for o in outcomes)} duplicated={sum(o.duplicates for o in outcomes)} "
            f"orphans={sum(o.orphans + o.shm_left for o in outcomes)}")


def run_fault(fault: str, items: int, work: pathlib.Path | None = None, item_retries: int | None = None) -> Outcome:
    """One run. `item_retries`: the unit task's `options.retries` (None: its default; for
    retries-spent, RETRIES_SPENT_ITEM_RETRIES)."""
    from flyte_cornserve.home import cornserve_home

    work = work or cornserve_home() / "bench" / "chaos" / f"{fault}-{uuid.uuid4().hex[:6]}"
    return Run(fault, items, work, item_retries).execute()


@click.command()
@click.option("--items", default=1000, show_default=True, help="items per fault run")
@click.option("--faults", default=",".join(FAULTS), show_default=True,
              help=f"of {', '.join(FAULTS + EXTRA_FAULTS)}")
@click.option("--item-retries", type=click.IntRange(0, RESTART_LIMIT - 2), default=None,
              help=f"the unit task's retries (default: its own; {RETRIES_SPENT_ITEM_RETRIES} for retries-spent)")
def main(items: int, faults: str, item_retries: int | None) -> None:
    outcomes = []
    for fault in faults.split(","):
        assert fault in FAULTS + EXTRA_FAULTS, f"unknown fault {fault!r}: one of {FAULTS + EXTRA_FAULTS}"
        outcomes.append(run_fault(fault, items, item_retries=item_retries))
        print(f"{fault}: {outcomes[-1]}", flush=True)
    print(report(outcomes))


if __name__ == "__main__":
    main()
