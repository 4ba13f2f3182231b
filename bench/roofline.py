"""What this CPU can do, measured: matmul GFLOP/s per dtype and row count, memory bandwidth, and from them
the floor of a decode step of a checkpoint (no engine can step faster than reading its weights once).

`--dtype auto` picks fp32 compute for half-precision checkpoints on CPUs without native bf16; this shows
why on the machine it runs on (bf16 at 1-128 rows against fp32), and what bf16's halved weight bytes would
give a bandwidth-bound decode.

    .venv/bin/python -m bench.roofline [--model DIR] [--rows 1,16,128] [--markdown]
"""

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import command_line, cpu_description, load_average, table
from moemesh import hardware


def _seconds(run: Callable[[], object], min_s: float = 0.3) -> float:
    """Median seconds of one `run()` over at least 20 repeats lasting `min_s` in all, after 10 warm-up runs
    (oneDNN builds its kernel for a shape on the first calls)."""
    for _ in range(10):
        run()
    times: list[float] = []
    while sum(times) < min_s or len(times) < 20:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def matmul_gflops(rows: int, inner: int, outer: int, dtype: torch.dtype) -> float:
    x, w = torch.randn(rows, inner).to(dtype), torch.randn(outer, inner).to(dtype)
    with torch.inference_mode():
        return 2 * rows * inner * outer / _seconds(lambda: torch.nn.functional.linear(x, w)) / 1e9


def bandwidth_gb_s(megabytes: int = 512) -> float:
    """Read bandwidth: a sum over a buffer much larger than the caches."""
    buffer = torch.ones(megabytes * 2**20 // 4)
    return buffer.numel() * 4 / _seconds(buffer.sum) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: the bundled demo model)")
    parser.add_argument("--rows", default="1,16,128", help="matmul rows (tokens in a step) to measure")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    from moemesh import demo_model
    from moemesh.checkpoint import Checkpoint
    from moemesh.inspect import parameter_counts

    model = (args.model or demo_model.ensure()).resolve()
    ckpt = Checkpoint(model)
    cfg = ckpt.config
    print(f"command: {command_line('bench.roofline')}")
    print(f"CPU: {cpu_description()}; torch threads {torch.get_num_threads()}; {load_average()}")
    auto = hardware.auto_compute_dtype(cfg.checkpoint_dtype, torch.device("cpu"))
    print(f"--dtype auto for this {cfg.checkpoint_dtype} checkpoint on this CPU: {auto}")
    inner, outer = cfg.hidden_size, cfg.moe_intermediate_size
    rows = []
    peak = {}
    for n in (int(r) for r in args.rows.split(",")):
        fp32 = matmul_gflops(n, inner, outer, torch.float32)
        bf16 = matmul_gflops(n, inner, outer, torch.bfloat16)
        peak = {torch.float32: fp32, torch.bfloat16: bf16}
        rows.append([str(n), f"{inner}x{outer}", f"{fp32:.1f}", f"{bf16:.1f}", f"{bf16 / fp32:.2f}"])
    table(["rows", "weight", "fp32 GFLOP/s", "bf16 GFLOP/s", "bf16/fp32"], rows, args.markdown)
    bandwidth = bandwidth_gb_s()
    print(f"\nmemory read bandwidth: {bandwidth:.1f} GB/s")
    # A decode step reads every weight its tokens use (one stream: the dense part and top-k experts per
    # layer; a large batch: all experts) and does 2 FLOPs per active parameter per token. The embedding
    # table counts as read, so the floors are a little low for big vocabularies.
    dense, gates, routed = parameter_counts(ckpt)
    total = dense + gates + routed
    active = dense + gates + routed * cfg.gate.top_k // cfg.num_experts
    floors = []
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        read_s = active * size / (bandwidth * 1e9)
        compute_s = 2 * active / (peak[dtype] * 1e9)  # per token, at the largest row count measured
        floors.append([str(dtype).removeprefix("torch."), f"{total * size / 1e6:.0f}", f"{1000 * read_s:.2f}",
                       f"{1 / read_s:.0f}", f"{1 / compute_s:.0f}"])  # fmt: skip
    print(f"\nfloors for {model.name}: {total / 1e6:.1f} M parameters, {active / 1e6:.1f} M active per token")
    table(["weights", "MB in all", "one-stream step ms (active weights read)", "one-stream tok/s ceiling",
           "batched tok/s ceiling (compute)"], floors, args.markdown)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
