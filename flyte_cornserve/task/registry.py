"""The unit-task class registry and plugin discovery, and references to any task class.

Every concrete `UnitTask` subclass registers itself by class name when its module is imported.
Modules that define unit tasks are found through the `flyte_cornserve.unit_tasks` entry-point group,
so a third-party package adds a unit task exactly as the built-in ones are added. Any task,
composites included, can also be named by its import path (`task_reference`), for processes that
have its code.
"""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from pydantic import ValidationError

from .errors import TaskDefinitionError, UnknownTaskClassError

if TYPE_CHECKING:
    from .base import Task, UnitTask

ENTRY_POINT_GROUP = "flyte_cornserve.unit_tasks"

_unit_tasks: dict[str, type[UnitTask]] = {}
_plugins_loaded = False


def register_unit_task(cls: type[UnitTask]) -> None:
    name = cls.__name__
    known = _unit_tasks.get(name)
    if known is not None and known.__module__ != cls.__module__:
        raise TaskDefinitionError(
            f"unit task class name {name!r} is registered by both {known.__module__} and {cls.__module__}"
        )
    _unit_tasks[name] = cls


def load_plugins() -> None:
    """Import every module registered under the entry-point group (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        entry_point.load()
    _plugins_loaded = True


def unit_task_classes() -> dict[str, type[UnitTask]]:
    load_plugins()
    return dict(_unit_tasks)


def unit_task_class(name: str) -> type[UnitTask]:
    if name not in _unit_tasks:
        load_plugins()
    try:
        return _unit_tasks[name]
    except KeyError:
        raise UnknownTaskClassError(
            f"unknown unit task class {name!r}; registered: {sorted(_unit_tasks)}. "
            f"Install the package that provides it (entry-point group {ENTRY_POINT_GROUP!r})."
        ) from None


def unit_task_from_json(data: str | dict) -> UnitTask:
    """Rebuild a unit task from `UnitTask.to_json()` output (a JSON string or the parsed dict)."""
    from .base import describe_validation_error

    document = json.loads(data) if isinstance(data, str) else data
    if not isinstance(document, dict) or not {"task_class", "config"} <= set(document):
        raise ValueError("a serialized unit task is an object with 'task_class' and 'config'")
    cls = unit_task_class(document["task_class"])
    try:
        return cls.model_validate(document["config"])
    except ValidationError as exc:
        raise ValueError(describe_validation_error(cls.__name__, exc)) from exc


def task_reference(task: Task) -> str:
    """Any task (unit or composite) as JSON naming its class by import path, with its configuration.

    What a process that has the task's code (a workflow's container) needs to rebuild it; the class
    must be defined at a module's top level."""
    cls = type(task)
    if "<locals>" in cls.__qualname__:
        raise TaskDefinitionError(f"{cls.__qualname__} is defined inside a function; define it at module level "
                                  f"so other processes can import it")
    return json.dumps({"module": cls.__module__, "class": cls.__qualname__, "config": task.model_dump(mode="json")},
                      sort_keys=True, separators=(",", ":"))


def task_from_reference(reference: str) -> Task:
    """Rebuild a task from `task_reference()`: imports its module."""
    import importlib

    from .base import Task, describe_validation_error

    document = json.loads(reference)
    try:
        cls = importlib.import_module(document["module"])
        for name in document["class"].split("."):
            cls = getattr(cls, name)
    except (ImportError, AttributeError) as exc:
        raise UnknownTaskClassError(
            f"cannot import task class {document['module']}.{document['class']}: {exc}. The task's code must be "
            f"installed where the batch is planned (the workflow's image)"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TaskDefinitionError(f"{document['module']}.{document['class']} is not a Task class")
    try:
        return cls.model_validate(document["config"])
    except ValidationError as exc:
        raise ValueError(describe_validation_error(cls.__name__, exc)) from exc
