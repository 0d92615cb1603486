"""The Elastic encoder stage (issue 14): a batch's encoder nodes run as a kfpytorch Elastic job of two
local processes (gloo, CPU) before the chunk's batch, with the encoder server's own code; the
captions are those of the all-warm batch; the stage serializes as kfpytorch's task, before each
chunk's batch node, with the pod settings that reach the node's sidecar."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import psutil
import pytest
import redis.asyncio as aioredis
from flytekit import workflow
from flytekit.types.file import FlyteFile
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from cornserve_builtins.encoder import ElasticEncode, EncoderTask
from cornserve_builtins.mllm import MLLMTask
from flyte_cornserve.flyte import batch
from flyte_cornserve.flyte.batch import plan_chunks
from flyte_cornserve.flyte.batch_task import file_uri
from flyte_cornserve.flyte.elastic import stage_resolver, stage_task
from flyte_cornserve.services.batches import read_chunk
from flyte_cornserve.models.tiny import PROMPT
from flyte_cornserve.protocol.invocations import InvocationStore, Priority
from flyte_cornserve.redis_server import ENV_URL
from flyte_cornserve.services.backend import ExecutorSpec
from flyte_cornserve.services.pods import PodSettings, executor_pod
from flyte_cornserve.sidecar.directory import Directory
from flyte_cornserve.task import Resources, TaskOptions, task_reference
from workflows.batch_caption import caption_folder

from ..stack import Stack

PROJECT = pathlib.Path(__file__).resolve().parents[2]
IMAGES = PROJECT / "workflows" / "images"
PYFLYTE = pathlib.Path(sys.executable).with_name("pyflyte")
ELASTIC = MLLMTask(model_id="tiny-llava", encoder=EncoderTask(
    model_id="tiny-llava", descriptor=ElasticEncode(nproc_per_node=2), options=TaskOptions(tensor_cache=False)))


@workflow
def elastic_batch(manifest: FlyteFile) -> FlyteFile:
    return batch(ELASTIC, manifest=manifest, chunk_size=8)


@pytest.fixture
def on_stack(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    monkeypatch.setenv(ENV_URL, stack.url)
    return stack


async def batch_records(url: str, since: float):
    store = InvocationStore(aioredis.Redis.from_url(url))
    try:
        return [r for r in await store.recent(200) if r.priority is Priority.BATCH and r.created_at >= since]
    finally:
        await store.redis.aclose()


def copies(sources: list[pathlib.Path], folder: pathlib.Path) -> pathlib.Path:
    """The images under the same names in `folder`, each with bytes no other file has (a PNG text
    chunk of its own): their encodes are never found stored."""
    folder.mkdir()
    for source in sources:
        unique = PngInfo()
        unique.add_text("test", uuid.uuid4().hex)
        Image.open(source).save(folder / source.name, pnginfo=unique)
    return folder


def test_pyflyte_run_of_the_nightly_workflow_with_an_elastic_encoder_stage_captions_as_the_warm_one(
        on_stack: Stack, tmp_path: pathlib.Path) -> None:
    """`nightly_elastic` (workflows/batch_caption.py) through `pyflyte run`: two gloo processes encode
    each chunk; the captions are the all-warm workflow's for the same pixels."""
    sources = sorted(IMAGES.glob("*.png"))
    warm = [json.loads(line) for line in pathlib.Path(caption_folder(
        images=str(copies(sources, tmp_path / "warm")), prompt=PROMPT).path).read_text().splitlines()]

    started = time.time()
    run = subprocess.run([str(PYFLYTE), "run", "workflows/batch_caption.py", "nightly_elastic",
                          "--run_date", "2026-12-06T02:00:00", "--images", str(copies(sources, tmp_path / "elastic")),
                          "--prompt", PROMPT, "--results", str(tmp_path / "published")],
                         cwd=PROJECT, env={**os.environ, ENV_URL: on_stack.url}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    published = tmp_path / "published" / "2026-12-06" / "captions.jsonl"
    elastic = [json.loads(line) for line in published.read_text().splitlines()]

    assert [row["state"] for row in elastic] == ["DONE"] * len(sources), elastic[0]
    assert [(row["id"], row["text"]) for row in elastic] == [(row["id"], row["text"]) for row in warm]
    records = asyncio.run(batch_records(on_stack.url, started))
    assert sum(r.items for r in records if r.label.startswith("EncoderTask")) == 0  # the job encoded them all
    assert sum(r.items for r in records if r.label.startswith("LLMTask")) == len(sources)


def pinned(directory: Directory) -> set[str]:
    """The tensors of the stack's sidecars that someone still holds (pins left)."""
    names = [key.decode() if isinstance(key, bytes) else key for key in directory.keys()]
    tensors = [name.split(":entry:", 1)[1] for name in names if ":entry:" in name]
    return {key for key in tensors if (entry := directory.entry(key)) is not None and entry.pins > 0}


def kill_a_rank_when_it_starts(done: threading.Event) -> list[int]:
    """In a thread: SIGKILL the first rank process torch elastic starts in this process (a direct
    child running `spawn_main`), as soon as it runs: the stage has begun. Returns the pid killed."""
    killed: list[int] = []

    def watch() -> None:
        while not done.is_set() and not killed:
            for child in psutil.Process().children():
                try:
                    if any("spawn_main" in part for part in child.cmdline()):
                        child.send_signal(signal.SIGKILL)
                        killed.append(child.pid)
                        return
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            done.wait(0.05)  # the look's period: a rank starts within a second or two

    threading.Thread(target=watch, daemon=True).start()
    return killed


def test_a_rank_killed_mid_stage_fails_it_as_recoverable_naming_the_rank_and_a_rerun_captions_alike(
        on_stack: Stack, tmp_path: pathlib.Path) -> None:
    sources = sorted(IMAGES.glob("*.png"))
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"id": path.stem, "images": [str(path)], "prompt": PROMPT}) + "\n"
                                for path in sources))
    directory = Directory.connect(on_stack.url)
    pinned_before = pinned(directory)
    done = threading.Event()
    killed = kill_a_rank_when_it_starts(done)
    try:
        with pytest.raises(Exception) as failed:
            elastic_batch(manifest=str(manifest))
    finally:
        done.set()
    assert killed, "no rank started"
    message = str(failed.value)
    assert re.search(rf"rank (\d) \(local rank \1, pid {killed[0]}\) was killed by SIGKILL", message), message
    assert "the stage is retried" in message  # a FlyteRecoverableException: Flyte's retries apply
    assert pinned(directory) <= pinned_before  # the failed attempt holds nothing: what it stored is expiring cache

    # why: the stage stores its outputs unpinned (CACHED); the batch runner pins them when it takes the chunk
    (chunk,) = plan_chunks.task_function(task=task_reference(ELASTIC), chunk_size=100, manifest=FlyteFile(str(manifest)))
    staged = stage_task(ELASTIC.encoder).execute(chunk=chunk)
    _, items = read_chunk(file_uri(staged.rows))
    refs = [output["embeddings"]["id"] for item in items for output in item.done.values()]
    assert len(refs) == len(sources) and all(directory.entry(ref).pins == 0 for ref in refs)

    again = [json.loads(line) for line in pathlib.Path(elastic_batch(manifest=str(manifest)).path).read_text().splitlines()]
    warm = [json.loads(line) for line in pathlib.Path(caption_folder(images=str(IMAGES), prompt=PROMPT).path)
            .read_text().splitlines()]
    assert [row["text"] for row in again] == [row["text"] for row in warm]
    assert pinned(directory) <= pinned_before  # the runner pinned each output once per consumer, who released it


