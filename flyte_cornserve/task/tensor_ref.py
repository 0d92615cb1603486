"""`TensorRef`: the metadata-only handle for a tensor held by a sidecar.

Only this small object travels through Flyte literals and Redis; the bytes stay with the sidecar
that produced them. Validation here is the boundary check for every later consumer: the dtype comes
from an allow-list and `nbytes` must agree with shape and dtype.
"""

from __future__ import annotations

import math

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


class TensorRef(BaseModel):
    """Where a tensor lives and what it looks like; never its contents."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    shape: tuple[int, ...]
    dtype: str
    nbytes: int = Field(ge=0)
    location: str = Field(default="", description="address of the producing sidecar")
    checksum: str = Field(default="", description="hex digest of the bytes, if the producer computed one")

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
