"""Batch captioning over a dataset, and the nightly launch plan that runs it.

  batch_caption(manifest):          a JSONL or CSV manifest, one request per row (id, images, prompt)
  caption_folder(images, prompt):   every image of a folder (local, s3://, gs://, ...), one prompt
  nightly_captions (launch plan):   caption_folder every night at 02:00 UTC; the results are published
                                    under <results>/<date>/captions.jsonl
  nightly_elastic(...):             the nightly workflow with its encoder stage as a distributed job
                                    (kfpytorch Elastic: 2 processes here; a PyTorchJob with nnodes > 1)

Each run writes a results file: one row per request (id, text, error, state, attempts, latency_s).
The nightly launch plan's dataset and results locations come from CORNSERVE_NIGHTLY_DATASET and
CORNSERVE_NIGHTLY_RESULTS when it is registered (defaults: this folder's images, and
$CORNSERVE_HOME/nightly locally), its failure e-mail from CORNSERVE_NIGHTLY_EMAIL.
"""

import os
import pathlib
from datetime import datetime

import fsspec
from flytekit import CronSchedule, Email, LaunchPlan, task, workflow
from flytekit.models.core.execution import WorkflowExecutionPhase
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from flyte_cornserve.flyte import batch
from flyte_cornserve.home import cornserve_home
from cornserve_builtins.encoder import ElasticEncode, EncoderTask
from cornserve_builtins.mllm import MLLMTask
from workflows.vlm import captioner

#: the same captioner, its encoder stage an Elastic job of two processes (the LLM stays warm)
elastic_captioner = MLLMTask(model_id=captioner.llm.model_id,
                             encoder=EncoderTask(model_id=captioner.encoder.model_id,
                                                 descriptor=ElasticEncode(nnodes=1, nproc_per_node=2)))

HERE = pathlib.Path(__file__).resolve().parent


@workflow
def batch_caption(manifest: FlyteFile, chunk_size: int = 500) -> FlyteFile:
    """Caption every row of `manifest` (JSONL or CSV: `id`, `images`, `prompt`)."""
    return batch(captioner, manifest=manifest, chunk_size=chunk_size)


@workflow
def caption_folder(images: FlyteDirectory, prompt: str = "Describe the image.") -> FlyteFile:
    """Caption every image of a folder with one prompt."""
    return batch(captioner, images=images, prompt=prompt)


@task
def publish(results: FlyteFile, run_date: datetime, destination: str) -> str:
    """Copy a run's results to `<destination>/<run date>/captions.jsonl` (any fsspec URI); return where."""
    target = f"{destination.rstrip('/')}/{run_date:%Y-%m-%d}/captions.jsonl"
    fs, path = fsspec.core.url_to_fs(target)
    fs.makedirs(fs._parent(path), exist_ok=True)
    fs.put_file(results.download(), path)
    return target


@workflow
def nightly(run_date: datetime, images: FlyteDirectory, prompt: str, results: str) -> str:
    """What the nightly launch plan runs: caption the folder, publish the results under the date."""
    return publish(results=batch(captioner, images=images, prompt=prompt), run_date=run_date, destination=results)


@workflow
def nightly_elastic(run_date: datetime, images: FlyteDirectory, prompt: str, results: str) -> str:
    """`nightly`, with the encoder stage of each chunk as an Elastic job."""
    return publish(results=batch(elastic_captioner, images=images, prompt=prompt), run_date=run_date,
                   destination=results)


nightly_captions = LaunchPlan.get_or_create(
    nightly,
    name="nightly_captions",
    schedule=CronSchedule(schedule="0 2 * * *", kickoff_time_input_arg="run_date"),
    default_inputs={"images": FlyteDirectory(os.environ.get("CORNSERVE_NIGHTLY_DATASET", str(HERE / "images")))},
    fixed_inputs={
        "prompt": "Describe the image.",
        "results": os.environ.get("CORNSERVE_NIGHTLY_RESULTS", str(cornserve_home() / "nightly")),
    },
    notifications=[Email(phases=[WorkflowExecutionPhase.FAILED, WorkflowExecutionPhase.TIMED_OUT],
                         recipients_email=[os.environ.get("CORNSERVE_NIGHTLY_EMAIL", "ml-platform@example.com")])],
)
