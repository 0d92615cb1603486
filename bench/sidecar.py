"""Sidecar data paths against their references, measured side by side in one run (issue 3).

    .venv/bin/python bench/sidecar.py

Two worker processes (a producer and a consumer) and two sidecar processes (A and B, standing in for
two nodes over loopback), float32 tensors of 1, 16 and 256 MiB:

(a) same node: producer `put` on A, consumer (already waiting in `get` on A) has its zero-copy view;
    timed from the start of the put to the return of the get, against `np.copyto` of the same bytes
    into a warm buffer (the physical memory-bandwidth reference);
(b) what a plain Flyte workflow does with a `torch.Tensor` output: flytekit's own torch transformer,
    `to_literal` in the producer (torch.save into the local raw-output store) and `to_python_value`
    in the consumer (download + torch.load), against (a);
(c) across sidecars: consumer `get` on B of a tensor held by A (B pulls it over TCP into its arena and
    verifies its checksum), against a raw socket `sendall` / `recv_into` of the same bytes, in the
    same chunks, between the same two processes.

Each figure is the median of several repetitions after warm-up, a measurement and its reference
taken in turns so that both see the same background load (flytekit in a block of its own: its file
churn would slow whatever runs next). Memory is reused as in steady state (tensors are put with
ttl=0, so a release evicts them at once instead of leaving them CACHED), so the arenas' pages are
already mapped; the first put onto untouched pages is shown separately. The machine has 2 cores:
the sidecars, Redis and both workers share them.
"""

from __future__ import annotations

import multiprocessing
import os
import pathlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable

import numpy as np
import torch

from flyte_cornserve import redis_server
from flyte_cornserve.home import use_project_tmp
from flyte_cornserve.launch import ReadyFile, launch
from flyte_cornserve.sidecar.client import SidecarClient
from flyte_cornserve.sidecar.wire import CHUNK

MiB = 1 << 20
SIZES = {"1MiB": 1 * MiB, "16MiB": 16 * MiB, "256MiB": 256 * MiB}
REPEATS = {"1MiB": 31, "16MiB": 21, "256MiB": 7}
WARMUP = 2
SIDECARS = ("bench-a", "bench-b")
CAPACITY = "1GiB"


