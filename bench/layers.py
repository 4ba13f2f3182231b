"""Where a MoE layer's time goes over the router, against the same layer in one process, at one decode token
and at prefill sizes.

Starts `moemesh up` and rebuilds the gateway's dense model in this process over its router (as
`bench.throughput`'s profile does), then drives the model directly with one sequence: decode steps after a
100-token prompt, and prompts of each `--prefill` size (each read once to warm oneDNN's kernels for its
shape, then three times, timed). For every case it prints the step, what the gateway waits per MoE layer, what the
router waits per call to a shard (`moemesh_router_replica_call_seconds`) and what the shards compute per call
(`moemesh_expert_call_seconds`); the in-process engine (experts in the engine's process) runs the same cases.

Before those, on streams no call has used yet, it calls the router alone, back to back, layer after layer, with
random hidden states of one token and of each prefill size: the hops and the shards with no dense part between
them, and each service's handler threads as they are when a cluster starts.

With `--routers 0` this process gates and calls the shards itself, as a gateway of `up --routers 0` does: the
"router" columns are then its own calls to the shards, and its CPU counts the routing.

    .venv/bin/python -m bench.layers [--model DIR] [--experts 2] [--replicas 1] [--routers 1] [--decode-steps 40]
        [--prefill 32,128,256] [--markdown]
"""

import argparse
import re
import statistics
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import prometheus_client
import torch

from bench.common import ServiceProcess, allocator_as_services, command_line, cpu_description, load_average, table
from bench.throughput import start_up
from moemesh.checkpoint import Checkpoint
from moemesh.compute_threads import in_passing_thread
from moemesh.model import DenseModel, KVCache, RoutedExperts, SequenceSlice, StepBatch

PROMPT_FOR_DECODE = 100
PREFILL_REPEATS = 3  # prompts of each size timed (median step); CPU times are summed over them
HISTOGRAMS = {"router": "moemesh_router_replica_call_seconds", "expert": "moemesh_expert_call_seconds"}


@dataclass
class Case:
    step_ms: float
    moe_ms: float  # per MoE layer, as the engine waits for it
    steps: int


# What `run_cases` calls each case through: (the case, what it saw around it).
Measure = Callable[[Callable[[], Case]], tuple[Case, dict[str, float]]]


class TimedExperts:
    """The engine's `RoutedExperts`, timing each MoE layer from submit to its output."""

    def __init__(self, routed: RoutedExperts):
        self.routed, self.seconds = routed, 0.0

    def submit(self, layer, hidden, deadline):
        start = time.perf_counter()
        wait = self.routed.submit(layer, hidden, deadline)

        def timed():
            out = wait()
            self.seconds += time.perf_counter() - start
            return out

        return timed


class Driver:
    """Steps one sequence through `model` over `routed`, timing the step and the MoE layers' waits."""

    def __init__(self, model: DenseModel, routed: RoutedExperts):
        self.model, self.timed = model, TimedExperts(routed)
        self.dtype, self.device = model.norm.weight.dtype, model.norm.weight.device
        self.moe_layers = len(model.cfg.moe_layers)

    def step(self, cache: KVCache, ids: list[int]) -> tuple[float, int]:
        batch = StepBatch(
            torch.tensor(ids), torch.arange(cache.length, cache.length + len(ids)),
            [SequenceSlice(0, len(ids), cache)], torch.tensor([len(ids) - 1]),
        )  # fmt: skip
        start = time.perf_counter()
        token = int(self.model([batch], self.timed).argmax())
        cache.length += len(ids)
        return time.perf_counter() - start, token

    def prompt(self, size: int) -> tuple[KVCache, float, int]:
        cache = KVCache(self.model.cfg, self.dtype, self.device)
        seconds, token = self.step(cache, list(range(1, size + 1)))
        return cache, seconds, token

    def decode(self, cache: KVCache, token: int, steps: int) -> Case:
        self.timed.seconds, times = 0.0, []
        for _ in range(steps):
            seconds, token = self.step(cache, [token])
            times.append(seconds)
        return Case(1000 * statistics.median(times), 1000 * self.timed.seconds / steps / self.moe_layers, steps)

    def prefill(self, size: int, repeats: int) -> Case:
        self.timed.seconds = 0.0
        times = [self.prompt(size)[1] for _ in range(repeats)]
        return Case(1000 * statistics.median(times), 1000 * self.timed.seconds / repeats / self.moe_layers, repeats)


