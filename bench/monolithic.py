"""Baseline (b) of bench/batch.py: one vLLM engine in one process captions a whole manifest.

    .venv/bin/python bench/monolithic.py --manifest M.jsonl --out result.json

The engine is started and warmed up (a few requests) before the clock starts; the timed part reads
every image from its file (PIL open + convert RGB) and generates all prompts at once with pixel
inputs, greedy, 64 tokens. The prompt is the model's chat template around one image slot, exactly as
the project's vLLM executor builds it (`VLLMHandler.format_prompt`), and the engine has the
executor's settings. vLLM starts its engine core with spawn, so this runs as a script with a
`__main__` guard (bench/batch.py runs it as a child process; the map-task baseline runs it with
`--warmup 0` as its per-chunk worker). Writes startup and timing figures, the CPU seconds of this
process tree during the timed part, and the captions by id as JSON.

Keep flytekit out of this module's top level: a process whose `__main__` imports flytekit at top
level cannot start vLLM (see bench/map_task_baseline.py).

The helpers here (`engine_env`, `start_engine`, `caption_rows`, `stop_engine`) are shared with the
map-task baseline (bench/map_task_baseline.py), so both baselines run the very same engine settings.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

MODEL_ID = "tiny-llava"
MAX_TOKENS = 64
WARMUP_REQUESTS = 4


def engine_env() -> None:
    """The environment the project's vLLM executor sets (flyte_cornserve/executors/vllm_engine.py)."""
    from flyte_cornserve.home import cornserve_home

    for name, folder in (("VLLM_CACHE_ROOT", "vllm"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
        os.environ.setdefault(name, str(cornserve_home() / folder))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def start_engine(model_id: str = MODEL_ID):
    """(llm, tokenizer): a `vllm.LLM` with the executor's settings, and the model's tokenizer."""
    engine_env()
    from transformers import AutoConfig, AutoTokenizer
    from vllm import LLM

    from flyte_cornserve.models import resolve_model

    path = resolve_model(model_id)
    config = AutoConfig.from_pretrained(path)
    text_config = getattr(config, "text_config", config)
    llm = LLM(
        model=str(path), dtype="float32", enforce_eager=True, seed=0,
        max_model_len=min(256, text_config.max_position_embeddings), disable_log_stats=True,
    )
    return llm, AutoTokenizer.from_pretrained(path)


def chat_prompt(tokenizer, prompt: str, images: int = 1) -> str:
    """`VLLMHandler.format_prompt`: the chat template around the prompt, one image slot per image."""
    content = [{"type": "image"}] * images + [{"type": "text", "text": prompt}]
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    return "<image>" * images + prompt


def load_image(path: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def caption_rows(llm, tokenizer, rows: list[dict], max_tokens: int = MAX_TOKENS) -> dict[str, str]:
    """Read each row's images and generate every row's caption in one `LLM.generate` call."""
    from vllm import SamplingParams

    prompts = [
        {"prompt": chat_prompt(tokenizer, row["prompt"], len(row["images"])),
         "multi_modal_data": {"image": [load_image(p) for p in row["images"]]}}
        for row in rows
    ]
    for prompt in prompts:  # one image: pass it bare, as a single-image request
        if len(prompt["multi_modal_data"]["image"]) == 1:
            prompt["multi_modal_data"]["image"] = prompt["multi_modal_data"]["image"][0]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return {row["id"]: output.outputs[0].text for row, output in zip(rows, outputs, strict=True)}


def stop_engine(llm) -> None:
    """Shut the engine core process down now (not at interpreter exit)."""
    llm.llm_engine.engine_core.shutdown()


def read_manifest(path: str | os.PathLike) -> list[dict]:
    with open(path) as lines:
        return [json.loads(line) for line in lines if line.strip()]


def tree_cpu_s() -> float:
    """User + system CPU seconds of this process and its live descendants (the engine core)."""
    import psutil

    total = 0.0
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def main() -> None:
    import argparse

    import psutil

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--warmup", type=int, default=WARMUP_REQUESTS, help="warm-up requests before timing")
    args = parser.parse_args()
    process_start = psutil.Process().create_time()

    rows = read_manifest(args.manifest)
    started = time.perf_counter()
    import transformers  # noqa: F401 - timed apart from the engine's start
    import vllm  # noqa: F401

    import_s = time.perf_counter() - started
    started = time.perf_counter()
    llm, tokenizer = start_engine()
    engine_s = time.perf_counter() - started
    started = time.perf_counter()
    if args.warmup > 0:
        caption_rows(llm, tokenizer, rows[: args.warmup])
    warmup_s = time.perf_counter() - started
    startup_s = time.time() - process_start  # interpreter, imports, engine, warm-up
    print(f"monolithic: vLLM imported in {import_s:.1f} s, engine ready in {engine_s:.1f} s, warm-up {warmup_s:.2f} s "
          f"(process start to ready {startup_s:.1f} s)", file=sys.stderr, flush=True)

    cpu_before = tree_cpu_s()
    started = time.perf_counter()
    captions = caption_rows(llm, tokenizer, rows)
    wall = time.perf_counter() - started
    cpu = tree_cpu_s() - cpu_before

    started = time.perf_counter()
    stop_engine(llm)
    stop_s = time.perf_counter() - started
    result = {
        "items": len(rows), "startup_s": startup_s, "import_s": import_s, "engine_s": engine_s, "warmup_s": warmup_s,
        "wall_s": wall, "items_per_s": len(rows) / wall, "cpu_s": cpu, "cpu_ms_per_item": 1000 * cpu / len(rows),
        "stop_s": stop_s, "captions": captions,
    }
    pathlib.Path(args.out).write_text(json.dumps(result))
    print(f"monolithic: {len(rows)} captions in {wall:.2f} s = {len(rows) / wall:.1f}/s, "
          f"{1000 * cpu / len(rows):.1f} CPU ms per item", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
