"""`moemesh inspect DIR`: what a checkpoint is and how its experts would split into shards."""

import math

import torch

from moemesh.checkpoint import Checkpoint
from moemesh.sharding import shard_bytes, shard_experts


def parameter_counts(ckpt: Checkpoint) -> tuple[int, int, int]:
    """Parameters of the gateway's dense part, the router's gates and the routed experts."""
    cfg, table = ckpt.config, ckpt.tensors
    dense = sum(math.prod(shape) for _, shape in table.dense().values())
    gates = sum(math.prod(shape) for layer in cfg.moe_layers for _, shape in table.gate(layer).values())
    routed = sum(math.prod(shape) for _, shape in table.all().values()) - dense - gates
    return dense, gates, routed


def report(ckpt: Checkpoint, shards: int, dtype: torch.dtype) -> str:
    cfg, table = ckpt.config, ckpt.tensors
    dense, gates, routed = parameter_counts(ckpt)
    attention = f"MLA (latent {cfg.mla.kv_lora_rank})" if cfg.mla else f"GQA {cfg.num_heads}/{cfg.num_kv_heads} heads"
    window = f", sliding window {cfg.sliding_window} on {len(cfg.sliding_layers)} layers" if cfg.sliding_window else ""
    lines = [
        f"model:        {ckpt.dir}",
        f"family:       {cfg.model_type} (fingerprint {ckpt.fingerprint})",
        f"sizes:        hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, {cfg.num_layers} layers, {attention}{window}",
        f"experts:      {cfg.num_experts} per MoE layer, top-{cfg.gate.top_k} ({cfg.gate.scoring}), "
        f"intermediate {cfg.moe_intermediate_size}, shared {cfg.shared_expert_size or 'none'}",
        f"MoE layers:   {len(cfg.moe_layers)} of {cfg.num_layers} "
        f"(dense: {sorted(set(range(cfg.num_layers)) - set(cfg.moe_layers)) or 'none'})",
        f"parameters:   {dense + gates + routed:,} (gateway {dense:,}, router {gates:,}, routed experts {routed:,})",
        f"shards at {str(dtype).removeprefix('torch.')}:",
    ]
    for i in range(shards):
        spec = f"{i}/{shards}"
        experts = shard_experts(spec, cfg.num_experts)
        lines.append(
            f"  shard {spec}: experts {experts[0]}-{experts[-1]} of each MoE layer, "
            f"{shard_bytes(table, spec, dtype):,} bytes"
        )
    return "\n".join(lines)
