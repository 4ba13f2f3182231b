"""Tensor wire codec: `torch.Tensor` <-> `moemesh.v1.Tensor` (dtype, shape, raw bytes).

Bytes are the tensor's row-major elements in the host's byte order, which is little-endian on every
machine we run on, as the wire contract requires. A tensor on a GPU is cast to the wire dtype there (fewer
bytes to copy), then copied to host memory to serialize; a parsed one is copied to the device asked for.
"""

from __future__ import annotations

import math

import torch

from moemesh.errors import InvalidArgument
from moemesh.v1 import tensor_pb2

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
_TO_PB: dict[torch.dtype, int] = {
    torch.float32: tensor_pb2.DTYPE_FLOAT32,
    torch.bfloat16: tensor_pb2.DTYPE_BFLOAT16,
    torch.float16: tensor_pb2.DTYPE_FLOAT16,
}
_FROM_PB: dict[int, torch.dtype] = {code: dtype for dtype, code in _TO_PB.items()}


def parse_dtype(name: str) -> torch.dtype:
    """`"bfloat16"` -> `torch.bfloat16`; raises ValueError for names outside `DTYPES`."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}") from None


def to_pb(tensor: torch.Tensor, wire_dtype: torch.dtype | None = None) -> tensor_pb2.Tensor:
    """Encode `tensor`, cast to `wire_dtype` first when given."""
    if wire_dtype is not None:
        tensor = tensor.to(wire_dtype)
    code = _TO_PB.get(tensor.dtype)
    if code is None:
        raise ValueError(f"cannot send {tensor.dtype}; expected one of {', '.join(DTYPES)}")
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes()
    return tensor_pb2.Tensor(dtype=code, shape=tensor.shape, data=data)


def from_pb(
    msg: tensor_pb2.Tensor,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    *,
    field: str = "tensor",
) -> torch.Tensor:
    """Decode and validate `msg` (errors name `field`), cast to `dtype` and copied to `device` when given."""
    wire = _FROM_PB.get(msg.dtype)
    if wire is None:
        raise InvalidArgument(f"{field}: dtype must be one of FLOAT32, BFLOAT16, FLOAT16 (got {msg.dtype})")
    shape = list(msg.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{field}: shape {shape} has a negative dimension")
    needed = math.prod(shape) * wire.itemsize
    if len(msg.data) != needed:
        raise InvalidArgument(
            f"{field}: {len(msg.data)} bytes do not match dtype {_NAMES[wire]} and shape {shape} (needs {needed})"
        )
    if needed == 0:
        tensor = torch.empty(shape, dtype=wire)
    else:
        tensor = torch.frombuffer(bytearray(msg.data), dtype=wire).reshape(shape)
    # non_blocking: CUDA stages pageable bytes before `to` returns (the buffer may go at once) without waiting
    # for the kernels queued before the copy; those that follow are ordered after it. On the CPU: no copy.
    return tensor.to(device, dtype, non_blocking=True)
