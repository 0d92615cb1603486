"""Round trips through real sidecar processes are bit-exact for every allowed dtype, on the same node
(a zero-copy view of the sidecar's shared memory) and across sidecars (pulled over TCP)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flyte_cornserve.sidecar.tensors import TORCH_DTYPES
from flyte_cornserve.task.tensor_ref import DTYPE_ITEMSIZE

ALL_DTYPES = sorted(DTYPE_ITEMSIZE)


@pytest.fixture(scope="module")
def nodes(module_sidecars):
    """Two sidecars standing in for two nodes, with a client on each."""
    a, b = module_sidecars.start(), module_sidecars.start()
    return module_sidecars.client(a), module_sidecars.client(b)


def random_tensor(dtype: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bits of `dtype` (NaNs, infinities and subnormals included), or 0/1 for bool."""
    generator = torch.Generator().manual_seed(seed)
    if dtype == "bool":
        return torch.randint(0, 2, shape, generator=generator).bool()
    raw = torch.randint(0, 256, (*shape, DTYPE_ITEMSIZE[dtype]), dtype=torch.uint8, generator=generator)
    return raw.view(TORCH_DTYPES[dtype]).reshape(shape)


def bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_exact(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    assert bits(got) == bits(expected)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_same_node_round_trip_is_bit_exact_and_zero_copy(nodes, dtype: str) -> None:
    a, _ = nodes
    tensor = random_tensor(dtype, (3, 5, 7))
    ref = a.put(tensor)
    assert (ref.dtype, ref.shape, ref.nbytes, ref.location) == (dtype, (3, 5, 7), tensor.numel() * tensor.element_size(), a.sidecar_id)
    first, second = a.get(ref), a.get(ref)
    assert_bit_exact(first, tensor)
    assert first.data_ptr() == second.data_ptr()  # both views of the same shared memory, no copy
    a.release(ref)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_cross_sidecar_round_trip_is_bit_exact(nodes, dtype: str) -> None:
    a, b = nodes
    tensor = random_tensor(dtype, (4, 33), seed=1)
    ref = a.put(tensor)
    assert_bit_exact(b.get(ref), tensor)
    b.release(ref)


def test_cross_sidecar_round_trip_of_a_multi_chunk_tensor(nodes) -> None:
    a, b = nodes
    tensor = random_tensor("float32", (5, 1 << 20), seed=2)  # 20 MiB: several 8 MiB chunks
    ref = a.put(tensor)
    assert_bit_exact(b.get(ref, timeout=30), tensor)
    b.release(ref)


@pytest.mark.parametrize("dtype", sorted(set(ALL_DTYPES) - {"bfloat16"}))
def test_numpy_arrays_round_trip(nodes, dtype: str) -> None:
    a, b = nodes
    array = random_tensor(dtype, (6, 2), seed=3).numpy()
    ref = a.put(array, pins=2)
    assert a.get(ref).numpy().tobytes() == array.tobytes()
    assert b.get(ref).numpy().tobytes() == array.tobytes()
    a.release(ref)
    b.release(ref)


def test_non_contiguous_scalar_empty_and_big_endian_inputs(nodes) -> None:
    a, b = nodes
    strided = random_tensor("float16", (8, 6), seed=4).t()[::2]
    big_endian = np.arange(12, dtype=">i4").reshape(3, 4)
    for value, expected in [
        (strided, strided),
        (torch.tensor(3.5, dtype=torch.float64), torch.tensor(3.5, dtype=torch.float64)),
        (torch.empty(0, 3, dtype=torch.int8), torch.empty(0, 3, dtype=torch.int8)),
        (big_endian, torch.arange(12, dtype=torch.int32).reshape(3, 4)),
    ]:
        ref = a.put(value)
        assert_bit_exact(b.get(ref), expected)
        b.release(ref)


def test_disallowed_inputs_are_rejected_before_anything_is_stored(nodes) -> None:
    a, _ = nodes
    before = a.stats().tensors
    with pytest.raises(ValueError, match="torch dtype torch.complex64 is not allowed"):
        a.put(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="numpy dtype uint32 is not allowed"):
        a.put(np.zeros(2, dtype=np.uint32))
    with pytest.raises(TypeError, match="expected a torch.Tensor or numpy.ndarray, got list"):
        a.put([1.0, 2.0])
    assert a.stats().tensors == before


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from(ALL_DTYPES), shape=st.lists(st.integers(0, 9), max_size=4).map(tuple), seed=st.integers(0, 1000))
def test_any_shape_round_trips_on_both_paths(nodes, dtype: str, shape: tuple[int, ...], seed: int) -> None:
    a, b = nodes
    tensor = random_tensor(dtype, shape, seed)
    ref = a.put(tensor, pins=2)
    assert_bit_exact(a.get(ref), tensor)
    assert_bit_exact(b.get(ref), tensor)
    a.release(ref)
    b.release(ref)


def test_a_batch_of_tensors_goes_in_and_out_in_one_request_each_way(nodes) -> None:
    a, b = nodes
    batch = [random_tensor("float32", (16, 64), seed=i) for i in range(200)]  # more than one alloc request holds
    refs = a.put_many(batch)
    assert len({ref.id for ref in refs}) == 200 and all(ref.location == a.sidecar_id for ref in refs)
    for got, expected in zip(a.get_many(refs), batch):  # held here: views of this node's memory
        assert_bit_exact(got, expected)
    for got, expected in zip(b.get_many(refs[:3]), batch[:3]):  # held elsewhere: pulled over TCP
        assert_bit_exact(got, expected)
    b.release_many(refs[:3])
    a.release_many(refs)
    found = a.directory.lookup_many([(ref.id, a.sidecar_id) for ref in refs])
    assert [entry.pins for entry, _ in found] == [0] * 200  # all CACHED: released once each, never below 0
    assert_bit_exact(a.get(refs[0]), batch[0])  # and still readable until evicted
