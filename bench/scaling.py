"""Scaling on backlog: the same batch with fixed deployments and with deployments that scale, side by
side in one run.

    .venv/bin/python bench/scaling.py [--items 4000] [--max-replicas 2]

A manifest of `--items` 32x32 PNGs (bench/batch.py's) is captioned through the batch workflow
(`flyte_cornserve.flyte.batch`, run in this process as `pyflyte run` runs it) on a warm private
stack that declares 8 cores (this machine may have fewer: the figure says what scaling gains here),
with the tensor cache off so that both runs encode every image:
  fixed:   the encoder and the LLM with one executor each (`Replicas()`, the default);
  scaling: the same deployments with `Replicas(min=1, max=--max-replicas)`: the control plane adds
           executors while the backlog per executor is above 4 invocations, and stops them after 60 s idle.
The fixed run goes first; the scaling run's deploy requests widen the same deployments' bounds.
Scale-ups are read from the deployments' events stream (when each new executor served, from the
batch's start). Temporary files live under `$CORNSERVE_HOME/bench/scaling/`, the raw figures in
`last.json` there.

The last line: `RESULT items=N fixed_per_s scaling_per_s scaling_vs_fixed scale_ups equal_captions`.
"""

import json
import pathlib
import sys
import time

import click

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from stack import PrivateStack  # noqa: E402
from batch import make_dataset  # noqa: E402
from tensor_cache import equal, run_batch, write  # noqa: E402


def workflows(max_replicas: int):
    """The batch workflow with fixed deployments, and with the same deployments scaling."""
    from flytekit import workflow
    from flytekit.types.file import FlyteFile

    from cornserve_builtins.encoder import EncoderTask
    from cornserve_builtins.llm import LLMTask
    from cornserve_builtins.mllm import MLLMTask
    from flyte_cornserve.flyte import batch
    from flyte_cornserve.task import Replicas, TaskOptions

    def captioner(replicas: Replicas) -> MLLMTask:
        encoder = EncoderTask(model_id="tiny-llava", options=TaskOptions(tensor_cache=False), replicas=replicas)
        return MLLMTask(model_id="tiny-llava", encoder=encoder, llm=LLMTask(model_id="tiny-llava", replicas=replicas))

    fixed, scaling = captioner(Replicas()), captioner(Replicas(min=1, max=max_replicas))

    @workflow
    def caption_fixed(manifest: FlyteFile) -> FlyteFile:
        return batch(fixed, manifest=manifest, chunk_size=100_000)

    @workflow
    def caption_scaling(manifest: FlyteFile) -> FlyteFile:
        return batch(scaling, manifest=manifest, chunk_size=100_000)

    return caption_fixed, caption_scaling


def scale_ups(stack: PrivateStack, since: float) -> list[dict]:
    """The `scaled-up` events after `since` (epoch s): which deployment, when (s after `since`)."""
    import redis

    from flyte_cornserve.protocol.deployments import deployment_events_key

    client = redis.Redis.from_url(stack.url)
    entries = client.xrange(deployment_events_key(), min=f"{int(since * 1000)}-0")
    return [{"deployment": fields[b"deployment"].decode(), "at_s": int(entry_id.split(b"-")[0]) / 1000 - since,
             "detail": fields[b"detail"].decode()}
            for entry_id, fields in entries if fields[b"event"] == b"scaled-up"]


@click.command(help=__doc__)
@click.option("--items", default=4000, show_default=True, help="images, one caption each")
@click.option("--max-replicas", default=2, show_default=True, help="the scaling run's maximum executors per deployment")
def main(items: int, max_replicas: int) -> None:
    from flyte_cornserve.home import cornserve_home, use_project_tmp

    use_project_tmp()
    work = cornserve_home() / "bench" / "scaling"
    work.mkdir(parents=True, exist_ok=True)
    _, rows = make_dataset(work / "images", items + 8)  # some repeat: no matter, the tensor cache is off
    paths = [row["images"][0] for row in rows]
    manifests = {
        "warm-up": write(work / "warm-up.jsonl", [{"id": str(n), "images": [p], "prompt": "Describe the image."}
                                                  for n, p in enumerate(paths[items:])]),
        "batch": write(work / "batch.jsonl", [{"id": str(n), "images": [p], "prompt": "Describe the image."}
                                              for n, p in enumerate(paths[:items])]),
    }
    figures: dict[str, dict] = {}
    with PrivateStack(cpu=8) as stack:
        caption_fixed, caption_scaling = workflows(max_replicas)
        print("warming up: deploying the encoder and the LLM", file=sys.stderr, flush=True)
        run_batch(stack, caption_fixed, manifests["warm-up"])
        for name, workflow in (("fixed", caption_fixed), ("scaling", caption_scaling)):
            started = time.time()
            figures[name] = run_batch(stack, workflow, manifests["batch"])
            figures[name]["scale_ups"] = scale_ups(stack, started)
            print(f"{name}: {figures[name]['items']} rows in {figures[name]['wall_s']:.1f} s = "
                  f"{figures[name]['items_per_s']:.1f}/s; stages (s from the start: first start, last end): "
                  f"encoder {figures[name]['encoder_stage']}, LLM {figures[name]['llm_stage']}; "
                  f"scale-ups {figures[name]['scale_ups']}", file=sys.stderr, flush=True)

    fixed, scaling = figures["fixed"], figures["scaling"]
    result = {
        "items": items, "fixed_per_s": round(fixed["items_per_s"], 1), "scaling_per_s": round(scaling["items_per_s"], 1),
        "scaling_vs_fixed": round(scaling["items_per_s"] / fixed["items_per_s"], 2),
        "scale_ups": len(scaling["scale_ups"]),
        "equal_captions": f"{equal(scaling['answers'], fixed['answers'])}/{len(fixed['answers'])}",
    }
    for figure in figures.values():
        figure.pop("rows", None)
    (work / "last.json").write_text(json.dumps({"figures": figures, "result": result}, indent=1))
    print()
    print(f"{'run':<10}{'rows/s':>9}{'wall s':>9}  scale-ups (s from the start)")
    for name in ("fixed", "scaling"):
        f = figures[name]
        ups = ", ".join(f"{u['deployment'].split('-')[0]} {u['at_s']:.1f}" for u in f["scale_ups"]) or "-"
        print(f"{name:<10}{f['items_per_s']:>9.1f}{f['wall_s']:>9.1f}  {ups}")
    print("RESULT " + " ".join(f"{key}={value}" for key, value in result.items()))


if __name__ == "__main__":
    main()
