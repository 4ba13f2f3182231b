"""Model configuration: what the math needs, in our terms, whatever family the checkpoint comes from.

`moemesh.families` reads each family's `config.json` into these types, reading exactly the fields
the family's `transformers` code reads.
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    dim: int  # rotated dimensions per head
    interleaved: bool = False  # pairs (2i, 2i+1) rotate together (DeepSeek), not (i, i + dim/2)
    type: Literal["default", "linear", "yarn"] = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True

    def frequencies(self) -> tuple[torch.Tensor, float]:
        """Inverse frequencies [dim/2] and the factor cos/sin are scaled by (YaRN's attention factor)."""
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float) / self.dim))
        if self.type == "linear":
            return inv_freq / self.factor, 1.0
        if self.type == "default":
            return inv_freq, 1.0
        low, high = (self._correction_dim(self.beta_fast), self._correction_dim(self.beta_slow))
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, self.dim - 1)
        ramp = ((torch.arange(self.dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
        extrapolate = 1 - ramp
        inv_freq = (inv_freq / self.factor) * (1 - extrapolate) + inv_freq * extrapolate
        attention = self.attention_factor
        if attention is None:
            attention = (
                yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
                if self.mscale and self.mscale_all_dim
                else yarn_mscale(self.factor)
            )
        return inv_freq, attention

    def _correction_dim(self, rotations: float) -> float:
        span = self.original_max_position_embeddings / (rotations * 2 * math.pi)
        return self.dim * math.log(span) / (2 * math.log(self.theta))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class GateConfig:
    """How the router turns gate logits into (weights, experts) per token."""

    top_k: int
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    normalize: bool = True  # renormalize the chosen weights to sum to 1
    scale: float = 1.0  # routed_scaling_factor
    num_groups: int = 1  # group-limited top-k: experts in `num_groups` groups,
    top_groups: int = 1  # only the best `top_groups` groups are eligible,
    group_score: Literal["max", "top2_sum"] = "max"  # a group scored by its best or best two experts
    float32_logits: bool = False  # logits from float32 copies of input and weight (DeepSeek)
    bias: bool = False  # e_score_correction_bias added for the choice only (DeepSeek-V3)


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head Latent Attention dimensions (DeepSeek-V2/V3)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    checkpoint_dtype: torch.dtype
    rope: RopeConfig
    softmax_scale: float
    intermediate_size: int  # dense MLP layers
    moe_intermediate_size: int  # one routed expert
    num_experts: int
    moe_layers: tuple[int, ...]  # decoder layers whose MLP is routed; the others are dense
    gate: GateConfig
    shared_expert_size: int = 0  # intermediate size of the shared expert(s) of MoE layers; 0: none
    shared_expert_gated: bool = False  # sigmoid(shared_expert_gate(x)) scales the shared output (Qwen2-MoE)
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # RMSNorm per head on q and k before RoPE (Qwen3)
    sliding_window: int | None = None
    sliding_layers: frozenset[int] = frozenset()
    mla: MLAConfig | None = None

    @property
    def experts_per_token(self) -> int:
        return self.gate.top_k

    def window(self, layer: int) -> int | None:
        return self.sliding_window if layer in self.sliding_layers else None
