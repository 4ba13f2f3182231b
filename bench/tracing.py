"""Tracing overhead: the throughput workload through `moemesh up`, tracing off vs on, side by side.

Each round starts the cluster twice, once with tracing off (`OTEL_TRACES_EXPORTER=none`, as when unset) and
once exporting every span over OTLP/gRPC to a sink in this process (`OTEL_TRACES_EXPORTER=otlp`,
`OTEL_BSP_SCHEDULE_DELAY=200`), and runs the fixed requests of `bench.throughput` at one concurrency
after a warm-up request. Rounds alternate the order (off/on, on/off, ...) so that a drift in the
machine's load does not favour one side. Reports tokens/s per run, the median per side, the on/off ratio,
the CPU time the cluster's processes used per token (steadier than tokens/s on a shared machine; the sink's
own is not counted, as a collector would run elsewhere), and the spans the sink received.

    .venv/bin/python -m bench.tracing [--model DIR] [--concurrency 16] [--requests 32] [--rounds 2]
        [--max-new-tokens 64] [--experts 2] [--markdown]
"""

import argparse
import os
import statistics
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from bench.common import command_line, load_average, table
from bench.throughput import run_distributed
from bench.workloads import fixed_requests


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC receiver that counts the spans it is sent."""

    def __init__(self):
        self.spans = 0
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(self, request, context):
        count = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        with self._lock:
            self.spans += count
        return trace_service_pb2.ExportTraceServiceResponse()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the bundled demo model)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent streams (default 16)")
    parser.add_argument("--requests", type=int, default=32, help="requests per run (default 32)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per side (default 2)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    parser.add_argument("--experts", type=int, default=2, help="expert shards of the cluster (default 2)")
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    args = parser.parse_args(argv)
    print(f"command: {command_line('bench.tracing')}", flush=True)

    from pathlib import Path

    from moemesh import demo_model
    from moemesh.families import load_config

    model = (Path(args.model) if args.model else demo_model.ensure()).resolve()
    vocab = load_config(model).vocab_size
    requests = fixed_requests(args.requests, vocab, args.max_new_tokens)
    sink = Sink()
    sides = {
        "off": {"OTEL_TRACES_EXPORTER": "none"},
        "on": {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        },
    }
    print(f"model: {model}; {os.cpu_count()} CPUs; {load_average()}", flush=True)
    runs: dict[str, list[float]] = {"off": [], "on": []}
    cpu: dict[str, list[float]] = {"off": [], "on": []}  # cluster CPU ms per token
    rows = []
    for i in range(args.rounds):
        for side in ("off", "on") if i % 2 == 0 else ("on", "off"):
            [level], _ = run_distributed(
                model, args.experts, [args.concurrency], requests, vocab, False, 0, sides[side], f"tracing {side}",
            )  # fmt: skip
            runs[side].append(level.tokens_per_s)
            cpu[side].append(level.cpu_s / level.tokens * 1000)
            rows.append([str(i + 1), side, str(level.tokens), f"{level.wall_s:.2f}", f"{level.tokens_per_s:.1f}",
                         f"{level.mean_ttft_ms:.1f}", f"{level.mean_step_ms:.1f}", f"{level.cpu_s:.2f}",
                         load_average()])  # fmt: skip
    sink.server.stop(0)
    print()
    header = ["round", "tracing", "tokens", "wall s", "tok/s", "mean TTFT ms", "mean step ms", "cluster CPU s",
              "after the run"]  # fmt: skip
    table(header, rows, args.markdown)
    off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
    cpu_off, cpu_on = statistics.median(cpu["off"]), statistics.median(cpu["on"])
    print()
    table(
        ["median tok/s off", "median tok/s on", "on/off", "cluster CPU ms/token off", "on", "on/off", "spans exported"],
        [[f"{off:.1f}", f"{on:.1f}", f"{on / off:.3f}", f"{cpu_off:.2f}", f"{cpu_on:.2f}", f"{cpu_on / cpu_off:.3f}",
          str(sink.spans)]],
        args.markdown,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
