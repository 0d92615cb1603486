"""Batch captioning over a dataset: our batch workflow vs three baselines, side by side in one run.

    .venv/bin/python bench/batch.py [--items 1000] [--per-item-sample 50] [--map-chunk 100]
                                    [--memory-items 4000] [--only b,c,d,ours]

One synthetic dataset (`--items` 32x32 PNGs of coloured shapes, a JSONL manifest) is captioned by
  (b) monolithic: one `vllm.LLM` in one process (bench/monolithic.py, a child process), started and
      warmed up before the clock starts: reads every image and generates all prompts at once. The
      ceiling on this machine; its start-up is reported apart.
  (c) per item:   `pyflyte run workflows/vlm.py caption --image ...`, one process per item, against
      this bench's private stack (warm executors), for a sample of `--per-item-sample` items.
  (d) map task:   plain flytekit without cornserve (bench/map_task_baseline.py, `pyflyte run` as a
      child process): a `map_task` over chunks of `--map-chunk` rows, each chunk starting its own
      vLLM engine in a fresh interpreter (as a pod per chunk would); engine start-ups included.
  ours:           our batch workflow on the same private stack (`run_ours`), after one unmeasured
      batch of `--memory-items` items (the processes' allocators grow to their working set over the
      first few thousand requests: vLLM's worker from ~850 to ~1150 MiB, then flat), then once more
      on `--memory-items` items, to compare the stack's peak RSS process by process.
All parts use the same model (tiny Llava), prompt format, greedy sampling and 64 tokens, so their
captions can be compared item by item. The stack's processes (control plane and its descendants,
the embedded redis-server) are sampled for RSS while (c) and ours run. Temporary files live under
`$CORNSERVE_HOME/bench/batch/`; the raw figures go to `$CORNSERVE_HOME/bench/batch/last.json`.

The last line: `RESULT items=N ours_per_s monolithic_per_s ours_vs_monolithic ours_vs_per_item
ours_vs_map_task equal_outputs interactive_slowdown peak_rss_growth`, where ours_vs_X is ours' items/s
over X's, equal_outputs counts ours' captions equal to (b)'s (over the ids both have),
interactive_slowdown is `run_interactive`'s, and peak_rss_growth is the stack's peak RSS (the peak of
the sum over its processes) in ours' `--memory-items` run over that in its `--items` run. A figure
whose part did not run reads n/a.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable

import click
import psutil

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from stack import PrivateStack  # noqa: E402

BENCH = pathlib.Path(__file__).resolve().parent
ROOT = BENCH.parent
PYFLYTE = pathlib.Path(sys.executable).with_name("pyflyte")
MODEL_ID = "tiny-llava"
PARTS = ("b", "c", "d", "ours")
MiB = 1024 * 1024


# --- the dataset ------------------------------------------------------------------------------------

def make_dataset(folder: pathlib.Path, n: int, seed: int = 0) -> tuple[pathlib.Path, list[dict]]:
    """`n` PNGs of a random shape in a random colour on another colour, and a JSONL manifest.

    Image i depends only on (seed, i), so files already in `folder` are reused, and a bigger
    dataset of the same seed extends a smaller one. Returns (manifest path, rows)."""
    from PIL import Image

    from flyte_cornserve.models.tiny import COLORS, PROMPT, SHAPES, draw

    folder = pathlib.Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(1, n + 1):
        item_id = f"img{i:05d}"
        path = folder / f"{item_id}.png"
        if not path.exists():
            rng = random.Random(f"{seed}-{i}")
            color, background = rng.sample(sorted(COLORS), 2)
            shape = rng.choice(SHAPES)
            partial = path.with_suffix(".tmp.png")
            Image.fromarray(draw(color, shape, background, rng)).save(partial)
            partial.rename(path)  # complete files only, should a run be interrupted
        rows.append({"id": item_id, "images": [str(path)], "prompt": PROMPT})
    manifest = folder / f"manifest-{n}.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest, rows


def compare(a: dict[str, str], b: dict[str, str]) -> tuple[int, int]:
    """(equal, total) over the ids both have; captions compared without surrounding whitespace."""
    common = a.keys() & b.keys()
    return sum(a[i].strip() == b[i].strip() for i in common), len(common)


# --- peak RSS per process ---------------------------------------------------------------------------

class PeakRss:
    """Samples, in a thread, the RSS of some process trees; peak per process, keyed by role.

        with PeakRss(lambda: [pid, ...]) as peak:
            ...
        peak.by_role  # {"control-plane": bytes, "executor vllm": bytes, "vllm engine-core": ...}
        peak.total    # the peak of the sum over all sampled processes at one instant

    `roots` is called at every sample (so processes started meanwhile are found); each root and all
    its descendants are sampled. A process's role is the last one seen (vLLM retitles its processes
    after the spawn); a second process of the same role gets "role #2", and so on in order of start,
    so two runs of the same stack compare key by key. RSS counts shared pages (the sidecar's shared
    memory, libraries) in every process that maps them, so the sum overstates the machine's use."""

    def __init__(self, roots: Callable[[], Iterable[int]] | Iterable[int], interval: float = 0.2) -> None:
        self.roots = roots if callable(roots) else (lambda pids=tuple(roots): pids)
        self.interval = interval
        self.total = 0
        self.samples = 0
        self._peak: dict[tuple[int, float], int] = {}  # (pid, create time) -> peak RSS
        self._role: dict[tuple[int, float], str] = {}  # its latest role (vLLM renames its processes)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRss:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        seen: dict[int, psutil.Process] = {}
        for pid in self.roots():
            try:
                root = psutil.Process(pid)
                seen.setdefault(root.pid, root)
                for child in root.children(recursive=True):
                    seen.setdefault(child.pid, child)
            except psutil.Error:
                continue
        total = 0
        for process in seen.values():
            try:
                rss = process.memory_info().rss
                identity = (process.pid, process.create_time())
                role = process_role(process)
            except psutil.Error:  # gone meanwhile
                continue
            total += rss
            self._peak[identity] = max(self._peak.get(identity, 0), rss)
            if role != "gone":
                self._role[identity] = role
        self.total = max(self.total, total)
        self.samples += 1

    @property
    def by_role(self) -> dict[str, int]:
        """Peak RSS per process, keyed by role ("role #2", ... for later processes of the same role)."""
        peaks: dict[str, int] = {}
        for identity in sorted(self._peak, key=lambda identity: identity[1]):  # in order of start
            role = self._role.get(identity, "gone")
            key, n = role, 1
            while key in peaks:
                n += 1
                key = f"{role} #{n}"
            peaks[key] = self._peak[identity]
        return peaks

    def as_dict(self) -> dict:
        return {"by_role": dict(sorted(self.by_role.items())), "total": self.total, "samples": self.samples}


