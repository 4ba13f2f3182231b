"""Dispatch and combine of routed experts, shared by the router service and the in-process engine.

A step's tokens are gated, their (token, expert) rows sorted by expert into contiguous groups, the
groups run by an `ExpertExecutor` (local modules, or expert services over gRPC), and the outputs
summed back per token with their gate weights, experts in ascending order as `transformers` does.
Shapes: T = tokens, D = hidden, A = active experts per token, R = T * A routed rows.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from moemesh.model import MLP, Gate


@dataclass(frozen=True)
class ExpertGroup:
    expert: int
    num_tokens: int


class ExpertExecutor(Protocol):
    def __call__(
        self, layer: int, groups: list[ExpertGroup], rows: torch.Tensor, timeout_s: float | None
    ) -> torch.Tensor:
        """rows: [R, D] grouped as `groups` says; returns the unweighted expert outputs [R, D]."""
        ...


@dataclass
class DispatchPlan:
    token_of_row: torch.Tensor  # [R] token index of each grouped row
    weight_of_row: torch.Tensor  # [R] gate weight (float32)
    groups: list[ExpertGroup]

    @classmethod
    def from_gate(cls, weights: torch.Tensor, indices: torch.Tensor, num_experts: int) -> "DispatchPlan":
        flat = indices.flatten()  # [R]
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=num_experts).tolist()  # the one host sync per layer
        groups = [ExpertGroup(e, n) for e, n in enumerate(counts) if n]
        return cls(order // indices.shape[1], weights.flatten()[order], groups)

    def combine(self, outputs: torch.Tensor, num_tokens: int) -> torch.Tensor:
        weighted = (outputs.float() * self.weight_of_row[:, None]).to(outputs.dtype)
        return weighted.new_zeros(num_tokens, outputs.shape[1]).index_add_(0, self.token_of_row, weighted)  # [T, D]


class LocalExperts:
    """Runs expert groups on modules held in this process (an expert shard, or the whole model)."""

    def __init__(self, experts: dict[tuple[int, int], MLP]):
        self.experts = experts

    def __call__(
        self, layer: int, groups: list[ExpertGroup], rows: torch.Tensor, timeout_s: float | None = None
    ) -> torch.Tensor:
        out = torch.empty_like(rows)
        start = 0
        with torch.inference_mode():
            for g in groups:
                end = start + g.num_tokens
                out[start:end] = self.experts[(layer, g.expert)](rows[start:end])
                start = end
        return out


class RoutedMoE:
    """Gate + dispatch + executor + combine: the `RoutedExperts` of one MoE model."""

    def __init__(self, gates: dict[int, Gate], executor: ExpertExecutor, num_experts: int):
        self.gates, self.executor, self.num_experts = gates, executor, num_experts

    def __call__(self, layer: int, hidden: torch.Tensor, timeout_s: float | None = None) -> torch.Tensor:
        with torch.inference_mode():
            weights, indices = self.gates[layer](hidden)  # [T, A]
            plan = DispatchPlan.from_gate(weights, indices, self.num_experts)
            outputs = self.executor(layer, plan.groups, hidden[plan.token_of_row], timeout_s)
            return plan.combine(outputs, hidden.shape[0])

    def submit(self, layer: int, hidden: torch.Tensor, deadline: float | None) -> Callable[[], torch.Tensor]:
        """`RoutedExperts` from this process (the experts here, or called directly over gRPC): the work is done
        before this returns, within what is left of `deadline`."""
        output = self(layer, hidden, None if deadline is None else max(0.0, deadline - time.monotonic()))
        return lambda: output
