"""Per-unit-task settings: the resources its executors need and how each invocation is run."""

from __future__ import annotations

import re
from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_QUANTITY = re.compile(r"^(\d+(\.\d+)?)(Ki|Mi|Gi|Ti|K|M|G|T)?$")
_UNITS = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity_bytes(value: str) -> int:
    """The bytes of a Kubernetes-style quantity (512Mi, 4Gi, 1G, 1000): the project's one size syntax."""
    match = _QUANTITY.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a quantity like 512Mi or 4Gi")
    number, _, unit = match.groups()
    return int(float(number) * _UNITS[unit])


class Resources(BaseModel):
    """What one executor of a unit task needs. Part of the deployment: it sizes the executors."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cpu: float = Field(default=1.0, gt=0, description="cores")
    memory: str = Field(default="1Gi", description="Kubernetes-style quantity, e.g. 512Mi or 4Gi")
    gpu: int = Field(default=0, ge=0)

    @field_validator("memory")
    @classmethod
    def _quantity(cls, value: str) -> str:
        quantity_bytes(value)
        return value

    @property
    def memory_bytes(self) -> int:
        return quantity_bytes(self.memory)


class Replicas(BaseModel):
    """How many executors a deployment runs: between `min` and `max`, more while its backlog is long.

    The control plane adds an executor while the backlog (invocations queued or running; a batch
    stage's invocation carries up to 64 items, and the batch runner keeps a bounded number in flight)
    per executor is above `backlog_per_executor`, one start at a time, as far as the resources it accounts allow;
    it stops one executor each `idle_s` the deployment has had nothing to do, down to `min` (0: no
    executor between runs; the first invocation starts one). Not part of the deployment identity:
    the latest deploy request's bounds apply to the shared deployment.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    min: int = Field(default=1, ge=0, le=64, description="executors kept while idle")
    max: int = Field(default=1, ge=1, le=64, description="executors at most")
    backlog_per_executor: int = Field(default=4, ge=1, description="scale up while the backlog per executor "
                                      "is above this")
    idle_s: float = Field(default=60.0, gt=0, description="seconds without work before one executor is stopped")

    @model_validator(mode="after")
    def _ordered(self) -> Replicas:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self

    @classmethod
    def fixed(cls, count: int) -> Replicas:
        """Exactly `count` executors (`cornserve deploy --replicas`)."""
        return cls(min=count, max=count)


#: retries of recoverable failures unless a task says otherwise. Not 0: FlytePropeller counts a failed
#: `create()` and a RETRYABLE_FAILED phase against a task's retries, so with none a blip fails the node.
DEFAULT_RETRIES = 3


class TaskOptions(BaseModel):
    """How each invocation of a unit task is run. Not part of its deployment identity."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    retries: int = Field(default=DEFAULT_RETRIES, ge=0, le=10, description="retries of recoverable failures")
    timeout: timedelta | None = Field(default=None, description="deadline of one invocation")
    cache: bool = False
    cache_version: str = ""
    interruptible: bool | None = None
    tensor_cache: bool = Field(default=True, description="content-addressed output tensors: the same input "
                               "is computed once while its output is in a sidecar (off: a fresh tensor each time)")
    tensor_ttl: timedelta | None = Field(default=None, description="how long an output tensor stays as cache "
                                         "once its consumers read it (default: the executor's, 10 minutes)")

    @field_validator("timeout", "tensor_ttl")
    @classmethod
    def _positive(cls, value: timedelta | None, info) -> timedelta | None:
        if value is not None and value <= timedelta(0):
            raise ValueError(f"{info.field_name} must be positive")
        return value

    @model_validator(mode="after")
    def _cache_needs_version(self) -> TaskOptions:
        if self.cache and not self.cache_version:
            raise ValueError("cache=True needs a cache_version")
        return self
