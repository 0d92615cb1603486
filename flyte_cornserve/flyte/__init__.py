"""Compile tasks to Flyte: unit tasks to `cornserve` tasks, composites to workflow nodes, and
batches over datasets to `cornserve_batch` chunk nodes."""

from .batch import batch
from .batch_task import BATCH_TASK_TYPE, BatchChunk, BatchOptions, ChunkResult, CornserveBatchTask
from .tensor_ref_type import TensorRefTransformer
from .unit_task import TASK_TYPE, CornserveTask, flyte_task, flyte_task_name
from .workflow import TaskOutputs, call

__all__ = [
    "BATCH_TASK_TYPE", "BatchChunk", "BatchOptions", "ChunkResult", "CornserveBatchTask", "CornserveTask", "TASK_TYPE",
    "TaskOutputs", "TensorRefTransformer", "batch", "call", "flyte_task", "flyte_task_name",
]
