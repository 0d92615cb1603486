"""The Elastic encoder stage vs the warm encoder executor: the same images encoded both ways, side by
side in one run.

    .venv/bin/python bench/elastic_encode.py [--images 2000]

A manifest of `--images` 32x32 PNGs (bench/batch.py's `make_dataset`), one row `{"id", "data"}` per
image, goes through the batch workflow (`flyte_cornserve.flyte.batch`, run in this process as
`pyflyte run` runs it) over an encoder-only task, one chunk, on a private stack (bench/stack.py),
with the tensor cache off in both, so that neither finds the other's outputs:
  warm:    `EncoderTask(model_id="tiny-llava")`: the chunk's items go to the warm encoder executor
           (deployed, and a small warm-up batch run, before the clock starts);
  elastic: `EncoderTask(..., descriptor=ElasticEncode(nproc_per_node=2))`: the chunk's Elastic job
           (`flyte_cornserve.flyte.elastic`: kfpytorch's `elastic_launch`, 2 local processes, gloo)
           encodes every item before the chunk's batch node, which then only collects them.
Both rates (`*_per_s`) are the images over the workflow call's wall time, whole (planning, the
stage, the batch node, the merge). Besides, each run's encode phase alone (`*_encode_per_s`): for
warm, from the encoder's first batch invocation starting to its last one ending (their records); for
elastic, from the first rank's first micro batch to the last rank's last one ending.

The Elastic job's start-up is measured inside it: the stage's task function is wrapped here (this
module's wrapper travels to the ranks by value, with cloudpickle, as the stage's own function does)
so that each rank writes when its process was created, when its function began, when the encoder
handler began and ended loading the model (`EncoderHandler.start`), when its first micro batch began
and its last one ended, and when its function returned. `elastic_startup_s` = from the stage's call
(`ElasticStage.execute`, in this process) until the last rank had its model loaded. As a cross-check
the stage is also run, once, on a chunk of `--tiny` (2) images before the timed runs
(`elastic_tiny_stage_s`, the whole stage's wall time: nearly all fixed cost). The stage's wall time
also holds a fixed tail after the ranks' functions return: torch elastic's agent looks at its
workers every `monitor_interval` seconds (kfpytorch's default, 5 s, which the stage keeps), then the
processes exit and the agent tears its rendezvous down; `--monitor-interval` sets it for one run, to
see what it costs.

The embeddings are read back from the sidecar right after each run (an encoder-only batch puts them
with no pins: cached for 10 min) and compared row by row (`torch.allclose`, default tolerances); the
largest absolute difference of any element is reported too. Temporary files live under
`$CORNSERVE_HOME/bench/elastic_encode/`, the raw figures in `last.json` there.

The last line: `RESULT images=N warm_per_s elastic_per_s elastic_vs_warm warm_encode_per_s
elastic_encode_per_s elastic_startup_s elastic_stage_s elastic_tiny_stage_s elastic_executor_items
monitor_interval_s equal max_abs_diff`, where elastic_stage_s is the stage's wall time in the timed
run, elastic_executor_items counts the items that executors still received in the Elastic run (0
when the stage encoded them all), and equal is rows allclose / N.
"""

import json
import os
import pathlib
import shutil
import sys
import time

import click

# The Elastic stage's ranks are spawned interpreters that import this module again (as
# `__mp_main__`): what it imports at the top is in their start-up, so only what they need is here.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

MODEL_ID = "tiny-llava"
ENV_MARKS = "CORNSERVE_BENCH_ELASTIC_MARKS"  # where the ranks write their timings (inherited by them)


# --- the two tasks, their workflows ------------------------------------------------------------------

def tasks():
    from cornserve_builtins.encoder import ElasticEncode, EncoderTask
    from flyte_cornserve.task import TaskOptions

    off = TaskOptions(tensor_cache=False)
    return (EncoderTask(model_id=MODEL_ID, options=off),
            EncoderTask(model_id=MODEL_ID, descriptor=ElasticEncode(nproc_per_node=2), options=off))


def workflows(warm, elastic):
    """A batch of the encoder itself, each way, in one chunk whatever the manifest's size."""
    from flytekit import workflow
    from flytekit.types.file import FlyteFile

    from flyte_cornserve.flyte import batch

    @workflow
    def encode_warm(manifest: FlyteFile) -> FlyteFile:
        return batch(warm, manifest=manifest, chunk_size=100_000)

    @workflow
    def encode_elastic(manifest: FlyteFile) -> FlyteFile:
        return batch(elastic, manifest=manifest, chunk_size=100_000)

    return encode_warm, encode_elastic


