"""`Task`, `UnitTask` and composite tasks.

A task is a Pydantic model: its fields are its configuration, `Task[InputT, OutputT]` names its input
and output models. A composite task's `invoke()` calls other tasks and so defines the graph. A unit
task is one model inference: it has no `invoke()` of its own; calling it inside a recording yields
placeholders, and it is executed by the executor its `TaskExecutionDescriptor` names.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import TaskDefinitionError, TaskError, TaskInputError
from .io import TaskIO
from .options import Replicas, Resources, TaskOptions

InputT = TypeVar("InputT", bound=TaskIO)
OutputT = TypeVar("OutputT", bound=TaskIO)

_io_models: dict[type, tuple[type[TaskIO], type[TaskIO]]] = {}  # per class: found once


class Task(BaseModel, Generic[InputT, OutputT]):
    """A reusable unit of work with a Pydantic input and output."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def io_models(cls) -> tuple[type[TaskIO], type[TaskIO]]:
        """The (input, output) models bound by `Task[InputT, OutputT]` somewhere in the class's bases."""
        found = _io_models.get(cls)
        if found is None:
            found = _io_models[cls] = cls._find_io_models()
        return found

    @classmethod
    def _find_io_models(cls) -> tuple[type[TaskIO], type[TaskIO]]:
        for klass in cls.__mro__:
            meta = getattr(klass, "__pydantic_generic_metadata__", None)
            args = meta["args"] if meta else ()
            if len(args) == 2 and all(isinstance(a, type) and issubclass(a, TaskIO) for a in args):
                return args  # type: ignore[return-value]
        raise TaskDefinitionError(
            f"{cls.__name__} does not bind its input and output models: subclass Task[Input, Output] "
            f"or UnitTask[Input, Output] with TaskIO models"
        )

    def invoke(self, request: InputT) -> OutputT:
        """Call other tasks to compute the output. Composite tasks override this."""
        raise TaskDefinitionError(f"{type(self).__name__} is a composite task without an invoke() method")

    def validate_input(self, request: InputT | Mapping[str, Any]) -> InputT:
        """Return `request` as this task's input model, or raise `TaskInputError` naming the field."""
        input_model, _ = self.io_models()
        if isinstance(request, input_model):
            return request  # type: ignore[return-value]
        if not isinstance(request, Mapping) or isinstance(request, BaseModel):
            raise TaskInputError(
                f"{type(self).__name__} expects {input_model.__name__}, got {type(request).__name__}"
            )
        name = type(self).__name__
        try:
            return input_model(**request)  # type: ignore[return-value]
        except ValidationError as exc:
            raise TaskInputError(describe_validation_error(name, exc)) from exc
        except TaskInputError as exc:  # built with placeholders: checked by TaskIO itself
            raise TaskInputError(f"invalid input for {name}: " + "; ".join(exc.problems), exc.problems) from exc

    def __call__(self, request: InputT | Mapping[str, Any]) -> OutputT:
        """Call this task from another task's `invoke()`; outside a recording there is nothing to run."""
        from .context import current_context

        context = current_context()
        if context is None:
            raise TaskError(
                f"{type(self).__name__} was called outside a task graph. Record it with "
                f"flyte_cornserve.task.trace(task, request), or run it through its Flyte workflow."
            )
        return context.call(self, self.validate_input(request))


class UnitTask(Task[InputT, OutputT]):
    """One model inference, run by persistent executors.

    Equivalent unit tasks (same class and same configuration, `options` aside) share one deployment.
    """

    #: name of the execution descriptor to use; "" means the class's default descriptor. A task class
    #: may also take a settings object naming one (its class's `descriptor_name`): `EncoderTask`'s
    #: `ElasticEncode`.
    descriptor: str = ""
    #: what each executor of this task needs; None lets the descriptor decide.
    resources: Resources | None = None
    #: how each invocation runs (retries, timeout, cache); not part of the deployment identity.
    options: TaskOptions = TaskOptions()
    #: how many executors serve it, scaled on backlog; not part of the deployment identity.
    replicas: Replicas = Replicas()

    NOT_IDENTITY: ClassVar[frozenset[str]] = frozenset({"options", "replicas"})

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if cls.__pydantic_generic_metadata__["origin"] is None and _binds_io(cls):
            from .registry import register_unit_task

            register_unit_task(cls)

    def invoke(self, request: InputT) -> OutputT:
        raise TaskDefinitionError(
            f"{type(self).__name__} is a unit task: it runs on its executor, not through invoke()"
        )

    def identity(self) -> dict[str, Any]:
        """The configuration that decides which deployment serves this task."""
        return {
            "task_class": type(self).__name__,
            "config": self.model_dump(mode="json", exclude=set(self.NOT_IDENTITY)),
        }

    def deployment_id(self) -> str:
        """Stable id of the deployment serving this task: equal for equivalent unit tasks."""
        digest = hashlib.sha256(canonical_json(self.identity()).encode()).hexdigest()
        return f"{type(self).__name__.lower()}-{digest[:16]}"

    def routing_candidates(self) -> list[UnitTask]:
        """The unit tasks whose deployments may serve an invocation of this one, preferred first.

        Just this task by default; a task that accepts several models (`LLMTask.alternative_models`)
        lists one candidate per model, and the dispatcher picks the least-loaded deployed one.
        """
        return [self]

    def to_json(self) -> str:
        """JSON with the registered class name, readable back by `unit_task_from_json`."""
        return canonical_json({"task_class": type(self).__name__, "config": self.model_dump(mode="json")})

    def compact_json(self) -> str:
        """`to_json` without the fields at their defaults (options, resources...): the same task to
        `unit_task_from_json`, in the few bytes a `TensorSource` has for it."""
        return canonical_json({"task_class": type(self).__name__,
                               "config": self.model_dump(mode="json", exclude_defaults=True)})


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def describe_validation_error(task_name: str, exc: ValidationError) -> str:
    problems = [f"field '{'.'.join(map(str, e['loc'])) or '(input)'}': {e['msg']}" for e in exc.errors()]
    return f"invalid input for {task_name}: " + "; ".join(problems)


def _binds_io(cls: type[Task]) -> bool:
    try:
        cls.io_models()
    except TaskDefinitionError:
        return False
    return True
