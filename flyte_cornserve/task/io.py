"""`TaskIO`: the base of every task's input and output model.

A task's input may hold placeholders while `invoke()` is recorded (the output of an upstream task, or
a request field that is a workflow input). Pydantic cannot validate a value nobody has yet, so when
a model is built with placeholders, a field that holds one is type-checked against the placeholder's
declared type instead, and every other field is validated as usual. A type mismatch is caught here,
at trace time.
"""

from __future__ import annotations

import functools
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from .errors import TaskInputError
from .placeholder import Placeholder, find_placeholders


class TaskIO(BaseModel):
    """Base class for task inputs and outputs: strict about unknown fields, JSON-friendly."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, /, **data: Any) -> None:
        if not find_placeholders(data):
            super().__init__(**data)
            return
        # Pydantic ignores a validator's replacement instance under __init__, so adopt its state.
        built = self._construct_with_placeholders(data)
        for attr in ("__dict__", "__pydantic_fields_set__", "__pydantic_extra__", "__pydantic_private__"):
            object.__setattr__(self, attr, getattr(built, attr))

    @classmethod
    def _construct_with_placeholders(cls, data: dict[str, Any]) -> TaskIO:
        errors: list[str] = []
        values: dict[str, Any] = {}
        unknown = set(data) - set(cls.model_fields)
        errors += [f"field '{name}': extra inputs are not permitted" for name in sorted(unknown)]
        for name, info in cls.model_fields.items():
            if name not in data:
                if info.is_required():
                    errors.append(f"field '{name}': field required")
                else:
                    values[name] = info.get_default(call_default_factory=True)
                continue
            try:
                values[name] = _check_value(data[name], info.annotation, f"{cls.__name__}.{name}", info.metadata)
            except (ValidationError, TypeError) as exc:
                errors.append(f"field '{name}': {_first_line(exc)}")
        if errors:
            raise TaskInputError(f"invalid {cls.__name__}: " + "; ".join(errors), problems=errors)
        return cls.model_construct(_fields_set=set(data) & set(cls.model_fields), **values)


def _check_value(value: Any, annotation: Any, where: str, constraints: list[Any] = ()) -> Any:
    """Validate `value` against `annotation` (and the field's constraints), letting placeholders
    through when their type fits."""
    if isinstance(value, Placeholder):
        if not accepts(annotation, value.annotation):
            raise TypeError(
                f"{value.describe()} has type {_type_name(value.annotation)}, "
                f"but {where} expects {_type_name(annotation)}"
            )
        return value
    if not find_placeholders(value):
        try:
            adapter = _adapter(annotation, tuple(constraints))
        except TypeError:  # an unhashable annotation: no cache
            adapter = _adapter.__wrapped__(annotation, tuple(constraints))
        return adapter.validate_python(value)
    if isinstance(value, (list, tuple)):
        item_type = _list_item_type(annotation)
        if item_type is None:
            raise TypeError(f"{where} expects {_type_name(annotation)}, not a list")
        return [_check_value(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(
        f"{where}: a placeholder may be a field's value or an item of a list field, "
        f"not nested inside {type(value).__name__}"
    )


@functools.lru_cache(maxsize=1024)
def _adapter(annotation: Any, constraints: tuple[Any, ...]) -> TypeAdapter:
    """A validator per field type, built once: building a TypeAdapter costs far more than using it."""
    return TypeAdapter(typing.Annotated[(annotation, *constraints)] if constraints else annotation)


def accepts(target: Any, source: Any) -> bool:
    """Whether a value of type `source` may be used where `target` is expected."""
    if target is Any or target is source:
        return True
    if _is_union(target):
        return any(accepts(member, source) for member in typing.get_args(target))
    if _is_union(source):
        return all(accepts(target, member) for member in typing.get_args(source))
    t_origin, s_origin = typing.get_origin(target), typing.get_origin(source)
    if t_origin is not None or s_origin is not None:
        if t_origin in (list, typing.List) and s_origin in (list, typing.List, tuple):
            return all(accepts(typing.get_args(target)[0], a) for a in typing.get_args(source) if a is not Ellipsis)
        return t_origin == s_origin and typing.get_args(target) == typing.get_args(source)
    if isinstance(target, type) and isinstance(source, type):
        return issubclass(source, target) or (target is float and source is int)
    return target == source


def _list_item_type(annotation: Any) -> Any:
    if _is_union(annotation):
        for member in typing.get_args(annotation):
            item = _list_item_type(member)
            if item is not None:
                return item
        return None
    if typing.get_origin(annotation) in (list, typing.List):
        return typing.get_args(annotation)[0] if typing.get_args(annotation) else Any
    return None


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def _first_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(e["msg"] for e in exc.errors())
    return str(exc)
