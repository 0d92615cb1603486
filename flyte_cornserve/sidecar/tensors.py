"""Turning torch tensors and numpy arrays into raw bytes in shared memory and back, without copies.

Writes go through numpy (`np.copyto` copies at memory bandwidth where `Tensor.copy_` is several times
slower here); reads give a torch tensor over the shared memory itself. numpy has no bfloat16, so a
bfloat16 tensor is written through its bit-identical int16 view.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..task.tensor_ref import DTYPE_ITEMSIZE

TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_ITEMSIZE}
_NAME_OF_TORCH = {dtype: name for name, dtype in TORCH_DTYPES.items()}

TensorLike = torch.Tensor | np.ndarray


def as_array(tensor: TensorLike) -> tuple[np.ndarray, str]:
    """A numpy view of `tensor`'s values (no copy for CPU tensors) and its dtype name."""
    if isinstance(tensor, torch.Tensor):
        name = _NAME_OF_TORCH.get(tensor.dtype)
        if name is None:
            raise ValueError(f"torch dtype {tensor.dtype} is not allowed; allowed: {sorted(DTYPE_ITEMSIZE)}")
        cpu = tensor.detach().cpu().resolve_conj().resolve_neg()
        if name == "bfloat16":
            cpu = cpu.view(torch.int16)
        return cpu.numpy(), name
    if isinstance(tensor, np.ndarray):
        name = tensor.dtype.name
        if name not in DTYPE_ITEMSIZE or name == "bfloat16":
            raise ValueError(f"numpy dtype {tensor.dtype} is not allowed; allowed: {sorted(set(DTYPE_ITEMSIZE) - {'bfloat16'})}")
        if not tensor.dtype.isnative:
            tensor = tensor.astype(tensor.dtype.newbyteorder("="))
        return tensor, name
    raise TypeError(f"expected a torch.Tensor or numpy.ndarray, got {type(tensor).__name__}")


def tensor_over(buffer: object, offset: int, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    """A torch tensor whose storage is `buffer[offset:]` itself."""
    count = math.prod(shape)
    if count == 0:
        return torch.empty(shape, dtype=TORCH_DTYPES[dtype])
    return torch.frombuffer(buffer, dtype=TORCH_DTYPES[dtype], count=count, offset=offset).view(shape)
