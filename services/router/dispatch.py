"""`RemoteExperts`: an `ExpertExecutor` that sends each expert group to a live replica that holds it.

All replicas of one call are sent to before any answer is awaited, so shards work concurrently.
When a replica fails (UNAVAILABLE, a deadline, a broken stream), its groups are resent to another
replica holding those experts; the caller sees nothing unless no replica is left for an expert.
"""

import logging
import time

import torch
from prometheus_client import Counter

from moemesh import codec
from moemesh.errors import DeadlineExceeded, Unavailable
from moemesh.moe import ExpertGroup
from moemesh.rpc import wait
from moemesh.v1 import expert_pb2
from services.router.placement import ExpertReplica, Placement

log = logging.getLogger(__name__)

EXPERT_TOKENS = Counter("moemesh_router_expert_tokens", "Tokens routed to each expert", ["layer", "expert"])

Part = tuple[ExpertGroup, int]  # a group and the row where it starts


class RemoteExperts:
    def __init__(self, placement: Placement, compute_dtype: torch.dtype, wire_dtype: torch.dtype, timeout_s: float):
        self.placement = placement
        self.compute_dtype, self.wire_dtype, self.timeout_s = compute_dtype, wire_dtype, timeout_s

    def __call__(
        self, layer: int, groups: list[ExpertGroup], rows: torch.Tensor, timeout_s: float | None
    ) -> torch.Tensor:
        """`timeout_s`: what is left of the caller's deadline; the configured limit caps it."""
        for g in groups:
            EXPERT_TOKENS.labels(layer=str(layer), expert=str(g.expert)).inc(g.num_tokens)
        out = torch.empty_like(rows)
        starts = [0]
        for g in groups[:-1]:
            starts.append(starts[-1] + g.num_tokens)
        todo: list[Part] = list(zip(groups, starts))
        failed: set[ExpertReplica] = set()
        budget = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        deadline = time.monotonic() + budget
        while todo:
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"layer {layer}: experts did not answer within {budget:g}s")
            calls = [
                self._send(layer, replica, parts, rows) for replica, parts in self._assign(layer, todo, failed).items()
            ]
            todo = []
            for replica, parts, future in calls:
                try:
                    response = wait(future, max(0.0, deadline - time.monotonic()), replica.address)
                except (Unavailable, DeadlineExceeded) as exc:
                    log.warning("expert %s failed (%s); resending its %d groups", replica.address, exc, len(parts))
                    replica.failed_at = time.monotonic()
                    failed.add(replica)
                    todo += parts
                    continue
                finally:
                    with replica.lock:
                        replica.outstanding -= 1
                self._scatter(out, parts, codec.from_pb(response.output, self.compute_dtype, field="output"))
        return out

    def _assign(self, layer: int, parts: list[Part], failed: set[ExpertReplica]) -> dict[ExpertReplica, list[Part]]:
        assigned: dict[ExpertReplica, list[Part]] = {}
        for g, start in parts:
            assigned.setdefault(self.placement.pick(layer, g.expert, failed), []).append((g, start))
        return assigned

    def _send(self, layer: int, replica: ExpertReplica, parts: list[Part], rows: torch.Tensor):
        pieces = [rows[s : s + g.num_tokens] for g, s in parts]
        sent = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        request = expert_pb2.ExpertRequest(
            layer=layer,
            groups=[expert_pb2.ExpertGroup(expert=g.expert, num_tokens=g.num_tokens) for g, _ in parts],
            hidden=codec.to_pb(sent, self.wire_dtype),
        )
        with replica.lock:
            replica.outstanding += 1
        return replica, parts, replica.client.submit(request)

    @staticmethod
    def _scatter(out: torch.Tensor, parts: list[Part], answer: torch.Tensor) -> None:
        offset = 0
        for g, start in parts:
            out[start : start + g.num_tokens] = answer[offset : offset + g.num_tokens]
            offset += g.num_tokens
