"""The CUDA path, measured on one GPU: the bf16 matmul peak, the expert service's grouped expert execution
against it, and the in-process engine's throughput with `--device cuda`.

1. Peak: a large square bf16 matmul (`--peak-size`, default 8192), TFLOP/s, the median of timed batches.
2. Experts: `LocalExperts` (what an expert service runs for each request) holding 16 random bf16 SwiGLU
   experts of the benchmark shapes (hidden 1024, intermediate 2816), routed top-2 by a random gate, at
   1, 32, 256 and 2048 tokens: ms per call, achieved TFLOP/s (6 x hidden x intermediate per routed row)
   and the share of the measured peak.
3. Engine: `bench.throughput`'s in-process engine (experts in the engine's process) on the random bench
   Mixtral (`moemesh build-demo-model`, bf16: `--dtype auto` keeps bf16 on a GPU of compute capability 8.0+)
   with `--device cuda`, greedy, closed loop at each concurrency: tok/s, mean TTFT and step time.

Exits with code 2, saying so, where torch sees no CUDA device.

    .venv/bin/python -m bench.gpu [--model DIR] [--concurrency 1,16,64] [--max-new-tokens 64] [--markdown]
"""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import command_line, table
from moemesh import hardware

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K = 1024, 2816, 16, 2
TOKENS = (1, 32, 256, 2048)


def cuda_seconds(run: Callable[[], object], batches: int = 7, min_calls: int = 10) -> float:
    """Median seconds of one `run()` on the GPU (CUDA events around batches of calls, after warm-up), so that
    host launch overhead counts where the GPU would wait for it."""
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(min_calls):
            run()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / 1000 / min_calls)
    return sorted(per_call)[len(per_call) // 2]


def matmul_peak_tflops(size: int, device: torch.device) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    return 2 * size**3 / cuda_seconds(lambda: a @ b) / 1e12


def expert_rows(device: torch.device, peak_tflops: float) -> list[list[str]]:
    """One row per token count: tokens, routed rows, expert groups, ms per call, TFLOP/s, share of the peak."""
    from moemesh.model import MLP
    from moemesh.moe import DispatchPlan, LocalExperts

    generator = torch.Generator(device).manual_seed(0)
    experts = {}
    for e in range(EXPERTS):
        with torch.device(device):
            module = MLP(HIDDEN, INTERMEDIATE).to(torch.bfloat16)
        experts[(0, e)] = module.eval().requires_grad_(False)
    run = LocalExperts(experts)
    rows = []
    for tokens in TOKENS:
        hidden = torch.randn(tokens, HIDDEN, device=device, dtype=torch.bfloat16, generator=generator)
        scores = torch.rand(tokens, EXPERTS, device=device, generator=generator)
        weights, indices = scores.topk(TOP_K, dim=-1)
        plan = DispatchPlan.from_gate(weights, indices, EXPERTS)
        routed = hidden[plan.token_of_row]
        seconds = cuda_seconds(lambda: run(0, plan.groups, routed))  # noqa: B023 - called before the next turn
        tflops = 6 * HIDDEN * INTERMEDIATE * routed.shape[0] / seconds / 1e12
        rows.append([str(tokens), str(routed.shape[0]), str(len(plan.groups)), f"{seconds * 1e3:.3f}",
                     f"{tflops:.2f}", f"{100 * tflops / peak_tflops:.1f}%"])  # fmt: skip
    return rows


def describe_gpu(device: torch.device) -> str:
    props = torch.cuda.get_device_properties(device)
    return (
        f"GPU: {props.name} (compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
        f"{props.multi_processor_count} SMs); torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"cuDNN {torch.backends.cudnn.version()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint for the engine (default: the random bench Mixtral)")
    parser.add_argument("--concurrency", default="1,16,64", help="engine streams, comma-separated (default 1,16,64)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    parser.add_argument("--peak-size", type=int, default=8192, help="side of the square bf16 peak matmul")
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1 or args.max_new_tokens < 1:
        parser.error("--concurrency and --max-new-tokens must be positive")
    print(f"command: {command_line('bench.gpu')}", flush=True)
    if not torch.cuda.is_available():
        print(f"bench.gpu: {hardware.torch_build()} sees no CUDA device; nothing to measure", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0)
    print(describe_gpu(device), flush=True)

    peak = matmul_peak_tflops(args.peak_size, device)
    print(f"\nbf16 matmul peak ({args.peak_size}^3): {peak:.1f} TFLOP/s", flush=True)

    print(f"\nexperts: LocalExperts, {EXPERTS} bf16 experts {HIDDEN}x{INTERMEDIATE}, top-{TOP_K}", flush=True)
    table(["tokens", "rows", "groups", "ms", "TFLOP/s", "of peak"], expert_rows(device, peak), args.markdown)

    from bench.throughput import run_in_process
    from bench.workloads import fixed_requests
    from moemesh import demo_model
    from moemesh.families import load_config

    model = (args.model or demo_model.ensure()).resolve()
    cfg = load_config(model)
    print(
        f"\nengine: in-process, --device cuda, {model} ({cfg.model_type}, {cfg.checkpoint_dtype}, hidden "
        f"{cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_experts} experts top-{cfg.experts_per_token}), "
        f"greedy, {args.max_new_tokens} new tokens, {2 * max(levels)} requests per level",
        flush=True,
    )
    requests = fixed_requests(2 * max(levels), cfg.vocab_size, args.max_new_tokens)
    results, _ = run_in_process(model, levels, requests, cfg.vocab_size, profile=False, device="cuda")
    rows = [
        [str(r.concurrency), str(r.tokens), f"{r.wall_s:.2f}", f"{r.tokens_per_s:.1f}", f"{r.mean_ttft_ms:.1f}",
         f"{r.mean_step_ms:.2f}" if r.mean_step_ms is not None else "-"]
        for r in results
    ]  # fmt: skip
    table(["streams", "tokens", "s", "tok/s", "TTFT ms", "step ms"], rows, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
