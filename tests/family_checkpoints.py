"""Tiny random checkpoints of every supported family, made with `transformers` `save_pretrained`."""

import json
from pathlib import Path

import torch

COMMON = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, max_position_embeddings=512, eos_token_id=None)


def _save(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def qwen2_moe(path: Path) -> Path:
    """Gated shared expert, a dense layer (mlp_only_layers), no top-k renormalization, q/k/v bias."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(2)
    cfg = Qwen2MoeConfig(
        **COMMON, num_hidden_layers=3, num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1],
    )  # fmt: skip
    return _save(Qwen2MoeForCausalLM(cfg), path)


def qwen3_moe(path: Path) -> Path:
    """q/k norm, head_dim != hidden/heads, top-4 of 16 renormalized, every second layer sparse, sliding window."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(3)
    cfg = Qwen3MoeConfig(
        **COMMON, num_hidden_layers=4, num_key_value_heads=2, head_dim=24, intermediate_size=96,
        moe_intermediate_size=32, num_experts=16, num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=2,
        use_sliding_window=True, sliding_window=8,
    )  # fmt: skip
    return _save(Qwen3MoeForCausalLM(cfg), path)


def deepseek_v2(path: Path) -> Path:
    """MLA without q compression, group-limited greedy top-k, 2 shared experts, a dense first layer, YaRN.

    config.json is rewritten the way older releases wrote it (`rope_theta`, `rope_scaling`, `torch_dtype`).
    """
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(4)
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 10000.0,
            "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}  # fmt: skip
    cfg = DeepseekV2Config(
        **COMMON, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
        n_shared_experts=2, num_experts_per_tok=3, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, topk_method="group_limited_greedy", n_group=4,
        topk_group=2, routed_scaling_factor=1.5, rope_parameters=rope,
    )  # fmt: skip
    _save(DeepseekV2ForCausalLM(cfg), path)
    raw = json.loads((path / "config.json").read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    raw["rope_scaling"] = {"type": params.pop("rope_type"), **params}
    raw["torch_dtype"] = raw.pop("dtype")
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    return path


def deepseek_v3(path: Path, **overrides) -> Path:
    """MLA with q compression, sigmoid scores + correction bias, group-limited top-k, scaling, YaRN, dense layer."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(5)
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 10000.0,
            "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}  # fmt: skip
    cfg = DeepseekV3Config(
        **(COMMON | overrides), num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=32,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1, kv_lora_rank=16,
        q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, rope_parameters=rope,
    )  # fmt: skip
    model = DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(16) * 0.05)
    return _save(model, path)


FAMILIES = {"qwen2_moe": qwen2_moe, "qwen3_moe": qwen3_moe, "deepseek_v2": deepseek_v2, "deepseek_v3": deepseek_v3}