def process_role(process: psutil.Process) -> str:
    """A stable name for one of the stack's (or a baseline's) processes, from its command line."""
    try:
        cmdline = process.cmdline()
        name = process.name()
    except psutil.Error:
        return "gone"
    line = " ".join(cmdline)
    if cmdline and pathlib.Path(cmdline[0]).name == "redis-server" or name == "redis-server":
        return "redis"
    if "EngineCore" in line or "EngineCore" in name:  # vLLM renames its processes VLLM::EngineCore
        return "vllm engine-core"
    if "Worker" in line and ("VLLM" in line or "Vllm" in line) or "Worker" in name and "VLLM" in name:
        return "vllm worker"
    if "multiprocessing.resource_tracker" in line:
        return "mp resource-tracker"
    if "flyte_cornserve.cli" in line:
        args = cmdline[cmdline.index("-c") + 2:] if "-c" in cmdline else cmdline[1:]
        command = next((arg for arg in args if not arg.startswith("-")), "")
        if command == "up":
            return "control-plane"
        if command == "executor" and "--task" in args:
            return f"executor {_executor_kind(args[args.index('--task') + 1])}"
        return command or "cornserve"
    if "monolithic.py" in line:
        return "monolithic"
    if "pyflyte" in line:
        return "pyflyte"
    if "multiprocessing" in line:
        return "mp child"
    return name


