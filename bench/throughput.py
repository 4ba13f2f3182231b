"""Throughput, side by side in one run: the distributed cluster vs the same engine in one process.

(a) distributed: `moemesh up --experts N --port 0` (gateway, router, N expert shards and redis-server as
    real subprocesses); the bench sends `GenerateStream` calls from a pool of client threads.
(b) in-process: `build_engine(GatewaySettings(model=...))` without a router (the experts run in the
    engine's process), requests submitted from threads and drained with `seq.outputs()`.

Both sides run the same fixed requests (deterministic token-id prompts of mixed lengths, greedy,
`--max-new-tokens` each), c at a time in a closed loop for each concurrency c, after one warm-up
request. The in-process side runs first and its engine is stopped and freed before the cluster
starts, so the two never compete for the CPUs. Reports, per (side, concurrency): generated tokens,
wall seconds, tokens/s, mean time to first token, engine steps and mean step time (from the gateway's
`moemesh_gateway_step_seconds` histogram); then the distributed / in-process ratio per concurrency.

    .venv/bin/python -m bench.throughput [--model DIR] [--concurrency 1,16] [--max-new-tokens 64]
        [--experts 2] [--requests N] [--service-threads N] [--markdown] [--profile]
"""

import argparse
import gc
import os
import random
import re
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import ServiceProcess, allocator_as_services, command_line, inter_token_gaps, load_average, table
from bench.workloads import WARMUP_INDEX, Request, describe, fixed_requests, warmup_request

ARRIVAL_SEED = 7  # the open loop's arrival times
REQUEST_TIMEOUT_S = 900
STEP_METRIC = "moemesh_gateway_step_seconds"


# ---------------------------------------------------------------------------------------------------
# Results


@dataclass
class RequestResult:
    index: int
    token_ids: list[int]
    ttft_s: float
    latency_s: float
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (s since submit, tokens) per streamed message


@dataclass
class LevelResult:
    side: str
    concurrency: int
    results: list[RequestResult]
    wall_s: float
    steps: float | None = None  # engine steps during the level
    step_s: float | None = None  # their summed wall time
    cpu_s: float | None = None  # CPU time of the serving processes during the level

    @property
    def tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.results)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def mean_ttft_ms(self) -> float:
        return 1000 * sum(r.ttft_s for r in self.results) / len(self.results)

    @property
    def mean_step_ms(self) -> float | None:
        return 1000 * self.step_s / self.steps if self.steps else None


def latencies(level: LevelResult) -> dict[str, list[float]]:
    """Seconds to the first token ("TTFT") and between tokens ("inter-token") over the level's requests."""
    return {
        "TTFT": [r.ttft_s for r in level.results if r.ttft_s is not None],
        "inter-token": [gap for r in level.results for gap in inter_token_gaps(r.chunks)],
    }


def collect(index: int, t0: float, messages: Iterable[Sequence[int]]) -> RequestResult:
    """Drains request `index`'s stream of token-id messages, timing each from `t0` (when it was sent): the
    same measurement for every side, whatever its transport."""
    tokens: list[int] = []
    chunks: list[tuple[float, int]] = []
    for ids in messages:
        if ids:
            chunks.append((time.perf_counter() - t0, len(ids)))
            tokens += ids
    return RequestResult(index, tokens, chunks[0][0] if chunks else None, time.perf_counter() - t0, chunks)


StepStats = Callable[[], tuple[float, float]]  # -> (count, sum) of the step-seconds histogram
Client = Callable[[int, Request], RequestResult]  # sends request number `index`, drains its stream


def run_level(side: str, concurrency: int, requests: Sequence[Request], one: Client, step_stats: StepStats,
              arrival_rate: float = 0.0) -> LevelResult:  # fmt: skip
    """The requests, `concurrency` at a time: each client thread takes the next one when done; or, with
    `arrival_rate` (requests/s), arriving as a Poisson process whatever is still running (`open_loop`)."""
    if arrival_rate:
        steps0, step_s0 = step_stats()
        results, wall = open_loop(requests, one, arrival_rate)
        steps1, step_s1 = step_stats()
        level = LevelResult(side, 0, results, wall, steps1 - steps0, step_s1 - step_s0)
        print(f"  {side:<12} open loop at {arrival_rate:.2f} requests/s: {level.tokens} tokens in {wall:.2f} s = "
              f"{level.tokens_per_s:.1f} tok/s, mean TTFT {level.mean_ttft_ms:.1f} ms", flush=True)  # fmt: skip
        return level
    next_index = iter(range(len(requests)))
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)

    def client() -> list[RequestResult]:
        done = []
        start.wait()
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return done
            done.append(one(index, requests[index]))

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"client-{side}") as pool:
        futures = [pool.submit(client) for _ in range(concurrency)]
        steps0, step_s0 = step_stats()
        t0 = time.perf_counter()
        start.wait()
        results = [r for f in futures for r in f.result()]
        wall = time.perf_counter() - t0
        steps1, step_s1 = step_stats()
    results.sort(key=lambda r: r.index)
    level = LevelResult(side, concurrency, results, wall, steps1 - steps0, step_s1 - step_s0)
    print(
        f"  {side:<12} {concurrency:>3} streams: {level.tokens} tokens in {wall:.2f} s = "
        f"{level.tokens_per_s:.1f} tok/s, mean TTFT {level.mean_ttft_ms:.1f} ms"
        + (f", {level.steps:.0f} steps of {level.mean_step_ms:.1f} ms" if level.steps else ""),  # none: not moemesh
        flush=True,
    )
    return level


