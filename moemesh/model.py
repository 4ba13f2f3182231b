"""Model math shared by every service: the dense decoder (gateway), the gate (router), the experts.

The routed experts are behind `RoutedExperts`, so the same code runs in one process and split
across services (`moemesh.moe` holds the dispatch; the services hold the wire).
Shapes: T = tokens in an engine step, D = hidden, H = query heads, K = KV heads, Dh = head dim,
E = experts, A = active experts per token, L = cached positions of one sequence, V = vocab,
C = MLA latent rank, R = rotary dims.
"""

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.checkpoint import Checkpoint
from moemesh.config import GateConfig, ModelConfig, RopeConfig
from moemesh.packed import half_weights_supported, pack_linears, packing_supported
from moemesh.quant_linear import install_quantized, quantize_linears


class RoutedExperts(Protocol):
    """The routed-expert half of an MoE block: gate, dispatch, expert FFNs and weighted combine."""

    def submit(self, layer: int, hidden: torch.Tensor, deadline: float | None) -> Callable[[], torch.Tensor]:
        """Starts the work for hidden [T, D], due by `deadline` (time.monotonic(); None: no client
        deadline); the returned callable waits for its output [T, D]."""
        ...


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
    def __init__(self, rope: RopeConfig):
        super().__init__()
        inv_freq, self.scale = rope.frequencies()
        self.interleaved = rope.interleaved
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq  # [T, R/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, R]
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, R]. Interleaved pairs are first gathered into halves, as DeepSeek's rope does."""
        if self.interleaved:
            x = x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos[:, None] + rotated * sin[:, None]


KV_BLOCK = 64  # positions a KV cache grows by


class KVCache:
    """What attention keeps per position for one sequence, all layers, allocated in blocks of `KV_BLOCK`
    positions as the sequence grows (not for prompt + max_new_tokens up front), so the engine can admit
    by the memory actually held.

    Two tensors per layer, positions first: keys and values [L, K, Dh], or for MLA the normalized
    latent [L, C] and the rotated shared key [L, R]. Each layer's tensors stay contiguous (growing copies
    them into a larger block-aligned buffer, at most once per `KV_BLOCK` positions), so attention reads
    a plain slice.
    """

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
        shapes = self.row_shapes(cfg)
        self.layers = [
            tuple(torch.empty((0, *s), dtype=dtype, device=device) for s in shapes) for _ in range(cfg.num_layers)
        ]
        self.length = 0  # positions written by completed steps
        self.position_bytes = self.bytes_per_position(cfg, dtype)

    @staticmethod
    def row_shapes(cfg: ModelConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if cfg.mla is not None:
            return (cfg.mla.kv_lora_rank,), (cfg.mla.qk_rope_head_dim,)
        return (cfg.num_kv_heads, cfg.head_dim), (cfg.num_kv_heads, cfg.head_dim)

    @classmethod
    def bytes_per_position(cls, cfg: ModelConfig, dtype: torch.dtype) -> int:
        """Bytes one position takes across all layers' tensors."""
        return sum(math.prod(s) for s in cls.row_shapes(cfg)) * cfg.num_layers * dtype.itemsize

    @classmethod
    def bytes_for(cls, cfg: ModelConfig, dtype: torch.dtype, positions: int) -> int:
        """Bytes a cache holding `positions` takes (whole blocks)."""
        return -(-positions // KV_BLOCK) * KV_BLOCK * cls.bytes_per_position(cfg, dtype)

    @property
    def device(self) -> torch.device:
        return self.layers[0][0].device

    @property
    def capacity(self) -> int:
        return self.layers[0][0].shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held (the engine sums these every step: kept O(1))."""
        return self.capacity * self.position_bytes

    def reserve(self, positions: int) -> None:
        """Room for `positions`, in whole blocks; what is written so far is kept."""
        if positions <= self.capacity:
            return
        capacity = -(-positions // KV_BLOCK) * KV_BLOCK
        old = self.capacity
        for i, tensors in enumerate(self.layers):
            grown = tuple(t.new_empty((capacity, *t.shape[1:])) for t in tensors)
            for new, t in zip(grown, tensors):
                new[:old] = t
            self.layers[i] = grown

    def extend(self, layer: int, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes n new positions after `length`; returns both tensors for all positions so far."""
        end = self.length + first.shape[0]
        self.reserve(end)
        a, b = self.layers[layer]
        a[self.length : end] = first
        b[self.length : end] = second
        return a[:end], b[:end]


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
    deadline: float | None = None  # monotonic time by which the step is of no more use to any client


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, window: int | None):
    """q: [n, H, Dq], the last n of L positions; keys: [L, K, Dq]; values: [L, K, Dv]. Causal, windowed.

    On the CPU, a half-precision decode query (n = 1) is attended in fp32: torch's CPU attention of one query
    is slower in bf16 than in fp32 with the conversions (16 heads of 64 over 200 keys: 0.19 against 0.07 ms),
    and a decode step makes one such call per sequence and layer; prefills gain nothing (docs/benchmarks.md)."""
    n, total = q.shape[0], keys.shape[0]
    first_query = total - n
    lo = max(0, first_query - window + 1) if window else 0  # oldest key any query can see
    keys, values = keys[lo:], values[lo:]
    dtype = q.dtype
    if n == 1 and q.device.type == "cpu" and dtype != torch.float32:
        q, keys, values = q.float(), keys.float(), values.float()
    mask = None
    if n > 1:
        q_pos = torch.arange(first_query, total, device=q.device)[:, None]
        k_pos = torch.arange(lo, total, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if window:
            mask &= k_pos > q_pos - window  # [n, L - lo]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
        attn_mask=mask, scale=scale, enable_gqa=True,
    )  # fmt: skip
    return out[0].transpose(0, 1).to(dtype)  # [n, H, Dv]


class Attention(nn.Module):
    """Grouped-query attention with optional q/k/v bias, per-head q/k norm, and a sliding window."""

    FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}  # one projection, the checkpoint's parts concatenated

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.cfg, self.window = layer, cfg, cfg.window(layer)
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_sizes = [q, kv, kv]
        # One matmul for q, k and v (checkpoints store them apart: concatenated when loaded), as for gate+up.
        self.qkv_proj = nn.Linear(cfg.hidden_size, q + 2 * kv, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        _register_fusion(self)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, cos, sin, slices: list[SequenceSlice]):
        t, dh = x.shape[0], self.cfg.head_dim
        q, k, v = (p.view(t, -1, dh) for p in self.qkv_proj(x).split(self.qkv_sizes, dim=-1))  # [T, H|K, Dh]
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)
        out = torch.empty_like(q)
        for s in slices:
            rows = slice(s.start, s.start + s.length)
            keys, values = s.cache.extend(self.layer, k[rows], v[rows])  # [L, K, Dh]
            out[rows] = attend(q[rows], keys, values, self.cfg.softmax_scale, self.window)
        return self.o_proj(out.view(t, -1))