def _executor_kind(task_json: str) -> str:
    try:
        from flyte_cornserve.descriptors import descriptor_for
        from flyte_cornserve.task.registry import unit_task_from_json

        return descriptor_for(unit_task_from_json(task_json)).executor
    except Exception:  # noqa: BLE001 - a name is all this is for
        try:
            return json.loads(task_json)["task_class"].lower().removesuffix("task")
        except Exception:  # noqa: BLE001
            return "?"


def stack_pids(stack: PrivateStack) -> Callable[[], list[int]]:
    """The roots of the stack's process trees: its control plane, and the embedded redis-server that
    this bench process started (found among its children)."""

    def roots() -> list[int]:
        pids = [stack.process.pid] if stack.process is not None else []
        for child in psutil.Process().children():
            try:
                if process_role(child) == "redis":
                    pids.append(child.pid)
            except psutil.Error:
                continue
        return pids

    return roots


class CpuMeter:
    """CPU seconds (user + system) spent meanwhile by this process, its children that ended and were
    waited for (their own waited-for descendants included), and the live process trees of `roots`.

        with CpuMeter(roots) as cpu:
            ...
        cpu.seconds
    """

    def __init__(self, roots: Callable[[], Iterable[int]] = lambda: ()) -> None:
        self.roots = roots
        self.seconds = 0.0

    def _now(self) -> float:
        times = os.times()
        total = times.user + times.system + times.children_user + times.children_system
        seen: set[int] = set()
        for pid in self.roots():
            try:
                root = psutil.Process(pid)
                processes = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for process in processes:
                if process.pid in seen:
                    continue
                seen.add(process.pid)
                try:
                    cpu = process.cpu_times()
                except psutil.Error:
                    continue
                total += cpu.user + cpu.system
        return total

    def __enter__(self) -> CpuMeter:
        self._start = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = self._now() - self._start


# --- (b) monolithic ---------------------------------------------------------------------------------

def run_monolithic(manifest: pathlib.Path, work: pathlib.Path) -> dict:
    """bench/monolithic.py in a child process: start-up apart, then the timed part."""
    out, log = work / "monolithic.json", work / "monolithic.log"
    out.unlink(missing_ok=True)
    with log.open("w") as log_file:
        process = subprocess.Popen([sys.executable, str(BENCH / "monolithic.py"), "--manifest", str(manifest),
                                    "--out", str(out)], stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)
        with PeakRss([process.pid]) as peak:
            code = process.wait()
    if code != 0:
        raise RuntimeError(f"bench/monolithic.py exited with {code}; see {log}:\n{_tail(log)}")
    result = json.loads(out.read_text())
    result["peak_rss"] = peak.as_dict()
    return result


# --- (d) flytekit map_task without cornserve -------------------------------------------------------

MAPTASK_LINE = re.compile(r"^MAPTASK (.*)$", re.MULTILINE)


