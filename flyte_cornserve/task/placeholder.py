"""Placeholders: values that only exist once the graph runs.

While `invoke()` is recorded, a unit task returns its output model filled with `OutputRef`s, and
(when compiling for Flyte) the request's fields are `InputRef`s. A placeholder may be passed on to
other tasks as it is; any use of its *value* (truth, comparison, arithmetic, iteration, str(), ...)
would make the graph depend on data nobody has yet, so it raises `PlaceholderMisuseError` naming the
task that misused it and the field the placeholder stands for.
"""

from __future__ import annotations

from typing import Any

from .errors import PlaceholderMisuseError


class Placeholder:
    """Base of the two placeholder kinds. `annotation` is the type of the value it stands for."""

    __slots__ = ("annotation",)

    def __init__(self, annotation: Any) -> None:
        object.__setattr__(self, "annotation", annotation)

    def describe(self) -> str:
        raise NotImplementedError

    def _misuse(self, what: str, *_: Any) -> Any:
        from .context import current_task_name  # the context imports this module

        user = current_task_name() or "invoke()"
        raise PlaceholderMisuseError(
            f"{user}.invoke() used the {what} of {self.describe()}, which is not known while the graph "
            f"is recorded. Pass it on to other tasks as it is; branch only on request fields "
            f"(e.g. `request.image is None`)."
        )

    # Identity-based hashing keeps placeholders usable as dict keys despite the __eq__ below.
    __hash__ = object.__hash__

    def __bool__(self) -> bool:
        return self._misuse("truth value (bool)")

    def __eq__(self, other: object) -> bool:  # type: ignore[override]
        return self._misuse("value in a comparison (==)")

    def __ne__(self, other: object) -> bool:  # type: ignore[override]
        return self._misuse("value in a comparison (!=)")

    def __lt__(self, other: object) -> bool:
        return self._misuse("value in a comparison (<)")

    def __le__(self, other: object) -> bool:
        return self._misuse("value in a comparison (<=)")

    def __gt__(self, other: object) -> bool:
        return self._misuse("value in a comparison (>)")

    def __ge__(self, other: object) -> bool:
        return self._misuse("value in a comparison (>=)")

    def __iter__(self):
        return self._misuse("items (iteration)")

    def __len__(self) -> int:
        return self._misuse("length (len)")

    def __contains__(self, item: object) -> bool:
        return self._misuse("items (`in`)")

    def __getitem__(self, key: object) -> Any:
        return self._misuse("items (indexing)")

    def __str__(self) -> str:
        return self._misuse("value as text (str)")

    def __format__(self, spec: str) -> str:
        return self._misuse("value as text (format)")

    def __int__(self) -> int:
        return self._misuse("value as a number (int)")

    def __float__(self) -> float:
        return self._misuse("value as a number (float)")

    def __index__(self) -> int:
        return self._misuse("value as a number (index)")

    def __bytes__(self) -> bytes:
        return self._misuse("value as bytes")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{self.describe()} is read-only")


def _arithmetic(symbol: str):
    def method(self: Placeholder, *args: Any) -> Any:
        return self._misuse(f"value in arithmetic ({symbol})")

    return method


for _name, _symbol in {
    "add": "+", "sub": "-", "mul": "*", "matmul": "@", "truediv": "/", "floordiv": "//",
    "mod": "%", "pow": "**", "lshift": "<<", "rshift": ">>", "and": "&", "or": "|", "xor": "^",
}.items():
    setattr(Placeholder, f"__{_name}__", _arithmetic(_symbol))
    setattr(Placeholder, f"__r{_name}__", _arithmetic(_symbol))
for _name, _symbol in {"neg": "unary -", "pos": "unary +", "abs": "abs()", "invert": "~",
                       "round": "round()", "trunc": "trunc()", "floor": "floor()", "ceil": "ceil()"}.items():
    setattr(Placeholder, f"__{_name}__", _arithmetic(_symbol))


class OutputRef(Placeholder):
    """Output field `field` of the recorded unit-task invocation `invocation_id`."""

    __slots__ = ("invocation_id", "field", "task_name")

    def __init__(self, invocation_id: str, field: str, task_name: str, annotation: Any) -> None:
        super().__init__(annotation)
        object.__setattr__(self, "invocation_id", invocation_id)
        object.__setattr__(self, "field", field)
        object.__setattr__(self, "task_name", task_name)

    def describe(self) -> str:
        return f"output field '{self.field}' of {self.task_name} (invocation {self.invocation_id})"

    def __repr__(self) -> str:
        return f"OutputRef({self.invocation_id}.{self.field})"


class InputRef(Placeholder):
    """A request field whose value is a workflow input, i.e. known only at run time.

    `path` locates it in the request: ("prompt",) or ("images", 0).
    """

    __slots__ = ("path", "task_name")

    def __init__(self, path: tuple[str | int, ...], task_name: str, annotation: Any) -> None:
        super().__init__(annotation)
        object.__setattr__(self, "path", tuple(path))
        object.__setattr__(self, "task_name", task_name)

    @property
    def field(self) -> str:
        return ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in self.path).replace(".[", "[")

    def describe(self) -> str:
        return f"request field '{self.field}' of {self.task_name} (a workflow input)"

    def __repr__(self) -> str:
        return f"InputRef({self.field})"


def find_placeholders(value: Any) -> list[Placeholder]:
    """All placeholders inside `value` (lists, tuples, dicts and Pydantic models are searched)."""
    from pydantic import BaseModel

    found: list[Placeholder] = []

    def walk(v: Any) -> None:
        if isinstance(v, Placeholder):
            found.append(v)
        elif isinstance(v, (list, tuple)):
            for item in v:
                walk(item)
        elif isinstance(v, dict):
            for item in v.values():
                walk(item)
        elif isinstance(v, BaseModel):
            for name in type(v).model_fields:
                walk(getattr(v, name, None))

    walk(value)
    return found
