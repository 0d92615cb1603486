"""First-fit placement of tensors in a sidecar's arena, lowest offset first.

Lowest-first keeps the used part of the arena compact, so puts keep landing on pages that the
processes have already mapped and touched (writing to fresh shared memory runs at a fraction of
memory bandwidth), and the arena's resident size stays at its high-water mark.
"""

from __future__ import annotations

import bisect

ALIGNMENT = 4096  # page-aligned extents: any dtype is aligned, and no two tensors share a page


class ExtentAllocator:
    """Hands out aligned, non-overlapping extents of `[0, capacity)`; not thread-safe."""

    def __init__(self, capacity: int, alignment: int = ALIGNMENT) -> None:
        if capacity < alignment:
            raise ValueError(f"capacity {capacity} is smaller than one {alignment}-byte extent")
        self.alignment = alignment
        self.capacity = capacity - capacity % alignment
        self._free_offsets = [0]  # sorted start offsets of free extents
        self._free_sizes = {0: self.capacity}
        self._allocated: dict[int, int] = {}  # offset -> size
        self.used = 0
        self.high_water = 0

    def size_for(self, nbytes: int) -> int:
        """The extent size that holds `nbytes` (at least one alignment unit, so offsets stay unique)."""
        return max(self.alignment, -(-nbytes // self.alignment) * self.alignment)

    def allocate(self, nbytes: int) -> int | None:
        """The offset of a new extent for `nbytes`, or None if no free extent is large enough."""
        size = self.size_for(nbytes)
        for i, offset in enumerate(self._free_offsets):
            free = self._free_sizes[offset]
            if free < size:
                continue
            del self._free_sizes[offset]
            if free == size:
                del self._free_offsets[i]
            else:
                self._free_offsets[i] = offset + size
                self._free_sizes[offset + size] = free - size
            self._allocated[offset] = size
            self.used += size
            self.high_water = max(self.high_water, offset + size)
            return offset
        return None

    def free(self, offset: int) -> None:
        size = self._allocated.pop(offset)
        self.used -= size
        i = bisect.bisect_left(self._free_offsets, offset)
        following = self._free_offsets[i] if i < len(self._free_offsets) else None
        if following == offset + size:  # merge with the free extent after it
            size += self._free_sizes.pop(following)
            del self._free_offsets[i]
        if i > 0 and (before := self._free_offsets[i - 1]) + self._free_sizes[before] == offset:
            self._free_sizes[before] += size  # merge into the free extent before it
        else:
            self._free_offsets.insert(i, offset)
            self._free_sizes[offset] = size

    @property
    def largest_free(self) -> int:
        return max(self._free_sizes.values(), default=0)

    def free_extents(self) -> list[tuple[int, int]]:
        return [(offset, self._free_sizes[offset]) for offset in self._free_offsets]