def write_manifest(path: pathlib.Path, images: list[str]) -> pathlib.Path:
    path.write_text("".join(json.dumps({"id": f"img{i:05d}", "data": image}) + "\n" for i, image in enumerate(images)))
    return path


# --- timing the Elastic stage, outside and inside ----------------------------------------------------

def rank_timer(function):
    """`function` (the stage's task function) wrapped to write this rank's timings to
    `$CORNSERVE_BENCH_ELASTIC_MARKS/rank-<RANK>.json`. Runs in the rank: everything it needs is
    imported inside."""

    def timed_rank(**kwargs):
        import json as json_
        import os as os_
        import time as time_

        entered = time_.time()
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:  # to the tick (psutil: to the second)
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
            alive = float(uptime.read().split()[0]) - ticks / os_.sysconf("SC_CLK_TCK")
        marks = {"created": entered - alive, "entered": entered, "items": 0, "batches": 0}
        from flyte_cornserve.executors.encoder import EncoderHandler

        start, handle = EncoderHandler.start, EncoderHandler.handle

        async def timed_start(self):
            marks["load_began"] = time_.time()
            await start(self)
            marks["load_ended"] = time_.time()

        async def timed_handle(self, batch):
            marks.setdefault("encode_began", time_.time())
            try:
                return await handle(self, batch)
            finally:
                marks["encode_ended"] = time_.time()
                marks["items"] += len(batch)
                marks["batches"] += 1

        EncoderHandler.start, EncoderHandler.handle = timed_start, timed_handle
        try:
            return function(**kwargs)
        finally:
            marks["returned"] = time_.time()
            folder = os_.environ.get(ENV_MARKS)
            if folder:
                with open(os_.path.join(folder, f"rank-{os_.environ.get('RANK', '0')}.json"), "w") as out:
                    json_.dump(marks, out)

    return timed_rank


class StageClock:
    """Wraps the Elastic stage task (`execute`, called once per chunk by the fan-out) and the batch
    node's local run (`run_chunks_locally`) to note when each began and ended, in this process."""

    def __init__(self, stage) -> None:
        from flyte_cornserve.flyte import batch_task

        self.marks: dict[str, float] = {}
        execute = stage.execute
        run_chunks = batch_task.run_chunks_locally

        def timed_execute(**kwargs):
            self.marks["stage_began"] = time.time()
            try:
                return execute(**kwargs)
            finally:
                self.marks["stage_ended"] = time.time()

        def timed_run_chunks(*args, **kwargs):
            self.marks["batch_node_began"] = time.time()
            try:
                return run_chunks(*args, **kwargs)
            finally:
                self.marks["batch_node_ended"] = time.time()

        stage.execute = timed_execute  # the instance's, over the class's method
        stage._task_function = rank_timer(stage._task_function)  # what `elastic_launch` pickles for the ranks
        batch_task.run_chunks_locally = timed_run_chunks

    def reset(self) -> None:
        self.marks = {}


def elastic_phases(clock: dict[str, float], folder: pathlib.Path, started_at: float) -> dict:
    """The stage's timeline (seconds from the workflow call) from this process's marks and the ranks'."""
    ranks = [json.loads(path.read_text()) for path in sorted(folder.glob("rank-*.json"))]
    if not ranks or any("load_ended" not in r for r in ranks):
        raise RuntimeError(f"the ranks' timings are missing in {folder}: {ranks}")
    began = clock["stage_began"]
    encoding = [r for r in ranks if "encode_began" in r]
    phases = {
        "ranks": len(ranks),
        "stage_began_s": began - started_at,
        "stage_s": clock["stage_ended"] - began,
        "startup_s": max(r["load_ended"] for r in ranks) - began,  # until every rank can encode
        "first_rank_ready_s": min(r["load_ended"] for r in ranks) - began,
        "per_rank": [{
            "items": r["items"], "micro_batches": r["batches"],
            "process_created_s": r["created"] - began,  # spawn: the elastic agent, then the interpreter
            "function_began_s": r["entered"] - began,  # imports, flytekit's setup, unpickling the function
            "model_load_began_s": r["load_began"] - began,
            "model_loaded_s": r["load_ended"] - began,
            "encode_began_s": r.get("encode_began", r["load_ended"]) - began,
            "encode_ended_s": r.get("encode_ended", r["load_ended"]) - began,
            "returned_s": r["returned"] - began,  # after the barrier; rank 0 after writing the chunk
        } for r in ranks],
        "after_ranks_s": clock["stage_ended"] - max(r["returned"] for r in ranks),  # the elastic agent's
        "batch_node_s": clock["batch_node_ended"] - clock["batch_node_began"],
    }
    if encoding:
        window = max(r["encode_ended"] for r in encoding) - min(r["encode_began"] for r in encoding)
        phases["encode_s"] = window
        phases["encoded_items"] = sum(r["items"] for r in ranks)
        phases["after_encode_s"] = clock["stage_ended"] - max(r["encode_ended"] for r in encoding)
    return phases


