"""Batch inference in a Flyte workflow: run any task on every request of a dataset.

    @workflow
    def batch_caption(manifest: FlyteFile) -> FlyteFile:
        return batch(captioner, manifest=manifest)           # JSONL or CSV: one request per row

    @workflow
    def caption_folder(images: FlyteDirectory, prompt: str) -> FlyteFile:
        return batch(captioner, images=images, prompt=prompt)  # one request per image

The workflow gets three nodes. `plan_chunks` (a plain Python task, so it runs where the task's code
is: the workflow's process or image) reads the dataset, validates each request, traces the task's
graph for it, and writes the plans into chunk files of `chunk_size` items; a request that does not
validate becomes an error row right there. The chunks fan out to `cornserve_batch` nodes
(`batch_task`), each run on the server side, whose services need only the unit tasks' plugins, not
the task's code. `merge_*` joins the chunks' results in dataset order: one row per request with its
`id`, the task's output fields, `error` (null when it succeeded), `state`, `attempts` and `latency_s`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import pathlib
import typing
from typing import Any

import fsspec
from flytekit import FlyteContextManager, task
from flytekit.core.promise import Promise
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile
from flytekit.types.structured import StructuredDataset

from flyte_cornserve.services.batches import ChunkHeader, ChunkItem, read_results, write_chunk
from flyte_cornserve.services.task_manager import describe
from flyte_cornserve.task import (
    PlaceholderMisuseError,
    Task,
    TaskDefinitionError,
    TaskInputError,
    UnitTask,
    plan_of,
    task_from_reference,
    task_reference,
    trace,
)

from .batch_task import BatchChunk, BatchOptions, ChunkResult, HashedChunk, fan_out
from .elastic import elastic_units, stage_task

#: what a folder of images counts as images
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


def batch(task_: Task, *, manifest: Any = None, images: Any = None, prompt: Any = None, chunk_size: Any = None,
          **options: Any) -> Promise:
    """Inside a `@workflow`: run `task_` on every request of `manifest` (a JSONL or CSV FlyteFile,
    one request per row: an `id` and the task's input fields) or of `images` (a FlyteDirectory,
    one request per image, all with `prompt`). Returns the results: a FlyteFile (JSONL), or a
    StructuredDataset (parquet) with `output="parquet"`. `options` are `BatchOptions` fields;
    `chunk_size` may also be a workflow input."""
    settings = BatchOptions(**options, **({} if chunk_size is None or isinstance(chunk_size, Promise)
                                          else {"chunk_size": chunk_size}))
    if (manifest is None) == (images is None):
        raise TypeError("batch() takes a manifest= or an images= folder, and not both")
    if images is not None and prompt is None:
        raise TypeError("batch(images=...) needs the prompt= every image is asked with")
    reference = task_reference(task_)
    label = describe(task_)
    chunks = plan_chunks(
        task=reference, chunk_size=chunk_size if isinstance(chunk_size, Promise) else settings.chunk_size,
        manifest=manifest, images=images,
        prompt="" if prompt is None else prompt, image_field=settings.image_field, prompt_field=settings.prompt_field,
    )
    stages = tuple(stage_task(unit) for unit in elastic_units(task_))  # encoder stages as distributed jobs
    results = fan_out(label, reference, settings, stages)(chunk=chunks)
    return (merge_jsonl if settings.output == "jsonl" else merge_parquet)(chunks=results)


@task
def plan_chunks(task: str, chunk_size: int, manifest: typing.Optional[FlyteFile] = None,
                images: typing.Optional[FlyteDirectory] = None, prompt: str = "", image_field: str = "images",
                prompt_field: str = "prompt") -> list[HashedChunk]:
    """Read the dataset, trace each request's plan, write chunk files of `chunk_size` items."""
    task_ = task_from_reference(task)
    if manifest is not None:
        rows = read_manifest(manifest)
    else:
        assert images is not None
        rows = image_rows(images, task_, prompt, image_field, prompt_field)
    task_index: dict[UnitTask, int] = {}
    items = [plan_item(task_, i, row, task_index) for i, row in enumerate(rows)]
    tasks = [json.loads(unit.to_json()) for unit in task_index]
    _, output_model = task_.io_models()
    folder = pathlib.Path(FlyteContextManager.current_context().file_access.get_random_local_directory())
    chunks = []
    for index, start in enumerate(range(0, len(items), chunk_size)):
        part = [item.model_copy(update={"i": item.i - start}) for item in items[start:start + chunk_size]]
        header = ChunkHeader(label=describe(task_), tasks=tasks, outputs=list(output_model.model_fields), items=len(part))
        path = folder / f"chunk-{index:05d}.jsonl"
        text = write_chunk(str(path), header, part)
        chunks.append(BatchChunk(rows=FlyteFile(str(path)), items=len(part),
                                 digest=hashlib.sha256(text.encode()).hexdigest(), index=index))
    return chunks


