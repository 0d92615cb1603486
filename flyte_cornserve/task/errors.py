"""Errors of the task abstraction. Each names the task (and field) it is about."""


class TaskError(Exception):
    """Base class for errors raised by the task abstraction."""


class TaskInputError(TaskError, ValueError):
    """A task was given input that does not validate against its input model."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        #: one "field 'x': why" entry per problem
        self.problems = problems or [message]


class TaskDefinitionError(TaskError, TypeError):
    """A task class or instance is malformed (missing input/output types, bad `invoke()` result)."""


class PlaceholderMisuseError(TaskError, TypeError):
    """`invoke()` used the value of something that is only known when the graph runs."""


class UnknownTaskClassError(TaskError, LookupError):
    """A serialized unit task names a class that no installed plugin registers."""


class ReplayMismatchError(TaskError, RuntimeError):
    """Replaying `invoke()` called different unit tasks than recording did."""
