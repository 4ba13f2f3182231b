"""`RouterClient`: the gateway's `RoutedExperts` when the experts run as services behind routers.

Routers are stateless per call, so a call that fails on one router (UNAVAILABLE, a broken stream)
is resent to the next one; later calls stay with the router that answered.
"""

import threading
import time
from collections.abc import Callable

import grpc
import torch

from moemesh import codec
from moemesh.errors import Unavailable
from moemesh.rpc import CHANNEL_OPTIONS, StreamClient, wait
from moemesh.v1 import router_pb2, router_pb2_grpc


class RouterClient:
    def __init__(self, addresses: list[str], compute_dtype: torch.dtype, wire_dtype: torch.dtype, timeout_s: float):
        self.compute_dtype, self.wire_dtype, self.timeout_s = compute_dtype, wire_dtype, timeout_s
        self.clients = [StreamClient(a, lambda channel: router_pb2_grpc.RouterStub(channel).Forward) for a in addresses]
        self._current = 0  # index of the router in use
        self._lock = threading.Lock()

    @staticmethod
    def wait_ready(addresses: list[str], timeout_s: float) -> None:
        """Returns once any of the routers accepts connections."""
        channels = [grpc.insecure_channel(a, options=CHANNEL_OPTIONS) for a in addresses]
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

    def submit(self, layer: int, hidden: torch.Tensor, deadline: float | None) -> Callable[[], torch.Tensor]:
        wire = codec.to_pb(hidden, self.wire_dtype)
        timeout_s = self.timeout_s if deadline is None else max(0.0, min(self.timeout_s, deadline - time.monotonic()))
        first = self._current

        def request() -> router_pb2.MoeRequest:
            return router_pb2.MoeRequest(layer=layer, hidden=wire, timeout_ms=max(1, int(timeout_s * 1000)))

        future = self.clients[first].submit(request())

        def output() -> torch.Tensor:
            index, pending = first, future
            for attempt in range(len(self.clients)):
                client = self.clients[index]
                try:
                    response = wait(pending, timeout_s, client.target)
                    return codec.from_pb(response.output, self.compute_dtype, field="output")
                except Unavailable:
                    if attempt == len(self.clients) - 1:
                        raise
                    index = (index + 1) % len(self.clients)
                    with self._lock:
                        self._current = index
                    pending = self.clients[index].submit(request())
            raise AssertionError("unreachable")

        return output
