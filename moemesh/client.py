"""A small command-line client of the public API (used by `make demo`)."""

import sys
from pathlib import Path

import grpc

from moemesh.rpc import CHANNEL_OPTIONS
from moemesh.tls import Tls, open_channel
from moemesh.v1 import gateway_pb2, gateway_pb2_grpc


def stream_generate(address: str, prompt: str, max_new_tokens: int, temperature: float, ca: Path | None) -> int:
    """Streams one reply to stdout; with `ca`, over TLS verifying the gateway against it."""
    request = gateway_pb2.GenerateRequest(
        prompt=prompt, sampling=gateway_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    )
    with open_channel(address, Tls.load(ca=ca).channel_credentials(), CHANNEL_OPTIONS) as channel:
        try:
            for response in gateway_pb2_grpc.GatewayStub(channel).GenerateStream(request, timeout=300):
                print(response.text, end="", flush=True)
                if response.finish_reason:
                    usage = response.usage
                    print(f"\n[finish_reason={response.finish_reason} prompt_tokens={usage.prompt_tokens} "
                          f"completion_tokens={usage.completion_tokens}]")  # fmt: skip
        except grpc.RpcError as exc:
            print(f"\nmoemesh generate: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0