# --- one run -----------------------------------------------------------------------------------------

def run_batch(stack, workflow, manifest: pathlib.Path) -> dict:
    """One batch, timed (`tensor_cache.run_batch`); its rows; the items and span of the executors'
    encoder invocations it made."""
    import tensor_cache  # here, not at the top: the ranks import this module too

    figures = tensor_cache.run_batch(stack, workflow, manifest)
    stage = figures["encoder_stage"]
    return {"images": figures["items"], "started_at": figures["started_at"], "wall_s": figures["wall_s"],
            "per_s": figures["items_per_s"], "executor_items": figures["encoder_invocations"],
            "executor_invocations": stage.get("invocations", 0), "rows": figures["rows"],
            **({"executor_span": {"first_start_s": stage["first_start_s"], "last_end_s": stage["last_end_s"]}}
               if stage else {})}


def read_embeddings(rows: list[dict]) -> dict:
    """Each row's embeddings, copied out of the sidecar (they are cached there, unpinned, for 10 min)."""
    from flyte_cornserve.sidecar.client import SidecarClient
    from flyte_cornserve.task import TensorRef

    sidecar = SidecarClient()
    try:
        refs = [TensorRef.model_validate(row["embeddings"]) for row in rows]
        return {row["id"]: tensor.clone() for row, tensor in zip(rows, sidecar.get_many(refs), strict=True)}
    finally:
        sidecar.close()


def compare(a: dict, b: dict) -> tuple[int, float]:
    """(rows whose tensors are allclose, the largest absolute difference of any element) over a's ids."""
    import torch

    equal, worst = 0, 0.0
    for key, tensor in a.items():
        other = b.get(key)
        if other is None or other.shape != tensor.shape:
            worst = float("inf")
            continue
        equal += bool(torch.allclose(tensor.float(), other.float()))
        worst = max(worst, (tensor.float() - other.float()).abs().max().item())
    return equal, worst


@click.command(help=__doc__)
@click.option("--images", default=2000, show_default=True, help="images to encode, each way")
@click.option("--tiny", default=2, show_default=True, help="images of the stage's start-up cross-check")
@click.option("--monitor-interval", type=int, default=None,
              help="set the stage's Elastic monitor_interval (s) for this run (default: the stage's own)")
