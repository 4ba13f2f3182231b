"""Int8 weight-only experts (`moemesh.quant`), side by side with unquantized ones, in one run.

1. Kernels: one projection of the benchmark expert (1024 -> 2816 and 2816 -> 1024), bf16 and fp32, for
   1..128 tokens: the float `F.linear`, and the int8 candidates (a) gpt-fast's
   `F.linear(x, w.to(x.dtype)) * scales`, (b) `aten._weight_int8pack_mm(x, w, scales)` (scales in x's
   dtype), (c) dequantizing in row blocks of 512 so each block's bf16 copy stays in L2, and what
   `Int8Linear.forward` dispatches to.
2. Expert: one SwiGLU expert of the DESIGN's benchmark shape (hidden 1024, intermediate 2816), 1 and 128
   tokens, unquantized vs `quantize_int8`; medians, int8 / float ratios, bytes per expert, and the output
   error of each against an fp32 reference.
3. Logit drift: a tiny random fp32 Mixtral made with `transformers` (hidden 256, intermediate 512,
   4 layers, 8 experts, top-2, vocab 1000), logits of a 64-token prompt before and after replacing every
   expert weight (the fused 3-D `gate_up_proj` / `down_proj`) by its per-output-channel int8 round trip;
   max / mean |diff|, top-2 routing decisions that change, and greedy-token agreement over 32 steps
   (free-running, and teacher-forced on the unquantized model's tokens).

    PYTHONPATH=. .venv/bin/python -m bench.quant [--runs 30] [--threads N]
"""

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.quant import Int8Linear, dequantize_weight, parameter_bytes, quantize_int8, quantize_weight

HIDDEN, INTERMEDIATE = 1024, 2816  # DESIGN.md "The benchmark model"
KERNEL_TOKENS = {torch.bfloat16: (1, 8, 16, 32, 64, 128), torch.float32: (1, 8, 128)}
EXPERT_TOKENS = (1, 128)
BLOCK_ROWS = 512
PROMPT_LEN, GREEDY_STEPS = 64, 32


