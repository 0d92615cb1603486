"""`TaskContext`: records or replays `invoke()`.

Record mode runs `invoke()` once with a concrete (or workflow-input) request: each unit-task call
appends a `TaskInvocation` and returns placeholders, so the result is the static graph. Replay mode
runs `invoke()` again once the unit tasks have produced their outputs: each unit-task call returns
its real output, and the composite computes its real result.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from typing import Any

from .base import Task, UnitTask
from .errors import ReplayMismatchError, TaskDefinitionError
from .graph import TaskGraph, TaskInvocation
from .io import TaskIO
from .placeholder import OutputRef

_current: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar("cornserve_task_context", default=None)


def current_context() -> TaskContext | None:
    return _current.get()


def current_task_name() -> str | None:
    """Name of the task whose `invoke()` is running, for error messages."""
    context = _current.get()
    return context.stack[-1] if context and context.stack else None


class TaskContext:
    """Collects unit-task invocations (record) or hands back their outputs (replay)."""

    def __init__(self, graph: TaskGraph, outputs: Mapping[str, TaskIO | Mapping[str, Any]] | None = None):
        self.graph = graph
        self.replaying = outputs is not None
        self._outputs = outputs or {}
        self._calls = 0
        self.stack: list[str] = []

    def call(self, task: Task, request: TaskIO) -> TaskIO:
        if isinstance(task, UnitTask):
            return self._replay_unit(task) if self.replaying else self._record_unit(task, request)
        return self._run_composite(task, request)

    def _run_composite(self, task: Task, request: TaskIO) -> TaskIO:
        _, output_model = task.io_models()
        self.stack.append(type(task).__name__)
        try:
            output = task.invoke(request)
        finally:
            self.stack.pop()
        if not isinstance(output, output_model):
            raise TaskDefinitionError(
                f"{type(task).__name__}.invoke() returned {type(output).__name__}, expected {output_model.__name__}"
            )
        return output

    def _record_unit(self, task: UnitTask, request: TaskIO) -> TaskIO:
        invocation_id = f"n{len(self.graph.invocations)}"
        name = type(task).__name__
        self.graph.invocations.append(
            TaskInvocation(id=invocation_id, task=task, input=request, path=(*self.stack, name))
        )
        _, output_model = task.io_models()
        return output_model.model_construct(
            **{
                field: OutputRef(invocation_id, field, name, info.annotation)
                for field, info in output_model.model_fields.items()
            }
        )

    def _replay_unit(self, task: UnitTask) -> TaskIO:
        index, self._calls = self._calls, self._calls + 1
        if index >= len(self.graph.invocations) or self.graph.invocations[index].task != task:
            raise ReplayMismatchError(
                f"replaying {type(self.graph.task).__name__}.invoke(): call #{index} is {type(task).__name__}, "
                f"which the recording did not make there; invoke() must be deterministic given its request"
            )
        invocation = self.graph.invocations[index]
        _, output_model = task.io_models()
        output = self._outputs[invocation.id]
        return output if isinstance(output, output_model) else output_model.model_validate(output)


def trace(task: Task, request: TaskIO | Mapping[str, Any]) -> TaskGraph:
    """Record `task` on `request` and return its static graph."""
    request = task.validate_input(request)
    graph = TaskGraph(task=task, request=request)
    graph.output = _run(TaskContext(graph), task, request)
    return graph


def replay(graph: TaskGraph, outputs: Mapping[str, TaskIO | Mapping[str, Any]]) -> TaskIO:
    """Re-run the graph's `invoke()` with each invocation's real output; return the task's real output."""
    missing = [inv.id for inv in graph.invocations if inv.id not in outputs]
    if missing:
        raise ValueError(f"replay needs the outputs of every invocation; missing: {missing}")
    return _run(TaskContext(graph, outputs), graph.task, graph.request)


def _run(context: TaskContext, task: Task, request: TaskIO) -> TaskIO:
    token = _current.set(context)
    try:
        return context.call(task, request)
    finally:
        _current.reset(token)
