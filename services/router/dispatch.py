"""`RemoteExperts`: an `ExpertExecutor` that sends each expert group to a replica that holds it.

All replicas of one call are sent to before any answer is awaited, so shards work concurrently.
"""

import torch

from moemesh import codec
from moemesh.moe import ExpertGroup
from moemesh.rpc import wait
from moemesh.v1 import expert_pb2
from services.router.placement import ExpertReplica, Placement


class RemoteExperts:
    def __init__(self, placement: Placement, compute_dtype: torch.dtype, wire_dtype: torch.dtype, timeout_s: float):
        self.placement = placement
        self.compute_dtype, self.wire_dtype, self.timeout_s = compute_dtype, wire_dtype, timeout_s

    def __call__(self, layer: int, groups: list[ExpertGroup], rows: torch.Tensor) -> torch.Tensor:
        segments: dict[ExpertReplica, list[tuple[ExpertGroup, int]]] = {}
        start = 0
        for g in groups:
            segments.setdefault(self.placement.pick(layer, g.expert), []).append((g, start))
            start += g.num_tokens
        calls = []
        for replica, parts in segments.items():
            sent = (
                torch.cat([rows[s : s + g.num_tokens] for g, s in parts])
                if len(parts) > 1
                else rows[parts[0][1] : parts[0][1] + parts[0][0].num_tokens]
            )
            request = expert_pb2.ExpertRequest(
                layer=layer,
                groups=[expert_pb2.ExpertGroup(expert=g.expert, num_tokens=g.num_tokens) for g, _ in parts],
                hidden=codec.to_pb(sent, self.wire_dtype),
            )
            with replica.lock:
                replica.outstanding += 1
            calls.append((replica, parts, replica.client.submit(request)))
        out = torch.empty_like(rows)
        for replica, parts, future in calls:
            try:
                response = wait(future, self.timeout_s, replica.address)
            finally:
                with replica.lock:
                    replica.outstanding -= 1
            answer = codec.from_pb(response.output, self.compute_dtype, field="output")
            offset = 0
            for g, s in parts:
                out[s : s + g.num_tokens] = answer[offset : offset + g.num_tokens]
                offset += g.num_tokens
        return out
