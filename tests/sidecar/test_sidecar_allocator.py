"""Placement of tensors in the arena: no overlaps, first fit, full coalescing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flyte_cornserve.sidecar.allocator import ExtentAllocator

UNIT = 4096


def test_first_fit_reuses_the_lowest_free_extent() -> None:
    allocator = ExtentAllocator(10 * UNIT)
    a, b, c = (allocator.allocate(UNIT) for _ in range(3))
    assert (a, b, c) == (0, UNIT, 2 * UNIT)
    allocator.free(b)
    assert allocator.allocate(1) == UNIT  # the hole, not the end
    assert allocator.allocate(8 * UNIT) is None  # 7 units free at the end
    assert allocator.largest_free == 7 * UNIT


def test_zero_byte_tensors_get_distinct_offsets() -> None:
    allocator = ExtentAllocator(4 * UNIT)
    assert allocator.allocate(0) != allocator.allocate(0)


def test_capacity_below_one_extent_is_rejected() -> None:
    with pytest.raises(ValueError, match="smaller than one"):
        ExtentAllocator(UNIT - 1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5 * UNIT)), max_size=60))
def test_random_allocations_and_frees_keep_the_books_exact(operations: list[tuple[bool, int]]) -> None:
    allocator = ExtentAllocator(32 * UNIT)
    live: dict[int, int] = {}
    for allocate, nbytes in operations:
        if allocate or not live:
            size = allocator.size_for(nbytes)
            fitting = [o for o, free in allocator.free_extents() if free >= size]
            offset = allocator.allocate(nbytes)
            assert offset == (fitting[0] if fitting else None)  # first fit, and None only if nothing fits
            if offset is None:
                continue
            live[offset] = size
        else:
            offset = next(iter(live))
            allocator.free(offset)
            del live[offset]
        spans = sorted([(o, o + s, "used") for o, s in live.items()] + [(o, o + s, "free") for o, s in allocator.free_extents()])
        assert spans[0][0] == 0 and spans[-1][1] == allocator.capacity
        for (_, end, kind), (start, _, next_kind) in zip(spans, spans[1:]):
            assert end == start  # no overlap, no gap
            assert not (kind == next_kind == "free")  # free neighbours are merged
        assert allocator.used == sum(live.values())
    for offset in list(live):
        allocator.free(offset)
    assert allocator.free_extents() == [(0, allocator.capacity)]
