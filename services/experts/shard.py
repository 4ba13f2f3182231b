"""Which experts a shard holds, and running token groups on them."""

from dataclasses import dataclass

import torch

from moemesh.checkpoint import Checkpoint
from moemesh.errors import InvalidArgument
from moemesh.model import load_experts
from moemesh.moe import ExpertGroup, LocalExperts
from moemesh.quant import parameter_bytes
from moemesh.sharding import shard_experts


@dataclass
class ExpertShard:
    fingerprint: str
    layers: dict[int, list[int]]  # layer -> experts held
    hidden_size: int
    run: LocalExperts

    @property
    def parameter_bytes(self) -> int:
        """Bytes of the expert weights held (what `moemesh inspect` predicts per shard)."""
        return sum(parameter_bytes(m) for m in self.run.experts.values())

    @classmethod
    def load(
        cls, ckpt: Checkpoint, spec: str, dtype: torch.dtype, device: torch.device, quantize: str = "none"
    ) -> "ExpertShard":
        """Reads this shard's experts onto `device` (a quantized checkpoint's at their stored width);
        `quantize="int8"` makes their float weights int8 with per-channel scales, `"int4"` 4-bit codes by
        group (`moemesh.quant_linear.rtn_int4`)."""
        cfg = ckpt.config
        experts = shard_experts(spec, cfg.num_experts)
        layers = {layer: experts for layer in cfg.moe_layers}
        pairs = [(layer, e) for layer, held in layers.items() for e in held]
        modules = load_experts(ckpt, pairs, dtype, device, quantize)
        return cls(ckpt.fingerprint, layers, cfg.hidden_size, LocalExperts(modules))

    def forward(self, layer: int, groups: list[ExpertGroup], rows: torch.Tensor) -> torch.Tensor:
        """Checks the request against what this shard holds, then runs it."""
        held = self.layers.get(layer)
        if held is None:
            raise InvalidArgument(f"layer: {layer} is not an MoE layer of this shard (holds {sorted(self.layers)})")
        for g in groups:
            if g.expert not in held:
                raise InvalidArgument(f"groups: expert {g.expert} of layer {layer} is not on this shard (holds {held})")
        total = sum(g.num_tokens for g in groups)
        if rows.shape != (total, self.hidden_size):
            raise InvalidArgument(
                f"hidden: shape {list(rows.shape)} does not match the groups' {total} tokens"
                f" x hidden {self.hidden_size}"
            )
        return self.run(layer, groups, rows)
