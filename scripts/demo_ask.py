"""Asks a gateway's Chat one question and streams the greedy reply: the non-interactive end of `make demo`.

Usage: demo_ask.py ADDRESS QUESTION. `moemesh chat` is the interactive way to talk to the bot.
"""

import sys

import grpc

from moemesh.v1 import gateway_pb2, gateway_pb2_grpc


def main(address: str, question: str) -> None:
    with grpc.insecure_channel(address) as channel:
        request = gateway_pb2.ChatRequest(
            messages=[gateway_pb2.Message(role="user", content=question)],
            sampling=gateway_pb2.SamplingParams(max_new_tokens=64, temperature=0.0),
        )
        for part in gateway_pb2_grpc.GatewayStub(channel).Chat(request, timeout=60):
            print(part.text, end="", flush=True)
    print()


if __name__ == "__main__":
    main(*sys.argv[1:])
