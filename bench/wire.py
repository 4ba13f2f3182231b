"""Round trips of a MoE layer's hidden states over `StreamClient` (the transport of every internal call), by
token count, with the C library's malloc and with moemesh's retained freed memory (`moemesh.allocator`), side
by side.

Each side is a client process and an echo server process (the Router service's `Forward`, answering each call
with the hidden states it got), both with that side's malloc. A round trip is what a caller pays besides the
callee's work: encode, send, the server's decode and encode of its answer, receive, decode. The sides take
turns, `--rounds` times, so that a machine that drifts moves both.

    .venv/bin/python -m bench.wire [--hidden 1024] [--tokens 1,32,128,256,512] [--repeats 40] [--rounds 2]
        [--markdown]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

SIDES = ("default", "retained")


def _set_malloc(side: str) -> None:
    from moemesh.allocator import retain_freed_memory

    if side == "retained" and not retain_freed_memory():
        raise SystemExit("bench.wire: the allocator could not be set (not glibc, or MALLOC_* settings present)")


def serve(side: str) -> None:
    _set_malloc(side)
    from moemesh.rpc import Service, answer_calls
    from moemesh.v1 import router_pb2, router_pb2_grpc

    class Echo(router_pb2_grpc.RouterServicer):
        def Forward(self, requests, context):
            echo = lambda r: router_pb2.MoeResponse(request_id=r.request_id, output=r.hidden)  # noqa: E731
            yield from answer_calls(requests, echo, lambda *_: None)

    service = Service("echo", "127.0.0.1", 0)
    router_pb2_grpc.add_RouterServicer_to_server(Echo(), service.server)
    service.start()  # prints "echo listening on ADDRESS"
    sys.stdin.read()  # until the client closes the pipe


def measure(side: str, hidden: int, tokens: list[int], repeats: int) -> dict[int, float]:
    """Median round trip in ms per token count, from this process to an echo server, both on `side`'s malloc."""
    _set_malloc(side)
    import torch

    from moemesh import codec
    from moemesh.rpc import StreamClient
    from moemesh.v1 import router_pb2, router_pb2_grpc

    server = subprocess.Popen(
        [sys.executable, "-m", "bench.wire", "--serve", side], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        address = server.stdout.readline().split()[-1]
        client = StreamClient(address, lambda channel: router_pb2_grpc.RouterStub(channel).Forward)
        medians = {}
        for count in tokens:
            states = torch.randn(count, hidden).to(torch.bfloat16)
            times = []
            for i in range(repeats + 2):  # the first two warm the stream and the heap
                start = time.perf_counter()
                answer = client.submit(router_pb2.MoeRequest(layer=0, hidden=codec.to_pb(states))).result(timeout=30)
                codec.from_pb(answer.output, torch.bfloat16)
                if i >= 2:
                    times.append(time.perf_counter() - start)
            medians[count] = 1000 * statistics.median(times)
        client.close()
        return medians
    finally:
        server.stdin.close()
        server.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wire", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024: the benchmark model)")
    parser.add_argument("--tokens", default="1,32,128,256,512", help="token counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=40, help="round trips per token count and side")
    parser.add_argument("--rounds", type=int, default=2, help="turns of each side")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--serve", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    if args.serve:
        serve(args.serve)
        return 0
    if args.measure:
        print(json.dumps(measure(args.measure, args.hidden, tokens, args.repeats)))
        return 0

    from bench.common import command_line, cpu_description, load_average, table

    print(f"command: {command_line('bench.wire')}\ncpu: {cpu_description()}; {load_average()}", flush=True)
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    for _ in range(args.rounds):
        for side in SIDES:
            argv = [sys.executable, "-m", "bench.wire", "--measure", side, "--hidden", str(args.hidden),
                    "--tokens", args.tokens, "--repeats", str(args.repeats)]  # fmt: skip
            runs[side].append(json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout))
    rows = []
    for count in tokens:
        per_side = {side: [run[str(count)] for run in runs[side]] for side in SIDES}
        mean = {side: statistics.mean(values) for side, values in per_side.items()}
        rows.append([
            str(count), f"{count * args.hidden * 2 / 1024:g}",
            *(" / ".join(f"{v:.2f}" for v in per_side[side]) for side in SIDES),
            f"{mean['retained'] / mean['default']:.2f}",
        ])  # fmt: skip
    table(["tokens", "KiB (bf16)", "default malloc ms", "retained ms", "retained / default"], rows, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
