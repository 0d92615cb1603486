"""`Plan`: a recorded graph as plain JSON, runnable where the task's code is not installed.

A batch traces each request where the task's code lives (the workflow's own process or image) and
ships the result as a `Plan`: the unit-task invocations with their concrete inputs, and where each
upstream output goes. The server side then needs only the unit-task classes (found through their
entry points), not the composite's `invoke()`: recording forbids using a placeholder's value, so a
composite's output is always a selection of its unit tasks' outputs, and substituting them is all a
replay would do.

A reference is kept apart from the value it stands in for (`Slot`: a path into the value and the
output it takes), so no JSON a user writes can be mistaken for one.
"""

from __future__ import annotations

from typing import Any

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field

from .base import UnitTask
from .errors import TaskDefinitionError
from .graph import TaskGraph
from .placeholder import InputRef, OutputRef

Path = tuple[str | int, ...]


class Slot(BaseModel):
    """The place `at` in a value that takes output field `field` of invocation `node`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    at: Path
    node: str
    field: str


class Template(BaseModel):
    """A JSON value with holes: `value` with `null` at each slot, filled from upstream outputs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    value: dict[str, Any]
    slots: tuple[Slot, ...] = ()

    def fill(self, outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The value with every slot set from `outputs` (invocation id -> its output as JSON)."""
        if not self.slots:
            return self.value
        filled = _copy(self.value)
        for slot in self.slots:
            *parents, last = slot.at
            target: Any = filled
            for key in parents:
                target = target[key]
            target[last] = outputs[slot.node][slot.field]
        return filled

    @property
    def needs(self) -> set[str]:
        return {slot.node for slot in self.slots}


class PlanNode(BaseModel):
    """One unit-task invocation: `task` indexes the plan's table of unit tasks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    task: int = Field(ge=0)
    input: Template


class Plan(BaseModel):
    """The unit-task invocations of one request, in a topological order, and its output."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    nodes: tuple[PlanNode, ...]
    output: Template


def plan_of(graph: TaskGraph, task_index: dict[UnitTask, int]) -> Plan:
    """`graph` as a `Plan`. `task_index` maps a unit task to its index in the table the plan refers
    to; a task not there yet is added (so one table serves many plans)."""
    nodes = []
    for invocation in graph.invocations:
        index = task_index.setdefault(invocation.task, len(task_index))
        nodes.append(PlanNode(id=invocation.id, task=index, input=_template(invocation.input, invocation.id)))
    if graph.output is None:
        raise TaskDefinitionError(f"{type(graph.task).__name__}: the graph has no output (was it traced?)")
    return Plan(nodes=tuple(nodes), output=_template(graph.output, "output"))


def _template(model: BaseModel, where: str) -> Template:
    slots: list[Slot] = []
    value = {name: _json(getattr(model, name), (name,), slots, where) for name in type(model).model_fields}
    return Template(value=value, slots=tuple(slots))


def _json(value: Any, at: Path, slots: list[Slot], where: str) -> Any:
    if isinstance(value, OutputRef):
        slots.append(Slot(at=at, node=value.invocation_id, field=value.field))
        return None
    if isinstance(value, InputRef):
        raise TaskDefinitionError(f"{where}: {value.describe()} has no value; a plan is traced from a concrete request")
    if isinstance(value, (list, tuple)):
        return [_json(item, (*at, i), slots, where) for i, item in enumerate(value)]
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return pydantic_core.to_jsonable_python(value)


def _copy(value: Any) -> Any:
    """A copy of the containers along slot paths (leaves are shared: they are never written)."""
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value