def main(images: int, tiny: int, monitor_interval: int | None) -> None:
    from batch import make_dataset
    from stack import PrivateStack

    from flyte_cornserve.flyte.elastic import stage_task
    from flyte_cornserve.home import cornserve_home, use_project_tmp

    use_project_tmp()
    work = cornserve_home() / "bench" / "elastic_encode"
    work.mkdir(parents=True, exist_ok=True)
    _, rows = make_dataset(work / "images", images)
    paths = [row["images"][0] for row in rows]
    manifests = {"warm-up": write_manifest(work / "warm-up.jsonl", paths[:8]),
                 "tiny": write_manifest(work / "tiny.jsonl", paths[:tiny]),
                 "images": write_manifest(work / f"images-{images}.jsonl", paths)}
    warm_task, elastic_task = tasks()
    encode_warm, encode_elastic = workflows(warm_task, elastic_task)
    stage_ = stage_task(elastic_task)
    if monitor_interval is not None:  # an experiment: how long the agent takes to see its workers end
        stage_.task_config.monitor_interval = monitor_interval
    monitor = stage_.task_config.monitor_interval
    clock = StageClock(stage_)
    figures: dict[str, dict] = {}
    embeddings: dict[str, dict] = {}

    def elastic_run(name: str, manifest: pathlib.Path) -> None:
        marks = work / f"marks-{os.getpid()}-{name}"
        marks.mkdir()
        os.environ[ENV_MARKS] = str(marks)
        clock.reset()
        figures[name] = run_batch(stack, encode_elastic, manifest)
        figures[name]["stage"] = elastic_phases(clock.marks, marks, figures[name]["started_at"])
        shutil.rmtree(marks)  # read: they are in last.json

    with PrivateStack() as stack:
        print("warming up: deploying the warm encoder, a batch of 8", file=sys.stderr, flush=True)
        stack.deploy(warm_task)
        run_batch(stack, encode_warm, manifests["warm-up"])
        print(f"the Elastic stage on {tiny} images (its fixed cost)",
              file=sys.stderr, flush=True)
        elastic_run("elastic_tiny", manifests["tiny"])
        print(f"warm: {images} images", file=sys.stderr, flush=True)
        figures["warm"] = run_batch(stack, encode_warm, manifests["images"])
        embeddings["warm"] = read_embeddings(figures["warm"]["rows"])  # at once: cached (unpinned) for 10 min
        print(f"elastic: {images} images", file=sys.stderr, flush=True)
        elastic_run("elastic", manifests["images"])
        embeddings["elastic"] = read_embeddings(figures["elastic"]["rows"])

    equal, max_abs_diff = compare(embeddings["warm"], embeddings["elastic"])
    warm, elastic, tiny_run = figures["warm"], figures["elastic"], figures["elastic_tiny"]
    stage = elastic["stage"]
    span = warm.get("executor_span", {})
    warm_encode_s = span["last_end_s"] - span["first_start_s"] if span else float("nan")
    result = {
        "images": images,
        "warm_per_s": round(warm["per_s"], 1),
        "elastic_per_s": round(elastic["per_s"], 1),
        "elastic_vs_warm": round(elastic["per_s"] / warm["per_s"], 2),
        "warm_encode_per_s": round(images / warm_encode_s, 1),
        "elastic_encode_per_s": round(images / stage["encode_s"], 1) if "encode_s" in stage else "n/a",
        "elastic_startup_s": round(stage["startup_s"], 2),
        "elastic_stage_s": round(stage["stage_s"], 2),
        "elastic_tiny_stage_s": round(tiny_run["stage"]["stage_s"], 2),
        "elastic_executor_items": elastic["executor_items"],
        "monitor_interval_s": monitor,
        "equal": f"{equal}/{images}",
        "max_abs_diff": f"{max_abs_diff:.3g}",
    }
    for run in figures.values():
        run.pop("rows")
    (work / "last.json").write_text(json.dumps({"figures": figures, "result": result}, indent=1))

    print()
    print(f"{'run':<34}{'images':>7}{'wall s':>8}{'images/s':>10}{'encode s':>10}{'encode/s':>10}{'start-up s':>12}")
    print(f"{'warm executor':<34}{images:>7}{warm['wall_s']:>8.2f}{warm['per_s']:>10.1f}{warm_encode_s:>10.2f}"
          f"{images / warm_encode_s:>10.1f}{'-':>12}")
    for label, run in (("elastic, 2 processes", elastic), (f"elastic, 2 processes, {tiny} images", tiny_run)):
        s = run["stage"]
        encode = f"{s['encode_s']:>10.2f}{run['images'] / s['encode_s']:>10.1f}" if "encode_s" in s else f"{'-':>10}{'-':>10}"
        print(f"{label:<34}{run['images']:>7}{run['wall_s']:>8.2f}{run['per_s']:>10.1f}{encode}{s['startup_s']:>12.2f}")
    print()
    print(f"elastic run, seconds from the stage's call: stage {stage['stage_s']:.2f} (began {stage['stage_began_s']:.2f} s "
          f"into the workflow call), batch node after it {stage['batch_node_s']:.2f}, "
          f"from the last encode until the stage returned {stage.get('after_encode_s', float('nan')):.2f}, of which "
          f"{stage['after_ranks_s']:.2f} after every rank's function had returned (the elastic agent: it looks at "
          f"its workers every {monitor:g} s, then tears down)")
    print(f"{'rank':<6}{'items':>7}{'created':>9}{'function':>10}{'load from':>11}{'loaded':>8}{'encode from':>13}"
          f"{'to':>7}{'returned':>10}")
    for n, r in enumerate(stage["per_rank"]):
        print(f"{n:<6}{r['items']:>7}{r['process_created_s']:>9.2f}{r['function_began_s']:>10.2f}"
              f"{r['model_load_began_s']:>11.2f}{r['model_loaded_s']:>8.2f}{r['encode_began_s']:>13.2f}"
              f"{r['encode_ended_s']:>7.2f}{r['returned_s']:>10.2f}")
    print(f"embeddings allclose: {equal}/{images}, largest absolute difference {max_abs_diff:.3g}; "
          f"items executors received in the elastic run: {elastic['executor_items']}")
    print("RESULT " + " ".join(f"{key}={value}" for key, value in result.items()))


if __name__ == "__main__":
    main()
