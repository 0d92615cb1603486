"""The task abstraction: tasks as Pydantic objects, recorded into static graphs.

Framework-free on purpose: nothing here imports flytekit, redis or torch.
"""

from .base import Task, UnitTask
from .context import TaskContext, replay, trace
from .errors import (
    PlaceholderMisuseError,
    ReplayMismatchError,
    TaskDefinitionError,
    TaskError,
    TaskInputError,
    UnknownTaskClassError,
)
from .graph import Edge, TaskGraph, TaskInvocation
from .io import TaskIO
from .options import Replicas, Resources, TaskOptions
from .placeholder import InputRef, OutputRef, Placeholder
from .plan import Plan, plan_of
from .registry import (
    load_plugins,
    task_from_reference,
    task_reference,
    unit_task_class,
    unit_task_classes,
    unit_task_from_json,
)
from .tensor_ref import DTYPE_ITEMSIZE, TensorRef, TensorSource, tensor_refs

__all__ = [
    "DTYPE_ITEMSIZE", "Edge", "InputRef", "OutputRef", "Placeholder", "PlaceholderMisuseError", "Plan",
    "Replicas", "ReplayMismatchError", "Resources", "Task", "TaskContext", "TaskDefinitionError", "TaskError",
    "TaskGraph", "TaskIO", "TaskInputError", "TaskInvocation", "TaskOptions", "TensorRef", "TensorSource", "UnitTask",
    "UnknownTaskClassError", "load_plugins", "plan_of", "replay", "task_from_reference", "task_reference", "tensor_refs", "trace",
    "unit_task_class", "unit_task_classes", "unit_task_from_json",
]
