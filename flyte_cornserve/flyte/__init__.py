"""Compile tasks to Flyte: unit tasks to `cornserve` tasks, composites to workflow nodes."""

from .tensor_ref_type import TensorRefTransformer
from .unit_task import TASK_TYPE, CornserveTask, flyte_task, flyte_task_name
from .workflow import TaskOutputs, call

__all__ = ["TASK_TYPE", "CornserveTask", "TaskOutputs", "TensorRefTransformer", "call", "flyte_task", "flyte_task_name"]
