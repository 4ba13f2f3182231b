"""Latency under an open loop: `moemesh up` at half its measured capacity, against a lone request.

Three measurements on the same workload (bench.throughput's prompts, greedy, `--max-new-tokens` each):
capacity (a closed loop at `--capacity-concurrency` streams: tokens/s, hence requests/s), a lone request
at a time (the floor of TTFT and inter-token latency), and requests arriving as a Poisson process at
`--load` x capacity. Prints p50/p99 TTFT and inter-token latency of both and their ratios against the
targets (open-loop p99 TTFT <= 3x, p99 inter-token latency <= 2x the lone request's).

    .venv/bin/python -m bench.openloop [--model DIR] [--load 0.5] [--requests 64] [--max-new-tokens 64]
        [--capacity-concurrency 32] [--markdown]
"""

import argparse
from pathlib import Path

from bench.common import command_line, cpu_description, load_average, percentile, table
from bench.throughput import LevelResult, latencies, run_distributed
from bench.workloads import fixed_requests

TARGETS = {"TTFT": 3.0, "inter-token": 2.0}  # open-loop p99 / lone p99, at most
HEADER = ["latency", "lone p50 ms", "lone p99 ms", "open-loop p50 ms", "open-loop p99 ms", "p99 ratio", "target", ""]


def arrival_rate(capacity: LevelResult, load: float) -> float:
    """Requests/s arriving at `load` x the rate at which the closed loop `capacity` completed them."""
    return load * len(capacity.results) / capacity.wall_s


def p99_ratios(lone: LevelResult, opened: LevelResult) -> dict[str, float]:
    """Open-loop p99 over the lone request's p99, for TTFT and inter-token latency (`TARGETS`' keys)."""
    alone, loaded = latencies(lone), latencies(opened)
    return {name: percentile(loaded[name], 99) / percentile(alone[name], 99) for name in TARGETS}


def latency_rows(lone: LevelResult, opened: LevelResult) -> list[list[str]]:
    """`HEADER`'s rows: p50/p99 of both runs, the p99 ratio and whether it meets its target."""
    alone, loaded, ratios = latencies(lone), latencies(opened), p99_ratios(lone, opened)
    rows = []
    for name, limit in TARGETS.items():
        ms = [f"{1000 * percentile(values, q):.1f}" for values in (alone[name], loaded[name]) for q in (50, 99)]
        rows.append([name, *ms, f"{ratios[name]:.2f}", f"<= {limit:g}", "met" if ratios[name] <= limit else "not met"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.openloop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: the bundled demo model)")
    parser.add_argument("--load", type=float, default=0.5, help="arrival rate as a share of capacity (default 0.5)")
    parser.add_argument("--requests", type=int, default=64, help="requests in the capacity and open-loop runs")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--capacity-concurrency", type=int, default=32)
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    from moemesh import demo_model
    from moemesh.families import load_config

    model = (args.model or demo_model.ensure()).resolve()
    vocab = load_config(model).vocab_size
    print(f"command: {command_line('bench.openloop')}\ncpu: {cpu_description()}; {load_average()}", flush=True)

    def cluster(levels: list[int], requests: int, rate: float = 0.0) -> list[LevelResult]:
        workload = fixed_requests(requests, vocab, args.max_new_tokens)
        return run_distributed(model, args.experts, levels, workload, vocab, False, 0, side="moemesh up",
                               arrival_rate=rate)[0]  # fmt: skip

    [capacity] = cluster([args.capacity_concurrency], args.requests)
    [lone] = cluster([1], 8)
    rate = arrival_rate(capacity, args.load)
    [opened] = cluster([0], args.requests, rate)
    print(f"\ncapacity: {capacity.tokens_per_s:.1f} tok/s at {args.capacity_concurrency} streams; open loop at "
          f"{args.load:g} x = {rate:.2f} requests/s ({opened.tokens_per_s:.1f} tok/s delivered); "
          f"{load_average()}\n")  # fmt: skip
    table(HEADER, latency_rows(lone, opened), args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
