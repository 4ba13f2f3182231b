"""How the routed experts are split into shards, and what each shard holds in bytes."""

import math

import torch

from moemesh.errors import InvalidArgument
from moemesh.families import TensorTable


def shard_experts(spec: str, num_experts: int) -> list[int]:
    """`"i/N"`: the i-th of N contiguous, near-equal slices of the expert ids; or an explicit list
    `"3,5,7"` (what `moemesh plan` prints). The same experts in every MoE layer."""
    if "/" not in spec:
        try:
            experts = sorted({int(part) for part in spec.split(",")})
        except ValueError:
            raise InvalidArgument(
                f"shard: expected i/N such as 0/2 or expert ids such as 3,5,7, got {spec!r}"
            ) from None
        if not experts or experts[0] < 0 or experts[-1] >= num_experts:
            raise InvalidArgument(f"shard: expert ids {spec!r} must lie in [0, {num_experts})")
        return experts
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        raise InvalidArgument(f"shard: expected i/N such as 0/2, got {spec!r}") from None
    if not 0 <= index < count <= num_experts:
        raise InvalidArgument(f"shard: {spec!r} needs 0 <= i < N <= {num_experts} (the model's experts)")
    return list(range(index * num_experts // count, (index + 1) * num_experts // count))


def expert_bytes(table: TensorTable, layer: int, expert: int, dtype: torch.dtype) -> int:
    return sum(math.prod(shape) for _, shape in table.expert(layer, expert).values()) * dtype.itemsize


def shard_bytes(table: TensorTable, spec: str, dtype: torch.dtype) -> int:
    """Bytes of expert weights the shard `spec` holds, at `dtype`."""
    experts = shard_experts(spec, table.cfg.num_experts)
    return sum(expert_bytes(table, layer, e, dtype) for layer in table.cfg.moe_layers for e in experts)
