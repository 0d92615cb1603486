"""The tensor cache on a VQA-style batch: each image encoded once, however many questions ask about
it, and not at all when the same images come again under new paths. Side by side in one run:

    .venv/bin/python bench/tensor_cache.py [--images 200] [--questions 5]

A manifest of `--images` distinct 32x32 PNGs (distinct bytes) x `--questions` prompts each (row `i-q`), captioned
through the batch workflow (`flyte_cornserve.flyte.batch`, run in this process as `pyflyte run`
runs it) on a warm private stack, with Flyte's cache off, so that only our tensor cache can save
work:
  off:        the encoder's `TaskOptions(tensor_cache=False)`: every row is encoded;
  on:         the default: rows with equal images are joined, a stored output is taken as it is;
  renamed:    the same images copied under new paths (new file names, same bytes), tensor cache on;
  monolithic: one `vllm.LLM` in one process (bench/monolithic.py, a child process, started and
              warmed up before its clock starts), pixels in: its engine dedupes images within itself.
Encoder and LLM invocations are counted as the items of the batch invocations each stage received
(their records). Answers are compared by row id across all four. Temporary files live under
`$CORNSERVE_HOME/bench/tensor_cache/`, the raw figures in `last.json` there.

The last line: `RESULT items=N images=M on_per_s off_per_s renamed_per_s monolithic_per_s
encoder_invocations_on encoder_invocations_off encoder_invocations_renamed llm_invocations_renamed
equal_on_off equal_renamed_off equal_monolithic_off` (equal_X_off: rows whose answer equals off's).
"""


import asyncio
import json
import os
import pathlib
import shutil
import sys
import time

import click

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from batch import make_dataset, run_monolithic  # noqa: E402
from stack import PrivateStack  # noqa: E402

QUESTIONS = ("Describe the image.", "What is in the picture?", "Which shape is it?", "What colour is it?",
             "What is the background?")


