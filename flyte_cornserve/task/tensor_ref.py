"""`TensorRef`: the metadata-only handle for a tensor held by a sidecar.

Only this small object travels through Flyte literals and Redis; the bytes stay with the sidecar
that produced them. Validation here is the boundary check for every later consumer: the dtype comes
from an allow-list and `nbytes` must agree with shape and dtype.

A ref may also say how to make its tensor again (`source`): when a ref outlives its tensor (it came
out of Flyte's cache after the stack restarted), the submitting side re-runs the producer.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: dtypes a tensor may have, with their item size in bytes. Anything else is rejected.
DTYPE_ITEMSIZE: dict[str, int] = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "bool": 1,
}


#: the longest input reference a ref carries; a longer one (or inline data) cannot be re-read
MAX_SOURCE_INPUT = 512
#: bounds the producer's JSON, so that a ref stays under 1 KiB
MAX_SOURCE_TASK = 256


class TensorSource(BaseModel):
    """What a tensor was computed from: enough to compute it again, never the input's bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task: str = Field(min_length=2, max_length=MAX_SOURCE_TASK, description="the producer unit task, as JSON")
    input: str = Field(default="", max_length=MAX_SOURCE_INPUT,
                       description="the input's reference (a path or URI); empty if it was inline data")
    content: str = Field(pattern=r"^[0-9a-f]{32}$", description="xxh3-128 of the input's content")


class TensorRef(BaseModel):
    """Where a tensor lives and what it looks like; never its contents."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    shape: tuple[int, ...]
    dtype: str
    nbytes: int = Field(ge=0)
    location: str = Field(default="", description="address of the producing sidecar")
    checksum: str = Field(default="", description="hex digest of the bytes, if the producer computed one")
    source: TensorSource | None = Field(default=None, description="how to compute it again, if it can be")

    @model_validator(mode="after")
    def _consistent(self) -> TensorRef:
        if self.dtype not in DTYPE_ITEMSIZE:
            raise ValueError(f"dtype {self.dtype!r} is not allowed; allowed: {sorted(DTYPE_ITEMSIZE)}")
        if any(d < 0 for d in self.shape):
            raise ValueError(f"shape {self.shape} has a negative dimension")
        expected = math.prod(self.shape) * DTYPE_ITEMSIZE[self.dtype]
        if self.nbytes != expected:
            raise ValueError(f"nbytes={self.nbytes} disagrees with shape {self.shape} and dtype {self.dtype} ({expected})")
        return self


def tensor_refs(value: Any) -> list[TensorRef]:
    """Every `TensorRef` in a value (a task's input or output: model fields, lists, dicts), in order."""
    if isinstance(value, TensorRef):
        return [value]
    if isinstance(value, BaseModel):
        return [ref for name in type(value).model_fields for ref in tensor_refs(getattr(value, name))]
    if isinstance(value, (list, tuple)):
        return [ref for item in value for ref in tensor_refs(item)]
    if isinstance(value, dict):
        return [ref for item in value.values() for ref in tensor_refs(item)]
    return []
