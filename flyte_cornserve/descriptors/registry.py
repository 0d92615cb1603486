"""Which descriptors can run which unit task class, and which one is the default."""

from __future__ import annotations

from collections.abc import Callable

from flyte_cornserve.task import TaskDefinitionError, UnitTask

from .base import TaskExecutionDescriptor

_by_task: dict[type[UnitTask], dict[str, type[TaskExecutionDescriptor]]] = {}
_default: dict[type[UnitTask], str] = {}

DescriptorClass = type[TaskExecutionDescriptor]


def register_descriptor(task_class: type[UnitTask], *, default: bool = False) -> Callable[[DescriptorClass], DescriptorClass]:
    """Class decorator: `descriptor_class` can execute `task_class` (and is its default if `default`)."""

    def register(descriptor_class: DescriptorClass) -> DescriptorClass:
        _by_task.setdefault(task_class, {})[descriptor_class.__name__] = descriptor_class
        if default:
            _default[task_class] = descriptor_class.__name__
        return descriptor_class

    return register


def descriptor_for(task: UnitTask) -> TaskExecutionDescriptor:
    """The descriptor instance that executes `task`: the one it names, else its class's default."""
    task_class = type(task)
    known = _by_task.get(task_class, {})
    chosen = task.descriptor if isinstance(task.descriptor, str) else type(task.descriptor).descriptor_name
    name = chosen or _default.get(task_class)
    if name is None:
        raise TaskDefinitionError(f"{task_class.__name__} has no default execution descriptor registered")
    if name not in known:
        raise TaskDefinitionError(
            f"{task_class.__name__} names descriptor {name!r}, which is not registered for it; "
            f"registered: {sorted(known)}"
        )
    return known[name](task=task)
