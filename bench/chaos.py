"""Chaos: one fault per run, injected mid-batch, and what every item and process made of it.

    .venv/bin/python bench/chaos.py [--items 1000] [--faults executor,control-plane,sidecar,connector,redis]

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

Checked per run: every item ended exactly once (the results file's rows: lost = items without a
row, duplicates = rows beyond one per item + the batch's counters beyond the rows + successful
outcomes the runner took in beyond `done`), no process of the stack left once it is stopped
(orphans: processes whose environment names this run's Redis socket, after a bounded wait on
their pidfds), no `/dev/shm` arena of the run's sidecars left, and recovery: from the fault to the
moment the batch takes in the first item done by a batch invocation that started after the fault
(if every remaining item was already under way then, to the batch's last item).

Last line: `RESULT faults=F items=N lost=L duplicated=D orphans=O` (sums over the runs).
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
from flyte_cornserve.task import task_reference  # noqa: E402
from tests.connector import ConnectorProcess  # noqa: E402
from tests.restartable_redis import RestartableRedis  # noqa: E402
from tests.stack import Stack  # noqa: E402

FAULTS = ("executor", "control-plane", "sidecar", "connector", "redis")
TASK = EncoderTask(model_id="tiny-llava", modality=Modality.TEXT)
LABEL = "EncoderTask tiny-llava"
CATEGORY = agent_pb2.TaskCategory(name="cornserve_batch", version=0)
TERMINAL = {TaskExecution.SUCCEEDED, TaskExecution.FAILED, TaskExecution.RETRYABLE_FAILED, TaskExecution.ABORTED}
NODE_RETRIES = 3  # the chunk node's `retries` (BatchOptions' default), as Propeller applies them
RUN_TIMEOUT_S = 600.0
GRPC_TIMEOUT_S = 20.0  # Propeller's own deadline on a connector call
EXIT_WAIT_S = 20.0  # what a stopped stack's processes get to end (the guards' SIGKILL comes after 10 s)
SHM = pathlib.Path("/dev/shm")


# --- driving the chunk node as Propeller does --------------------------------------------------------

def plan(items: int, work: pathlib.Path) -> BatchChunk:
    manifest = work / "texts.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"t{i:05d}", "data": f"chaos item number {i}"}) + "\n"
                                for i in range(items)))
    (chunk,) = plan_chunks.task_function(task=task_reference(TASK), chunk_size=items, manifest=FlyteFile(str(manifest)))
    return chunk


def create(stub, chunk: BatchChunk, execution: str, prefix: pathlib.Path, attempt: int) -> bytes:
    ctx = FlyteContextManager.current_context()
    task = fan_out(LABEL, task_reference(TASK), BatchOptions()).batch_task
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


class Run:
    def __init__(self, fault: str, items: int, work: pathlib.Path) -> None:
        self.fault, self.items, self.work = fault, items, work
        self.outcome = Outcome(fault, items)
        self.sidecars: set[str] = set()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.stack.url, socket_timeout=5)

    def note_sidecars(self) -> None:
        info = self.client().get("cornserve:control-plane")
        if info:
            self.sidecars.update(json.loads(info)["sidecars"].values())

    def execute(self) -> Outcome:
        self.work.mkdir(parents=True, exist_ok=True)
        chunk = plan(self.items, self.work)
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
        meta = create(self.connector.stub, chunk, execution, prefix, attempt)
        batch = batch_id_of(meta)
        threshold = max(1, self.items // 5)
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
                    meta = create(self.connector.stub, chunk, execution, prefix, attempt)
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
            if fault_at is None and record.ended >= threshold:
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
            again = create(self.connector.stub, chunk, execution, prefix, attempt)  # Propeller's create again
            if batch_id_of(again) != batch_id_of(meta):
                self.outcome.notes.append("the repeated CreateTask made another batch")
            return again
        elif self.fault == "redis":
            self.redis.restart()
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
        for message in o.error_messages:
            console.print(f"  error row: {message}")
        for note in dict.fromkeys(o.notes):
            console.print(f"  note: {note}")
    return (f"RESULT faults={len(outcomes)} items={outcomes[0].items if outcomes else 0} "
            f"lost={sum(o.lost for o in outcomes)} duplicated={sum(o.duplicates for o in outcomes)} "
            f"orphans={sum(o.orphans + o.shm_left for o in outcomes)}")


def run_fault(fault: str, items: int, work: pathlib.Path | None = None) -> Outcome:
    from flyte_cornserve.home import cornserve_home

    work = work or cornserve_home() / "bench" / "chaos" / f"{fault}-{uuid.uuid4().hex[:6]}"
    return Run(fault, items, work).execute()


@click.command()
@click.option("--items", default=1000, show_default=True, help="items per fault run")
@click.option("--faults", default=",".join(FAULTS), show_default=True)
def main(items: int, faults: str) -> None:
    outcomes = []
    for fault in faults.split(","):
        assert fault in FAULTS, f"unknown fault {fault!r}: one of {FAULTS}"
        outcomes.append(run_fault(fault, items))
        print(f"{fault}: {outcomes[-1]}", flush=True)
    print(report(outcomes))


if __name__ == "__main__":
    main()
