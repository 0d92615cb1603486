"""Compile a task into the Flyte workflow being defined: one node per unit-task invocation.

Inside a `@workflow` function, `call(task, **request)` records `task.invoke()` with the request
fields that are workflow inputs standing in as placeholders, then adds one `cornserve` node per
recorded unit-task invocation, wired by the recorded edges. The structure is fixed by the Python
values the workflow passes (which fields are None, how many images): each input variant is its own
`@workflow`, e.g. `caption(image, prompt)` and `chat(prompt)`. Why not a Flyte conditional: a
conditional cannot branch on list lengths, and a variant workflow shows exactly the nodes that run,
has an interface holding exactly the inputs it uses, and caches independently.
"""

from __future__ import annotations

import typing
from typing import Any

from flytekit import FlyteContextManager
from flytekit.core.promise import Promise

from flyte_cornserve.task import InputRef, OutputRef, Task, TaskGraph, trace

from .unit_task import flyte_task


class TaskOutputs:
    """The task's output fields as Flyte promises (or constants), e.g. `call(...).text`."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no output field {name!r}; fields: {sorted(self._values)}") from None

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __repr__(self) -> str:
        return f"TaskOutputs({self._values})"


def call(task: Task, **request: Any) -> TaskOutputs:
    """Add `task`'s unit-task invocations for `request` to the enclosing `@workflow`."""
    input_model, _ = task.io_models()
    promises: dict[tuple, Promise] = {}
    fields = {}
    for name, value in request.items():
        annotation = input_model.model_fields[name].annotation if name in input_model.model_fields else Any
        fields[name] = _lift(value, (name,), annotation, type(task).__name__, promises)
    graph = trace(task, fields)
    return TaskOutputs(_emit(graph, promises))


def _lift(value: Any, path: tuple, annotation: Any, task_name: str, promises: dict[tuple, Promise]) -> Any:
    """Replace workflow-input promises in a request value by `InputRef` placeholders."""
    if isinstance(value, Promise):
        promises[path] = value
        return InputRef(path, task_name, annotation)
    if isinstance(value, (list, tuple)):
        item_type = _item_type(annotation)
        return [_lift(item, (*path, i), item_type, task_name, promises) for i, item in enumerate(value)]
    return value


def _emit(graph: TaskGraph, promises: dict[tuple, Promise]) -> dict[str, Any]:
    compiling = FlyteContextManager.current_context().compilation_state is not None
    outputs: dict[str, dict[str, Any]] = {}

    def bind(value: Any) -> Any:
        if isinstance(value, InputRef):
            return promises[value.path]
        if isinstance(value, OutputRef):
            return outputs[value.invocation_id][value.field]
        if isinstance(value, list):
            return [bind(item) for item in value]
        return value

    for invocation in graph.invocations:
        entity = flyte_task(invocation.task)
        kwargs = {name: bind(getattr(invocation.input, name)) for name in type(invocation.input).model_fields}
        result = entity(**kwargs)
        names = list(entity.python_interface.outputs)
        values = [result] if len(names) == 1 else list(result)
        if compiling:
            values[0].ref.node.with_overrides(
                node_name=f"{invocation.id}-{invocation.path[-1].lower()}", name=".".join(invocation.path)
            )
        outputs[invocation.id] = dict(zip(names, values))
    return {name: bind(getattr(graph.output, name)) for name in type(graph.output).model_fields}


def _item_type(annotation: Any) -> Any:
    for candidate in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(candidate) in (list, tuple) and typing.get_args(candidate):
            return typing.get_args(candidate)[0]
    return Any