def open_loop(requests: Sequence[Request], one: Client, rate: float) -> tuple[list[RequestResult], float]:
    """Requests sent as they arrive, at exponential gaps of mean 1/`rate` seconds (a seeded Poisson process),
    each on its own thread however many are still running: independent clients, not a fixed pool that
    waits for the server (a closed loop hides queueing, since a slow server slows its own arrivals)."""
    gaps = random.Random(ARRIVAL_SEED)
    with ThreadPoolExecutor(max_workers=len(requests), thread_name_prefix="arrival") as pool:
        t0 = due = time.perf_counter()
        futures = []
        for i, request in enumerate(requests):
            due += gaps.expovariate(rate)
            time.sleep(max(0.0, due - time.perf_counter()))
            futures.append(pool.submit(one, i, request))
        results = [f.result() for f in futures]
    return results, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------
# Optional profile: where an engine step's time goes (MoE calls vs the rest), measured in this process


class TimedRouted:
    """Wraps an engine's `RoutedExperts`, summing the wall time of its calls (gate+experts+combine+wire)."""

    def __init__(self, routed):
        self.routed, self.seconds, self.calls = routed, 0.0, 0

    def submit(self, layer, hidden, deadline):
        t0 = time.perf_counter()
        wait = self.routed.submit(layer, hidden, deadline)

        def timed_wait():
            try:
                return wait()
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        return timed_wait


@dataclass
class Profile:
    label: str
    steps: float
    step_s: float
    moe_s: float
    moe_calls: int

    def line(self) -> str:
        per_step = lambda s: 1000 * s / self.steps  # noqa: E731
        return (
            f"  {self.label:<42} {self.steps:>5.0f} steps, {per_step(self.step_s):6.1f} ms/step: "
            f"MoE calls {per_step(self.moe_s):6.1f} ms ({self.moe_calls / self.steps:.0f}/step), "
            f"rest {per_step(self.step_s - self.moe_s):6.1f} ms"
        )


def profile_engine(label: str, engine, concurrency: int, requests: Sequence[Request]) -> Profile:
    from prometheus_client import REGISTRY

    timed = TimedRouted(engine.routed)
    engine.routed = timed
    stats = lambda: _registry_step_stats(REGISTRY)  # noqa: E731
    level = run_level("profile", concurrency, requests, _engine_client(engine), stats)
    engine.routed = timed.routed
    return Profile(label, level.steps, level.step_s, timed.seconds, timed.calls)


# ---------------------------------------------------------------------------------------------------
# (b) in-process


def _registry_step_stats(registry) -> tuple[float, float]:
    return (
        registry.get_sample_value(f"{STEP_METRIC}_count") or 0.0,
        registry.get_sample_value(f"{STEP_METRIC}_sum") or 0.0,
    )