class LatentAttention(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2/V3); the cache holds the compressed latent, not K/V."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        m = cfg.mla
        self.layer, self.cfg, self.m = layer, cfg, m
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, m.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(m.q_lora_rank, cfg.num_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, m.kv_lora_rank + m.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(m.kv_lora_rank, cfg.num_heads * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * m.v_head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, cos, sin, slices: list[SequenceSlice]):
        m, t, h = self.m, x.shape[0], self.cfg.num_heads
        q = self.q_proj(x) if m.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rot = q.view(t, h, -1).split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [T, C]
        k_rot = rope.apply(k_rot[:, None], cos, sin)[:, 0]  # [T, R]
        q = torch.cat((q_nope, rope.apply(q_rot, cos, sin)), dim=-1)  # [T, H, Dq]
        out = q.new_empty(t, h, m.v_head_dim)
        for s in slices:
            rows = slice(s.start, s.start + s.length)
            latents, k_rots = s.cache.extend(self.layer, latent[rows], k_rot[rows])  # [L, C], [L, R]
            k_nope, values = (
                self.kv_b_proj(latents)
                .view(-1, h, m.qk_nope_head_dim + m.v_head_dim)
                .split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
            )  # [L, H, *]
            keys = torch.cat((k_nope, k_rots[:, None].expand(-1, h, -1)), dim=-1)  # [L, H, Dq]
            out[rows] = attend(q[rows], keys, values, self.cfg.softmax_scale, None)
        return self.o_proj(out.view(t, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: a routed expert, a shared expert, or a dense layer's MLP.

    The gate and up projections are one [2 x intermediate, hidden] matmul (checkpoints store them apart:
    they are concatenated when loaded), so a small batch pays one matmul's fixed cost instead of two.
    """

    FUSED = {"gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        _register_fusion(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def _register_fusion(module: nn.Module) -> None:
    """The module's `FUSED` projections are concatenated as its state dict loads (quantized ones before:
    `moemesh.quant_linear.install_quantized`)."""
    for fused, parts in module.FUSED.items():
        module._register_load_state_dict_pre_hook(_fuse_on_load(parts, fused))


def _fuse_on_load(parts: list[str], fused: str) -> Callable[..., None]:
    """A load-state-dict pre-hook: a checkpoint's separate projections `parts` (weights, and biases where they
    have them) become the one `fused` projection, their outputs stacked in that order."""

    def hook(state_dict: dict[str, torch.Tensor], prefix: str, *_) -> None:
        for param in ("weight", "bias"):
            names = [f"{prefix}{part}.{param}" for part in parts]
            if all(name in state_dict for name in names):
                state_dict[f"{prefix}{fused}.{param}"] = torch.cat([state_dict.pop(name) for name in names])

    return hook


class Gate(nn.Module):
    """Top-k routing: softmax or sigmoid scores, optionally group-limited, renormalized and scaled."""

    def __init__(self, cfg: GateConfig, hidden: int, num_experts: int):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.bias = nn.Parameter(torch.zeros(num_experts)) if cfg.bias else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        logits = F.linear(x.float(), self.weight.float()) if c.float32_logits else F.linear(x, self.weight)
        scores = logits.float().softmax(dim=-1) if c.scoring == "softmax" else logits.float().sigmoid()  # [T, E]
        choice = scores if self.bias is None else scores + self.bias.float()
        if c.num_groups > 1:
            grouped = choice.view(choice.shape[0], c.num_groups, -1)  # [T, G, E/G]
            group_scores = grouped.amax(-1) if c.group_score == "max" else grouped.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(c.top_groups, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        indices = choice.topk(c.top_k, dim=-1).indices  # [T, A]
        weights = scores.gather(1, indices)
        if c.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * c.scale, indices


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.moe = layer in cfg.moe_layers
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LatentAttention(cfg, layer) if cfg.mla else Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = None if self.moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.shared = MLP(cfg.hidden_size, cfg.shared_expert_size) if self.moe and cfg.shared_expert_size else None
        self.shared_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if self.moe and cfg.shared_expert_gated else None

    def run(self, x, rope, cos, sin, batch: StepBatch, routed: RoutedExperts) -> Generator[None, None, torch.Tensor]:
        """The layer's forward pass. An MoE layer pauses (yields) once while its routed experts are in
        flight, so that another micro-batch can compute meanwhile (`DenseModel.forward`)."""
        h = x + self.self_attn(self.input_layernorm(x), rope, cos, sin, batch.slices)
        y = self.post_attention_layernorm(h)
        if self.mlp is not None:
            return h + self.mlp(y)
        routed_output = routed.submit(self.layer, y, batch.deadline)  # in flight while the shared expert runs
        shared = None
        if self.shared is not None:
            shared = self.shared(y)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(y)) * shared
        yield
        return h + (routed_output() if shared is None else routed_output() + shared)


class DenseModel(nn.Module):
    """Everything but the routed experts: embeddings, attention, norms, dense and shared MLPs, LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.rope)

    @torch.inference_mode()
    def forward(self, batches: list[StepBatch], routed: RoutedExperts) -> torch.Tensor:
        """Next-token logits [S, V] of every batch's `logit_rows`, batch after batch.

        Several batches are micro-batches of one step run in turn, layer by layer: while one waits for its
        routed experts, the next one's attention runs (ping-pong: with the experts behind a router, the
        gateway's compute overlaps the expert services'). The LM head runs once for all of them, since at
        decode it reads its whole weight whatever the rows."""
        passes = [self._hidden_for_logits(batch, routed) for batch in batches]
        rows: list[torch.Tensor | None] = [None] * len(passes)
        while any(r is None for r in rows):
            for i, run in enumerate(passes):
                if rows[i] is None:
                    try:
                        next(run)
                    except StopIteration as done:
                        rows[i] = done.value
        return self.lm_head(torch.cat(rows) if len(rows) > 1 else rows[0]).float()

    def _hidden_for_logits(self, batch: StepBatch, routed: RoutedExperts) -> Generator[None, None, torch.Tensor]:
        """One batch through every layer (pausing at each MoE layer), then the final norm of its logit rows."""
        x = self.embed_tokens(batch.token_ids).to(self.norm.weight.dtype)  # [T, D]
        cos, sin = self.rotary(batch.positions, x.dtype)
        for layer in self.layers:
            x = yield from layer.run(x, self.rotary, cos, sin, batch, routed)
        return self.norm(x[batch.logit_rows])

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, quantize: str = "none"
    ) -> "DenseModel":
        """The dense part; a quantized checkpoint's linears at their stored width, and with `quantize` (int8,
        int4) the float ones made smaller too (attention, dense and shared MLPs, LM head; not the embeddings)."""
        stored = ckpt.config.checkpoint_dtype
        half = half_weights_supported(stored, dtype, device)  # linears and embeddings at the checkpoint's width
        with torch.device("meta"):
            model = cls(ckpt.config)
        state = ckpt.load(ckpt.tensors.dense(), dtype, device, keep_quantized=True)
        if not isinstance(state["embed_tokens.weight"], torch.Tensor):  # looked up by rows: kept in float
            state["embed_tokens.weight"] = state["embed_tokens.weight"].dequantize(dtype)
        # The LM head is a decode step's largest matmul (a GEMV at one stream). Stored input-major (the same
        # [vocab, hidden] values over a [hidden, vocab] buffer), torch's CPU kernels stream it near memory
        # speed, faster than the [vocab, hidden] layout at one row (`python -m bench.micro`, docs/benchmarks.md).
        # Where the linears are packed (`moemesh.packed`), the packed head is faster still.
        tied = ckpt.config.tie_word_embeddings
        head = state["embed_tokens.weight" if tied else "lm_head.weight"]
        if isinstance(head, torch.Tensor) and not (packing_supported(dtype, device) or half):
            head = head.T.contiguous().T
        state["lm_head.weight"] = head
        if tied:
            state["embed_tokens.weight"] = head  # one buffer for both (unless the head is packed)
        install_quantized(model, state, dtype)
        model.load_state_dict(state, strict=True, assign=True)
        model.rotary = RotaryEmbedding(ckpt.config.rope).to(device)
        model = _finish_linears(model.eval(), quantize, dtype, stored)
        if half:  # the rows looked up are widened to `dtype` (`_hidden_for_logits`)
            model.embed_tokens.weight = nn.Parameter(model.embed_tokens.weight.to(stored), requires_grad=False)
        return model