def median_ms(fns: dict[str, Callable[[], object]], runs: dict[str, int] | int, warmup: int = 3) -> dict[str, float]:
    """Median ms of each fn, timed round-robin (one run of each in turn) so load changes hit all alike."""
    counts = {name: runs.get(name, 0) if isinstance(runs, dict) else runs for name in fns}
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        for i in range(max(counts.values())):
            for name, fn in fns.items():
                if i < counts[name]:
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def markdown(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def expert_class() -> type[nn.Module]:
    """moemesh's SwiGLU expert, `MLP(hidden, intermediate)` (older trees: `Expert`)."""
    from moemesh import model

    return getattr(model, "MLP", None) or model.Expert


# ---------------------------------------------------------------------------------------------------
# 1. Kernels


def blocked_dequant(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.cat(
        [F.linear(x, q[i : i + BLOCK_ROWS].to(x.dtype)) * s[i : i + BLOCK_ROWS] for i in range(0, q.shape[0], BLOCK_ROWS)],
        dim=1,
    )


def kernels(runs: int) -> str:
    torch.manual_seed(0)
    rows = []
    for out_f, in_f in ((INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)):
        linear = nn.Linear(in_f, out_f, bias=False)
        q, s32 = quantize_weight(linear.weight)
        int8 = Int8Linear.from_linear(linear)
        for dtype in (torch.bfloat16, torch.float32):
            w, s = linear.weight.detach().to(dtype), s32.to(dtype)
            for m in KERNEL_TOKENS[dtype]:
                x = torch.randn(m, in_f, dtype=dtype)
                fns = {
                    "float": lambda: F.linear(x, w),
                    "a": lambda: F.linear(x, q.to(dtype)) * s,
                    "b": lambda: torch.ops.aten._weight_int8pack_mm(x, q, s),
                    "c": lambda: blocked_dequant(x, q, s),
                    "Int8Linear": lambda: int8(x),
                }
                slow_pack = dtype == torch.float32 and m > 8  # int8pack in fp32 is slow at many rows
                t = median_ms(fns, {name: max(3, runs // 5) if name == "b" and slow_pack else runs for name in fns})
                best = min(("a", "b", "c"), key=t.get)
                rows.append(
                    [f"{in_f}->{out_f}", str(dtype).removeprefix("torch."), m]
                    + [f"{t[k]:.3f}" for k in ("float", "a", "b", "c", "Int8Linear")]
                    + [best, f"{t['Int8Linear'] / t['float']:.2f}"]
                )
                print(f"  kernels {rows[-1]}", flush=True)
    header = ["shape", "dtype", "tokens", "float ms", "(a) gpt-fast ms", "(b) int8pack ms", "(c) blocked ms"]
    header += ["Int8Linear ms", "fastest int8", "Int8Linear / float"]
    return markdown(header, rows)


# ---------------------------------------------------------------------------------------------------
# 2. One expert


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def expert(runs: int) -> str:
    torch.manual_seed(0)
    cls = expert_class()
    ref32 = cls(HIDDEN, INTERMEDIATE).eval().requires_grad_(False)
    for p in ref32.parameters():  # the checkpoint init of transformers' Mixtral: N(0, 0.02)
        nn.init.normal_(p, std=0.02)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        plain = plain_copy(ref32, cls, dtype)
        quant = quantize_int8(plain_copy(ref32, cls, dtype))  # from the weights in `dtype`, as a shard would
        plain_b, quant_b = parameter_bytes(plain), parameter_bytes(quant)
        for m in EXPERT_TOKENS:
            x = torch.randn(m, HIDDEN) * 0.5
            with torch.inference_mode():
                ref = ref32(x)
                err_plain = relative_error(plain(x.to(dtype)), ref)
                err_quant = relative_error(quant(x.to(dtype)), ref)
            xd = x.to(dtype)
            t = median_ms({"plain": lambda: plain(xd), "quant": lambda: quant(xd)}, runs)
            t_plain, t_quant = t["plain"], t["quant"]
            rows.append(
                [
                    str(dtype).removeprefix("torch."),
                    m,
                    f"{t_plain:.3f}",
                    f"{t_quant:.3f}",
                    f"{t_quant / t_plain:.2f}",
                    f"{plain_b / 2**20:.2f}",
                    f"{quant_b / 2**20:.2f}",
                    f"{quant_b / plain_b:.3f}",
                    f"{err_plain:.2e}",
                    f"{err_quant:.2e}",
                ]
            )
            print(f"  expert {rows[-1]}", flush=True)
    header = ["dtype", "tokens", "float ms", "int8 ms", "int8 / float", "float MiB", "int8 MiB", "bytes ratio"]
    header += ["float rel. err vs fp32", "int8 rel. err vs fp32"]
    return markdown(header, rows)


def plain_copy(ref32: nn.Module, cls: type[nn.Module], dtype: torch.dtype) -> nn.Module:
    module = cls(HIDDEN, INTERMEDIATE).eval().requires_grad_(False)
    module.load_state_dict(ref32.state_dict())
    return module.to(dtype)


# ---------------------------------------------------------------------------------------------------
# 3. Logit drift on a tiny Mixtral


def int8_round_trip_(weight: torch.Tensor) -> None:
    """[..., out, in] expert weights, in place: each row (output channel) through int8 and back."""
    flat = weight.data.reshape(-1, weight.shape[-1])
    q, s = quantize_weight(flat)
    flat.copy_(dequantize_weight(q, s, weight.dtype))


def greedy(model, ids: torch.Tensor, steps: int) -> list[int]:
    out = []
    for _ in range(steps):
        token = model(ids).logits[0, -1].argmax().item()
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def drift() -> str:
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    config = MixtralConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        MixtralForCausalLM(config).save_pretrained(tmp)
        model = MixtralForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    routes: list[torch.Tensor] = []
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(lambda mod, args, out: routes.append(out[2].sort(-1).values))
    prompt = torch.randint(0, config.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))

    with torch.inference_mode():
        routes.clear()
        ref_logits = model(prompt).logits[0]
        ref_routes = torch.stack(routes)  # [layers, T, A]
        ref_tokens = greedy(model, prompt, GREEDY_STEPS)
        full = torch.cat([prompt, torch.tensor([ref_tokens])], dim=1)
        ref_forced = model(full).logits[0, PROMPT_LEN - 1 : -1].argmax(-1)

        for layer in model.model.layers:
            int8_round_trip_(layer.mlp.experts.gate_up_proj)
            int8_round_trip_(layer.mlp.experts.down_proj)
        routes.clear()
        q_logits = model(prompt).logits[0]
        q_routes = torch.stack(routes)
        q_tokens = greedy(model, prompt, GREEDY_STEPS)
        q_forced = model(full).logits[0, PROMPT_LEN - 1 : -1].argmax(-1)

    diff = (q_logits - ref_logits).abs()
    same_prefix = next((i for i, (a, b) in enumerate(zip(ref_tokens, q_tokens)) if a != b), GREEDY_STEPS)
    route_changed = (ref_routes != q_routes).any(-1).float().mean().item()
    rows = [
        ["logits std (unquantized)", f"{ref_logits.std().item():.4f}"],
        ["max abs logit diff", f"{diff.max().item():.2e}"],
        ["mean abs logit diff", f"{diff.mean().item():.2e}"],
        ["prompt argmax agreement", f"{(q_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item():.1%}"],
        ["(token, layer) top-2 routes changed", f"{route_changed:.1%}"],
        [
            f"greedy tokens equal, free-running ({GREEDY_STEPS} steps)",
            f"{sum(a == b for a, b in zip(ref_tokens, q_tokens))}/{GREEDY_STEPS}",
        ],
        ["greedy steps before the first difference", f"{same_prefix}/{GREEDY_STEPS}"],
        [
            "greedy tokens equal, teacher-forced",
            f"{(ref_forced == q_forced).sum().item()}/{GREEDY_STEPS}",
        ],
    ]
    return markdown(["tiny Mixtral, fp32, experts int8 round trip", "value"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30, help="timed runs per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--skip-kernels", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    sections = []
    if not args.skip_kernels:
        sections.append(("Kernels: one projection, median ms", kernels(args.runs)))
    sections.append((f"One SwiGLU expert {HIDDEN} -> {INTERMEDIATE}, median ms", expert(args.runs)))
    sections.append(("Logit drift", drift()))
    end_load = os.getloadavg()
    for title, table in sections:
        print(f"\n### {title}\n\n{table}")
    print(f"\nload average at end: {end_load[0]:.2f} {end_load[1]:.2f} {end_load[2]:.2f};", end=" ")
    print(f"wall {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
