"""Hugging Face checkpoint directories: tensor tables per family, checked, memory-mapped, read in part.

Every service opens the same directory, checks the whole table of names and shapes against the
config (cheap: headers only), then reads only the tensors it holds: the router the gates, an expert
shard its experts, the gateway the rest.
"""

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from moemesh.config import ModelConfig
from moemesh.errors import CheckpointError

Shape = tuple[int, ...]


class MixtralTensors:
    """Checkpoint tensor names and shapes of the Mixtral family (per-expert `w1/w2/w3` on disk)."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    def dense(self) -> dict[str, Shape]:
        """Tensors the gateway holds, keyed by checkpoint name."""
        c = self.cfg
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        names: dict[str, Shape] = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size)}
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            names |= {
                p + "input_layernorm.weight": (c.hidden_size,),
                p + "post_attention_layernorm.weight": (c.hidden_size,),
                p + "self_attn.q_proj.weight": (q, c.hidden_size),
                p + "self_attn.k_proj.weight": (kv, c.hidden_size),
                p + "self_attn.v_proj.weight": (kv, c.hidden_size),
                p + "self_attn.o_proj.weight": (c.hidden_size, q),
            }
        names["model.norm.weight"] = (c.hidden_size,)
        if not c.tie_word_embeddings:
            names["lm_head.weight"] = (c.vocab_size, c.hidden_size)
        return names

    def gate(self, layer: int) -> dict[str, Shape]:
        return {f"model.layers.{layer}.block_sparse_moe.gate.weight": (self.cfg.num_experts, self.cfg.hidden_size)}

    def expert(self, layer: int, expert: int) -> dict[str, Shape]:
        """Keyed by checkpoint name; the module names are the last two parts (`w1.weight`)."""
        c = self.cfg
        p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
        return {
            p + "w1.weight": (c.intermediate_size, c.hidden_size),
            p + "w2.weight": (c.hidden_size, c.intermediate_size),
            p + "w3.weight": (c.intermediate_size, c.hidden_size),
        }

    def all(self) -> dict[str, Shape]:
        names = self.dense()
        for layer in self.cfg.moe_layers:
            names |= self.gate(layer)
            for expert in range(self.cfg.num_experts):
                names |= self.expert(layer, expert)
        return names


TENSOR_TABLES = {"mixtral": MixtralTensors}


class Checkpoint:
    """A checked checkpoint directory; `load` reads the named tensors from memory-mapped files."""

    def __init__(self, model_dir: Path | str):
        self.dir = Path(model_dir)
        self.config = ModelConfig.from_dir(self.dir)
        self.tensors = TENSOR_TABLES[self.config.model_type](self.config)
        self._file_of, headers = self._index()
        self._check(headers)
        self.fingerprint = self._fingerprint(headers)

    def load(self, names: Iterable[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._file_of[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, file_names in by_file.items():
            with safe_open(path, framework="pt") as f:
                for name in file_names:
                    out[name] = f.get_tensor(name).to(dtype)
        return out

    def _index(self) -> tuple[dict[str, Path], dict[str, tuple[str, Shape]]]:
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            files = sorted({self.dir / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.dir}: no safetensors files")
        file_of: dict[str, Path] = {}
        headers: dict[str, tuple[str, Shape]] = {}
        for path in files:
            try:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        file_of[name] = path
                        headers[name] = (sl.get_dtype(), tuple(sl.get_shape()))
            except Exception as exc:  # safetensors raises several types for a corrupt header
                raise CheckpointError(f"{path.name}: unreadable safetensors file ({exc})") from None
        return file_of, headers

    def _check(self, headers: dict[str, tuple[str, Shape]]) -> None:
        expected = self.tensors.all()
        missing = sorted(set(expected) - set(headers))
        if missing:
            raise CheckpointError(f"{self.dir}: missing tensor {missing[0]}" + _more(missing))
        unexpected = sorted(set(headers) - set(expected))
        if unexpected:
            raise CheckpointError(f"{self.dir}: unexpected tensor {unexpected[0]}" + _more(unexpected))
        for name, shape in expected.items():
            if headers[name][1] != shape:
                raise CheckpointError(
                    f"{self.dir}: tensor {name} has shape {list(headers[name][1])}, config implies {list(shape)}"
                )

    def _fingerprint(self, headers: dict[str, tuple[str, Shape]]) -> str:
        digest = hashlib.sha256((self.dir / "config.json").read_bytes())
        for name in sorted(headers):
            digest.update(f"{name}:{headers[name]}".encode())
        return digest.hexdigest()[:16]


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""