def load_gates(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device) -> dict[int, Gate]:
    cfg = ckpt.config
    gates = {}
    for layer in cfg.moe_layers:
        with torch.device("meta"):
            gate = Gate(cfg.gate, cfg.hidden_size, cfg.num_experts)
        gate.load_state_dict(ckpt.load(ckpt.tensors.gate(layer), dtype, device), strict=True, assign=True)
        gates[layer] = gate.eval().requires_grad_(False)
    return gates


def _finish_linears(module: nn.Module, quantize: str, dtype: torch.dtype, stored: torch.dtype) -> nn.Module:
    """Float linears packed for their kernel where that pays (`moemesh.packed`; `stored`: the checkpoint's
    dtype), or made int8 / int4 / W8A8 (`quantize`)."""
    return pack_linears(module, stored) if quantize == "none" else quantize_linears(module, quantize, dtype)


def load_experts(
    ckpt: Checkpoint, pairs: list[tuple[int, int]], dtype: torch.dtype, device: torch.device, quantize: str = "none"
) -> dict[tuple[int, int], MLP]:
    """Reads only the given (layer, expert) pairs' weights, quantized ones at their stored width; `quantize` (int8,
    int4) makes the float ones smaller."""
    cfg = ckpt.config
    experts = {}
    for layer, expert in pairs:
        with torch.device("meta"):
            module = MLP(cfg.hidden_size, cfg.moe_intermediate_size)
        state = ckpt.load(ckpt.tensors.expert(layer, expert), dtype, device, keep_quantized=True)
        install_quantized(module, state, dtype)
        module.load_state_dict(state, strict=True, assign=True)
        module = module.eval().requires_grad_(False)
        experts[(layer, expert)] = _finish_linears(module, quantize, dtype, cfg.checkpoint_dtype)
    return experts