def producer_tensor(size: str) -> torch.Tensor:
    return torch.rand(SIZES[size] // 4, generator=torch.Generator().manual_seed(SIZES[size]))


# --- worker processes ------------------------------------------------------------------------------


def worker(conn, redis_url: str, namespace: str, scratch: str) -> None:
    """Run commands from the parent until told to stop; each command answers with one message."""
    torch.set_num_threads(1)
    clients = {sid: SidecarClient(sid, redis_url=redis_url, namespace=namespace) for sid in SIDECARS}
    tensors = {size: producer_tensor(size) for size in SIZES}
    flyte = _Flyte(pathlib.Path(scratch))
    listener = socket.create_server(("127.0.0.1", 0))
    conn.send(listener.getsockname()[1])
    raw: socket.socket | None = None
    raw_buffers: dict[str, memoryview] = {}
    while True:
        command, *args = conn.recv()
        if command == "stop":
            return
        if command == "put":  # (size, id, sidecar) -> start time
            size, tensor_id, sid = args
            start = time.perf_counter()
            clients[sid].put(tensors[size], id=tensor_id, ttl=0)
            conn.send(start)
        elif command == "get":  # (id, sidecar) -> "waiting", then (end time, last value)
            tensor_id, sid = args
            conn.send("waiting")
            tensor = clients[sid].get(tensor_id)
            end = time.perf_counter()
            last = float(tensor[-1])
            del tensor
            clients[sid].release(tensor_id)
            conn.send((end, last))
        elif command == "timed_get":  # (id, sidecar) -> (seconds, last value)
            tensor_id, sid = args
            start = time.perf_counter()
            tensor = clients[sid].get(tensor_id)
            seconds = time.perf_counter() - start
            last = float(tensor[-1])
            del tensor
            clients[sid].release(tensor_id)
            conn.send((seconds, last))
        elif command == "flyte_put":  # (size,) -> (start time, serialized literal)
            start = time.perf_counter()
            literal = flyte.to_literal(tensors[args[0]])
            conn.send((start, literal))
        elif command == "flyte_get":  # (serialized literal,) -> (end time, last value)
            tensor = flyte.to_python_value(args[0])
            end = time.perf_counter()
            last = float(tensor[-1])
            del tensor  # free it now, not inside the next command's timed region
            conn.send((end, last))
        elif command == "flyte_clean":
            flyte.clean()
            conn.send("ok")
        elif command == "last":  # (size,) -> last value of the producer's tensor
            conn.send(float(tensors[args[0]][-1]))
        elif command == "raw_connect":  # (port,)
            raw = socket.create_connection(("127.0.0.1", args[0]))
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.send("ok")
        elif command == "raw_accept":
            raw, _ = listener.accept()
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.send("ok")
        elif command == "raw_send":  # (size,): send the tensor's bytes when asked, as a sidecar does
            raw.recv(1)
            payload = memoryview(tensors[args[0]].numpy()).cast("B")
            for start in range(0, len(payload), CHUNK):
                raw.sendall(payload[start : start + CHUNK])
            conn.send("sent")
        elif command == "raw_recv":  # (size,) -> seconds from request to last byte received
            view = raw_buffers.setdefault(args[0], memoryview(np.ones(SIZES[args[0]], dtype=np.uint8)))  # long-lived, like an arena
            start = time.perf_counter()
            raw.sendall(b"g")
            got = 0
            while got < len(view):
                got += raw.recv_into(view[got:], min(CHUNK, len(view) - got))
            conn.send(time.perf_counter() - start)


class _Flyte:
    """flytekit's torch.Tensor transformer over a local file-based raw-output store."""

    def __init__(self, scratch: pathlib.Path) -> None:
        from flytekit.core.context_manager import FlyteContextManager
        from flytekit.core.data_persistence import FileAccessProvider
        from flytekit.core.type_engine import TypeEngine
        from flytekit.extras.pytorch import PyTorchTensorTransformer

        self.sandbox = pathlib.Path(tempfile.mkdtemp(prefix="sandbox-", dir=scratch))
        access = FileAccessProvider(local_sandbox_dir=self.sandbox, raw_output_prefix=str(scratch / "raw"))
        self.ctx = FlyteContextManager.current_context().with_file_access(access).build()
        self.transformer = PyTorchTensorTransformer()
        self.literal_type = TypeEngine.to_literal_type(torch.Tensor)
        self.raw = scratch / "raw"

    def to_literal(self, tensor: torch.Tensor) -> bytes:
        literal = self.transformer.to_literal(self.ctx, tensor, torch.Tensor, self.literal_type)
        return literal.to_flyte_idl().SerializeToString()

    def to_python_value(self, serialized: bytes) -> torch.Tensor:
        from flyteidl.core import literals_pb2
        from flytekit.models.literals import Literal

        literal = Literal.from_flyte_idl(literals_pb2.Literal.FromString(serialized))
        return self.transformer.to_python_value(self.ctx, literal, torch.Tensor)

    def clean(self) -> None:
        for folder in (self.raw, self.sandbox):
            for path in sorted(folder.rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()


# --- measurements ----------------------------------------------------------------------------------


def medians(measurements: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median seconds of each measurement after warm-up, taken in turns, so that a measurement and
    its reference see the same background load."""
    samples: dict[str, list[float]] = {name: [] for name in measurements}
    for round_ in range(WARMUP + repeats):
        for name, measure in measurements.items():
            seconds = measure()
            if round_ >= WARMUP:
                samples[name].append(seconds)
    return {name: statistics.median(values) for name, values in samples.items()}


def copyto(size: str) -> Callable[[], float]:
    """The physical reference: np.copyto of the producer's bytes into a warm buffer."""
    source = producer_tensor(size).numpy()
    target = np.zeros_like(source)

    def once() -> float:
        start = time.perf_counter()
        np.copyto(target, source)
        return time.perf_counter() - start

    return once


def main() -> None:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    url = redis_server.redis_url()
    use_project_tmp()
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="bench-sidecar-"))
    sidecars = [_start_sidecar(sid, url, namespace) for sid in SIDECARS]
    context = multiprocessing.get_context("spawn")
    pipes, workers = [], []
    for _ in range(2):
        parent, child = context.Pipe()
        process = context.Process(target=worker, args=(child, url, namespace, str(scratch)), daemon=True)
        process.start()
        pipes.append(parent)
        workers.append(process)
    producer, consumer = pipes
    try:
        ports = [p.recv() for p in pipes]
        producer.send(("raw_accept",))
        consumer.send(("raw_connect", ports[0]))
        producer.recv(), consumer.recv()
        rows = [_measure(name, producer, consumer) for name in SIZES]
    finally:
        for pipe in pipes:
            pipe.send(("stop",))
        for process in workers:
            process.join(30)
        for process in sidecars:
            process.terminate()
            process.wait(30)
        shutil.rmtree(scratch, ignore_errors=True)
    _report(rows)


def _measure(size: str, producer, consumer) -> dict[str, float]:
    nbytes, repeats = SIZES[size], REPEATS[size]
    producer.send(("last", size))
    expected_last = producer.recv()

    def checked(last: float) -> None:
        if last != expected_last:
            raise AssertionError(f"{size}: consumer saw {last}, producer wrote {expected_last}")

    def same_node() -> float:
        tensor_id = uuid.uuid4().hex
        consumer.send(("get", tensor_id, "bench-a"))
        consumer.recv()  # "waiting": the consumer is about to block in get
        producer.send(("put", size, tensor_id, "bench-a"))
        start = producer.recv()
        end, last = consumer.recv()
        checked(last)
        return end - start

    def flyte() -> float:
        producer.send(("flyte_put", size))
        start, literal = producer.recv()
        consumer.send(("flyte_get", literal))
        end, last = consumer.recv()
        checked(last)
        for worker_pipe in (producer, consumer):
            worker_pipe.send(("flyte_clean",))
            worker_pipe.recv()
        return end - start

    def cross() -> float:
        tensor_id = uuid.uuid4().hex
        producer.send(("put", size, tensor_id, "bench-a"))
        producer.recv()
        consumer.send(("timed_get", tensor_id, "bench-b"))
        seconds, last = consumer.recv()
        checked(last)
        return seconds

    def raw_socket() -> float:
        producer.send(("raw_send", size))
        consumer.send(("raw_recv", size))
        seconds = consumer.recv()
        producer.recv()
        return seconds

    first_put = same_node()  # for 256 MiB, onto arena pages no process has touched yet
    return {
        "nbytes": nbytes,
        "first_put": first_put,
        **medians({"same_node": same_node, "copyto": copyto(size)}, repeats),
        **medians({"flyte": flyte}, repeats),  # on its own: its file churn would slow whatever runs next
        **medians({"cross": cross, "raw_socket": raw_socket}, repeats),
    }


def _report(rows: list[dict[str, float]]) -> None:
    def gbps(row: dict[str, float], key: str) -> float:
        return row["nbytes"] / row[key] / 1e9

    header = f"{'size':>7} | {'copyto':>9} | {'same-node':>9} {'ratio':>6} | {'flytekit':>9} {'speedup':>7} | {'socket':>9} | {'cross':>9} {'ratio':>6}"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nsidecar benchmark (GB/s; {os.cpu_count()} cores, load average {load}; python {sys.version.split()[0]}, torch {torch.__version__})")
    print(header)
    print("-" * len(header))
    result = {}
    for size, row in zip(SIZES, rows):
        a = row["copyto"] / row["same_node"]
        b = row["flyte"] / row["same_node"]
        c = row["raw_socket"] / row["cross"]
        print(
            f"{size:>7} | {gbps(row, 'copyto'):9.2f} | {gbps(row, 'same_node'):9.2f} {a:6.2f} | "
            f"{gbps(row, 'flyte'):9.2f} {b:6.1f}x | {gbps(row, 'raw_socket'):9.2f} | {gbps(row, 'cross'):9.2f} {c:6.2f}"
        )
        result.update({
            f"a_same_node_vs_copyto_{size}": f"{a:.2f}",
            f"b_speedup_vs_flytekit_{size}": f"{b:.1f}",
            f"c_cross_vs_socket_{size}": f"{c:.2f}",
            f"same_node_GBps_{size}": f"{gbps(row, 'same_node'):.2f}",
            f"copyto_GBps_{size}": f"{gbps(row, 'copyto'):.2f}",
            f"flytekit_GBps_{size}": f"{gbps(row, 'flyte'):.3f}",
            f"cross_GBps_{size}": f"{gbps(row, 'cross'):.2f}",
            f"socket_GBps_{size}": f"{gbps(row, 'raw_socket'):.2f}",
        })  # fmt: skip
    cold = gbps(rows[-1], "first_put")
    print(f"first same-node put+get of 256 MiB, onto arena pages not touched before: {cold:.2f} GB/s")
    result["first_put_GBps_256MiB"] = f"{cold:.2f}"
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))


def _start_sidecar(sidecar_id: str, url: str, namespace: str) -> subprocess.Popen:
    command = [sys.executable, "-c", "from flyte_cornserve.cli import main; main()", "sidecar",
               "--id", sidecar_id, "--namespace", namespace, "--memory-cap", CAPACITY, "--log-level", "WARNING"]  # fmt: skip
    env = dict(os.environ, **{redis_server.ENV_URL: url})
    log = pathlib.Path(tempfile.gettempdir()) / f"sidecar-{sidecar_id}.log"
    # ready once it writes its ready file (`flyte_cornserve.launch`); raises with its log tail if it does not
    return launch(command, env, log, ReadyFile(), 60.0, f"sidecar {sidecar_id}").process


if __name__ == "__main__":
    main()