def distinct_images(folder: pathlib.Path, count: int) -> list[str]:
    """`count` images of distinct content (bench/batch.py's generator repeats one now and then: two of
    its first 200 are copies of others)."""
    import xxhash

    seen: set[str] = set()
    paths: list[str] = []
    _, rows = make_dataset(folder, count + count // 10 + 10, seed=12)
    for row in rows:
        digest = xxhash.xxh3_128_hexdigest(pathlib.Path(row["images"][0]).read_bytes())
        if digest not in seen:
            seen.add(digest)
            paths.append(row["images"][0])
    if len(paths) < count:
        raise RuntimeError(f"only {len(paths)} distinct images")
    return paths[:count]


def vqa_rows(images: list[str], questions: int) -> list[dict]:
    return [{"id": f"{i}-{q}", "images": [image], "prompt": QUESTIONS[q % len(QUESTIONS)]}
            for i, image in enumerate(images) for q in range(questions)]


def write(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def workflows():
    """The batch workflow twice: the captioner with the tensor cache, and without."""
    from flytekit import workflow
    from flytekit.types.file import FlyteFile

    from cornserve_builtins.encoder import EncoderTask
    from cornserve_builtins.mllm import MLLMTask
    from flyte_cornserve.flyte import batch
    from flyte_cornserve.task import TaskOptions

    cached = MLLMTask(model_id="tiny-llava")
    uncached = MLLMTask(model_id="tiny-llava", encoder=EncoderTask(model_id="tiny-llava",
                                                                    options=TaskOptions(tensor_cache=False)))

    @workflow
    def vqa(manifest: FlyteFile) -> FlyteFile:
        return batch(cached, manifest=manifest, chunk_size=100_000)

    @workflow
    def vqa_uncached(manifest: FlyteFile) -> FlyteFile:
        return batch(uncached, manifest=manifest, chunk_size=100_000)

    return vqa, vqa_uncached


def run_batch(stack: PrivateStack, workflow, manifest: pathlib.Path) -> dict:
    """One batch, timed; its rows and answers, and the items its encoder and LLM invocations carried."""
    from flyte_cornserve.protocol.invocations import InvocationStore, Priority, RECENT_LIMIT

    started_at, started = time.time(), time.perf_counter()
    rows = [json.loads(line) for line in pathlib.Path(workflow(manifest=str(manifest)).path).read_text().splitlines()]
    wall = time.perf_counter() - started
    failed = [row for row in rows if row["state"] != "DONE"]
    if failed:
        raise RuntimeError(f"{len(failed)} rows failed, e.g. {failed[0]}")

    async def records():
        from flyte_cornserve import redis_server

        store = InvocationStore(redis_server.connect_async(stack.url))
        try:
            return [r for r in await store.recent(RECENT_LIMIT) if r.priority is Priority.BATCH and r.created_at >= started_at]
        finally:
            await store.redis.aclose()

    found = asyncio.run(records())

    def span(label: str) -> dict:
        """When the stage's first invocation started and its last one ended, from the batch's start."""
        stage = [r for r in found if r.label.startswith(label) and r.started_at and r.finished_at]
        if not stage:
            return {}
        return {"first_start_s": min(r.started_at for r in stage) - started_at,
                "last_end_s": max(r.finished_at for r in stage) - started_at,
                "invocations": len(stage)}

    return {"items": len(rows), "started_at": started_at, "wall_s": wall, "items_per_s": len(rows) / wall,
            "encoder_stage": span("EncoderTask"), "llm_stage": span("LLMTask"),
            "encoder_invocations": sum(r.items for r in found if r.label.startswith("EncoderTask")),
            "llm_invocations": sum(r.items for r in found if r.label.startswith("LLMTask")),
            "answers": {row["id"]: row.get("text") for row in rows}, "rows": rows}


def equal(a: dict[str, str], b: dict[str, str]) -> int:
    return sum(a[key].strip() == b.get(key, "").strip() for key in a)


@click.command(help=__doc__)
@click.option("--images", default=200, show_default=True, help="distinct images")
@click.option("--questions", default=5, show_default=True, help="prompts per image")
def main(images: int, questions: int) -> None:
    from flyte_cornserve.home import cornserve_home, use_project_tmp

    use_project_tmp()
    work = cornserve_home() / "bench" / "tensor_cache"
    work.mkdir(parents=True, exist_ok=True)
    paths = distinct_images(work / "images", images)
    copies = work / f"copies-{os.getpid()}"  # new paths each run: never seen by a stack before
    copies.mkdir()
    renamed_paths = [str(shutil.copyfile(path, copies / f"copy-{n}.png")) for n, path in enumerate(paths)]
    _, warm_rows = make_dataset(work / "warm-up", 4, seed=13)
    manifests = {
        "warm-up": write(work / "warm-up.jsonl", vqa_rows([row["images"][0] for row in warm_rows], 2)),
        "vqa": write(work / "vqa.jsonl", vqa_rows(paths, questions)),
        "renamed": write(work / "renamed.jsonl", vqa_rows(renamed_paths, questions)),
    }
    figures: dict[str, dict] = {}
    try:
        with PrivateStack() as stack:
            vqa, vqa_uncached = workflows()
            print("warming up: deploying the encoder and the LLM", file=sys.stderr, flush=True)
            run_batch(stack, vqa, manifests["warm-up"])
            for name, workflow, manifest in (("off", vqa_uncached, manifests["vqa"]), ("on", vqa, manifests["vqa"]),
                                             ("renamed", vqa, manifests["renamed"])):
                figures[name] = run_batch(stack, workflow, manifest)
                print(f"{name}: {figures[name]['items']} rows in {figures[name]['wall_s']:.1f} s = "
                      f"{figures[name]['items_per_s']:.1f}/s; encoder items {figures[name]['encoder_invocations']}, "
                      f"LLM items {figures[name]['llm_invocations']}; stages (s from the start: first start, "
                      f"last end): encoder {figures[name]['encoder_stage']}, LLM {figures[name]['llm_stage']}",
                      file=sys.stderr, flush=True)
        monolithic = run_monolithic(manifests["vqa"], work)
        figures["monolithic"] = {"items": monolithic["items"], "wall_s": monolithic["wall_s"],
                                 "items_per_s": monolithic["items_per_s"], "startup_s": monolithic["startup_s"],
                                 "answers": monolithic["captions"]}
    finally:
        shutil.rmtree(copies, ignore_errors=True)

    off = figures["off"]["answers"]
    result = {
        "items": len(off), "images": images,
        **{f"{name}_per_s": round(figures[name]["items_per_s"], 1) for name in ("on", "off", "renamed", "monolithic")},
        **{f"encoder_invocations_{name}": figures[name]["encoder_invocations"] for name in ("on", "off", "renamed")},
        "llm_invocations_renamed": figures["renamed"]["llm_invocations"],
        **{f"equal_{name}_off": f"{equal(figures[name]['answers'], off)}/{len(off)}"
           for name in ("on", "renamed", "monolithic")},
    }
    for figure in figures.values():
        figure.pop("rows", None)
    (work / "last.json").write_text(json.dumps({"figures": figures, "result": result}, indent=1))
    print()
    print(f"{'run':<12}{'rows/s':>9}{'encoder items':>15}{'LLM items':>11}{'answers = off':>15}")
    for name in ("off", "on", "renamed", "monolithic"):
        f = figures[name]
        print(f"{name:<12}{f['items_per_s']:>9.1f}{f.get('encoder_invocations', '-'):>15}"
              f"{f.get('llm_invocations', '-'):>11}{equal(f['answers'], off):>10}/{len(off)}")
    print("RESULT " + " ".join(f"{key}={value}" for key, value in result.items()))


if __name__ == "__main__":
    main()
