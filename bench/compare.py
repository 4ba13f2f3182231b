"""moemesh against llama.cpp, side by side in one run: same checkpoint, same dtype, same requests.

Three sides run `bench.throughput`'s fixed workload (deterministic token-id prompts, greedy, exactly
`--max-new-tokens` each, c client streams in a closed loop for each concurrency c), one side at a time so
they never compete for the CPUs, taking turns at each concurrency (each starts afresh with one warm-up
request) so that a busy spell of a shared machine falls on all of them rather than on one. All sides get
OMP_WAIT_POLICY=PASSIVE unless the environment sets it (`moemesh up` gives its services the same):

- **in-process**: moemesh's engine with the experts in its own process (`bench.throughput.run_in_process`);
- **moemesh up**: the real cluster, gateway + router + expert shards as processes, over gRPC
  (`bench.throughput.run_distributed`);
- **llama.cpp**: `llama-server --parallel c` on the checkpoint converted to GGUF (`bench.llamacpp`), built
  from source on first use (minutes, then cached).

Reports per (concurrency, side): tokens, wall s, tok/s, TTFT mean/p50/p99 and inter-token latency
p50/p99 (client-side, from the streamed messages), then each moemesh side's tok/s and TTFT over
llama.cpp's. The CPU model and SIMD flags come first, since they decide llama.cpp's kernels.

    .venv/bin/python -m bench.compare [--model DIR] [--concurrency 1,8,32] [--max-new-tokens 64]
        [--requests N] [--experts 2] [--sides in-process,moemesh-up,llama.cpp] [--quick] [--markdown]
"""

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from bench import llamacpp
from bench.common import command_line, cpu_description, inter_token_gaps, load_average, percentile, table
from bench.throughput import LevelResult, prompt, run_distributed, run_in_process

SIDES = ("in-process", "moemesh-up", "llama.cpp")
QUICK = {"concurrency": "1,8", "requests": 8, "max_new_tokens": 32}  # ~2-3 minutes on 2 cores, once built
DEFAULTS = {"concurrency": "1,8,32", "requests": 0, "max_new_tokens": 64}


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f}"


def level_row(level: LevelResult) -> list[str]:
    """One side at one concurrency: throughput, then TTFT and inter-token latency percentiles."""
    ttfts = [r.ttft_s for r in level.results if r.ttft_s is not None]
    gaps = [gap for r in level.results for gap in inter_token_gaps(r.chunks)]
    return [
        level.side, str(level.concurrency), str(level.tokens), f"{level.wall_s:.2f}", f"{level.tokens_per_s:.1f}",
        f"{level.mean_ttft_ms:.1f}", _ms(percentile(ttfts, 50)), _ms(percentile(ttfts, 99)),
        _ms(percentile(gaps, 50)), _ms(percentile(gaps, 99)),
    ]  # fmt: skip


AGREEMENT = "same output, same first token"


def agreement(level: LevelResult, reference: LevelResult) -> str:
    """How many requests generated exactly llama.cpp's tokens, and how many at least its first token. The
    first token checks the conversion (both compute the same function of the same weights); later tokens
    drift apart where a random model's top logits are near-ties and the two round differently."""
    pairs = list(zip(level.results, reference.results))
    same = sum(a.token_ids == b.token_ids for a, b in pairs)
    first = sum(a.token_ids[:1] == b.token_ids[:1] for a, b in pairs)
    return f"{same}/{len(pairs)}, {first}/{len(pairs)}"


