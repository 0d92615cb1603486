"""Baseline (d) of bench/batch.py: batch captioning with plain flytekit, without cornserve.

    pyflyte run bench/map_task_baseline.py caption_manifest --manifest M.jsonl [--chunk 100]
    pyflyte run bench/map_task_baseline.py caption_manifest_in_process --manifest M.jsonl [--chunk 100]

What a Flyte user writes today: split the manifest into chunks, `map_task` a plain task over the
chunks -- each one starts its own vLLM engine on the model (as a pod per chunk would), captions its
chunk's images (pixels, greedy, 64 tokens, the executor's prompt format and engine settings: the
code of bench/monolithic.py), shuts the engine down and returns the captions -- and join the captions
into one JSONL file. Each chunk logs one `MAPTASK chunk=... engine_s=...` line on stderr, which
bench/batch.py parses to report the engines' start-up apart. Locally, flytekit runs the map task's
instances one after another in the `pyflyte run` process.

vLLM inside a local flytekit task. `vllm.LLM` spawns its engine core, which spawns a worker; a
spawned process first re-runs the parent's `__main__` module, here pyflyte's console script, whose
top level imports flytekit (only `main()` is behind its `__main__` guard). flytekit leaves
`lazy_module("pandas")` placeholders as module attributes (pandas is not installed), and the vLLM CPU
worker, registering its kernel overrides, scans every module attribute with `hasattr(value,
"__dict__")`, which such a placeholder answers with ImportError instead of AttributeError: the
worker dies and `LLM()` raises "Engine core initialization failed". Two ways around it, both here:

- `caption_manifest` (what bench/batch.py measures): each chunk runs bench/monolithic.py
  (`--warmup 0`) in a fresh interpreter, which never imports flytekit. This is what a pod per chunk
  pays: interpreter start, imports of torch/vLLM, engine start-up, captioning, shutdown.
- `caption_manifest_in_process`: the engine is created in the task's own process, with
  `__main__.__file__` hidden while `LLM()` starts, so the spawned processes skip re-running pyflyte's
  script. Each chunk still gets a freshly started engine, shut down (`engine_core.shutdown()`) before
  it returns, but the imports are paid once per `pyflyte run` rather than per chunk.
"""

from __future__ import annotations

import contextlib
import functools
import json
import pathlib
import subprocess
import sys
import time

from flytekit import current_context, map_task, task, workflow
from flytekit.types.file import FlyteFile

BENCH = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from monolithic import caption_rows, read_manifest, start_engine, stop_engine  # noqa: E402


@task
def split(manifest: FlyteFile, chunk: int) -> list[FlyteFile]:
    """The manifest's rows in chunks of `chunk`, one JSONL file per chunk."""
    lines = [line for line in pathlib.Path(manifest.download()).read_text().splitlines() if line.strip()]
    folder = pathlib.Path(current_context().working_directory) / "chunks"
    folder.mkdir(parents=True, exist_ok=True)
    chunks = []
    for index, first in enumerate(range(0, len(lines), chunk)):
        path = folder / f"chunk{index:05d}.jsonl"
        path.write_text("\n".join(lines[first:first + chunk]) + "\n")
        chunks.append(FlyteFile(str(path)))
    return chunks


@task
def caption_chunk(rows: FlyteFile, fresh_process: bool) -> dict[str, str]:
    """Start a vLLM engine, caption the chunk's images, stop the engine: {id: caption}."""
    path = pathlib.Path(rows.download())
    started = time.perf_counter()
    figures = _in_fresh_process(path) if fresh_process else _in_this_process(path)
    total_s = time.perf_counter() - started
    print(f"MAPTASK chunk={path.stem} items={figures['items']} total_s={total_s:.3f} "
          f"startup_s={figures['startup_s']:.3f} import_s={figures.get('import_s', 0.0):.3f} "
          f"engine_s={figures['engine_s']:.3f} "
          f"caption_s={figures['wall_s']:.3f} stop_s={figures['stop_s']:.3f}", file=sys.stderr, flush=True)
    return figures["captions"]


def _in_fresh_process(path: pathlib.Path) -> dict:
    out, log = path.with_suffix(".out.json"), path.with_suffix(".log")
    with log.open("w") as log_file:
        done = subprocess.run([sys.executable, str(BENCH / "monolithic.py"), "--manifest", str(path),
                               "--out", str(out), "--warmup", "0"], stdout=log_file, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"the chunk worker exited with {done.returncode}:\n{tail}")
    return json.loads(out.read_text())


def _in_this_process(path: pathlib.Path) -> dict:
    chunk_rows = read_manifest(path)
    started = time.perf_counter()
    with _spawn_without_main():
        llm, tokenizer = start_engine()
    engine_s = time.perf_counter() - started
    started = time.perf_counter()
    captions = caption_rows(llm, tokenizer, chunk_rows)
    wall_s = time.perf_counter() - started
    started = time.perf_counter()
    stop_engine(llm)
    del llm
    return {"items": len(chunk_rows), "startup_s": engine_s, "engine_s": engine_s, "wall_s": wall_s,
            "stop_s": time.perf_counter() - started, "captions": captions}


@contextlib.contextmanager
def _spawn_without_main():
    """Hide `__main__.__file__`, so processes spawned meanwhile do not re-run pyflyte's script."""
    main = sys.modules["__main__"]
    path = main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        if path is not None:
            main.__file__ = path


@task
def join(parts: list[dict[str, str]]) -> FlyteFile:
    """All captions, one JSON object per line: {"id": ..., "caption": ...}."""
    path = pathlib.Path(current_context().working_directory) / "captions.jsonl"
    with path.open("w") as out:
        for part in parts:
            for item_id, text in part.items():
                out.write(json.dumps({"id": item_id, "caption": text}) + "\n")
    return FlyteFile(str(path))


@workflow
def caption_manifest(manifest: FlyteFile, chunk: int = 100) -> FlyteFile:
    """Each chunk in a fresh interpreter (a pod per chunk)."""
    chunks = split(manifest=manifest, chunk=chunk)
    return join(parts=map_task(functools.partial(caption_chunk, fresh_process=True))(rows=chunks))


@workflow
def caption_manifest_in_process(manifest: FlyteFile, chunk: int = 100) -> FlyteFile:
    """Each chunk's engine started in the `pyflyte run` process itself."""
    chunks = split(manifest=manifest, chunk=chunk)
    return join(parts=map_task(functools.partial(caption_chunk, fresh_process=False))(rows=chunks))
