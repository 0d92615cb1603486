"""Flyte type transformer for `TensorRef`: a small Struct literal, metadata only.

The tensor's bytes stay in the sidecar; what Flyte stores, shows in the console and passes between
nodes is this record (under 1 KiB, with its `source`), whatever the tensor's size.
"""

from __future__ import annotations

from typing import Optional

from flytekit import FlyteContext
from flytekit.core.type_engine import TypeEngine, TypeTransformer, TypeTransformerFailedError
from flytekit.models.literals import Literal, Scalar
from flytekit.models.types import LiteralType, SimpleType
from google.protobuf.json_format import MessageToDict
from google.protobuf.struct_pb2 import Struct
from pydantic import ValidationError

from flyte_cornserve.task import TensorRef


class TensorRefTransformer(TypeTransformer[TensorRef]):
    def __init__(self) -> None:
        super().__init__(name="cornserve-tensor-ref", t=TensorRef)

    def get_literal_type(self, t: type[TensorRef]) -> LiteralType:
        return LiteralType(simple=SimpleType.STRUCT, metadata={"title": "TensorRef"})

    def to_literal(self, ctx: FlyteContext, python_val: TensorRef, python_type: type[TensorRef], expected: LiteralType) -> Literal:
        if not isinstance(python_val, TensorRef):
            raise TypeTransformerFailedError(f"expected a TensorRef, got {type(python_val).__name__}")
        struct = Struct()
        struct.update(python_val.model_dump(mode="json"))
        return Literal(scalar=Scalar(generic=struct))

    def to_python_value(self, ctx: FlyteContext, lv: Literal, expected_python_type: type[TensorRef]) -> Optional[TensorRef]:
        if lv.scalar is None or lv.scalar.generic is None:
            raise TypeTransformerFailedError(f"a TensorRef literal is a Struct, got {lv}")
        try:
            # Struct numbers are doubles; pydantic turns integral floats back into ints.
            return TensorRef.model_validate(MessageToDict(lv.scalar.generic))
        except ValidationError as exc:
            raise TypeTransformerFailedError(f"invalid TensorRef literal: {exc}") from exc

    def guess_python_type(self, literal_type: LiteralType) -> type[TensorRef]:
        if literal_type.simple == SimpleType.STRUCT and (literal_type.metadata or {}).get("title") == "TensorRef":
            return TensorRef
        raise ValueError(f"{literal_type} is not a TensorRef")


TypeEngine.register(TensorRefTransformer())
