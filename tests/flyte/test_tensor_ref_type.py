"""`TensorRef` crosses Flyte as a small Struct literal, whatever the tensor's size."""

from __future__ import annotations

from flytekit import FlyteContextManager
from flytekit.core.type_engine import TypeEngine

from flyte_cornserve.flyte import TensorRefTransformer
from flyte_cornserve.task import TensorRef


def test_tensor_ref_has_its_own_transformer():
    assert isinstance(TypeEngine.get_transformer(TensorRef), TensorRefTransformer)


def test_literal_of_a_256_mib_tensor_is_under_1_kib_and_round_trips():
    ref = TensorRef(
        id="enc-0f3a9c.0", shape=(64, 1024, 1024), dtype="float32", nbytes=256 * 2**20,
        location="10.0.0.7:7070", checksum="9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    )
    ctx = FlyteContextManager.current_context()
    literal_type = TypeEngine.to_literal_type(TensorRef)
    literal = TypeEngine.to_literal(ctx, ref, TensorRef, literal_type)
    assert literal.to_flyte_idl().ByteSize() < 1024
    assert TypeEngine.to_python_value(ctx, literal, TensorRef) == ref


def test_lists_of_refs_use_the_same_transformer():
    refs = [TensorRef(id=f"t{i}", shape=(3,), dtype="int64", nbytes=24) for i in range(3)]
    ctx = FlyteContextManager.current_context()
    literal = TypeEngine.to_literal(ctx, refs, list[TensorRef], TypeEngine.to_literal_type(list[TensorRef]))
    assert TypeEngine.to_python_value(ctx, literal, list[TensorRef]) == refs