def call_router(client: RoutedExperts, layers: Sequence[int], hidden: torch.Tensor, rounds: int) -> Case:
    """`rounds` calls per MoE layer, one after the other; the case's step and MoE layer are the mean call."""
    for layer in layers:  # each layer's buffers, untimed
        client.submit(layer, hidden, None)()
    start = time.perf_counter()
    for _ in range(rounds):
        for layer in layers:
            client.submit(layer, hidden, None)()
    ms = 1000 * (time.perf_counter() - start) / (rounds * len(layers))
    return Case(ms, ms, rounds)


def run_cases(
    driver: Driver, decode_steps: int, prefill: list[int], measure: Measure = lambda run: (run(), {})
) -> dict[str, tuple[Case, dict[str, float]]]:
    """{case: (Case, what `measure` saw around it)}; every shape is run once untimed first (oneDNN builds its
    kernels per shape, each service its buffers)."""
    cache, _, token = driver.prompt(PROMPT_FOR_DECODE)
    _, token = driver.step(cache, [token])
    cases = {"decode, 1 token": measure(lambda: driver.decode(cache, token, decode_steps))}
    for size in prefill:
        driver.prompt(size)
        cases[f"prefill, {size} tokens"] = measure(lambda size=size: driver.prefill(size, PREFILL_REPEATS))
    return cases