def _engine_client(engine) -> Client:
    from services.gateway.requests import GenerationRequest, SamplingConfig

    def one(index: int, request: Request) -> RequestResult:
        sampling = SamplingConfig(max_new_tokens=request.max_new, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        seq = engine.submit(GenerationRequest(list(request.prompt), sampling))
        return collect(index, t0, (out.token_ids for out in seq.outputs()))

    return one


def run_in_process(model: Path, levels: list[int], requests: Sequence[Request], vocab_size: int,
                   profile: bool, device: str = "auto",
                   quantize: str = "none") -> tuple[list[LevelResult], Profile | None]:  # fmt: skip
    from prometheus_client import REGISTRY

    from moemesh.settings import GatewaySettings
    from services.gateway.server import build_engine

    settings = GatewaySettings(model=model, device=device, quantize=quantize)
    settings.configure_compute()
    engine, _ = build_engine(settings)
    engine.start()
    try:
        one = _engine_client(engine)
        one(WARMUP_INDEX, warmup_request(vocab_size))
        stats = lambda: _registry_step_stats(REGISTRY)  # noqa: E731
        results = [run_level("in-process", c, requests, one, stats) for c in levels]
        prof = None
        if profile:
            prof = profile_engine("in-process engine", engine, max(levels), requests)
        return results, prof
    finally:
        engine.stop()
        del engine
        gc.collect()


# ---------------------------------------------------------------------------------------------------
# (a) distributed: `moemesh up` as a subprocess in its own session


def start_up(
    model: Path,
    experts: int,
    service_threads: int = 0,
    extra_env: dict[str, str] | None = None,
    replicas: int = 1,
    routers: int = 1,
    quantize: str = "none",
) -> ServiceProcess:
    """`moemesh up` in a new session (so that everything it starts can be found and checked at the end), its
    environment this process's plus `extra_env`; `routers=0`: the gateway routes itself."""
    argv = [sys.executable, "-m", "moemesh.cli", "up", "--model", str(model), "--experts", str(experts), "--port", "0"]
    argv += ["--replicas", str(replicas)] if replicas > 1 else []
    argv += ["--routers", str(routers)] if routers != 1 else []
    argv += ["--threads", str(service_threads)] if service_threads else []
    argv += ["--quantize", quantize] if quantize != "none" else []
    env = os.environ | (extra_env or {})
    return ServiceProcess("moemesh up", argv, env)


def _scrape_step_stats(address: str) -> tuple[float, float]:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    values = []
    for suffix in ("_count", "_sum"):
        match = re.search(rf"^{STEP_METRIC}{suffix} (\S+)$", text, re.MULTILINE)
        values.append(float(match.group(1)) if match else 0.0)
    return values[0], values[1]


def run_distributed(model: Path, experts: int, levels: list[int], requests: Sequence[Request], vocab_size: int,
                    profile: bool, service_threads: int, extra_env: dict[str, str] | None = None,
                    side: str = "distributed", arrival_rate: float = 0.0, routers: int = 1,
                    quantize: str = "none") -> tuple[list[LevelResult], Profile | None]:  # fmt: skip
    import grpc

    from moemesh.rpc import CHANNEL_OPTIONS
    from moemesh.v1 import gateway_pb2, gateway_pb2_grpc

    if profile and not routers:
        raise ValueError("the profile drives the engine over the cluster's router: it needs routers")
    up = start_up(model, experts, service_threads, extra_env, routers=routers, quantize=quantize)
    try:
        address = up.wait_for(r"^gateway listening on (\S+)").group(1)
        router = up.wait_for(r"^\[router-0\] ready on (\S+)").group(1) if routers else "none (the gateway routes)"
        metrics = up.wait_for(r"gateway metrics on (\S+)").group(1)
        print(f"  cluster up: gateway {address}, router {router}, {experts} expert shards", flush=True)
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        stub = gateway_pb2_grpc.GatewayStub(channel)

        def one(index: int, request: Request) -> RequestResult:
            sampling = gateway_pb2.SamplingParams(max_new_tokens=request.max_new, temperature=0.0, ignore_eos=True)
            call = gateway_pb2.GenerateRequest(prompt_token_ids=request.prompt, sampling=sampling)
            t0 = time.perf_counter()
            return collect(index, t0, (msg.token_ids for msg in stub.GenerateStream(call, timeout=REQUEST_TIMEOUT_S)))

        one(WARMUP_INDEX, warmup_request(vocab_size))
        stats = lambda: _scrape_step_stats(metrics)  # noqa: E731
        results = []
        for concurrency in levels:
            cpu_before = up.cpu_seconds()
            results.append(run_level(side, concurrency, requests, one, stats, arrival_rate))
            results[-1].cpu_s = up.cpu_seconds() - cpu_before
        channel.close()
        prof = None
        if profile:  # the gateway's engine, rebuilt in this process over the cluster's router
            import torch

            from moemesh.settings import GatewaySettings
            from services.gateway.server import build_engine

            engine, _ = build_engine(GatewaySettings(model=model, router=router))
            threads = torch.get_num_threads()
            torch.set_num_threads(service_threads or threads)  # as the gateway service would run it
            engine.start()
            try:
                _engine_client(engine)(WARMUP_INDEX, warmup_request(vocab_size))
                label = "engine over the cluster's router (gRPC)"
                prof = profile_engine(label, engine, max(levels), requests)
            finally:
                engine.stop()
                engine.routed.close()
                torch.set_num_threads(threads)
        return results, prof
    finally:
        code, left = up.stop()
        stopped = (
            f"cluster stopped with SIGTERM: `moemesh up` exit code {code}; "
            f"processes left in its session: {', '.join(left) if left else 'none'}"
        )
        print(f"  {stopped}", flush=True)
        if code is None or left:
            print("  (they were killed with SIGKILL)", flush=True)


# ---------------------------------------------------------------------------------------------------
# Report


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(inproc: list[LevelResult], dist: list[LevelResult], markdown: bool) -> None:
    header = ["side", "streams", "requests", "tokens", "wall s", "tok/s", "mean TTFT ms", "steps", "mean step ms"]
    rows = [
        [
            r.side,
            str(r.concurrency),
            str(len(r.results)),
            str(r.tokens),
            f"{r.wall_s:.2f}",
            f"{r.tokens_per_s:.1f}",
            f"{r.mean_ttft_ms:.1f}",
            _fmt(r.steps, ".0f"),
            _fmt(r.mean_step_ms, ".1f"),
        ]
        for pair in zip(inproc, dist)
        for r in pair
    ]
    ratio_header = ["streams", "in-process tok/s", "distributed tok/s", "ratio dist/in-proc",
                    "TTFT ratio dist/in-proc", "identical greedy outputs"]  # fmt: skip
    ratio_rows = []
    for a, b in zip(inproc, dist):
        same = sum(x.token_ids == y.token_ids for x, y in zip(a.results, b.results))
        ratio_rows.append([
            str(a.concurrency), f"{a.tokens_per_s:.1f}", f"{b.tokens_per_s:.1f}",
            f"{b.tokens_per_s / a.tokens_per_s:.2f}", f"{b.mean_ttft_ms / a.mean_ttft_ms:.2f}",
            f"{same}/{len(a.results)}",
        ])  # fmt: skip
    print()
    table(header, rows, markdown)
    print()
    table(ratio_header, ratio_rows, markdown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: the bundled demo model)")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated concurrent streams (default 1,16)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    parser.add_argument("--experts", type=int, default=2, help="expert shards of the cluster (default 2)")
    parser.add_argument("--requests", type=int, default=0,
                        help="requests per concurrency level (default: 2 x the largest concurrency)")  # fmt: skip
    parser.add_argument(
        "--service-threads",
        type=int,
        default=0,
        help="torch threads of each cluster service (`moemesh up --threads`; default 0: up's own choice)",
    )
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    parser.add_argument(
        "--profile", action="store_true", help="also time an engine step's MoE calls, in-process and over the router"
    )
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1 or args.max_new_tokens < 1 or args.experts < 1:
        parser.error("--concurrency, --max-new-tokens and --experts must be positive")
    num_requests = args.requests or 2 * max(levels)

    print(f"command: {command_line('bench.throughput')}", flush=True)
    import torch

    from moemesh import demo_model
    from moemesh.families import load_config

    model = (args.model or demo_model.ensure()).resolve()
    print(allocator_as_services(model), flush=True)
    cfg = load_config(model)
    requests = fixed_requests(num_requests, cfg.vocab_size, args.max_new_tokens)
    print(
        f"model: {model} ({cfg.model_type}, {cfg.checkpoint_dtype}, vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, "
        f"{cfg.num_layers} layers, {cfg.num_experts} experts top-{cfg.experts_per_token})\n"
        f"workload: {describe(requests)} per level, greedy; "
        f"concurrency {','.join(map(str, levels))}; warm-up: 1 request per side\n"
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads; "
        f"{load_average()}",
        flush=True,
    )
    print(f"in-process (experts in the engine's process, no gRPC); {load_average()}", flush=True)
    inproc, prof_in = run_in_process(model, levels, requests, cfg.vocab_size, args.profile)
    threads = f"up --threads {args.service_threads}" if args.service_threads else "up's default threads"
    print(
        f"distributed (moemesh up --experts {args.experts}, {threads}, GenerateStream over gRPC); {load_average()}",
        flush=True,
    )
    dist, prof_dist = run_distributed(
        model, args.experts, levels, requests, cfg.vocab_size, args.profile, args.service_threads,
    )  # fmt: skip
    print(f"done; {load_average()}")
    report(inproc, dist, args.markdown)
    if prof_in and prof_dist:
        print(f"\nprofile at {max(levels)} streams (engine steps timed in this process):")
        print(prof_in.line())
        print(prof_dist.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
