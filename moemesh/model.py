"""Model math shared by every service: the dense decoder (gateway), the gate (router), the experts.

The routed experts are behind `RoutedExperts`, so the same code runs in one process and split
across services (`moemesh.moe` holds the dispatch; the services hold the wire).
Shapes: T = tokens in an engine step, D = hidden, H = query heads, K = KV heads, Dh = head dim,
E = experts, A = active experts per token, L = cached positions of one sequence, V = vocab.
"""

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.checkpoint import Checkpoint
from moemesh.config import ModelConfig


class RoutedExperts(Protocol):
    """The routed-expert half of an MoE block: gate, dispatch, expert FFNs and weighted combine."""

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor: ...  # [T, D] -> [T, D]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq  # [T, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, Dh]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, Dh]; cos, sin: [T, Dh]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class KVCache:
    """Keys and values of one sequence, all layers, preallocated for its whole length."""

    def __init__(self, cfg: ModelConfig, capacity: int, dtype: torch.dtype):
        shape = (cfg.num_kv_heads, capacity, cfg.head_dim)  # [K, L_max, Dh]
        self.keys = [torch.empty(shape, dtype=dtype) for _ in range(cfg.num_layers)]
        self.values = [torch.empty(shape, dtype=dtype) for _ in range(cfg.num_layers)]
        self.length = 0  # positions written by completed steps

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes n new positions (k, v: [n, K, Dh]) after `length`; returns all keys/values [K, L, Dh]."""
        end = self.length + k.shape[0]
        self.keys[layer][:, self.length : end] = k.transpose(0, 1)
        self.values[layer][:, self.length : end] = v.transpose(0, 1)
        return self.keys[layer][:, :end], self.values[layer][:, :end]


@dataclass
class SequenceSlice:
    """One sequence's rows in a step's flat token batch."""

    start: int
    length: int
    cache: KVCache


@dataclass
class StepBatch:
    """Every live sequence's new tokens of one engine step, packed flat (no padding)."""

    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slices: list[SequenceSlice]
    logit_rows: torch.Tensor  # [S] rows whose next-token logits are needed


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slices: list[SequenceSlice]):
        t, dh = x.shape[0], self.cfg.head_dim
        q = apply_rope(self.q_proj(x).view(t, -1, dh), cos, sin)  # [T, H, Dh]
        k = apply_rope(self.k_proj(x).view(t, -1, dh), cos, sin)  # [T, K, Dh]
        v = self.v_proj(x).view(t, -1, dh)
        out = torch.empty_like(q)
        for s in slices:
            rows = slice(s.start, s.start + s.length)
            keys, values = s.cache.extend(self.layer, k[rows], v[rows])
            out[rows] = self._attend(q[rows], keys, values)
        return self.o_proj(out.view(t, -1))

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """q: [n, H, Dh], the last n of L positions; keys, values: [K, L, Dh]. Causal, sliding window."""
        n, total = q.shape[0], keys.shape[1]
        first_query = total - n
        window = self.cfg.sliding_window
        lo = max(0, first_query - window + 1) if window else 0  # oldest key any query can see
        keys, values = keys[:, lo:], values[:, lo:]
        mask = None
        if n > 1:
            q_pos = torch.arange(first_query, total)[:, None]
            k_pos = torch.arange(lo, total)[None, :]
            mask = k_pos <= q_pos
            if window:
                mask &= k_pos > q_pos - window  # [n, L - lo]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask, enable_gqa=True
        )  # [1, H, n, Dh]
        return out[0].transpose(0, 1)


class Expert(nn.Module):
    """SwiGLU FFN of one routed expert (Mixtral names)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=False)
        self.w2 = nn.Linear(intermediate, hidden, bias=False)
        self.w3 = nn.Linear(hidden, intermediate, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """Top-k softmax gate: weights renormalized over the chosen experts (Mixtral)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.linear(x, self.weight).float().softmax(dim=-1)  # [T, E]
        weights, indices = probs.topk(self.top_k, dim=-1)  # [T, A]
        return weights / weights.sum(dim=-1, keepdim=True), indices


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, slices: list[SequenceSlice], routed: RoutedExperts) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, slices)
        return h + routed(self.layer, self.post_attention_layernorm(h))


class DenseModel(nn.Module):
    """Everything but the routed experts: embeddings, attention, norms, LM head (the gateway's part)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    @torch.inference_mode()
    def forward(self, batch: StepBatch, routed: RoutedExperts) -> torch.Tensor:
        x = self.embed_tokens(batch.token_ids)  # [T, D]
        cos, sin = self.rotary(batch.positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, batch.slices, routed)
        return self.lm_head(self.norm(x[batch.logit_rows])).float()  # [S, V]

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, dtype: torch.dtype) -> "DenseModel":
        with torch.device("meta"):
            model = cls(ckpt.config)
        names = ckpt.tensors.dense()
        state = {_strip_model_prefix(k): v for k, v in ckpt.load(names, dtype).items()}
        if ckpt.config.tie_word_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        model.rotary = RotaryEmbedding(ckpt.config.head_dim, ckpt.config.rope_theta)
        return model.eval()


def load_gates(ckpt: Checkpoint, dtype: torch.dtype) -> dict[int, Gate]:
    cfg = ckpt.config
    gates = {}
    for layer in cfg.moe_layers:
        ((_, weight),) = ckpt.load(ckpt.tensors.gate(layer), dtype).items()
        gate = Gate(cfg.hidden_size, cfg.num_experts, cfg.experts_per_token)
        gate.weight = nn.Parameter(weight, requires_grad=False)
        gates[layer] = gate.eval()
    return gates


def load_experts(ckpt: Checkpoint, pairs: list[tuple[int, int]], dtype: torch.dtype) -> dict[tuple[int, int], Expert]:
    """Reads only the given (layer, expert) pairs' weights."""
    cfg = ckpt.config
    experts = {}
    for layer, expert in pairs:
        tensors = ckpt.load(ckpt.tensors.expert(layer, expert), dtype)
        with torch.device("meta"):
            module = Expert(cfg.hidden_size, cfg.intermediate_size)
        module.load_state_dict({k.rsplit(".", 2)[-2] + ".weight": v for k, v in tensors.items()}, assign=True)
        experts[(layer, expert)] = module.eval().requires_grad_(False)
    return experts


def _strip_model_prefix(name: str) -> str:
    return name.removeprefix("model.")
