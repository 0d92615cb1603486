"""`TaskInvocation` and `TaskGraph`: the static graph recorded from a task's `invoke()`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .io import TaskIO
from .placeholder import InputRef, OutputRef, find_placeholders

if TYPE_CHECKING:
    from .base import Task, UnitTask


@dataclass(frozen=True)
class TaskInvocation:
    """One recorded call of a unit task. `input` may hold placeholders."""

    id: str
    task: UnitTask
    input: TaskIO
    #: the chain of tasks that led to this call, outermost first, e.g. ("MLLMTask", "EncoderTask")
    path: tuple[str, ...]

    def dependencies(self) -> list[OutputRef]:
        """Upstream outputs this invocation consumes."""
        return [p for p in find_placeholders(self.input) if isinstance(p, OutputRef)]


@dataclass(frozen=True)
class Edge:
    """Data flows from `source`'s output field to `target`'s input field ("output" = the graph's result)."""

    source: str
    source_field: str
    target: str
    target_field: str


@dataclass
class TaskGraph:
    """Unit-task invocations in call order (a topological order) and the output they lead to."""

    task: Task
    request: TaskIO
    invocations: list[TaskInvocation] = field(default_factory=list)
    output: TaskIO | None = None

    def invocation(self, invocation_id: str) -> TaskInvocation:
        for invocation in self.invocations:
            if invocation.id == invocation_id:
                return invocation
        raise KeyError(invocation_id)

    @property
    def edges(self) -> list[Edge]:
        edges = []
        for invocation in self.invocations:
            edges += _edges_into(invocation.id, invocation.input)
        if self.output is not None:
            edges += _edges_into("output", self.output)
        return edges

    def inputs_used(self) -> list[InputRef]:
        """Request fields (when traced as workflow inputs) that some invocation or the output uses."""
        seen: dict[tuple, InputRef] = {}
        for value in [inv.input for inv in self.invocations] + [self.output]:
            for p in find_placeholders(value):
                if isinstance(p, InputRef):
                    seen.setdefault(p.path, p)
        return list(seen.values())

    def describe(self) -> str:
        lines = [f"{type(self.task).__name__} graph:"]
        for inv in self.invocations:
            deps = sorted({d.invocation_id for d in inv.dependencies()})
            after = f" <- {', '.join(deps)}" if deps else ""
            lines.append(f"  {inv.id}: {' > '.join(inv.path)}{after}")
        return "\n".join(lines)


def _edges_into(target: str, model: Any) -> list[Edge]:
    edges = []
    for name in type(model).model_fields:
        for ref in find_placeholders(getattr(model, name)):
            if isinstance(ref, OutputRef):
                edges.append(Edge(ref.invocation_id, ref.field, target, name))
    return edges
