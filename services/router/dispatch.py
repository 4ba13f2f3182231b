"""`RemoteExperts`: an `ExpertExecutor` that sends each expert group to a live replica that holds it.

All replicas of one call are sent to before any answer is awaited, so shards work concurrently.
When a replica fails (UNAVAILABLE, a deadline, a broken stream), its groups are resent to another
replica holding those experts; when it is slow or hung (no answer within its latency budget), they
are hedged to another holder and the first answer wins. The caller sees nothing unless no replica
is left for an expert.
"""

import logging
import time

import torch
from prometheus_client import Counter

from moemesh import codec, tracing
from moemesh.errors import DeadlineExceeded
from moemesh.moe import ExpertGroup
from moemesh.peers import Attempt, HedgedCall, Peer
from moemesh.v1 import expert_pb2
from services.router.placement import Discovery, ExpertReplica, Placement

log = logging.getLogger(__name__)

EXPERT_TOKENS = Counter("moemesh_router_expert_tokens", "Tokens routed to each expert", ["layer", "expert"])

Part = tuple[ExpertGroup, int]  # a group and the row where it starts


class RemoteExperts:
    def __init__(
        self,
        placement: Placement,
        compute_dtype: torch.dtype,
        wire_dtype: torch.dtype,
        timeout_s: float,
        discovery: Discovery | None = None,
    ):
        """`discovery`: what keeps `placement` up to date, stopped with `close`."""
        self.placement, self.discovery = placement, discovery
        self.compute_dtype, self.wire_dtype, self.timeout_s = compute_dtype, wire_dtype, timeout_s

    def close(self) -> None:
        """Stops following the registry and closes the replicas' channels (a caller that outlives its cluster)."""
        if self.discovery is not None:
            self.discovery.stop()
        self.placement.close()

    def __call__(
        self, layer: int, groups: list[ExpertGroup], rows: torch.Tensor, timeout_s: float | None
    ) -> torch.Tensor:
        """`timeout_s`: what is left of the caller's deadline; the configured limit caps it. The rows go to host
        memory once (one copy from a GPU, none on the CPU), are sent and answered there, and the outputs go
        back to the rows' device once."""
        device, rows = rows.device, rows.cpu()
        for g in groups:
            EXPERT_TOKENS.labels(layer=str(layer), expert=str(g.expert)).inc(g.num_tokens)
        starts = [0]
        for g in groups[:-1]:
            starts.append(starts[-1] + g.num_tokens)
        parts: list[Part] = list(zip(groups, starts))
        budget = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)

        def send(indices: list[int], tried: dict[int, set[Peer]]) -> list[Attempt]:
            assigned: dict[ExpertReplica, list[int]] = {}
            for i in indices:  # every part gets a replica before anything is sent
                replica = self.placement.pick(layer, parts[i][0].expert, tried[i])
                assigned.setdefault(replica, []).append(i)
            for replica, chosen in assigned.items():
                tried.update({i: tried[i] | {replica} for i in chosen})
            return [self._send(layer, replica, chosen, parts, rows) for replica, chosen in assigned.items()]

        out = torch.empty_like(rows)
        call = HedgedCall(len(parts), send, time.monotonic() + budget, f"layer {layer} experts")
        try:
            for attempt, response, fresh in call.answers():
                answer = codec.from_pb(response.output, self.compute_dtype, field="output")
                self._scatter(out, [(parts[i], i in fresh) for i in attempt.parts], answer)
        except DeadlineExceeded:
            raise DeadlineExceeded(f"layer {layer}: experts did not answer within {budget:g}s") from None
        return out.to(device, non_blocking=True)

    def _send(self, layer: int, replica: ExpertReplica, chosen: list[int], parts: list[Part], rows: torch.Tensor):
        groups = [parts[i][0] for i in chosen]
        pieces = [rows[s : s + g.num_tokens] for g, s in (parts[i] for i in chosen)]
        sent = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        request = expert_pb2.ExpertRequest(
            layer=layer,
            groups=[expert_pb2.ExpertGroup(expert=g.expert, num_tokens=g.num_tokens) for g in groups],
            hidden=codec.to_pb(sent, self.wire_dtype),
            traceparent=tracing.outgoing_traceparent(),
        )
        return replica.call(request, sent.shape[0], chosen)

    @staticmethod
    def _scatter(out: torch.Tensor, parts: list[tuple[Part, bool]], answer: torch.Tensor) -> None:
        """Copies the answer's rows of each part flagged as answered first (a hedge may have won the rest)."""
        offset = 0
        for (g, start), first in parts:
            if first:
                out[start : start + g.num_tokens] = answer[offset : offset + g.num_tokens]
            offset += g.num_tokens
