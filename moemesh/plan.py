"""`moemesh plan`: an EPLB-style placement of experts on pools from measured load.

Every pool (an expert service) holds `slots` experts of every MoE layer. The hottest experts get
extra replicas (each replica takes an equal share of its expert's load) until every slot is used,
then replicas are packed heaviest first onto the least-loaded pool that does not hold that expert
yet, the greedy balancing of DeepSeek's EPLB. The plan reports max/mean pool load before (the
contiguous `i/N` shards) and after.
"""

import re
from dataclasses import dataclass

import torch

from moemesh.errors import InvalidArgument
from moemesh.families import TensorTable
from moemesh.kustomize import Pool
from moemesh.sharding import shard_bytes, shard_experts


@dataclass(frozen=True)
class Plan:
    pools: list[list[int]]  # experts each pool holds
    before: float  # max/mean pool load of the contiguous shards
    after: float  # max/mean pool load of this plan


def balance(load: dict[int, float], num_experts: int, pools: int, slots: int) -> Plan:
    if pools * slots < num_experts:
        raise InvalidArgument(f"slots: {pools} pools x {slots} slots cannot hold {num_experts} experts")
    if slots > num_experts:
        raise InvalidArgument(f"slots: {slots} is more than the {num_experts} experts")
    replicas = {e: 1 for e in range(num_experts)}
    for _ in range(pools * slots - num_experts):
        growable = [e for e in replicas if replicas[e] < pools]  # at most one replica per pool
        hottest = max(growable, key=lambda e: (load.get(e, 0.0) / replicas[e], -e))
        replicas[hottest] += 1
    items = sorted(
        ((load.get(e, 0.0) / replicas[e], e) for e in replicas for _ in range(replicas[e])), key=lambda x: (-x[0], x[1])
    )
    held: list[list[int]] = [[] for _ in range(pools)]
    pool_load = [0.0] * pools
    for share, expert in items:
        candidates = [p for p in range(pools) if len(held[p]) < slots and expert not in held[p]]
        if not candidates:
            raise InvalidArgument(f"slots: no pool has room for another replica of expert {expert}; add slots")
        target = min(candidates, key=lambda p: (pool_load[p], p))
        held[target].append(expert)
        pool_load[target] += share
    contiguous = [sum(load.get(e, 0.0) for e in shard_experts(f"{i}/{pools}", num_experts)) for i in range(pools)]
    return Plan([sorted(h) for h in held], _imbalance(contiguous), _imbalance(pool_load))


def load_from_metrics(text: str, metric: str = "moemesh_router_expert_tokens_total") -> dict[int, float]:
    """Tokens per expert, summed over layers, from a router's Prometheus exposition."""
    load: dict[int, float] = {}
    for match in re.finditer(rf'^{metric}\{{[^}}]*expert="(\d+)"[^}}]*\}} (\S+)$', text, re.MULTILINE):
        load[int(match.group(1))] = load.get(int(match.group(1)), 0.0) + float(match.group(2))
    return load


def report(plan: Plan, model: str, registry: str) -> str:
    lines = [f"max/mean pool load: {plan.before:.3f} as contiguous shards, {plan.after:.3f} with this plan"]
    for i, experts in enumerate(plan.pools):
        spec = ",".join(map(str, experts))
        lines.append(f"pool {i}: moemesh expert --model {model} --shard {spec} --registry {registry}")
    return "\n".join(lines)


def kustomize_pools(
    plan: Plan, table: TensorTable, dtype: torch.dtype, prefix: str, min_replicas: int, max_replicas: int
) -> list[Pool]:
    """The plan's pools as `<prefix><i>`, sized by the bytes of expert weights each holds at `dtype`."""
    specs = [",".join(map(str, experts)) for experts in plan.pools]
    return [
        Pool(f"{prefix}{i}", spec, shard_bytes(table, spec, dtype), min_replicas, max_replicas)
        for i, spec in enumerate(specs)
    ]


def _imbalance(loads: list[float]) -> float:
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean else 1.0