def scrape(address: str | None, histogram: str) -> tuple[float, float]:
    """(count, sum) of `histogram` over all its labels, at `address` or (None) in this process."""
    if address is None:
        text = prometheus_client.generate_latest().decode()
    else:
        text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    totals = []
    for suffix in ("_count", "_sum"):
        values = re.findall(rf"^{histogram}{suffix}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
        totals.append(sum(float(v) for v in values))
    return totals[0], totals[1]


def service_calls(up: ServiceProcess, metrics: dict[str, list[str | None]], moe_layers: int) -> Measure:
    """A `measure` for `run_cases`: the mean ms per call of each service kind's histogram over the run (an address
    of None: this process's), and the CPU ms per MoE layer of this process (the gateway's engine) and of the
    cluster's routers and shards (0 without routers: this process routes)."""

    def cpu() -> dict[str, float]:
        return {"gateway": time.process_time()} | {kind: up.cpu_seconds(f"moemesh.cli {kind}") for kind in metrics}

    def measure(run: Callable[[], Case]) -> tuple[Case, dict[str, float]]:
        before = {kind: [scrape(a, HISTOGRAMS[kind]) for a in addresses] for kind, addresses in metrics.items()}
        cpu_before = cpu()
        case = run()
        cpu_after = cpu()
        seen = {}
        for kind, addresses in metrics.items():
            after = [scrape(a, HISTOGRAMS[kind]) for a in addresses]
            count = sum(a[0] - b[0] for a, b in zip(after, before[kind]))
            seconds = sum(a[1] - b[1] for a, b in zip(after, before[kind]))
            seen[kind] = 1000 * seconds / count if count else float("nan")
        layers = moe_layers * case.steps
        seen |= {f"{kind} cpu": 1000 * (cpu_after[kind] - cpu_before[kind]) / layers for kind in cpu_after}
        return case, seen

    return measure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.layers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: the bundled demo model)")
    parser.add_argument("--experts", type=int, default=2, help="expert shards of the cluster (default 2)")
    parser.add_argument("--replicas", type=int, default=1, help="replicas of each shard (default 1)")
    parser.add_argument("--routers", type=int, default=1, choices=(0, 1), help="0: this process routes (default 1)")
    parser.add_argument("--decode-steps", type=int, default=40)
    parser.add_argument("--prefill", default="32,128,256", help="prompt sizes, comma-separated")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    prefill = [int(p) for p in args.prefill.split(",") if p.strip()]
    rounds = args.decode_steps  # router-alone calls per MoE layer and size
    from moemesh import demo_model
    from moemesh.settings import GatewaySettings
    from services.gateway.experts import local_experts, registry_experts
    from services.gateway.router_client import RouterClient

    model_dir = (args.model or demo_model.ensure()).resolve()
    print(f"command: {command_line('bench.layers')}\ncpu: {cpu_description()}; {load_average()}", flush=True)
    print(allocator_as_services(model_dir), flush=True)
    ckpt = Checkpoint(model_dir)
    settings = GatewaySettings(model=model_dir)
    device = settings.torch_device()
    dtype = settings.compute_dtype(ckpt.config.checkpoint_dtype, device)
    model = in_passing_thread(lambda: DenseModel.from_checkpoint(ckpt, dtype, device))
    generator = torch.Generator().manual_seed(0)

    def random_hidden(tokens: int) -> torch.Tensor:
        return torch.randn(tokens, ckpt.config.hidden_size, generator=generator).to(dtype)

    local = in_passing_thread(lambda: local_experts(ckpt, dtype, device))
    in_process = run_cases(Driver(model, local), args.decode_steps, prefill)
    del local

    up = start_up(model_dir, args.experts, replicas=args.replicas, routers=args.routers)
    try:
        up.wait_for(r"^gateway listening on ")  # the whole cluster has started: nothing loads while we measure
        metrics: dict[str, list[str | None]] = {
            "expert": [
                up.wait_for(rf"^\[expert-{i}\.{r}\] expert metrics on (\S+)").group(1)
                for i in range(args.experts)
                for r in range(args.replicas)
            ],
        }
        if args.routers:
            router = up.wait_for(r"^\[router-0\] ready on (\S+)").group(1)
            metrics["router"] = [up.wait_for(r"^\[router-0\] router metrics on (\S+)").group(1)]
            wire = settings.wire_torch_dtype(dtype)
            client = RouterClient([router], device, dtype, wire, settings.router_timeout_s, settings.hedge_floor_s)
        else:
            registry = up.wait_for(r"^\[redis\] ready on (\S+)").group(1)
            metrics["router"] = [None]
            routing = settings.model_copy(update={"registry": registry})
            client = in_passing_thread(lambda: registry_experts(routing, ckpt, device, dtype))
        measure = service_calls(up, metrics, len(ckpt.config.moe_layers))
        alone = {
            size: measure(lambda size=size: call_router(client, ckpt.config.moe_layers, random_hidden(size), rounds))
            for size in [1, *prefill]
        }
        distributed = run_cases(Driver(model, client), args.decode_steps, prefill, measure)
        (client if args.routers else client.executor).close()
    finally:
        up.stop()
    rows = []
    for name, (local_case, _) in in_process.items():
        case, calls = distributed[name]
        cpu = " / ".join(f"{calls[f'{kind} cpu']:.2f}" for kind in ("gateway", "router", "expert"))
        rows.append([name, f"{local_case.step_ms:.1f}", f"{local_case.moe_ms:.2f}", f"{case.step_ms:.1f}",
                     f"{case.moe_ms:.2f}", f"{calls['router']:.2f}", f"{calls['expert']:.2f}", cpu])  # fmt: skip
    header = ["case", "in-process step ms", "in-process MoE layer ms", "up step ms", "up MoE layer ms (gateway waits)",
              "router -> shard call ms", "shard compute ms", "CPU ms/layer: gateway/router/shards"]  # fmt: skip
    table(header, rows, args.markdown)
    print("\nrouter alone: calls back to back, layer after layer, random hidden states (run first)")
    rows = []
    for size, (case, calls) in alone.items():
        cpu = " / ".join(f"{calls[f'{kind} cpu']:.2f}" for kind in ("gateway", "router", "expert"))
        rows.append([f"{size} token{'s' if size > 1 else ''}", f"{case.step_ms:.2f}", f"{calls['router']:.2f}",
                     f"{calls['expert']:.2f}", cpu])  # fmt: skip
    header = ["hidden states of", "call ms", "router -> shard call ms", "shard compute ms",
              "CPU ms/call: caller/router/shards"]  # fmt: skip
    table(header, rows, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
