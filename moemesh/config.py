"""Model configuration read from a Hugging Face `config.json`.

Reads exactly the fields the family's `transformers` code reads, in both the `transformers` 5 form
(`rope_parameters`, `dtype`) and the older one (`rope_theta`, `rope_scaling`, `torch_dtype`).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moemesh.errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("mixtral",)

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    sliding_window: int | None
    num_experts: int
    experts_per_token: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    checkpoint_dtype: torch.dtype

    @property
    def moe_layers(self) -> range:
        """Decoder layers whose MLP is a routed MoE block (every layer in Mixtral)."""
        return range(self.num_layers)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"config.json: unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        num_heads = raw["num_attention_heads"]
        eos = raw.get("eos_token_id")
        dtype_name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        if dtype_name not in _TORCH_DTYPES:
            raise CheckpointError(f"config.json: unsupported dtype {dtype_name!r}")
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
            rope_theta=_rope_theta(raw),
            max_position_embeddings=raw.get("max_position_embeddings", 4096 * 32),
            sliding_window=raw.get("sliding_window") or None,
            num_experts=raw["num_local_experts"],
            experts_per_token=raw["num_experts_per_tok"],
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
            checkpoint_dtype=_TORCH_DTYPES[dtype_name],
        )

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no config.json in the model directory") from None
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(raw)


def _rope_theta(raw: dict[str, Any]) -> float:
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"config.json: RoPE type {rope_type!r} is not supported for {raw['model_type']}")
    return float(rope.get("rope_theta", raw.get("rope_theta", 1e6)))