def report(by_side: dict[str, list[LevelResult]], levels: list[int], markdown: bool) -> None:
    header = ["side", "streams", "tokens", "wall s", "tok/s", "mean TTFT ms", "TTFT p50 ms", "TTFT p99 ms",
              "ITL p50 ms", "ITL p99 ms"]  # fmt: skip
    rows = [level_row(results[i]) for i in range(len(levels)) for results in by_side.values()]
    print()
    table(header, rows, markdown)
    reference = by_side.get(llamacpp.SIDE)
    moemesh = {side: results for side, results in by_side.items() if side != llamacpp.SIDE}
    if not reference or not moemesh:
        return
    ratio_header = ["streams"]
    for side in moemesh:
        ratio_header += [f"{side} / llama.cpp tok/s", f"{side} / llama.cpp TTFT p50", f"{side}: {AGREEMENT}"]
    ratio_rows = []
    for i, concurrency in enumerate(levels):
        ref = reference[i]
        ref_ttft = percentile([r.ttft_s for r in ref.results], 50)
        row = [str(concurrency)]
        for results in moemesh.values():
            ttft = percentile([r.ttft_s for r in results[i].results], 50)
            row += [f"{results[i].tokens_per_s / ref.tokens_per_s:.2f}", f"{ttft / ref_ttft:.2f}",
                    agreement(results[i], ref)]  # fmt: skip
        ratio_rows.append(row)
    print()
    table(ratio_header, ratio_rows, markdown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: the bundled demo model)")
    parser.add_argument("--concurrency", help="comma-separated concurrent streams (default 1,8,32; quick: 1,8)")
    parser.add_argument("--max-new-tokens", type=int, help="tokens generated per request (default 64; quick: 32)")
    parser.add_argument("--requests", type=int,
                        help="requests per level (default: 2 x the largest concurrency; quick: 8)")  # fmt: skip
    parser.add_argument("--experts", type=int, default=2, help="expert shards of `moemesh up` (default 2)")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"which sides to run (default {','.join(SIDES)})")
    parser.add_argument("--quick", action="store_true", help="a small run: concurrency 1,8, 8 requests of 32 tokens")
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    args = parser.parse_args(argv)
    chosen = QUICK if args.quick else DEFAULTS
    for name, default in chosen.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    sides = list(dict.fromkeys(s.strip() for s in args.sides.split(",") if s.strip()))
    if not levels or min(levels) < 1 or args.max_new_tokens < 1 or args.experts < 1:
        parser.error("--concurrency, --max-new-tokens and --experts must be positive")
    if unknown := set(sides) - set(SIDES):
        parser.error(f"unknown side(s) {', '.join(sorted(unknown))}; choose from {', '.join(SIDES)}")
    num_requests = args.requests or 2 * max(levels)

    print(f"command: {command_line('bench.compare')}", flush=True)
    print(f"cpu: {cpu_description()}; {load_average()}", flush=True)
    # Every side's thread pool sleeps while idle, as `moemesh up` makes its services' do: set before torch
    # loads OpenMP, inherited by llama-server (OpenMP too). Spinning pools collapse on a shared machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from moemesh import demo_model
    from moemesh.families import load_config

    model = (args.model or demo_model.ensure()).resolve()
    cfg = load_config(model)
    dtype = str(cfg.checkpoint_dtype).removeprefix("torch.")
    binary = gguf = Path()
    if llamacpp.SIDE in sides:  # first, so that a failing build or conversion fails before the long runs
        binary, gguf = llamacpp.prepare(model, dtype)
    lengths = [len(prompt(i, cfg.vocab_size)) for i in range(num_requests)]
    print(
        f"model: {model} ({cfg.model_type}, {dtype}, vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, "
        f"{cfg.num_layers} layers, {cfg.num_experts} experts top-{cfg.experts_per_token})"
        + (f"; llama.cpp reads {gguf.name}" if llamacpp.SIDE in sides else "")
        + f"\nworkload: {num_requests} requests per level, prompts of {min(lengths)}-{max(lengths)} tokens "
        f"(mean {sum(lengths) / len(lengths):.0f}), greedy, exactly {args.max_new_tokens} new tokens each; "
        f"concurrency {','.join(map(str, levels))}; warm-up: 1 request per side and level\n"
        f"threads: torch {torch.__version__} with {torch.get_num_threads()} threads; llama-server "
        f"--threads {os.cpu_count()}; OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} for all sides",
        flush=True,
    )
    runs: dict[str, tuple[str, Callable[[list[int]], list[LevelResult]]]] = {
        "in-process": (
            "in-process (experts in the engine's process, no gRPC)",
            lambda c: run_in_process(model, c, num_requests, cfg.vocab_size, args.max_new_tokens, profile=False)[0],
        ),
        "moemesh-up": (
            f"moemesh up --experts {args.experts} (GenerateStream over gRPC)",
            lambda c: run_distributed(
                model,
                args.experts,
                c,
                num_requests,
                cfg.vocab_size,
                args.max_new_tokens,
                profile=False,
                service_threads=0,
                side="moemesh up",
            )[0],
        ),  # fmt: skip
        llamacpp.SIDE: (
            f"llama.cpp (llama-server, llama-cpp-python {llamacpp.VERSION})",
            lambda c: llamacpp.run_llamacpp(binary, gguf, c, num_requests, cfg.vocab_size, args.max_new_tokens),
        ),
    }
    by_side: dict[str, list[LevelResult]] = {}
    for concurrency in levels:  # sides take turns at each level, so a busy spell of the machine hits all alike
        for side in sides:
            title, run = runs[side]
            print(f"{title}, {concurrency} streams; {load_average()}", flush=True)
            for level in run([concurrency]):
                by_side.setdefault(level.side, []).append(level)
    print(f"done; {load_average()}", flush=True)
    report(by_side, levels, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
