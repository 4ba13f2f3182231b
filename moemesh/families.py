"""Supported model families: how each one's `config.json` and tensor names map onto ours.

A registry keyed by `model_type`; adding a family adds one config reader and one `Naming`.
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moemesh.config import GateConfig, MLAConfig, ModelConfig, RopeConfig, yarn_mscale
from moemesh.errors import CheckpointError

Shape = tuple[int, ...]
TensorMap = dict[str, tuple[str, Shape]]  # checkpoint name -> (our module path, shape)

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Naming:
    """Where a family keeps its MLP tensors, relative to `model.layers.{i}.`."""

    moe: str  # the MoE block: "block_sparse_moe" or "mlp"
    expert_proj: dict[str, str]  # our projection name -> the checkpoint's
    shared: str = ""  # shared expert module under the MoE block
    ignore_extra_layers: bool = False  # layers past num_hidden_layers (DeepSeek-V3's multi-token prediction)


_IDENTITY = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}


class TensorTable:
    """Checkpoint names and shapes of every part, as the services hold them."""

    def __init__(self, cfg: ModelConfig, naming: Naming):
        self.cfg, self.naming = cfg, naming

    def dense(self) -> TensorMap:
        """The gateway's tensors: embeddings, attention, norms, dense MLPs, shared experts, LM head."""
        c = self.cfg
        out: TensorMap = {"model.embed_tokens.weight": ("embed_tokens.weight", (c.vocab_size, c.hidden_size))}
        for i in range(c.num_layers):
            names: TensorMap = {
                "input_layernorm.weight": ("input_layernorm.weight", (c.hidden_size,)),
                "post_attention_layernorm.weight": ("post_attention_layernorm.weight", (c.hidden_size,)),
            }
            names |= {f"self_attn.{k}": (f"self_attn.{k}", shape) for k, shape in self._attention().items()}
            names |= self._mlp_dense(i)
            out |= {
                f"model.layers.{i}.{theirs}": (f"layers.{i}.{ours}", shape) for theirs, (ours, shape) in names.items()
            }
        out["model.norm.weight"] = ("norm.weight", (c.hidden_size,))
        if not c.tie_word_embeddings:
            out["lm_head.weight"] = ("lm_head.weight", (c.vocab_size, c.hidden_size))
        return out

    def gate(self, layer: int) -> TensorMap:
        c, p = self.cfg, f"model.layers.{layer}.{self.naming.moe}.gate."
        out: TensorMap = {p + "weight": ("weight", (c.num_experts, c.hidden_size))}
        if c.gate.bias:
            out[p + "e_score_correction_bias"] = ("bias", (c.num_experts,))
        return out

    def expert(self, layer: int, expert: int) -> TensorMap:
        prefix = f"model.layers.{layer}.{self.naming.moe}.experts.{expert}."
        return {
            f"{prefix}{theirs}.weight": (f"{ours}.weight", shape)
            for ours, theirs, shape in self._swiglu(self.cfg.moe_intermediate_size)
        }

    def all(self) -> TensorMap:
        out = self.dense()
        for layer in self.cfg.moe_layers:
            out |= self.gate(layer)
            for expert in range(self.cfg.num_experts):
                out |= self.expert(layer, expert)
        return out

    def ignored(self, name: str) -> bool:
        """Checkpoint tensors that `transformers` ignores too."""
        if name.endswith(".rotary_emb.inv_freq"):
            return True
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        return self.naming.ignore_extra_layers and layer is not None and int(layer.group(1)) >= self.cfg.num_layers

    def _swiglu(self, intermediate: int, names: dict[str, str] | None = None) -> list[tuple[str, str, Shape]]:
        names, d = names or self.naming.expert_proj, self.cfg.hidden_size
        return [
            ("gate_proj", names["gate_proj"], (intermediate, d)),
            ("up_proj", names["up_proj"], (intermediate, d)),
            ("down_proj", names["down_proj"], (d, intermediate)),
        ]

    def _mlp_dense(self, layer: int) -> TensorMap:
        """A dense layer's MLP, or an MoE layer's shared expert and its gate."""
        c, n = self.cfg, self.naming
        if layer not in c.moe_layers:
            return {
                f"mlp.{p}.weight": (f"mlp.{p}.weight", shape)
                for p, _, shape in self._swiglu(c.intermediate_size, _IDENTITY)
            }
        out: TensorMap = {}
        if c.shared_expert_size:
            for p, _, shape in self._swiglu(c.shared_expert_size, _IDENTITY):
                out[f"{n.moe}.{n.shared}.{p}.weight"] = (f"shared.{p}.weight", shape)
        if c.shared_expert_gated:
            out[f"{n.moe}.shared_expert_gate.weight"] = ("shared_gate.weight", (1, c.hidden_size))
        return out

    def _attention(self) -> dict[str, Shape]:
        c = self.cfg
        d = c.hidden_size
        if c.mla is not None:
            m = c.mla
            qk = m.qk_nope_head_dim + m.qk_rope_head_dim
            out = {
                "kv_a_proj_with_mqa.weight": (m.kv_lora_rank + m.qk_rope_head_dim, d),
                "kv_a_layernorm.weight": (m.kv_lora_rank,),
                "kv_b_proj.weight": (c.num_heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank),
                "o_proj.weight": (d, c.num_heads * m.v_head_dim),
            }
            if m.q_lora_rank is None:
                return out | {"q_proj.weight": (c.num_heads * qk, d)}
            return out | {
                "q_a_proj.weight": (m.q_lora_rank, d),
                "q_a_layernorm.weight": (m.q_lora_rank,),
                "q_b_proj.weight": (c.num_heads * qk, m.q_lora_rank),
            }
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        out = {"q_proj.weight": (q, d), "k_proj.weight": (kv, d), "v_proj.weight": (kv, d), "o_proj.weight": (d, q)}
        if c.qkv_bias:
            out |= {"q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,)}
        if c.o_bias:
            out["o_proj.bias"] = (d,)
        if c.qk_norm:
            out |= {"q_norm.weight": (c.head_dim,), "k_norm.weight": (c.head_dim,)}
        return out


@dataclass(frozen=True)
class Family:
    read_config: Callable[[dict[str, Any]], ModelConfig]
    naming: Naming


def load_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no config.json in the model directory") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    return read_config(raw)


def read_config(raw: dict[str, Any]) -> ModelConfig:
    """Our config from a parsed `config.json`, by its family's reader."""
    return family(raw.get("model_type")).read_config(raw)


def family(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"config.json: unsupported model_type {model_type!r} (supported: {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[model_type]


def tensor_table(cfg: ModelConfig) -> TensorTable:
    return TensorTable(cfg, FAMILIES[cfg.model_type].naming)


def _common(raw: dict[str, Any]) -> dict[str, Any]:
    """Fields every family reads the same way."""
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json: hidden_act {raw['hidden_act']!r} is not supported (only silu)")
    dtype_name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    if dtype_name not in _TORCH_DTYPES:
        raise CheckpointError(f"config.json: unsupported dtype {dtype_name!r}")
    heads = raw["num_attention_heads"]
    eos = raw.get("eos_token_id")
    return dict(
        model_type=raw["model_type"],
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        checkpoint_dtype=_TORCH_DTYPES[dtype_name],
    )


def _first(raw: dict[str, Any], *names: str) -> Any:
    """The first of several names a field goes by (releases and `transformers` versions differ)."""
    return next((raw[n] for n in names if raw.get(n) is not None), None)


def _rope(raw: dict[str, Any], dim: int, default_theta: float, interleaved: bool = False) -> RopeConfig:
    """`rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta` (older releases)."""
    params = dict(raw.get("rope_scaling") or {}) | dict(raw.get("rope_parameters") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear", "yarn"):
        raise CheckpointError(f"config.json: RoPE type {rope_type!r} is not supported for {raw['model_type']}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError("config.json: partial_rotary_factor is not supported")
    theta = float(params.get("rope_theta", raw.get("rope_theta", default_theta)))
    if rope_type == "default":
        return RopeConfig(theta, dim, interleaved)
    original = params.get("original_max_position_embeddings") or raw.get("max_position_embeddings")
    factor = params.get("factor") or raw["max_position_embeddings"] / original
    return RopeConfig(
        theta, dim, interleaved, rope_type, float(factor), int(original),
        beta_fast=params.get("beta_fast") or 32.0, beta_slow=params.get("beta_slow") or 1.0,
        mscale=params.get("mscale") or 0.0, mscale_all_dim=params.get("mscale_all_dim") or 0.0,
        attention_factor=params.get("attention_factor"), truncate=params.get("truncate", True),
    )  # fmt: skip


def _mixtral(raw: dict[str, Any]) -> ModelConfig:
    base = _common(raw) | {"rms_norm_eps": raw.get("rms_norm_eps", 1e-5)}
    window = raw.get("sliding_window") or None
    return ModelConfig(
        **base,
        rope=_rope(raw, base["head_dim"], 1e6),
        softmax_scale=base["head_dim"] ** -0.5,
        intermediate_size=raw["intermediate_size"],
        moe_intermediate_size=raw["intermediate_size"],
        num_experts=_first(raw, "num_local_experts", "num_experts"),
        moe_layers=tuple(range(base["num_layers"])),
        gate=GateConfig(top_k=raw["num_experts_per_tok"]),
        sliding_window=window,
        sliding_layers=frozenset(range(base["num_layers"])) if window else frozenset(),
    )


def _qwen_moe(raw: dict[str, Any]) -> ModelConfig:
    """Qwen2-MoE and Qwen3-MoE: dense layers by `mlp_only_layers` / `decoder_sparse_step`."""
    base = _common(raw)
    qwen3 = raw["model_type"] == "qwen3_moe"
    layers, experts = base["num_layers"], _first(raw, "num_experts", "num_local_experts") or 0
    dense_only = set(raw.get("mlp_only_layers") or [])
    step = raw.get("decoder_sparse_step", 1)
    window = raw.get("sliding_window") if raw.get("use_sliding_window") else None
    if qwen3:
        sliding = range(layers) if window else ()
    else:
        types = raw.get("layer_types") or [
            "sliding_attention" if (i + 1) % 2 and i < raw.get("max_window_layers", 28) and window else "full"
            for i in range(layers)
        ]
        sliding = [i for i, t in enumerate(types) if t == "sliding_attention" and window]
    return ModelConfig(
        **base,
        rope=_rope(raw, base["head_dim"], 1e4),
        softmax_scale=base["head_dim"] ** -0.5,
        intermediate_size=raw["intermediate_size"],
        moe_intermediate_size=raw["moe_intermediate_size"],
        num_experts=experts,
        moe_layers=tuple(i for i in range(layers) if i not in dense_only and experts and (i + 1) % step == 0),
        gate=GateConfig(top_k=raw["num_experts_per_tok"], normalize=bool(raw.get("norm_topk_prob", False))),
        shared_expert_size=0 if qwen3 else raw.get("shared_expert_intermediate_size", 0),
        shared_expert_gated=not qwen3,
        qkv_bias=bool(raw.get("attention_bias", False)) if qwen3 else bool(raw.get("qkv_bias", True)),
        o_bias=qwen3 and bool(raw.get("attention_bias", False)),
        qk_norm=qwen3,
        sliding_window=window or None,
        sliding_layers=frozenset(sliding),
    )


def _deepseek(raw: dict[str, Any]) -> ModelConfig:
    """DeepSeek-V2 (softmax, optional group-limited top-k) and V3 (sigmoid + bias, group-limited)."""
    base = _common(raw)
    v3 = raw["model_type"] == "deepseek_v3"
    if raw.get("attention_bias"):
        raise CheckpointError("config.json: attention_bias is not supported for MLA attention")
    mla = MLAConfig(
        q_lora_rank=raw.get("q_lora_rank"),
        kv_lora_rank=raw["kv_lora_rank"],
        qk_nope_head_dim=raw["qk_nope_head_dim"],
        qk_rope_head_dim=raw["qk_rope_head_dim"],
        v_head_dim=raw["v_head_dim"],
    )
    rope = _rope(raw, mla.qk_rope_head_dim, 1e4, interleaved=raw.get("rope_interleave", True) if v3 else True)
    scale = (mla.qk_nope_head_dim + mla.qk_rope_head_dim) ** -0.5
    if rope.type != "default" and rope.mscale_all_dim:
        scale *= yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    experts = _first(raw, "n_routed_experts", "num_local_experts", "num_experts")
    if v3:
        gate = GateConfig(
            top_k=raw["num_experts_per_tok"], scoring="sigmoid", normalize=bool(raw.get("norm_topk_prob", True)),
            scale=raw.get("routed_scaling_factor", 1.0), num_groups=raw.get("n_group") or 1,
            top_groups=raw.get("topk_group") or 1, group_score="top2_sum", float32_logits=True, bias=True,
        )  # fmt: skip
    else:
        grouped = raw.get("topk_method", "greedy") == "group_limited_greedy"
        gate = GateConfig(
            top_k=raw["num_experts_per_tok"], normalize=False, scale=raw.get("routed_scaling_factor", 1.0),
            num_groups=raw["n_group"] if grouped else 1, top_groups=raw["topk_group"] if grouped else 1,
            float32_logits=True,
        )  # fmt: skip
    shared = raw.get("n_shared_experts") or 0
    return ModelConfig(
        **base | {"head_dim": mla.qk_nope_head_dim + mla.qk_rope_head_dim, "num_kv_heads": base["num_heads"]},
        rope=rope,
        softmax_scale=scale,
        intermediate_size=raw["intermediate_size"],
        moe_intermediate_size=raw["moe_intermediate_size"],
        num_experts=experts,
        moe_layers=tuple(range(raw.get("first_k_dense_replace") or 0, base["num_layers"])),
        gate=gate,
        shared_expert_size=raw["moe_intermediate_size"] * shared,
        mla=mla,
    )


FAMILIES: dict[str, Family] = {
    "mixtral": Family(
        _mixtral, Naming(moe="block_sparse_moe", expert_proj={"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"})
    ),
    "qwen2_moe": Family(_qwen_moe, Naming(moe="mlp", expert_proj=_IDENTITY, shared="shared_expert")),
    "qwen3_moe": Family(_qwen_moe, Naming(moe="mlp", expert_proj=_IDENTITY)),
    "deepseek_v2": Family(_deepseek, Naming(moe="mlp", expert_proj=_IDENTITY, shared="shared_experts")),
    "deepseek_v3": Family(
        _deepseek, Naming(moe="mlp", expert_proj=_IDENTITY, shared="shared_experts", ignore_extra_layers=True)
    ),
}
