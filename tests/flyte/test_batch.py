"""Batch inference over a dataset, on the real stack: `pyflyte run` of the batch workflow, a composite
task of this module, stages that overlap, Flyte's cache per chunk, remote images, per-item retries."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import random
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pytest
import redis
import redis.asyncio as aioredis
from flytekit import workflow
from flytekit.types.file import FlyteFile
from flytekit.types.structured import StructuredDataset
from PIL import Image
from pydantic import Field

from cornserve_builtins.encoder import EncoderInput, EncoderTask
from cornserve_builtins.llm import LLMInput, LLMTask, SamplingParams
from cornserve_builtins.mllm import MLLMTask
from flyte_cornserve.flyte import batch
from flyte_cornserve.models.tiny import COLORS, PROMPT, SHAPES, draw
from flyte_cornserve.protocol.content import cache_counts, content_digest, content_id, published_identity
from flyte_cornserve.protocol.invocations import recent_key, InvocationStore, Priority
from flyte_cornserve.redis_server import ENV_URL
from flyte_cornserve.services.batches import batches_key
from flyte_cornserve.services.control import load_deployment
from flyte_cornserve.sidecar.directory import Directory
from flyte_cornserve.task import Task, TaskIO, TaskOptions
from workflows.vlm import caption, captioner, chat

from ..media_servers import S3Server, serve_http
from ..stack import Stack

PROJECT = pathlib.Path(__file__).resolve().parents[2]
PYFLYTE = pathlib.Path(sys.executable).with_name("pyflyte")
DISTINCT = 20  # distinct images; rows reuse them


@dataclass
class Dataset:
    folder: pathlib.Path
    images: list[pathlib.Path]
    broken: pathlib.Path  # a .png that is not an image


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    folder = tmp_path_factory.mktemp("images")
    rng = random.Random(7)
    images = []
    for i in range(DISTINCT):
        color, background = rng.sample(sorted(COLORS), 2)
        path = folder / f"shape-{i:02d}.png"
        Image.fromarray(draw(color, rng.choice(SHAPES), background, rng)).save(path)
        images.append(path)
    broken = folder / "broken.png"
    broken.write_bytes(b"this is not a png")
    return Dataset(folder, images, broken)


@pytest.fixture(scope="module")
def one_by_one(use_module_stack: Stack, dataset: Dataset) -> dict[str, str]:
    """The `caption` workflow run once per distinct image: what every batch must agree with."""
    return {path.name: caption(image=str(path)) for path in dataset.images}


@pytest.fixture(scope="module")
def use_module_stack(stack: Stack) -> Stack:
    """Local runs in this module go to the shared stack (as `pyflyte run` does with the URL set)."""
    previous = os.environ.get(ENV_URL)
    os.environ[ENV_URL] = stack.url
    yield stack
    if previous is None:
        del os.environ[ENV_URL]
    else:
        os.environ[ENV_URL] = previous


def manifest_rows(dataset: Dataset, count: int, reference=lambda path: str(path), bad: bool = True) -> list[dict]:
    """`count` rows over the distinct images; with `bad`, rows 7, 50 and 133 are bad (missing file,
    undecodable image, empty prompt) when there are that many."""
    rows = [{"id": f"row-{i:04d}", "images": [reference(dataset.images[i % DISTINCT])], "prompt": PROMPT}
            for i in range(count)]
    if bad and count > 133:
        rows[7]["images"] = [str(dataset.folder / "no-such-image.png")]
        rows[50]["images"] = [str(dataset.broken)]
        rows[133]["prompt"] = ""
    return rows


def write_manifest(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_rows(path: str | pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def check_bad_rows(rows: list[dict]) -> None:
    by_id = {row["id"]: row for row in rows}
    missing, broken, empty = by_id["row-0007"], by_id["row-0050"], by_id["row-0133"]
    assert missing["state"] == "ERROR" and "EncoderTask tiny-llava" in missing["error"]
    assert "no such file or object" in missing["error"] and "no-such-image.png" in missing["error"]
    assert broken["state"] == "ERROR" and "undecodable image" in broken["error"]
    assert empty["state"] == "ERROR" and "MLLMTask" in empty["error"] and "field 'prompt'" in empty["error"]
    for row in (missing, broken, empty):
        assert row["text"] is None


def test_pyflyte_run_of_the_batch_workflow_writes_a_row_per_request(use_module_stack, dataset, one_by_one, tmp_path):
    rows = manifest_rows(dataset, 200)
    manifest = write_manifest(tmp_path / "manifest.jsonl", rows)
    env = {**os.environ, ENV_URL: use_module_stack.url}
    run = subprocess.run([str(PYFLYTE), "run", "workflows/batch_caption.py", "batch_caption", "--manifest", str(manifest),
                          "--chunk_size", "64"], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = read_rows(run.stdout.strip().splitlines()[-1])
    assert [row["id"] for row in results] == [row["id"] for row in rows]  # one row each, in manifest order
    check_bad_rows(results)
    good = [(row, result) for row, result in zip(rows, results) if row["id"] not in {"row-0007", "row-0050", "row-0133"}]
    assert len(good) == 197
    for row, result in good:
        assert result["state"] == "DONE" and result["error"] is None and result["attempts"] == 1
        assert result["text"] == one_by_one[pathlib.Path(row["images"][0]).name], row["id"]
        assert result["latency_s"] > 0


# -- a composite task of this module, not a built-in ----------------------------------------------------

class CaptionAndEchoInput(TaskIO):
    image: str
    word: str = Field(min_length=1)


class CaptionAndEchoOutput(TaskIO):
    caption: str
    echo: str


class CaptionAndEcho(Task[CaptionAndEchoInput, CaptionAndEchoOutput]):
    """An encoder and two LLM calls, one of them on the text alone: a graph no built-in has."""

    encoder: EncoderTask
    llm: LLMTask

    def invoke(self, request: CaptionAndEchoInput) -> CaptionAndEchoOutput:
        embeddings = self.encoder(EncoderInput(data=request.image)).embeddings
        described = self.llm(LLMInput(prompt=PROMPT, embeddings=[embeddings]))
        echoed = self.llm(LLMInput(prompt=request.word))
        return CaptionAndEchoOutput(caption=described.text, echo=echoed.text)


CAPTION_AND_ECHO = CaptionAndEcho(encoder=captioner.encoder, llm=captioner.llm)


@workflow
def caption_and_echo_batch(manifest: FlyteFile) -> FlyteFile:
    return batch(CAPTION_AND_ECHO, manifest=manifest, chunk_size=64)


def test_a_composite_of_the_test_module_runs_as_a_batch(use_module_stack, dataset, one_by_one, tmp_path):
    rows = [{"id": f"row-{i:04d}", "image": str(dataset.images[i % DISTINCT]), "word": ["red", "blue"][i % 2]}
            for i in range(200)]
    rows[7]["image"] = str(dataset.folder / "no-such-image.png")
    rows[50]["image"] = str(dataset.broken)
    rows[133]["word"] = ""
    results = read_rows(caption_and_echo_batch(manifest=str(write_manifest(tmp_path / "m.jsonl", rows))).path)
    assert [row["id"] for row in results] == [row["id"] for row in rows]
    by_id = {row["id"]: row for row in results}
    assert "no such file or object" in by_id["row-0007"]["error"]
    assert "undecodable image" in by_id["row-0050"]["error"]
    assert "CaptionAndEcho" in by_id["row-0133"]["error"] and "field 'word'" in by_id["row-0133"]["error"]
    echoes = {word: chat(prompt=word) for word in ("red", "blue")}
    for row in rows:
        if row["id"] in ("row-0007", "row-0050", "row-0133"):
            continue
        result = by_id[row["id"]]
        assert result["state"] == "DONE", result
        assert result["caption"] == one_by_one[pathlib.Path(row["image"]).name]
        assert result["echo"] == echoes[row["word"]]


# -- pipelining ---------------------------------------------------------------------------------------

#: the captioner without the tensor cache: each item is encoded (equal images are not joined or found)
UNCACHED = MLLMTask(model_id="tiny-llava", encoder=EncoderTask(model_id="tiny-llava",
                                                                options=TaskOptions(tensor_cache=False)))


@workflow
def plain_batch(manifest: FlyteFile) -> FlyteFile:
    return batch(UNCACHED, manifest=manifest, chunk_size=320)


def test_the_stages_overlap(use_module_stack, dataset, tmp_path):
    """Some item's LLM invocation starts before another item's encoder invocation ends (every item is
    encoded: the tensor cache is off)."""
    started = time.time()
    results = read_rows(plain_batch(manifest=str(write_manifest(tmp_path / "m.jsonl", manifest_rows(dataset, 640, bad=False)))).path)
    assert all(row["state"] == "DONE" for row in results) and len(results) == 640
    records = [r for r in asyncio.run(batch_records(use_module_stack.url, count=100)) if r.created_at >= started]
    encodes = [r for r in records if r.label.startswith("EncoderTask") and r.items]
    generations = [r for r in records if r.label.startswith("LLMTask") and r.items]
    assert sum(r.items for r in encodes) == 640 and sum(r.items for r in generations) == 640
    assert any(g.started_at < e.finished_at for g in generations for e in encodes), "the LLM waited for every encode"


def test_node_outputs_a_stage_computed_before_the_batch_are_taken_as_they_are(use_module_stack, dataset, one_by_one,
                                                                               tmp_path):
    """Issue 14, step 1: a chunk item's `done` outputs (what an Elastic encoder stage will write) go
    into its plan as they are: that node is not sent, its consumers read them. Item 0's encoder
    output is given as another image's embeddings, so its caption is that image's."""
    from flyte_cornserve.flyte.batch import plan_chunks
    from flyte_cornserve.flyte.batch_task import BatchChunk, BatchOptions, fan_out, run_chunks_locally
    from flyte_cornserve.services.batches import read_chunk, write_chunk
    from flyte_cornserve.services.dispatcher import Dispatcher
    from flyte_cornserve.task import task_reference

    rows = manifest_rows(dataset, 4, bad=False)
    (chunk,) = plan_chunks.task_function(task=task_reference(UNCACHED), chunk_size=100,
                                         manifest=FlyteFile(str(write_manifest(tmp_path / "m.jsonl", rows))))
    header, items = read_chunk(chunk.rows.path)
    encoder_index = next(i for i, task in enumerate(header.tasks) if task["task_class"] == "EncoderTask")
    (node,) = [node for node in items[0].plan.nodes if node.task == encoder_index]

    async def encode_another() -> dict:
        client = aioredis.Redis.from_url(use_module_stack.url)
        try:
            output = await Dispatcher(client).run(UNCACHED.encoder, {"data": str(dataset.images[5])})
            return output.model_dump(mode="json")
        finally:
            await client.aclose()

    items[0] = items[0].model_copy(update={"done": {node.id: asyncio.run(encode_another())}})
    given = tmp_path / "chunk-given.jsonl"
    write_chunk(str(given), header, items)

    started = time.time()
    task = fan_out(header.label, task_reference(UNCACHED), BatchOptions()).batch_task
    (result,) = run_chunks_locally(task, [BatchChunk(rows=FlyteFile(str(given)), items=4, digest="given")])
    captions = [row["text"] for row in read_rows(result.results.path)]
    assert captions == [one_by_one[dataset.images[5].name], *(one_by_one[dataset.images[i].name] for i in (1, 2, 3))]
    records = [r for r in asyncio.run(batch_records(use_module_stack.url, count=20)) if r.created_at >= started]
    assert sum(r.items for r in records if r.label.startswith("EncoderTask")) == 3  # not item 0's
    assert sum(r.items for r in records if r.label.startswith("LLMTask")) == 4


async def batch_records(url: str, count: int):
    store = InvocationStore(aioredis.Redis.from_url(url))
    try:
        return [r for r in await store.recent(count) if r.priority is Priority.BATCH]
    finally:
        await store.redis.aclose()


# -- the tensor cache: one encoding per image --------------------------------------------------------

@workflow
def vqa_batch(manifest: FlyteFile) -> FlyteFile:
    return batch(captioner, manifest=manifest, chunk_size=1000)


@workflow
def uncached_vqa_batch(manifest: FlyteFile) -> FlyteFile:
    return batch(UNCACHED, manifest=manifest, chunk_size=1000)


QUESTIONS = (PROMPT, "What is in the picture?", "Which shape is it?", "What colour is it?")


def test_a_vqa_manifest_encodes_each_image_once_and_renamed_copies_not_at_all(use_module_stack, tmp_path):
    """Several questions per image: one encoder item per distinct image with the tensor cache, one
    per row without; the same images under new paths: none. The answers are the same each way."""
    rng = random.Random(99)  # images no other test encoded: none is stored yet
    images = []
    for i in range(8):
        color, background = rng.sample(sorted(COLORS), 2)
        images.append(tmp_path / "vqa" / f"{i}.png")
        images[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(draw(color, rng.choice(SHAPES), background, rng)).save(images[-1])
    copies = []
    for image in images:
        copies.append(tmp_path / "copies" / f"copy-of-{image.name}")
        copies[-1].parent.mkdir(exist_ok=True)
        copies[-1].write_bytes(image.read_bytes())

    def manifest(paths, name):
        rows = [{"id": f"{n}-{q}", "images": [str(path)], "prompt": question}
                for n, path in enumerate(paths) for q, question in enumerate(QUESTIONS)]
        return str(write_manifest(tmp_path / name, rows))

    def answers_and_items(workflow, path) -> tuple[list, int, int]:
        started = time.time()
        rows = read_rows(workflow(manifest=path).path)
        assert all(row["state"] == "DONE" for row in rows), [row["error"] for row in rows if row["error"]][:3]
        records = [r for r in asyncio.run(batch_records(use_module_stack.url, count=100)) if r.created_at >= started]
        encoded = sum(r.items for r in records if r.label.startswith("EncoderTask"))
        generated = sum(r.items for r in records if r.label.startswith("LLMTask"))
        return [(row["id"], row["text"]) for row in rows], encoded, generated

    rows = len(images) * len(QUESTIONS)
    encoder = captioner.encoder.deployment_id()
    before = asyncio.run(tensor_cache_counts(use_module_stack.url)).get(encoder, {"hit": 0, "miss": 0})
    uncached = answers_and_items(uncached_vqa_batch, manifest(images, "uncached.jsonl"))
    assert uncached[1:] == (rows, rows)
    cached = answers_and_items(vqa_batch, manifest(images, "vqa.jsonl"))
    assert cached == (uncached[0], len(images), rows)
    renamed = answers_and_items(vqa_batch, manifest(copies, "copies.jsonl"))
    assert renamed == (uncached[0], 0, rows)
    assert len({text for _, text in uncached[0]}) > 1  # the questions are answered apart, not all alike

    # each image's tensor had a pin per question, every one released: CACHED now, not held
    directory = Directory(redis.Redis.from_url(use_module_stack.url, decode_responses=True))
    identity = asyncio.run(encoder_identity(use_module_stack.url, encoder))
    entries = [directory.entry(content_id(identity, content_digest(path.read_bytes()))) for path in images]
    assert [entry.pins if entry else None for entry in entries] == [0] * len(images)

    # misses: every uncached row, then one per image; hits: the other questions, then every renamed row
    after = asyncio.run(tensor_cache_counts(use_module_stack.url))[encoder]
    assert (after["miss"] - before["miss"], after["hit"] - before["hit"]) == (rows + len(images), 2 * rows - len(images))
    status = subprocess.run([str(PYFLYTE.with_name("cornserve")), "status", "--invocations", "0"],
                            env={**os.environ, ENV_URL: use_module_stack.url, "COLUMNS": "250"},
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    (row,) = [line for line in status.stdout.splitlines() if line.startswith("│ " + encoder) and "%" in line]
    assert [cell.strip() for cell in row.split("│")][3:5] == [str(after["hit"]), str(after["miss"])], status.stdout
    assert "sidecars" in status.stdout and "evicted lru" in status.stdout


async def encoder_identity(url: str, deployment_id: str) -> str:
    client = aioredis.Redis.from_url(url)
    try:
        return await published_identity(client, (await load_deployment(client, deployment_id)).executors)
    finally:
        await client.aclose()


async def tensor_cache_counts(url: str) -> dict:
    client = aioredis.Redis.from_url(url)
    try:
        return await cache_counts(client)
    finally:
        await client.aclose()


# -- Flyte's cache, per chunk -------------------------------------------------------------------------

CACHE_VERSION = uuid.uuid4().hex  # this session's: the local cache lives in its HOME


@workflow
def cached_batch(manifest: FlyteFile) -> FlyteFile:
    return batch(captioner, manifest=manifest, chunk_size=50, cache=True, cache_version=CACHE_VERSION)


def test_a_cached_rerun_submits_nothing_and_a_changed_row_recomputes_its_chunk(use_module_stack, dataset, tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    rows = manifest_rows(dataset, 200)
    write_manifest(manifest, rows)

    def run() -> tuple[list[dict], int, int]:
        client = use_module_stack.sync_client()
        batches, invocations = client.zcard(batches_key()), client.zcard(recent_key())
        results = read_rows(cached_batch(manifest=str(manifest)).path)
        return results, client.zcard(batches_key()) - batches, client.zcard(recent_key()) - invocations

    first, batches, invocations = run()
    assert batches == 4 and invocations > 0
    again, batches, invocations = run()
    assert (batches, invocations) == (0, 0) and again == first
    rows[120]["prompt"] = "What is in the picture?"  # the manifest rewritten in place: chunk 2 changes
    write_manifest(manifest, rows)
    changed, batches, invocations = run()
    assert batches == 1 and invocations > 0
    assert changed[:100] == first[:100] and changed[150:] == first[150:]  # the other chunks: from the cache
    assert [(r["id"], r["text"], r["state"]) for r in changed[100:150] if r["id"] != "row-0120"] == \
           [(r["id"], r["text"], r["state"]) for r in first[100:150] if r["id"] != "row-0120"]


# -- images from where datasets live ------------------------------------------------------------------

@workflow
def small_batch(manifest: FlyteFile) -> FlyteFile:
    return batch(captioner, manifest=manifest, chunk_size=20)


def test_http_and_s3_images_give_the_captions_of_the_local_files(use_module_stack, dataset, one_by_one, s3: S3Server,
                                                                 tmp_path):
    bucket = f"images-{uuid.uuid4().hex[:8]}"
    s3.put(bucket, {path.name: path.read_bytes() for path in dataset.images})
    with serve_http(dataset.folder) as http:
        for reference in (lambda p: f"{http.url}{p.name}", lambda p: f"s3://{bucket}/{p.name}"):
            rows = manifest_rows(dataset, DISTINCT, reference)
            results = read_rows(small_batch(manifest=str(write_manifest(tmp_path / "m.jsonl", rows))).path)
            assert [r["state"] for r in results] == ["DONE"] * DISTINCT, results
            assert {pathlib.Path(row["images"][0]).name: r["text"] for row, r in zip(rows, results)} == one_by_one


# -- failures stay per item ---------------------------------------------------------------------------

@workflow
def strict_batch(manifest: FlyteFile) -> FlyteFile:
    return batch(captioner, manifest=manifest, chunk_size=20, min_success_ratio=0.9)


def test_a_recoverable_failure_is_retried_per_item_and_then_is_that_rows_error(use_module_stack, dataset, tmp_path):
    with serve_http(dataset.folder) as http:
        http.special["/flaky.png"] = 500
        rows = manifest_rows(dataset, 4)
        rows[1]["images"] = [f"{http.url}flaky.png"]
        results = read_rows(small_batch(manifest=str(write_manifest(tmp_path / "m.jsonl", rows))).path)
    assert [r["state"] for r in results] == ["DONE", "ERROR", "DONE", "DONE"]
    assert "HTTP status 500" in results[1]["error"]
    assert results[1]["attempts"] == captioner.encoder.options.retries + 1 == 4
    assert results[0]["attempts"] == 1


def test_below_min_success_ratio_the_batch_fails_with_the_counts_and_first_errors(use_module_stack, dataset, tmp_path):
    rows = manifest_rows(dataset, 10)
    rows[3]["prompt"] = ""
    rows[6]["images"] = [str(dataset.broken)]
    with pytest.raises(Exception, match=r"2 of 10 items failed") as failure:
        strict_batch(manifest=str(write_manifest(tmp_path / "m.jsonl", rows)))
    assert "row-0003" in str(failure.value) and "undecodable image" in str(failure.value)


# -- many cheap items ---------------------------------------------------------------------------------

ONE_TOKEN = LLMTask(model_id="tiny-llava", sampling=SamplingParams(max_tokens=1))


@workflow
def cheap_batch(manifest: FlyteFile) -> FlyteFile:
    return batch(ONE_TOKEN, manifest=manifest, chunk_size=10_000, max_in_flight=10_000)


def test_ten_thousand_items_in_flight_at_once_complete(use_module_stack, tmp_path):
    client = use_module_stack.sync_client()
    rows = [{"id": str(i), "prompt": f"item {i}"} for i in range(10_000)]
    results = read_rows(cheap_batch(manifest=str(write_manifest(tmp_path / "m.jsonl", rows))).path)
    assert len(results) == 10_000 and all(r["state"] == "DONE" and r["text"] is not None for r in results)
    assert client.info("clients")["connected_clients"] < 100  # no connection per item anywhere


# -- the nightly launch plan, run locally -------------------------------------------------------------

def test_the_nightly_launch_plan_runs_locally_and_publishes_under_the_run_date(use_module_stack, tmp_path):
    env = {**os.environ, ENV_URL: use_module_stack.url, "CORNSERVE_NIGHTLY_RESULTS": str(tmp_path / "published")}
    run = subprocess.run([str(PYFLYTE), "run", "workflows/batch_caption.py", "nightly_captions",
                          "--run_date", "2026-12-06T02:00:00"], cwd=PROJECT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    published = tmp_path / "published" / "2026-12-06" / "captions.jsonl"
    assert run.stdout.strip().splitlines()[-1] == str(published)
    rows = read_rows(published)  # the default dataset: the images in workflows/images
    assert [row["id"] for row in rows] == sorted(path.name for path in (PROJECT / "workflows" / "images").iterdir())
    assert all(row["state"] == "DONE" and row["text"] for row in rows)


# -- results as parquet -------------------------------------------------------------------------------

@workflow
def parquet_batch(manifest: FlyteFile) -> StructuredDataset:
    return batch(captioner, manifest=manifest, chunk_size=8, output="parquet")


def test_results_can_be_a_parquet_structured_dataset(use_module_stack, dataset, one_by_one, tmp_path):
    rows = manifest_rows(dataset, 20)
    rows[4]["prompt"] = ""
    table = parquet_batch(manifest=str(write_manifest(tmp_path / "m.jsonl", rows))).open(pa.Table).all()
    assert table.column_names == ["id", "text", "error", "state", "attempts", "latency_s"]
    results = table.to_pylist()
    assert [r["id"] for r in results] == [row["id"] for row in rows]
    assert results[4]["state"] == "ERROR" and "field 'prompt'" in results[4]["error"] and results[4]["text"] is None
    assert all(r["text"] == one_by_one[pathlib.Path(row["images"][0]).name]
               for row, r in zip(rows, results) if r["id"] != "row-0004")


# -- a CSV manifest, and the batches in `cornserve status` ----------------------------------------------

def test_a_csv_manifest_runs_and_cornserve_status_lists_the_batch(use_module_stack, dataset, one_by_one, tmp_path):
    manifest = tmp_path / "requests.csv"
    lines = ["id,images,prompt"] + [f"c{i},{dataset.images[i]},{PROMPT}" for i in range(6)]  # a cell: one image
    lines.append(f'c6,"[""{dataset.images[6]}""]",{PROMPT}')  # a cell: a JSON array of images
    lines.append(f"c7,{dataset.images[7]},")  # an empty prompt
    manifest.write_text("\n".join(lines) + "\n")
    results = read_rows(small_batch(manifest=str(manifest)).path)
    assert [r["id"] for r in results] == [f"c{i}" for i in range(8)]
    assert [r["text"] for r in results[:7]] == [one_by_one[dataset.images[i].name] for i in range(7)]
    assert results[7]["state"] == "ERROR" and "field 'prompt'" in results[7]["error"]

    status = subprocess.run([str(PYFLYTE.with_name("cornserve")), "status", "--invocations", "0"],
                            env={**os.environ, ENV_URL: use_module_stack.url, "COLUMNS": "250"},
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    (row,) = [line for line in status.stdout.splitlines() if "MLLMTask tiny-llava" in line and "DONE" in line][:1]
    assert [cell.strip() for cell in row.split("│")][4:8] == ["7", "1", "0", "8"]  # done, failed, cancelled, total