MULTI_NODE = MLLMTask(model_id="tiny-llava", encoder=EncoderTask(
    model_id="tiny-llava", descriptor=ElasticEncode(nnodes=4, nproc_per_node=8)))


@workflow
def multi_node_batch(manifest: FlyteFile) -> FlyteFile:
    return batch(MULTI_NODE, manifest=manifest)


def serialized(entity) -> list:
    """Every entity of `entity`'s registration, as `pyflyte register` would serialize them."""
    from collections import OrderedDict

    from flytekit.configuration import Image, ImageConfig, SerializationSettings
    from flytekit.tools.translator import get_serializable

    mapping: OrderedDict = OrderedDict()
    settings = SerializationSettings(ImageConfig(default_image=Image(name="default", fqn="ghcr.io/acme/project",
                                                                     tag="v1")))
    get_serializable(mapping, settings, entity)
    return list(mapping.values())


@pytest.mark.parametrize(("workflow_", "task_type"), [(multi_node_batch, "pytorch"), (elastic_batch, "python-task")])
def test_the_encoder_stage_serializes_as_an_elastic_task_before_each_chunks_batch(workflow_, task_type: str) -> None:
    from flytekit.models.task import TaskSpec
    from flytekit.models.admin.workflow import WorkflowSpec

    entities = serialized(workflow_)
    (stage,) = [e.template for e in entities if isinstance(e, TaskSpec) and e.template.id.name.startswith("cornserve.elastic.")]
    assert stage.type == task_type and stage.task_type_version == 1
    pod = stage.k8s_pod.pod_spec  # with the pod settings that reach the node's sidecar
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/acme/project:v1"  # the project's image
    assert pod["hostIPC"] is True
    assert pod["volumes"] == [{"name": "shm", "hostPath": {"path": "/dev/shm", "type": "Directory"}}]
    executor = executor_pod(ExecutorSpec("e-1", "d", MULTI_NODE.encoder.to_json(), "cluster", Resources()),
                            PodSettings(namespace="cornserve", image="x")).to_dict()["spec"]["containers"][0]["env"]
    wanted = {"CORNSERVE_REDIS_URL", "CORNSERVE_SIDECAR_ID", "CORNSERVE_SIDECAR_TOKEN"}
    assert sorted((v for v in container["env"] if v["name"] in wanted), key=str) == sorted(
        (v for v in executor if v["name"] in wanted), key=str)  # as an executor pod finds its sidecar
    args = container["args"]
    assert "flyte_cornserve.flyte.elastic.stage_resolver" in args  # loaded by its resolver, from the unit task's JSON
    assert json.loads(args[-1])["config"]["descriptor"]["kind"] == "elastic"
    loaded = stage_resolver.load_task(args[args.index("--") + 1:])  # what the pod does with those args
    assert loaded.name == stage.id.name
    if task_type == "pytorch":  # a PyTorchJob: 4 workers of 8 processes
        assert stage.custom["workerReplicas"]["replicas"] == 4
        assert stage.custom["elasticConfig"]["nprocPerNode"] == 8 and stage.custom["elasticConfig"]["rdzvBackend"] == "c10d"
    else:  # one pod: the plugin's elastic python task, its settings in its config
        assert stage.custom is None or "elasticConfig" not in stage.custom
    (chunk_workflow,) = [e.template for e in entities if isinstance(e, WorkflowSpec) and e.template.id.name.endswith(".chunk")]
    stage_node, batch_node = chunk_workflow.nodes
    assert stage_node.task_node.reference_id.name == stage.id.name
    assert batch_node.inputs[0].binding.promise.node_id == stage_node.id  # the batch reads the stage's chunk


