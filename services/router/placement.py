"""Where each (layer, expert) lives: expert replicas discovered by asking each address."""

import threading
from dataclasses import dataclass, field

import grpc

from moemesh.errors import CheckpointError, Unavailable
from moemesh.rpc import CHANNEL_OPTIONS, StreamClient
from moemesh.v1 import expert_pb2, expert_pb2_grpc


@dataclass(eq=False)
class ExpertReplica:
    address: str
    held: set[tuple[int, int]]
    client: StreamClient
    outstanding: int = 0  # calls in flight; the least-loaded replica is chosen
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def connect(cls, address: str, fingerprint: str, timeout_s: float) -> "ExpertReplica":
        with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            try:
                info = expert_pb2_grpc.ExpertStub(channel).Describe(
                    expert_pb2.DescribeExpertRequest(), timeout=timeout_s, wait_for_ready=True
                )
            except grpc.RpcError as exc:
                raise Unavailable(f"expert {address}: {exc.code().name}: {exc.details()}") from None
        if info.model_fingerprint != fingerprint:
            raise CheckpointError(
                f"expert {address} serves model {info.model_fingerprint}, this router {fingerprint}: refused"
            )
        held = {(entry.layer, e) for entry in info.layers for e in entry.experts}
        client = StreamClient(address, lambda ch: expert_pb2_grpc.ExpertStub(ch).Forward)
        return cls(address, held, client)


class Placement:
    """Replicas per (layer, expert); `pick` returns the least-loaded one holding an expert."""

    def __init__(self, replicas: list[ExpertReplica], layers: range, num_experts: int):
        self.replicas = replicas
        self._holders: dict[tuple[int, int], list[ExpertReplica]] = {}
        for replica in replicas:
            for pair in replica.held:
                self._holders.setdefault(pair, []).append(replica)
        missing = [(layer, e) for layer in layers for e in range(num_experts) if (layer, e) not in self._holders]
        if missing:
            layer, expert = missing[0]
            raise CheckpointError(f"no expert service holds layer {layer} expert {expert} ({len(missing)} missing)")

    def pick(self, layer: int, expert: int) -> ExpertReplica:
        return min(self._holders[(layer, expert)], key=lambda r: r.outstanding)

    def close(self) -> None:
        for replica in self.replicas:
            replica.client.close()
