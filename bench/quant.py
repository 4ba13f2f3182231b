"""Int8 weight-only experts (`moemesh.quant`), side by side with unquantized ones, in one run.

1. Kernels: one projection of the benchmark expert (1024 -> 2816 and 2816 -> 1024), bf16 and fp32, for
   1..128 tokens: the float `F.linear`, and the int8 candidates (a) gpt-fast's
   `F.linear(x, w.to(x.dtype)) * scales`, (b) `aten._weight_int8pack_mm(x, w, scales)` (scales in x's
   dtype), (c) dequantizing in row blocks of 512 so each block's bf16 copy stays in L2, and what
   `Int8Linear.forward` dispatches to.
2. Expert: one SwiGLU expert of the DESIGN's benchmark shape (hidden 1024, intermediate 2816), 1, 8 and
   128 tokens, unquantized vs `quantize_int8`; medians, int8 / float ratios, bytes per expert, and the output
   error of each against an fp32 reference.
3. Logit drift: a tiny random fp32 Mixtral made with `transformers` (hidden 256, intermediate 512,
   4 layers, 8 experts, top-2, vocab 1000), logits of a 64-token prompt before and after replacing every
   expert weight (the fused 3-D `gate_up_proj` / `down_proj`) by its per-output-channel int8 round trip;
   max / mean |diff|, top-2 routing decisions that change, and greedy-token agreement over 32 steps
   (free-running, and teacher-forced on the unquantized model's tokens).

    PYTHONPATH=. .venv/bin/python -m bench.quant [--runs 30] [--threads N] [--sections kernels,expert,drift]
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
KERNEL_TOKENS = {torch.bfloat16: (1, 8, 12, 16, 32, 128), torch.float32: (1, 8, 128)}
EXPERT_TOKENS = (1, 8, 128)
EXPERT_POOL = 8  # cold runs: 8 experts = 132 MiB in bf16, 66 MiB in int8, both over the 32 MiB L3
KERNEL_POOL = 16  # per candidate: 16 weights of 2.75 MiB (int8) or more, over the L3
BLOCK_ROWS = 512
PROMPT_LEN, GREEDY_STEPS = 64, 32


def median_ms(fns: dict[str, Callable[[int], object]], runs: dict[str, int] | int, warmup: int = 3) -> dict[str, float]:
    """Median ms of each fn(i), i the run's index, timed round-robin (one run of each in turn) so that load
    changes hit every candidate alike."""
    counts = {name: runs.get(name, 0) if isinstance(runs, dict) else runs for name in fns}
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for i in range(warmup):
                fn(i)
        for i in range(max(counts.values())):
            for name, fn in fns.items():
                if i < counts[name]:
                    start = time.perf_counter()
                    fn(i)
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
        [
            F.linear(x, q[i : i + BLOCK_ROWS].to(x.dtype)) * s[i : i + BLOCK_ROWS]
            for i in range(0, q.shape[0], BLOCK_ROWS)
        ],
        dim=1,
    )


def kernel_candidates(x: torch.Tensor, linears: list[nn.Linear]) -> dict[str, Callable[[int], torch.Tensor]]:
    """Each candidate cycles through its own copies of `len(linears)` weights, so that no candidate finds
    its weight in cache because another just read it, and none finds it there from its own last run."""
    pool = len(linears)
    dtype = x.dtype
    w = [lin.weight.detach().to(dtype) for lin in linears]
    quantized = [quantize_weight(lin.weight) for lin in linears]
    qs = {name: [(q.clone(), s.to(dtype)) for q, s in quantized] for name in "abc"}
    int8 = [Int8Linear.from_linear(lin) for lin in linears]
    return {
        "float": lambda i: F.linear(x, w[i % pool]),
        "a": lambda i: F.linear(x, qs["a"][i % pool][0].to(dtype)) * qs["a"][i % pool][1],
        "b": lambda i: torch.ops.aten._weight_int8pack_mm(x, *qs["b"][i % pool]),
        "c": lambda i: blocked_dequant(x, *qs["c"][i % pool]),
        "Int8Linear": lambda i: int8[i % pool](x),
    }


def kernels(runs: int) -> str:
    torch.manual_seed(0)
    rows = []
    for out_f, in_f in ((INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)):
        linears = [nn.Linear(in_f, out_f, bias=False) for _ in range(KERNEL_POOL)]
        for dtype in (torch.bfloat16, torch.float32):
            for m in KERNEL_TOKENS[dtype]:
                fns = kernel_candidates(torch.randn(m, in_f, dtype=dtype), linears)
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
    """Hot: one expert called again and again (its weights stay in the 32 MiB L3). Cold: a pool of
    `EXPERT_POOL` experts called in turn, as a shard serving many experts does, so each call reads its
    weights from DRAM."""
    torch.manual_seed(0)
    cls = expert_class()
    refs = [cls(HIDDEN, INTERMEDIATE).eval().requires_grad_(False) for _ in range(EXPERT_POOL)]
    for ref in refs:
        for p in ref.parameters():  # the checkpoint init of transformers' Mixtral: N(0, 0.02)
            nn.init.normal_(p, std=0.02)
    timing, sizes = [], []
    for dtype in (torch.bfloat16, torch.float32):
        plain = [plain_copy(ref, cls, dtype) for ref in refs]
        quant = [quantize_int8(plain_copy(ref, cls, dtype)) for ref in refs]  # from `dtype` weights, as a shard
        plain_b, quant_b = parameter_bytes(plain[0]), parameter_bytes(quant[0])
        errors = []
        for m in EXPERT_TOKENS:
            x = torch.randn(m, HIDDEN) * 0.5
            xd = x.to(dtype)
            with torch.inference_mode():
                ref = refs[0](x)
                errors.append((relative_error(plain[0](xd), ref), relative_error(quant[0](xd), ref)))
            row = [str(dtype).removeprefix("torch."), m]
            for pool in (1, EXPERT_POOL):  # hot, cold
                t = median_ms({"plain": rotating(plain[:pool], xd), "quant": rotating(quant[:pool], xd)}, runs)
                row += [f"{t['plain']:.3f}", f"{t['quant']:.3f}", f"{t['quant'] / t['plain']:.2f}"]
            timing.append(row)
            print(f"  expert {timing[-1]}", flush=True)
        sizes.append(
            [str(dtype).removeprefix("torch."), f"{plain_b:,}", f"{quant_b:,}", f"{quant_b / plain_b:.3f}"]
            + [f"{max(e[0] for e in errors):.2e}", f"{max(e[1] for e in errors):.2e}"]
        )
    header = ["dtype", "tokens", "hot float ms", "hot int8 ms", "hot int8 / float"]
    header += ["cold float ms", "cold int8 ms", "cold int8 / float"]
    size_header = ["dtype", "float bytes / expert", "int8 bytes / expert", "int8 / float"]
    size_header += ["float rel. error vs fp32", "int8 rel. error vs fp32"]
    return markdown(header, timing) + "\n\n" + markdown(size_header, sizes)


def rotating(modules: list[nn.Module], x: torch.Tensor) -> Callable[[int], torch.Tensor]:
    return lambda i: modules[i % len(modules)](x)


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
        as_bf16 = MixtralForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).eval()  # a yardstick
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

        bf16_diff = (as_bf16(prompt).logits[0].float() - ref_logits).abs()

    diff = (q_logits - ref_logits).abs()
    same_prefix = next((i for i, (a, b) in enumerate(zip(ref_tokens, q_tokens)) if a != b), GREEDY_STEPS)
    route_changed = (ref_routes != q_routes).any(-1).float().mean().item()
    rows = [
        ["logits std (unquantized)", f"{ref_logits.std().item():.4f}"],
        ["max abs logit diff", f"{diff.max().item():.2e}"],
        ["mean abs logit diff", f"{diff.mean().item():.2e}"],
        [
            "for scale: unquantized in bf16 vs fp32, max / mean abs diff",
            f"{bf16_diff.max():.2e} / {bf16_diff.mean():.2e}",
        ],
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


def load_now() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30, help="timed runs per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--sections", default="kernels,expert,drift", help="comma-separated subset to run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    chosen = args.sections.split(",")
    sections = []
    if "expert" in chosen:
        sections.append((f"One SwiGLU expert {HIDDEN} -> {INTERMEDIATE}, median ms", expert(args.runs), load_now()))
    if "kernels" in chosen:
        sections.append(("Kernels: one projection, median ms", kernels(args.runs), load_now()))
    if "drift" in chosen:
        sections.append(("Logit drift", drift(), load_now()))
    end_load = os.getloadavg()
    for title, table, load in sections:
        print(f"\n### {title}\n\n{table}\n\n(load average after it: {load})")
    print(f"\nload average at end: {end_load[0]:.2f} {end_load[1]:.2f} {end_load[2]:.2f};", end=" ")
    print(f"wall {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
