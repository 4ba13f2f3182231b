"""The model runner: executes a `StepPlan` (packs the chosen tokens into micro-batches, runs the forward pass,
rerunning a failed one once, samples) and returns each sampled sequence's token. It never decides who runs."""

import logging
import time

import torch

from moemesh.errors import InvalidArgument
from moemesh.model import DenseModel, RoutedExperts, SequenceSlice, StepBatch
from services.gateway import metrics
from services.gateway.sampling import sample
from services.gateway.scheduler import StepPlan
from services.gateway.sequence import Sequence

log = logging.getLogger(__name__)


def split_micro_batches(
    chosen: list[tuple["Sequence", int]], parts: int, min_tokens: int
) -> list[list[tuple["Sequence", int]]]:
    """The step's (sequence, tokens) in up to `parts` consecutive groups of about equal tokens, each of at
    least `min_tokens` (a sequence is never split): the micro-batches `DenseModel.forward` runs in ping-pong.
    Splitting pays each layer's fixed costs once per micro-batch, so small steps stay whole."""
    if parts <= 1:  # the default: one batch, nothing to split (this runs every step)
        return [chosen]
    total = sum(n for _, n in chosen)
    parts = max(1, min(parts, len(chosen), total // max(1, min_tokens)))
    groups: list[list[tuple[Sequence, int]]] = [[]]
    taken = 0
    for seq, n in chosen:
        if taken >= total * len(groups) / parts and len(groups) < parts:
            groups.append([])
        groups[-1].append((seq, n))
        taken += n
    if len(groups) > 1 and sum(n for _, n in groups[-1]) < min_tokens:  # a large sequence came last but one
        last = groups.pop()
        groups[-1] += last
    return groups


class ModelRunner:
    def __init__(
        self,
        model: DenseModel,
        routed: RoutedExperts,
        *,
        micro_batches: int = 1,
        micro_batch_min_tokens: int = 8,
        one_thread_step_tokens: int = 0,
    ):
        """`one_thread_step_tokens`: a step of at most this many tokens computes on one torch thread (set only
        where the experts are remote, so that the gateway waits on them); 0: never."""
        self.model, self.routed = model, routed
        self.micro_batches, self.micro_batch_min_tokens = micro_batches, micro_batch_min_tokens
        self.one_thread_step_tokens = one_thread_step_tokens
        self.threads = 1  # the engine thread's torch threads, set when it starts
        self.device = model.norm.weight.device

    def run(self, plan: StepPlan) -> list[tuple[Sequence, int, float]]:
        """The plan's forward pass; each chosen sequence's cache advances, and each sampled one gets
        (sequence, token, log-prob), in the plan's order."""
        groups = split_micro_batches(plan.chosen, self.micro_batches, self.micro_batch_min_tokens)
        batches = [self._pack(group) for group in groups]
        sampled = [seq for group in groups for seq, n in group if n == seq.pending]  # the logit rows, in order
        if self.one_thread_step_tokens:
            torch.set_num_threads(1 if plan.num_tokens <= self.one_thread_step_tokens else self.threads)
        logits = self._forward(batches)
        for seq, n in plan.chosen:
            seq.computed += n
            seq.cache.length += n
        tokens, logprobs = sample(logits, [s.sampling for s in sampled], [s.generator for s in sampled])
        metrics.GENERATED_TOKENS.inc(len(tokens))
        return list(zip(sampled, tokens, logprobs))

    def _pack(self, chosen: list[tuple[Sequence, int]]) -> StepBatch:
        """One batch of the chosen sequences' next tokens: n of each, with a logit row where its chunk ends
        the known tokens."""
        ids: list[int] = []
        positions: list[int] = []
        slices, logit_rows = [], []
        for seq, n in chosen:
            start = len(ids)
            ids += seq.token_ids(seq.computed, n)
            positions += range(seq.computed, seq.computed + n)
            slices.append(SequenceSlice(start, n, seq.cache))
            if n == seq.pending:  # this chunk ends the known tokens: the next one is due
                logit_rows.append(len(ids) - 1)
        device = self.device
        rows = torch.tensor(logit_rows, dtype=torch.long, device=device)  # may be empty: prefill chunks only
        deadlines = [seq.deadline for seq, _ in chosen]
        latest = None if None in deadlines else max(deadlines)  # the step is useful until its last client gives up
        token_ids, positions = torch.tensor(ids, device=device), torch.tensor(positions, device=device)
        return StepBatch(token_ids, positions, slices, rows, latest)

    def _forward(self, batches: list[StepBatch]) -> torch.Tensor:
        """The step's forward pass, run once more if it fails for a reason a rerun may not meet again."""
        deadlines = [b.deadline for b in batches]
        deadline = None if None in deadlines else max(deadlines)
        for attempt in (1, 2):
            try:
                with metrics.STEP_SECONDS.time():
                    return self.model(batches, self.routed)
            except InvalidArgument:
                raise  # the same input fails the same way
            except Exception as exc:  # noqa: BLE001
                out_of_time = deadline is not None and time.monotonic() >= deadline
                if attempt == 2 or out_of_time:
                    raise
                log.warning("step failed (%s); running it once more", exc)
        raise AssertionError("unreachable")