def run_map_task(manifest: pathlib.Path, chunk: int, work: pathlib.Path, workflow: str = "caption_manifest") -> dict:
    """`pyflyte run bench/map_task_baseline.py caption_manifest` as a child process, timed whole."""
    log = work / "map_task.log"
    command = [str(PYFLYTE), "run", str(BENCH / "map_task_baseline.py"), workflow,
               "--manifest", str(manifest), "--chunk", str(chunk)]
    started = time.perf_counter()
    with log.open("w") as log_file, CpuMeter() as cpu:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, text=True, cwd=ROOT)
        with PeakRss([process.pid]) as peak:
            stdout, _ = process.communicate()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"the map-task workflow exited with {process.returncode}; see {log}:\n"
                           f"{stdout[-2000:]}{_tail(log)}")
    output = pathlib.Path(stdout.strip().splitlines()[-1].strip())  # pyflyte prints the output FlyteFile's path
    captions = {}
    for line in output.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            captions[row["id"]] = row["caption"]
    chunks = [dict(pair.split("=", 1) for pair in match.split()) for match in MAPTASK_LINE.findall(log.read_text())]

    def total(field: str) -> float:
        return sum(float(c[field]) for c in chunks)

    items = len(captions)
    return {
        "items": items, "chunks": len(chunks), "chunk": chunk, "wall_s": wall, "items_per_s": items / wall,
        "startup_s": total("startup_s"),  # per chunk: process start (imports) to engine ready, summed
        "import_s": total("import_s"),  # per chunk: importing transformers + vLLM, summed
        "engine_s": total("engine_s"),  # per chunk: `LLM()` alone, summed
        "caption_s": total("caption_s"), "stop_s": total("stop_s"), "chunk_total_s": total("total_s"),
        "cpu_s": cpu.seconds, "cpu_ms_per_item": 1000 * cpu.seconds / items,  # start-ups included
        "chunk_figures": chunks, "peak_rss": peak.as_dict(), "captions": captions,
    }


# --- (c) one pyflyte run per item -------------------------------------------------------------------

def run_per_item(stack: PrivateStack, rows: list[dict]) -> dict:
    """`pyflyte run workflows/vlm.py caption --image ...` per item, one after another, on the stack."""
    env = {**os.environ, "CORNSERVE_REDIS_URL": stack.url}
    captions, latencies = {}, []
    started = time.perf_counter()
    with CpuMeter(stack_pids(stack)) as cpu:
        for n, row in enumerate(rows, 1):
            item_started = time.perf_counter()
            captions[row["id"]] = pyflyte_caption(row, env)
            latencies.append(time.perf_counter() - item_started)
            print(f"\r  per item {n}/{len(rows)}", end="", flush=True, file=sys.stderr)
    print(file=sys.stderr)
    wall = time.perf_counter() - started
    return {"items": len(rows), "wall_s": wall, "items_per_s": len(rows) / wall,
            "median_latency_s": statistics.median(latencies), "cpu_s": cpu.seconds,
            "cpu_ms_per_item": 1000 * cpu.seconds / len(rows), "captions": captions}


