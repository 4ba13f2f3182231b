"""Speed in one command: moemesh against llama.cpp and `transformers`, same checkpoint, dtype and requests.

Three workloads (`--workload`, default all; greedy, every request generates exactly its own output length):

- **mixed** (the headline): `--mixed-requests` (32) requests sent at once, prompts uniform in 16-256 tokens
  and outputs in 16-128 (seeded token ids, `bench.workloads`); useful tokens = each request's own output.
- **fixed**: `bench.throughput`'s requests (prompts of 8-200 tokens, `--max-new-tokens` each), c client
  streams in a closed loop for each concurrency c (1, 8, 32, 64).
- **open loop** (`moemesh up` only, `bench.openloop`): Poisson arrivals at `--load` (0.5) x the capacity the
  fixed workload measured at its most streams, against its lone requests (1 stream).

Sides (`--sides`), one at a time so that they never compete for the CPUs, taking turns at each level (each
starts afresh with one warm-up request) so that a busy spell of a shared machine falls on all of them:

- **in-process**: moemesh's engine with the experts in its own process (`bench.throughput.run_in_process`);
- **moemesh-up**: the real cluster, gateway + router + expert shards as processes, over gRPC;
- **llama.cpp**: `llama-server --parallel c` on the checkpoint converted to GGUF (`bench.llamacpp`), built
  from source on first use (minutes, then cached);
- **transformers-batch** / **transformers-serial**: `model.generate()` on static left-padded batches (of all
  mixed requests; of c fixed ones) / one request at a time, mixed workload only (`bench.hf`).

All sides get OMP_WAIT_POLICY=PASSIVE unless the environment sets it (`bench/__init__.py`; `moemesh up`
gives its services the same). Prints the CPU model and SIMD flags, the roofline floors from this
machine's measured matmul GFLOP/s and memory bandwidth (`bench.roofline`), then per (workload, level,
side): useful tokens, wall s, tok/s, its share of the floor's tok/s, TTFT and inter-token latency p50/p99
(client-side, from the streamed messages); the ratios between sides, and the issue's targets (target /
reached / met?). `--plot PATH` draws the fixed workload's tok/s and p99 TTFT against concurrency.

`--quick` (under 3 minutes on the demo model, once llama.cpp is built): mixed 8 requests of 16-128 prompt
and 16-64 new tokens; fixed at 1,8 streams, 8 requests of 32 new tokens; the open loop on those 8.

    .venv/bin/python -m bench.compare [--model DIR] [--workload mixed,fixed,openloop] [--quick]
        [--concurrency 1,8,32,64] [--max-new-tokens 64] [--requests N] [--mixed-requests 32]
        [--sides in-process,moemesh-up,llama.cpp,transformers-batch,transformers-serial] [--experts 2] [--routers 1]
        [--load 0.5] [--markdown] [--plot docs/bench-compare.png]
"""

import argparse
import functools
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import hf, llamacpp, openloop, roofline
from bench.common import allocator_as_services, command_line, cpu_description, load_average, percentile, table
from bench.plot import plot
from bench.targets import OPEN_LOOP, RATIOS, TARGET_HEADER, UP, Reached, ratios, target_rows
from bench.throughput import LevelResult, latencies, run_distributed, run_in_process
from bench.workloads import Request, describe, fixed_requests, mixed_requests
from moemesh.compute_threads import in_passing_thread

SIDES = ("in-process", "moemesh-up", llamacpp.SIDE, *hf.SIDES)
WORKLOADS = ("mixed", "fixed", "openloop")
QUICK = {"concurrency": "1,8", "requests": 8, "max_new_tokens": 32, "mixed_requests": 8, "mixed_prompt": "16,128",
         "mixed_new": "16,64"}  # fmt: skip
DEFAULTS = {"concurrency": "1,8,32,64", "requests": 0, "max_new_tokens": 64, "mixed_requests": 32,
            "mixed_prompt": "16,256", "mixed_new": "16,128"}  # fmt: skip
Runner = Callable[[list[int], list[Request]], list[LevelResult]]
BySide = dict[str, list[LevelResult]]  # side -> its results, a level each


@dataclass(frozen=True)
class Workload:
    name: str
    requests: list[Request]
    levels: list[int]  # concurrent streams
    sides: list[str]


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f}"


def level_row(workload: str, level: LevelResult, floor_s: float | None) -> list[str]:
    """One side at one level: throughput, its share of the roofline floor's, TTFT and ITL percentiles."""
    ttfts, gaps = latencies(level).values()
    share = "-" if floor_s is None else f"{floor_s / level.wall_s:.2f}"
    return [
        workload, level.side, str(level.concurrency or "open"), str(len(level.results)), str(level.tokens),
        f"{level.wall_s:.2f}", f"{level.tokens_per_s:.1f}", share, _ms(percentile(ttfts, 50)),
        _ms(percentile(ttfts, 99)), _ms(percentile(gaps, 50)), _ms(percentile(gaps, 99)),
    ]  # fmt: skip