def test_a_failed_attempt_frees_what_its_ranks_stored_from_their_journals(on_stack: Stack, tmp_path: pathlib.Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank journals a put's ids before the put (`JournaledStore`); the launching process frees
    those nobody holds when the stage fails (`discard_attempt`), whatever killed the rank."""
    import torch

    from flyte_cornserve.flyte.elastic import JournaledStore, discard_attempt
    from flyte_cornserve.services.control import control_plane_info
    from flyte_cornserve.services.dispatcher import Dispatcher
    from flyte_cornserve.sidecar.client import SidecarClient
    from flyte_cornserve.sidecar.directory import ENV_SIDECAR_ID

    async def start_sidecar() -> str:  # the stack starts its sidecar with its first deployment
        client = aioredis.Redis.from_url(on_stack.url)
        try:
            await Dispatcher(client).deploy(EncoderTask(model_id="tiny-llava"))
            return next(iter((await control_plane_info(client))["sidecars"].values()))
        finally:
            await client.aclose()

    monkeypatch.setenv(ENV_SIDECAR_ID, asyncio.run(start_sidecar()))
    folder = tmp_path / "journals"
    folder.mkdir()
    store = JournaledStore(SidecarClient(), folder / "rank-1-0.puts")
    (unheld,) = store.put_many([torch.ones(8)], pins=0, ttl=600)
    (held,) = store.put_many([torch.ones(8)], pins=1, ttl=600)  # someone reads it: not the attempt's to free
    assert [json.loads(line) for line in (folder / "rank-1-0.puts").read_text().splitlines()] == [[unheld.id], [held.id]]

    directory = Directory.connect(on_stack.url)
    assert discard_attempt(folder) == 1 and not folder.exists()
    gone = threading.Event()
    deadline = time.monotonic() + 30
    while directory.entry(unheld.id) is not None and time.monotonic() < deadline:
        gone.wait(0.05)  # the sidecar frees it when it reads its discard queue
    assert directory.entry(unheld.id) is None
    assert directory.entry(held.id).pins == 1
