"""What this CPU can do, measured: matmul GFLOP/s per dtype and row count, memory bandwidth, and from them
the floor of a decode step of a checkpoint (no engine can step faster than reading its weights once).

A step of n tokens reads the dense part, the gates and the experts its tokens pick (1 - (1 - k/E)^n of
them, expected, for top-k of E), plus n rows of an untied embedding table, and computes 2 FLOPs per active
parameter per token; its floor is the longer of the two at the measured bandwidth and GFLOP/s. A
workload's floor (`workload_floor_s`, which `bench.compare` prints) is the sum of its steps' floors: one
prefill step of every prompt token, then one decode step per position with every stream still generating.

`--dtype auto` picks fp32 compute for half-precision checkpoints on CPUs without native bf16; this shows
why on the machine it runs on (bf16 at 1-128 rows against fp32), and what bf16's halved weight bytes would
give a bandwidth-bound decode.

    .venv/bin/python -m bench.roofline [--model DIR] [--rows 1,16,128] [--markdown]
"""

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import command_line, cpu_description, load_average, table
from bench.workloads import Request
from moemesh import hardware


def _seconds(run: Callable[[], object], min_s: float = 0.3) -> float:
    """Median seconds of one `run()` over at least 20 repeats lasting `min_s` in all, after at least 10
    warm-up runs lasting `min_s` (oneDNN builds its kernel for a shape on the first calls, and a process's
    first matmuls run several times slower for a while)."""
    warmup_until = time.perf_counter() + min_s
    for _ in range(10):
        run()
    while time.perf_counter() < warmup_until:
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


@dataclass(frozen=True)
class Weights:
    """The parameters of a checkpoint as a decode step reads them."""

    always: int  # read by every step: the dense part (less an untied embedding table) and the gates
    routed: int  # all routed experts
    num_experts: int
    top_k: int
    lookup: int  # parameters of one untied embedding row (a step reads only its tokens' rows); 0 when tied

    @property
    def total(self) -> int:
        return self.always + self.routed

    @property
    def active(self) -> int:
        """Parameters one token computes with (2 FLOPs each)."""
        return self.always + self.routed * self.top_k // self.num_experts

    def read(self, tokens: int) -> float:
        """Parameters a step of `tokens` tokens reads: the experts at least one token picks, expected."""
        touched = 1 - (1 - self.top_k / self.num_experts) ** tokens
        return self.always + self.routed * touched + self.lookup * tokens


def weights(ckpt) -> Weights:
    """`Weights` of a `moemesh.checkpoint.Checkpoint`."""
    from moemesh.inspect import parameter_counts

    cfg, dense_tensors = ckpt.config, ckpt.tensors.dense()
    dense, gates, routed = parameter_counts(ckpt)
    embedding = sum(
        math.prod(shape) for name, (_, shape) in dense_tensors.items() if name.endswith("embed_tokens.weight")
    )
    tied = not any(name.endswith("lm_head.weight") for name in dense_tensors)
    table_size = 0 if tied else embedding
    lookup = table_size // cfg.vocab_size
    return Weights(dense + gates - table_size, routed, cfg.num_experts, cfg.gate.top_k, lookup)


@dataclass(frozen=True)
class Machine:
    """Measured on the machine the bench runs on, in the compute dtype."""

    dtype: torch.dtype
    gflops: float  # matmul GFLOP/s at `rows` rows (tokens in a step)
    rows: int
    bandwidth_gb_s: float

    def step_floor_s(self, weights: Weights, tokens: int) -> float:
        """No engine's step of `tokens` tokens is faster: reading its weights once, or computing with them."""
        read_s = weights.read(tokens) * self.dtype.itemsize / (self.bandwidth_gb_s * 1e9)
        return max(read_s, 2 * weights.active * tokens / (self.gflops * 1e9))


def measure(hidden: int, intermediate: int, dtype: torch.dtype, rows: int = 128) -> Machine:
    """Matmul GFLOP/s on an expert-sized weight (`hidden` x `intermediate`) and memory read bandwidth."""
    return Machine(dtype, matmul_gflops(rows, hidden, intermediate, dtype), rows, bandwidth_gb_s())


def workload_floor_s(requests: Sequence[Request], weights: Weights, machine: Machine) -> float:
    """The requests sent at once: one prefill step of all prompts, then one decode step per position with
    the streams still generating (the first new token comes with the prefill)."""
    steps = [sum(len(r.prompt) for r in requests)]
    steps += [sum(r.max_new > position for r in requests) for position in range(1, max(r.max_new for r in requests))]
    return sum(machine.step_floor_s(weights, tokens) for tokens in steps)


def closed_loop_floor_s(requests: Sequence[Request], streams: int, weights: Weights, machine: Machine) -> float:
    """`streams` at a time in a closed loop, as batches of `streams` requests one after the other (exact
    for equal output lengths)."""
    batches = [requests[i : i + streams] for i in range(0, len(requests), streams)]
    return sum(workload_floor_s(batch, weights, machine) for batch in batches)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: the bundled demo model)")
    parser.add_argument("--rows", default="1,16,128", help="matmul rows (tokens in a step) to measure")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    from moemesh import demo_model
    from moemesh.checkpoint import Checkpoint

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
    row_counts = [int(r) for r in args.rows.split(",")]
    for n in row_counts:
        fp32 = matmul_gflops(n, inner, outer, torch.float32)
        bf16 = matmul_gflops(n, inner, outer, torch.bfloat16)
        peak = {torch.float32: fp32, torch.bfloat16: bf16}
        rows.append([str(n), f"{inner}x{outer}", f"{fp32:.1f}", f"{bf16:.1f}", f"{bf16 / fp32:.2f}"])
    table(["rows", "weight", "fp32 GFLOP/s", "bf16 GFLOP/s", "bf16/fp32"], rows, args.markdown)
    bandwidth = bandwidth_gb_s()
    print(f"\nmemory read bandwidth: {bandwidth:.1f} GB/s")
    counts = weights(ckpt)
    floors = []
    for dtype in (torch.float32, torch.bfloat16):
        machine = Machine(dtype, peak[dtype], row_counts[-1], bandwidth)  # peak: at the last row count measured
        step_s = machine.step_floor_s(counts, 1)
        compute_s = 2 * counts.active / (peak[dtype] * 1e9)
        floors.append([str(dtype).removeprefix("torch."), f"{counts.total * dtype.itemsize / 1e6:.0f}",
                       f"{1000 * step_s:.2f}", f"{1 / step_s:.0f}", f"{1 / compute_s:.0f}"])  # fmt: skip
    print(f"\nfloors for {model.name}: {counts.total / 1e6:.1f} M parameters besides an untied embedding table "
          f"(read a row per token), {counts.active / 1e6:.1f} M active per token")  # fmt: skip
    table(["weights", "MB in all", "one-stream step floor ms", "one-stream tok/s ceiling",
           "batched tok/s ceiling (compute)"], floors, args.markdown)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