def pyflyte_caption(row: dict, env: dict[str, str]) -> str:
    done = subprocess.run(
        [str(PYFLYTE), "run", str(ROOT / "workflows" / "vlm.py"), "caption",
         "--image", row["images"][0], "--prompt", row["prompt"]],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pyflyte run for {row['id']} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


# --- ours -------------------------------------------------------------------------------------------

def run_ours(stack: PrivateStack, manifest: pathlib.Path, rows: list[dict]) -> dict:
    """`pyflyte run workflows/batch_caption.py batch_caption --manifest ...` on the warm stack. Its
    items/s are over the run's wall time less the pyflyte process's own start-up (imports, loading
    the workflow module: `pyflyte_startup_s`), which is reported apart, as (b)'s engine start-up is."""
    env = {**os.environ, "CORNSERVE_REDIS_URL": stack.url}
    started = time.perf_counter()
    done = subprocess.run([str(PYFLYTE), "run", str(ROOT / "workflows" / "batch_caption.py"), "batch_caption",
                           "--manifest", str(manifest)], capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the batch workflow exited with {done.returncode}:\n{done.stderr[-3000:]}")
    results = [json.loads(line) for line in pathlib.Path(done.stdout.strip().splitlines()[-1]).read_text().splitlines()]
    failed = [row for row in results if row["state"] != "DONE"]
    if failed:
        raise RuntimeError(f"{len(failed)} items failed, e.g. {failed[0]}")
    startup = pyflyte_startup(env)
    return {"items": len(results), "wall_s": wall - startup, "pyflyte_wall_s": wall, "pyflyte_startup_s": startup,
            "items_per_s": len(results) / (wall - startup), "pyflyte_items_per_s": len(results) / wall,
            "captions": {row["id"]: row["text"] for row in results},
            "latency_p50_s": statistics.median(row["latency_s"] for row in results)}


def pyflyte_startup(env: dict[str, str]) -> float:
    """What every `pyflyte run` of the batch workflow pays before it runs anything: the process
    start, flytekit's and our imports, loading the workflow module (median of 3)."""
    walls = []
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([str(PYFLYTE), "run", str(ROOT / "workflows" / "batch_caption.py"), "batch_caption", "--help"],
                       capture_output=True, text=True, env=env, cwd=ROOT, check=True)
        walls.append(time.perf_counter() - started)
    return statistics.median(walls)


def run_interactive(stack: PrivateStack, manifest: pathlib.Path, rows: list[dict], samples: int = 10) -> dict:
    """The latency of one interactive caption (the `caption` workflow, run in this process as
    `pyflyte run` runs it) on the idle stack, and then while a batch of `rows` runs; medians."""
    os.environ["CORNSERVE_REDIS_URL"] = stack.url
    sys.path.insert(0, str(ROOT))  # as `pyflyte run` finds the workflows package
    from workflows.vlm import caption

    image = rows[0]["images"][0]
    caption(image=image)  # warm: this process's connections
    idle = [_timed(lambda: caption(image=image)) for _ in range(samples)]
    env = {**os.environ, "CORNSERVE_REDIS_URL": stack.url}
    batch = subprocess.Popen([str(PYFLYTE), "run", str(ROOT / "workflows" / "batch_caption.py"), "batch_caption",
                              "--manifest", str(manifest)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env, cwd=ROOT)
    try:
        _wait_for_a_running_batch(stack)
        during = []
        while len(during) < samples and batch.poll() is None:
            latency = _timed(lambda: caption(image=image))
            if _batch_progress(stack) < 1.0:  # the whole caption ran while the batch ran
                during.append(latency)
    finally:
        batch.communicate()
    if len(during) < 3:
        raise RuntimeError(f"only {len(during)} captions ran wholly during the batch; use more items")
    return {"idle_s": statistics.median(idle), "during_s": statistics.median(during),
            "slowdown": statistics.median(during) / statistics.median(idle), "samples_idle": len(idle),
            "samples_during": len(during)}


def _timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _wait_for_a_running_batch(stack: PrivateStack) -> None:
    """Block (on the batch runner's stream: new batches, ended invocations) until a batch of the
    stack has ended some items."""
    import redis

    from flyte_cornserve.services.batches import runner_stream

    client = redis.Redis.from_url(stack.url)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if _batch_progress(stack) > 0:
            return
        client.xread({runner_stream(): "$"}, block=1000)
    raise RuntimeError("no batch started within 120 s")


def _batch_progress(stack: PrivateStack) -> float:
    """The newest batch's fraction of items ended."""
    import asyncio

    from flyte_cornserve.redis_server import connect_async
    from flyte_cornserve.services.batches import BatchStore

    async def newest() -> list:
        client = connect_async(stack.url)
        try:
            return await BatchStore(client).recent(1)
        finally:
            await client.aclose()

    batches = asyncio.run(newest())
    return batches[0].ended / max(1, batches[0].total) if batches else 0.0


def measure_ours(stack: PrivateStack, manifest: pathlib.Path, rows: list[dict]) -> dict:
    with PeakRss(stack_pids(stack)) as peak, CpuMeter(stack_pids(stack)) as cpu:
        result = run_ours(stack, manifest, rows)
    result.setdefault("items", len(rows))
    result.setdefault("peak_rss", peak.as_dict())
    result.setdefault("cpu_s", cpu.seconds)  # this process, its children, the stack's processes
    result.setdefault("cpu_ms_per_item", 1000 * result["cpu_s"] / result["items"])
    return result


# --- the run ----------------------------------------------------------------------------------------

@click.command()
@click.option("--items", default=1000, show_default=True, help="dataset size for (b), (d) and ours")
@click.option("--per-item-sample", default=50, show_default=True, help="items captioned by (c)")
@click.option("--map-chunk", default=100, show_default=True, help="rows per map_task instance in (d)")
@click.option("--memory-items", default=4000, show_default=True, help="dataset size of ours' second (memory) run")
@click.option("--only", default=",".join(PARTS), show_default=True, help="comma list of parts to run: b,c,d,ours")
def main(items: int, per_item_sample: int, map_chunk: int, memory_items: int, only: str) -> None:
    from flyte_cornserve.home import cornserve_home, use_project_tmp
    from flyte_cornserve.models import resolve_model

    parts = [part.strip() for part in only.split(",") if part.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise click.BadParameter(f"unknown part(s) {sorted(unknown)}; choose from {','.join(PARTS)}",
                                 param_hint="--only")
    use_project_tmp()
    work = cornserve_home() / "bench" / "batch"
    work.mkdir(parents=True, exist_ok=True)
    resolve_model(MODEL_ID)  # built once, before anything is timed
    manifest, rows = make_dataset(work / "data-seed0", items)
    print(f"dataset: {items} images, manifest {manifest}", flush=True)

    results: dict = {"items": items, "per_item_sample": per_item_sample, "map_chunk": map_chunk,
                     "memory_items": memory_items, "parts": parts, "machine": _machine()}
    last = work / "last.json"

    def save() -> None:
        last.write_text(json.dumps(results, indent=1))

    if "b" in parts:
        print("(b) monolithic vLLM: starting the engine ...", flush=True)
        results["b"] = run_monolithic(manifest, work)
        print(f"(b) {_rate(results['b'])}, start-up {results['b']['startup_s']:.1f} s", flush=True)
        save()
    if "d" in parts:
        print(f"(d) flytekit map_task, chunks of {map_chunk}, an engine per chunk ...", flush=True)
        results["d"] = run_map_task(manifest, map_chunk, work)
        print(f"(d) {_rate(results['d'])}, engine start-ups {results['d']['startup_s']:.1f} s in all", flush=True)
        save()
    if "c" in parts or "ours" in parts:
        from cornserve_builtins.encoder import EncoderTask
        from cornserve_builtins.llm import LLMTask

        started = time.perf_counter()
        with PrivateStack() as stack:
            print("private stack up; deploying the encoder and the LLM (tiny Llava) ...", flush=True)
            stack.deploy(EncoderTask(model_id=MODEL_ID), LLMTask(model_id=MODEL_ID))
            env = {**os.environ, "CORNSERVE_REDIS_URL": stack.url}
            for row in rows[:2]:  # warm-up: executors' first requests, pyflyte's first imports
                pyflyte_caption(row, env)
            results["stack_startup_s"] = time.perf_counter() - started
            print(f"stack ready and warm in {results['stack_startup_s']:.1f} s", flush=True)
            if "c" in parts:
                sample = rows[:per_item_sample]
                with PeakRss(stack_pids(stack)) as peak:
                    results["c"] = run_per_item(stack, sample)
                results["c"]["peak_rss"] = peak.as_dict()
                print(f"(c) {_rate(results['c'])}", flush=True)
                save()
            if "ours" in parts:
                _ours(stack, manifest, rows, work, memory_items, results)
                save()
    save()
    report(results)
    print(f"(raw figures: {last})")
    print(result_line(results))


def _ours(stack: PrivateStack, manifest: pathlib.Path, rows: list[dict], work: pathlib.Path,
          memory_items: int, results: dict) -> None:
    memory_manifest, memory_rows = make_dataset(work / "data-seed0", memory_items or len(rows))
    print(f"ours: warm-up batch of {len(memory_rows)} items (not measured) ...", flush=True)
    run_ours(stack, memory_manifest, memory_rows)  # the processes' allocators reach their working set
    print("ours: batch workflow ...", flush=True)
    results["ours"] = measure_ours(stack, manifest, rows)
    print(f"ours: {_rate(results['ours'])} (pyflyte start-up {results['ours']['pyflyte_startup_s']:.1f} s apart)",
          flush=True)
    if memory_items:
        print(f"ours: memory run on {memory_items} items ...", flush=True)
        results["ours_memory"] = measure_ours(stack, memory_manifest, memory_rows)
        results["ours_memory"].pop("captions", None)
        print(f"ours: {_rate(results['ours_memory'])}", flush=True)
    if memory_items:
        print(f"interactive: one caption, idle and during a batch of {memory_items} items ...", flush=True)
        results["interactive"] = run_interactive(stack, memory_manifest, memory_rows)
        print(f"interactive: {results['interactive']['idle_s'] * 1000:.0f} ms idle, "
              f"{results['interactive']['during_s'] * 1000:.0f} ms during the batch", flush=True)


# --- the report -------------------------------------------------------------------------------------

LABELS = {"b": "(b) monolithic vLLM", "c": "(c) pyflyte run per item", "d": "(d) flytekit map_task", "ours": "ours"}


def report(results: dict) -> None:
    reference = results.get("b", {}).get("captions")
    print(f"\n{'':28}{'items':>7}{'wall s':>9}{'items/s':>9}{'start-up s':>12}{'CPU ms/item':>13}{'same as (b)':>13}")
    for part in ("b", "c", "d", "ours"):
        figures = results.get(part)
        if not figures:
            continue
        startup = {"b": figures.get("startup_s"), "d": figures.get("startup_s"),
                   "c": results.get("stack_startup_s"), "ours": results.get("stack_startup_s")}[part]
        cpu = figures.get("cpu_ms_per_item")
        same = "-"
        if reference is not None and part != "b" and figures.get("captions"):
            equal, total = compare(figures["captions"], reference)
            same = f"{equal}/{total}"
        print(f"{LABELS[part]:28}{figures['items']:>7}{figures['wall_s']:>9.2f}{figures['items_per_s']:>9.1f}"
              f"{_fmt(startup, '.1f'):>12}{_fmt(cpu, '.1f'):>13}{same:>13}")
    if "b" in results:
        b = results["b"]
        print(f"(b) start-up: process start to warm engine {b['startup_s']:.1f} s (imports {b['import_s']:.1f} s, "
              f"LLM() {b['engine_s']:.1f} s), paid once, not in its wall time")
    if "d" in results:
        d = results["d"]
        print(f"(d) {d['chunks']} chunks of {d['chunk']}: per chunk, process start to engine ready "
              f"{d['startup_s'] / max(1, d['chunks']):.1f} s (imports {d['import_s'] / max(1, d['chunks']):.1f} s, "
              f"LLM() {d['engine_s'] / max(1, d['chunks']):.1f} s), "
              f"captioning {d['caption_s'] / max(1, d['chunks']):.2f} s, "
              f"shutdown {d['stop_s'] / max(1, d['chunks']):.1f} s; "
              f"start-ups are {100 * d['startup_s'] / d['wall_s']:.0f}% of its wall time")
    print("CPU ms/item: (b) the timed part only; (c) the pyflyte processes and the stack's; (d) everything, "
          "start-ups included; ours: this process, its children and the stack's")
    if "c" in results:
        print(f"(c) median latency per item (one pyflyte run) {results['c']['median_latency_s'] * 1000:.0f} ms")
    if "c" in results or "ours" in results:
        print(f"(c)/ours start-up: private stack up, executors deployed and warm, "
              f"{results.get('stack_startup_s', float('nan')):.1f} s, paid once per stack")
    memory_table(results)


def memory_table(results: dict) -> None:
    columns = [(name, results[part]["peak_rss"]) for part, name in
               (("c", "(c)"), ("ours", f"ours {results.get('items')}"),
                ("ours_memory", f"ours {results.get('memory_items')}"))
               if part in results and "peak_rss" in results[part]]
    if not columns:
        return
    growth = "ours_memory" in results and "ours" in results
    roles = sorted({role for _, peak in columns for role in peak["by_role"]})
    print(f"\npeak RSS of the stack's processes, MiB\n{'':26}" + "".join(f"{name:>12}" for name, _ in columns)
          + (f"{'growth':>10}" if growth else ""))

    def row(label: str, values: list[int | None]) -> None:
        line = f"{label:26}" + "".join(f"{_fmt(_mib(value), '.0f'):>12}" for value in values)
        if growth and values[-1] is not None and values[-2] is not None and values[-2]:
            line += f"{values[-1] / values[-2]:>9.2f}x"
        print(line)

    for role in roles:
        row(role, [peak["by_role"].get(role) for _, peak in columns])
    row("all at once (peak of sum)", [peak["total"] for _, peak in columns])
    if growth:
        small, big = results["ours"]["peak_rss"]["by_role"], results["ours_memory"]["peak_rss"]["by_role"]
        most = max(small.keys() & big.keys(), key=lambda role: big[role] / max(1, small[role]), default=None)
        if most is not None:
            print(f"from {results['items']} to {results['memory_items']} items: the largest growth is {most}'s, "
                  f"x{rss_growth(results):.2f} ({_mib(small[most]):.0f} -> {_mib(big[most]):.0f} MiB); the peak of "
                  f"the sum grows x{results['ours_memory']['peak_rss']['total'] / results['ours']['peak_rss']['total']:.2f}")


def rss_growth(results: dict) -> float | None:
    """The largest growth of one stack process's peak RSS from ours' run (`--items`) to its memory
    run (`--memory-items`), on the same stack, one after the other (the target: at most 1.10)."""
    if "ours" not in results or "ours_memory" not in results:
        return None
    small, big = results["ours"]["peak_rss"]["by_role"], results["ours_memory"]["peak_rss"]["by_role"]
    return max((big[role] / small[role] for role in small.keys() & big.keys() if small[role]), default=None)


def result_line(results: dict) -> str:
    def rate(part: str) -> float | None:
        return results[part]["items_per_s"] if part in results else None

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}" if a is not None and b else "n/a"

    ours, mono = rate("ours"), rate("b")
    equal = "n/a"
    if "ours" in results and "b" in results:
        equal = "{}/{}".format(*compare(results["ours"]["captions"], results["b"]["captions"]))
    slowdown = results.get("interactive", {}).get("slowdown")
    growth = rss_growth(results)
    return (f"RESULT items={results['items']} ours_per_s={_fmt(ours, '.1f')} monolithic_per_s={_fmt(mono, '.1f')} "
            f"ours_vs_monolithic={ratio(ours, mono)} ours_vs_per_item={ratio(ours, rate('c'))} "
            f"ours_vs_map_task={ratio(ours, rate('d'))} equal_outputs={equal} "
            f"interactive_slowdown={_fmt(slowdown, '.2f')} peak_rss_growth={_fmt(growth, '.2f')}")


def _rate(figures: dict) -> str:
    return f"{figures['items']} items in {figures['wall_s']:.2f} s = {figures['items_per_s']:.1f}/s"


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _mib(value: int | None) -> float | None:
    return None if value is None else value / MiB


def _tail(path: pathlib.Path, lines: int = 30) -> str:
    return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])


def _machine() -> dict:
    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "load_avg_at_start": os.getloadavg()}


if __name__ == "__main__":
    sys.exit(main())