def agreement(level: LevelResult, reference: LevelResult) -> str:
    """How many requests generated exactly llama.cpp's tokens, and how many at least its first token. The
    first token checks the conversion (both compute the same function of the same weights); later tokens
    drift apart where a random model's top logits are near-ties and the two round differently."""
    pairs = list(zip(level.results, reference.results))
    same = sum(a.token_ids == b.token_ids for a, b in pairs)
    first = sum(a.token_ids[:1] == b.token_ids[:1] for a, b in pairs)
    return f"{same}/{len(pairs)}, {first}/{len(pairs)}"


def check_lengths(level: LevelResult, requests: Sequence[Request]) -> None:
    """Every side must generate exactly each request's output length, or its tokens/s mean nothing."""
    wrong = [(r.index, len(r.token_ids)) for r in level.results if len(r.token_ids) != requests[r.index].max_new]
    if wrong:
        raise RuntimeError(f"{level.side} generated other token counts than asked (request, tokens): {wrong}")


def by_level(by_side: BySide) -> list[dict[str, LevelResult]]:
    """The same results, as each level's {side: result}."""
    levels: list[dict[str, LevelResult]] = []
    for side, results in by_side.items():
        for i, level in enumerate(results):
            if i == len(levels):
                levels.append({})
            levels[i][side] = level
    return levels


def run_workload(workload: Workload, runs: dict[str, tuple[str, Runner]]) -> BySide:
    by_side: BySide = {}
    for concurrency in workload.levels:  # sides take turns at each level
        for side in workload.sides:
            title, run = runs[side]
            print(f"{workload.name}: {title}, {concurrency} streams; {load_average()}", flush=True)
            # A passing thread: a side's torch work must leave no OpenMP pool behind (`moemesh.compute_threads`)
            for level in in_passing_thread(functools.partial(run, [concurrency], workload.requests), "side"):
                check_lengths(level, workload.requests)
                by_side.setdefault(level.side, []).append(level)
    return by_side


def ratio_rows(name: str, by_side: BySide) -> tuple[list[list[str]], Reached]:
    """Each level's ratios between sides, with moemesh's agreement with llama.cpp; and the same as `Reached`."""
    rows, reached = [], {}
    for level in by_level(by_side):
        any_level = next(iter(level.values()))
        values = ratios(level)
        reached[(name, any_level.concurrency if name == "fixed" else None)] = values
        row = [name, str(any_level.concurrency), *("-" if v is None else f"{v:.2f}" for v in values.values())]
        reference = level.get(llamacpp.SIDE)
        for side in ("in-process", UP):
            row.append(agreement(level[side], reference) if side in level and reference else "-")
        rows.append(row)
    return rows, reached


def run_open_loop(model: Path, experts: int, requests: list[Request], vocab_size: int, levels: list[int],
                  load: float, fixed: BySide,
                  routers: int = 1) -> tuple[LevelResult, LevelResult, LevelResult, float]:  # fmt: skip
    """(lone, capacity, open loop, arrival rate) of `moemesh up`: the lone and capacity runs are the fixed
    workload's at 1 and at the most streams when it ran, else measured here in one cluster."""
    measured = {level.concurrency: level for level in fixed.get(UP, [])}
    if not {1, max(levels)} <= measured.keys():
        runs = run_distributed(model, experts, [1, max(levels)], requests, vocab_size, False, 0, side=UP,
                               routers=routers)[0]  # fmt: skip
        measured = {level.concurrency: level for level in runs}
    lone, capacity = measured[1], measured[max(levels)]
    rate = openloop.arrival_rate(capacity, load)
    print(f"open loop: moemesh up at {load:g} x capacity = {rate:.2f} requests/s; {load_average()}", flush=True)
    [opened] = run_distributed(model, experts, [0], requests, vocab_size, False, 0, side=UP, arrival_rate=rate,
                               routers=routers)[0]  # fmt: skip
    return lone, capacity, opened, rate


