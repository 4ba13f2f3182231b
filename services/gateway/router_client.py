"""`RouterClient`: the gateway's `RoutedExperts` when the experts run as services behind routers.

Routers are stateless per call, so each call goes to the router expected to answer first
(`moemesh.peers.Chooser`); a call whose router fails (UNAVAILABLE, a broken stream) is resent to
another router, and one whose router does not answer within its latency budget (hung, SIGSTOPped,
overloaded) is hedged to another router, the first answer winning.
"""

import threading
import time
from collections.abc import Callable

import grpc
import torch

from moemesh import codec, tracing
from moemesh.errors import Unavailable
from moemesh.peers import Attempt, Chooser, HedgedCall, Peer
from moemesh.rpc import CHANNEL_OPTIONS, StreamClient
from moemesh.tls import open_channel
from moemesh.v1 import router_pb2, router_pb2_grpc


class RouterClient:
    def __init__(
        self,
        addresses: list[str],
        device: torch.device,
        compute_dtype: torch.dtype,
        wire_dtype: torch.dtype,
        timeout_s: float,
        hedge_floor_s: float = 1.0,
        credentials: grpc.ChannelCredentials | None = None,
    ):
        """`device`: where the dense model is (the routers' answers are copied there)."""
        self.device, self.compute_dtype, self.wire_dtype, self.timeout_s = device, compute_dtype, wire_dtype, timeout_s
        self.routers = [
            Peer(
                StreamClient(a, lambda ch: router_pb2_grpc.RouterStub(ch).Forward, credentials),
                hedge_floor_s,
                10 * hedge_floor_s,
            )
            for a in addresses
        ]
        self._chooser = Chooser()

    @staticmethod
    def wait_ready(addresses: list[str], timeout_s: float, credentials: grpc.ChannelCredentials | None = None) -> None:
        """Returns once any of the routers accepts connections (with TLS: completes a handshake)."""
        channels = [open_channel(a, credentials, CHANNEL_OPTIONS) for a in addresses]
        try:
            ready = [grpc.channel_ready_future(c) for c in channels]
            done = threading.Event()
            for future in ready:
                future.add_done_callback(lambda _: done.set())
            if not done.wait(timeout_s):
                raise Unavailable(f"routers {', '.join(addresses)}: none reachable within {timeout_s:g}s")
        finally:
            for channel in channels:
                channel.close()

    def close(self) -> None:
        for router in self.routers:
            router.client.close()

    def submit(self, layer: int, hidden: torch.Tensor, deadline: float | None) -> Callable[[], torch.Tensor]:
        wire = codec.to_pb(hidden, self.wire_dtype)
        timeout_s = self.timeout_s if deadline is None else max(0.0, min(self.timeout_s, deadline - time.monotonic()))
        rows = hidden.shape[0]
        traceparent = tracing.outgoing_traceparent()

        def send(parts: list[int], tried: dict[int, set[Peer]]) -> list[Attempt]:
            untried = [r for r in self.routers if r not in tried[0]]
            if not untried:
                raise Unavailable(f"layer {layer}: no router left to try")
            router = self._chooser.choose(untried)
            tried[0].add(router)
            request = router_pb2.MoeRequest(
                layer=layer, hidden=wire, timeout_ms=max(1, int(timeout_s * 1000)), traceparent=traceparent
            )
            return [router.call(request, rows, parts)]

        call = HedgedCall(1, send, time.monotonic() + timeout_s, f"layer {layer} router call")

        def output() -> torch.Tensor:
            for _, response, _ in call.answers():
                return codec.from_pb(response.output, self.compute_dtype, self.device, field="output")
            raise AssertionError("a call of one part ends with its answer")

        return output