def plan_item(task_: Task, i: int, row: dict[str, Any], task_index: dict[UnitTask, int]) -> ChunkItem:
    """One request's plan, or the error that keeps it from running (its row says which)."""
    item_id = row.pop("id", None)
    if item_id is None or str(item_id) == "":
        return ChunkItem(i=i, id=f"#{i + 1}", error=f"row {i + 1} has no 'id'")
    try:
        graph = trace(task_, _coerce(task_, row))
    except (TaskDefinitionError, PlaceholderMisuseError):
        raise  # the task's own bug, not the row's: every row would fail the same way
    except TaskInputError as exc:
        return ChunkItem(i=i, id=str(item_id), error=str(exc))
    except Exception as exc:  # noqa: BLE001 - a composite's invoke() failing on this request
        return ChunkItem(i=i, id=str(item_id), error=f"{type(task_).__name__}.invoke() failed: {type(exc).__name__}: {exc}")
    return ChunkItem(i=i, id=str(item_id), plan=plan_of(graph, task_index))


def read_manifest(manifest: FlyteFile) -> list[dict[str, Any]]:
    """The rows of a JSONL file (one object per line) or, for a name ending in .csv, a CSV file
    with a header line. Duplicate ids: the later rows are errors."""
    text = pathlib.Path(manifest.download()).read_text()
    name = str(getattr(manifest, "remote_source", None) or manifest.path)
    if name.lower().endswith(".csv"):
        rows = [{key: value for key, value in row.items() if value != "" or key != "id"}
                for row in csv.DictReader(io.StringIO(text))]
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                row = {"id": f"line-{number}", "__error__": f"line {number} is not JSON: {exc}"}
            rows.append(row if isinstance(row, dict) else {"id": f"line-{number}", "__error__": f"line {number} is not an object"})
    seen: set[str] = set()
    for row in rows:
        key = str(row.get("id"))
        if key in seen:
            row["__error__"] = f"duplicate id {key!r}"
        seen.add(key)
    return rows


def image_rows(images: FlyteDirectory, task_: Task, prompt: str, image_field: str, prompt_field: str) -> list[dict]:
    """One request per image file of the folder (searched recursively, in name order), id = its
    path inside the folder. The executors fetch the images; they are not downloaded here."""
    root = str(getattr(images, "remote_source", None) or images.path)
    fs, base = fsspec.core.url_to_fs(root)
    input_model, _ = task_.io_models()
    as_list = _is_list(input_model.model_fields[image_field].annotation) if image_field in input_model.model_fields else False
    rows = []
    for path in sorted(fs.find(base)):
        if pathlib.PurePosixPath(path).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        uri = path if fs.protocol in ("file", ("file", "local")) or "file" in fs.protocol else fs.unstrip_protocol(path)
        rows.append({"id": path[len(base):].lstrip("/"), image_field: [uri] if as_list else uri, prompt_field: prompt})
    return rows


def _coerce(task_: Task, row: dict[str, Any]) -> dict[str, Any]:
    """Row values as the task's input wants them: a CSV cell for a list field is a JSON array or a
    single value."""
    if "__error__" in row:
        raise TaskInputError(row["__error__"])
    input_model, _ = task_.io_models()
    fields = input_model.model_fields
    coerced = {}
    for name, value in row.items():
        if name in fields and isinstance(value, str) and _is_list(fields[name].annotation):
            value = json.loads(value) if value.startswith("[") else [value]
        coerced[name] = value
    return coerced


def _is_list(annotation: Any) -> bool:
    candidates = (annotation, *typing.get_args(annotation))
    return any(typing.get_origin(c) in (list, tuple) for c in candidates)


@task
def merge_jsonl(chunks: list[ChunkResult]) -> FlyteFile:
    """The chunks' results in one JSONL file, in dataset order."""
    out = pathlib.Path(FlyteContextManager.current_context().file_access.get_random_local_directory()) / "results.jsonl"
    with open(out, "w") as merged:
        for chunk in chunks:
            with fsspec.open(chunk.results.download(), "r") as part:
                merged.write(part.read())
    return FlyteFile(str(out))


@task
def merge_parquet(chunks: list[ChunkResult]) -> StructuredDataset:
    """The chunks' results as one parquet dataset, in dataset order."""
    import pyarrow as pa

    rows = [row for chunk in chunks for row in read_results(chunk.results.download())]
    return StructuredDataset(dataframe=pa.Table.from_pylist(rows))