def side_runners(
    model: Path, experts: int, vocab_size: int, binary: Path, gguf: Path, routers: int = 1, quantize: str = "none"
) -> dict[str, tuple[str, Runner]]:
    return {
        "in-process": (
            f"in-process (experts in the engine's process, no gRPC; --quantize {quantize})",
            lambda levels, requests: run_in_process(
                model, levels, requests, vocab_size, profile=False, quantize=quantize
            )[0],
        ),
        "moemesh-up": (
            f"moemesh up --experts {experts} --routers {routers} --quantize {quantize} (GenerateStream over gRPC)",
            lambda levels, requests: run_distributed(
                model, experts, levels, requests, vocab_size, profile=False, service_threads=0, side=UP,
                routers=routers, quantize=quantize,
            )[0],
        ),
        llamacpp.SIDE: (
            f"llama.cpp (llama-server, llama-cpp-python {llamacpp.VERSION}, {gguf.name})",
            lambda levels, requests: llamacpp.run_llamacpp(binary, gguf, levels, requests, vocab_size),
        ),
        **{
            side: (f"{side} (model.generate)", lambda levels, requests, side=side: hf.run_transformers(
                model, side, levels, requests, vocab_size))
            for side in hf.SIDES
        },
    }  # fmt: skip


def _pair(text: str) -> tuple[int, int]:
    low, high = (int(x) for x in text.split(","))
    return low, high


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n")[-2], formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: the demo model)")
    parser.add_argument("--workload", default=",".join(WORKLOADS), help=f"default {','.join(WORKLOADS)}")
    parser.add_argument("--concurrency", help="fixed workload's streams (default 1,8,32,64; quick: 1,8)")
    parser.add_argument(
        "--max-new-tokens", type=int, help="fixed workload's tokens per request (default 64; quick: 32)"
    )
    parser.add_argument("--requests", type=int, help="fixed and open-loop requests (default: 2 x the most streams)")
    parser.add_argument("--mixed-requests", type=int, help="mixed workload's requests (default 32; quick: 8)")
    parser.add_argument("--mixed-prompt", help="mixed prompt tokens, low,high (default 16,256; quick: 16,128)")
    parser.add_argument("--mixed-new", help="mixed new tokens, low,high (default 16,128; quick: 16,64)")
    parser.add_argument("--experts", type=int, default=2, help="expert shards of `moemesh up` (default 2)")
    parser.add_argument(
        "--routers", type=int, default=1, help="routers of `moemesh up` (default 1; 0: the gateway routes itself)"
    )
    parser.add_argument(
        "--quantize", default="none", choices=["none", "int8", "int4", "w8a8"],
        help="moemesh's weights made smaller at load; llama.cpp runs the same bits (Q8_0, Q4_0) unless --gguf-type",
    )  # fmt: skip
    parser.add_argument(
        "--gguf-type", choices=llamacpp.QUANT_TYPES,
        help="llama.cpp's weights: 16-bit as converted, or made by llama-quantize (default: --quantize's bits)",
    )  # fmt: skip
    parser.add_argument("--load", type=float, default=0.5, help="open loop's arrival rate, x capacity (default 0.5)")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"default {','.join(SIDES)}")
    parser.add_argument("--quick", action="store_true", help="the small run described below")
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    parser.add_argument("--plot", type=Path, help="write a PNG of the fixed workload's tok/s and p99 TTFT here")
    args = parser.parse_args(argv)
    for name, default in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    args.workloads = [w.strip() for w in args.workload.split(",") if w.strip()]
    args.side_list = list(dict.fromkeys(s.strip() for s in args.sides.split(",") if s.strip()))
    if not args.levels or min(args.levels) < 1 or min(args.max_new_tokens, args.experts, args.mixed_requests) < 1:
        parser.error("--concurrency, --max-new-tokens, --mixed-requests and --experts must be positive")
    if args.routers < 0:
        parser.error("--routers must be 0 or more")
    for given, known, option in ((args.side_list, SIDES, "--sides"), (args.workloads, WORKLOADS, "--workload")):
        if unknown := set(given) - set(known):
            parser.error(f"unknown {option} {', '.join(sorted(unknown))}; choose from {', '.join(known)}")
    args.requests = args.requests or 2 * max(args.levels)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpu = cpu_description()
    print(f"command: {command_line('bench.compare')}\ncpu: {cpu}; {load_average()}", flush=True)
    import torch

    from moemesh import demo_model
    from moemesh.checkpoint import Checkpoint
    from moemesh.hardware import auto_compute_dtype

    model = (args.model or demo_model.ensure()).resolve()
    print(allocator_as_services(model), flush=True)
    ckpt = Checkpoint(model)
    cfg = ckpt.config
    dtype = str(cfg.checkpoint_dtype).removeprefix("torch.")
    binary = gguf = Path()
    if llamacpp.SIDE in args.side_list:  # first, so that a failing build or conversion fails before the long runs
        binary, gguf = llamacpp.prepare(model, dtype, args.gguf_type or llamacpp.SAME_BITS[args.quantize])
    mixed = mixed_requests(args.mixed_requests, cfg.vocab_size, _pair(args.mixed_prompt), _pair(args.mixed_new))
    fixed = fixed_requests(args.requests, cfg.vocab_size, args.max_new_tokens)
    compute = auto_compute_dtype(cfg.checkpoint_dtype, torch.device("cpu"))
    weights = roofline.weights(ckpt)
    machine = in_passing_thread(lambda: roofline.measure(cfg.hidden_size, cfg.moe_intermediate_size, compute))
    one_stream_s = machine.step_floor_s(weights, 1)
    mixed_floor_s = roofline.workload_floor_s(mixed, weights, machine)
    print(
        f"model: {model} ({cfg.model_type}, {dtype}, computed in {str(compute).removeprefix('torch.')}, vocab "
        f"{cfg.vocab_size}, hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_experts} experts "
        f"top-{cfg.experts_per_token})" + (f"; llama.cpp reads {gguf.name}" if llamacpp.SIDE in args.side_list else "")
        + f"\nmixed workload: {describe(mixed)}, all at once\nfixed workload: {describe(fixed)}, concurrency "
        f"{','.join(map(str, args.levels))}; open loop: the fixed requests at {args.load:g} x capacity\n"
        f"threads: torch {torch.__version__} with {torch.get_num_threads()} threads (transformers too); "
        f"llama-server --threads {os.cpu_count()}; OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} for all sides\n"
        f"roofline: matmul {machine.gflops:.1f} GFLOP/s ({str(compute).removeprefix('torch.')}, {machine.rows} rows "
        f"x {cfg.hidden_size}x{cfg.moe_intermediate_size}), memory read {machine.bandwidth_gb_s:.1f} GB/s; floors: "
        f"one-stream decode {1000 * one_stream_s:.2f} ms/token ({1 / one_stream_s:.0f} tok/s), mixed workload "
        f"{mixed_floor_s:.2f} s ({sum(r.max_new for r in mixed) / mixed_floor_s:.0f} useful tok/s)",
        flush=True,
    )  # fmt: skip
    runs = side_runners(model, args.experts, cfg.vocab_size, binary, gguf, args.routers, args.quantize)
    plan = [
        Workload("mixed", mixed, [len(mixed)], args.side_list),
        Workload("fixed", fixed, args.levels, [s for s in args.side_list if s != hf.SERIAL]),
    ]
    results = {w.name: run_workload(w, runs) for w in plan if w.name in args.workloads}
    opened = None
    if "openloop" in args.workloads:
        opened = run_open_loop(model, args.experts, fixed, cfg.vocab_size, args.levels, args.load,
                               results.get("fixed", {}), args.routers)  # fmt: skip
    print(f"done; {load_average()}", flush=True)

    def floor_s(name: str, level: LevelResult) -> float:
        if name == "mixed":
            return mixed_floor_s
        return roofline.closed_loop_floor_s(fixed, level.concurrency, weights, machine)

    rows = [level_row(name, level, floor_s(name, level)) for name, by_side in results.items()
            for level_sides in by_level(by_side) for level in level_sides.values()]  # fmt: skip
    print()
    table(["workload", "side", "streams", "requests", "useful tokens", "wall s", "tok/s", "of floor tok/s",
           "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"], rows, args.markdown)  # fmt: skip
    reached: Reached = {}
    ratio_table = []
    for name, by_side in results.items():
        level_rows, level_reached = ratio_rows(name, by_side)
        ratio_table += level_rows
        reached |= level_reached
    print()
    table(["workload", "streams", *RATIOS, "in-process: same output, first token as llama.cpp",
           "moemesh up: same output, first token as llama.cpp"], ratio_table, args.markdown)  # fmt: skip
    if opened:
        lone, capacity, loaded, rate = opened
        print(f"\nopen loop: moemesh up, capacity {capacity.tokens_per_s:.1f} tok/s at {capacity.concurrency} streams; "
              f"arrivals at {rate:.2f} requests/s ({loaded.tokens_per_s:.1f} tok/s delivered)\n")  # fmt: skip
        table(openloop.HEADER, openloop.latency_rows(lone, loaded), args.markdown)
        reached[(OPEN_LOOP, None)] = {
            f"p99 {k} / lone request": v for k, v in openloop.p99_ratios(lone, loaded).items()
        }
    print()
    table(TARGET_HEADER, target_rows(reached), args.markdown)
    if args.plot and "fixed" in results:
        title = f"bench.compare, fixed workload ({describe(fixed)}), {model.name}\n{cpu}; at the end, {load_average()}"
        print(f"\nplot: {plot(results['fixed'], args.plot, title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
