"""Who runs next (`Scheduler`, whose `schedule()` returns each step's `StepPlan`): admission by priority,
prefill shortest-first with aging, chunks that keep decodes flowing.

- Admission: the waiting request with the lowest `priority` value first (vLLM's convention; default 0),
  first come first served among equals.
- Prefill: of the admitted sequences still reading their prompts, the one with the fewest prompt tokens
  left goes first (shortest remaining processing time: short questions are not stuck behind long
  documents), less `AGING_TOKENS_PER_S` for every second since it arrived, so that a long prompt is not
  starved by a stream of short ones.
- Chunk size: while sequences are decoding, a step's prefill tokens are capped so that reading them adds
  at most the stall budget (`--max-decode-stall-ms`) to the step: each decoding stream waits at most that
  much longer for its next token than a step of decodes alone takes, however long the prompts being read
  beside it. (A budget on the whole step would leave no room at all where decodes alone take most of it,
  as 32 streams of a 1.2 B model do on 2 cores: prompts would crawl in 16 tokens a step.) The time per
  prefill token is fitted to the recent steps themselves (`StepCost`), so it fits the machine and model.
"""

from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from moemesh.errors import ResourceExhausted
from moemesh.model import KVCache
from services.gateway.sequence import RequestStatus, Sequence

AGING_TOKENS_PER_S = 256.0  # a second of waiting counts as this many prompt tokens fewer
MIN_PREFILL_CHUNK = 16  # prefill always moves by at least this much, whatever the budget says
COST_WINDOW = 64  # recent steps the step-time model is fitted to
MIN_TOKEN_S = 1e-5  # floor of the fitted time per prefill token (noise may fit ~0 or less)


class Schedulable(Protocol):
    priority: int
    submitted_at: float

    @property
    def pending(self) -> int: ...


def next_to_admit(waiting: Seq[Schedulable]) -> int:
    """Index of the waiting request to admit next: lowest priority value, then earliest."""
    return min(range(len(waiting)), key=lambda i: (waiting[i].priority, waiting[i].submitted_at))


def prefill_order(prefilling: Seq[Schedulable], now: float) -> list[Schedulable]:
    """Priority first, then fewest prompt tokens left, aged by the time since arrival."""
    return sorted(prefilling, key=lambda s: (s.priority, s.pending - AGING_TOKENS_PER_S * (now - s.submitted_at)))


class StepCost:
    """A step's time as fixed + (per decode) x decodes + (per prefill token) x prefill tokens, fitted by least
    squares over the last `COST_WINDOW` steps, so that it follows the load and the machine.

    The fixed part (reading the weights, one expert call per MoE layer) is most of a step on a large model:
    a step of 512 prefill tokens and one of 32 decodes may take about the same time. Counting it per token
    (as a ratio of time to tokens does) would cap chunks far below what the budget allows, and prompts
    beside decodes would crawl in at the minimum chunk."""

    def __init__(self) -> None:
        self._steps: deque[tuple[int, int, float]] = deque(maxlen=COST_WINDOW)  # (decodes, prefill tokens, s)
        self._fit: tuple[float, float, float] | None = None
        self._stale = False

    def observe(self, decodes: int, prefill_tokens: int, seconds: float) -> None:
        self._steps.append((decodes, prefill_tokens, seconds))
        self._stale = True

    def estimate(self) -> tuple[float, float, float] | None:
        """(fixed s, s per decode, s per prefill token); None until prefill has been seen beside varied steps."""
        if self._stale:
            self._fit, self._stale = _fit(list(self._steps)), False
        return self._fit

    def prefill_room(self, budget_s: float) -> int | None:
        """Prefill tokens that add at most `budget_s` to a step of decodes; None: no limit known."""
        fit = self.estimate() if budget_s > 0 else None
        if fit is None:
            return None
        return max(MIN_PREFILL_CHUNK, int(round(budget_s / fit[2], 6)))  # rounded: 79.99999 tokens is 80


def _fit(steps: list[tuple[int, int, float]]) -> tuple[float, float, float] | None:
    prefill = {p for _, p, _ in steps}
    if len(steps) < 3 or len(prefill) < 2:  # no variety in prefill: its cost per token cannot be told apart
        return None
    x = np.array([[1.0, d, p] for d, p, _ in steps])
    y = np.array([t for _, _, t in steps])
    if np.linalg.matrix_rank(x) < 3:  # decodes never vary (apart from prefill): fold them into the fixed part
        x = x[:, [0, 2]]
        (fixed, per_token), *_ = np.linalg.lstsq(x, y, rcond=None)
        per_decode = 0.0
    else:
        (fixed, per_decode, per_token), *_ = np.linalg.lstsq(x, y, rcond=None)
    return float(fixed), float(per_decode), max(float(per_token), MIN_TOKEN_S)


@dataclass
class StepPlan:
    """What one step computes: each chosen sequence with its number of tokens (decodes first, one each, then
    prefill chunks), and the sequences preempted to make room for it."""

    chosen: list[tuple[Sequence, int]]
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.chosen)

    @property
    def prefill_chunks(self) -> list[int]:
        return [n for _, n in self.chosen if n > 1]


class Scheduler:
    """The waiting queue and the running batch, and the one that moves sequences between them: admission
    (`next_to_admit`, within `max_batch_seqs` and the KV budget), preemption (the latest admitted, as vLLM does,
    while a step's KV growth would pass the budget) and each step's `StepPlan`. It computes nothing; the engine
    calls it under its lock."""

    def __init__(
        self,
        *,
        max_batch_seqs: int,
        max_batch_tokens: int,
        max_waiting: int,
        max_decode_stall_s: float,
        kv_cache_bytes: int,
        kv_bytes: Callable[[int], int],
        new_cache: Callable[[], KVCache],
    ):
        """`kv_bytes(positions)`: a cache's bytes for that many positions; `new_cache()`: an empty one."""
        self.max_batch_seqs, self.max_batch_tokens, self.max_waiting = max_batch_seqs, max_batch_tokens, max_waiting
        self.max_decode_stall_s, self.kv_cache_bytes = max_decode_stall_s, kv_cache_bytes
        self.kv_bytes, self.new_cache = kv_bytes, new_cache
        self.running: list[Sequence] = []
        self.waiting: list[Sequence] = []
        self.cost = StepCost()

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise ResourceExhausted(f"waiting queue is full ({self.max_waiting} requests); retry later")
        seq.status = RequestStatus.WAITING
        self.waiting.append(seq)

    def take_all(self) -> list[Sequence]:
        """Every sequence, running or waiting, now ABORTED and out of the scheduler (the engine stops)."""
        left = [*self.running, *self.waiting]
        self.running, self.waiting = [], []
        for seq in left:
            seq.status = RequestStatus.ABORTED
        return left

    def drop_finished_by_client(self, now: float) -> list[Sequence]:
        """Sequences whose client cancelled or whose deadline passed leave the batch and the queue (ABORTED)."""
        gone = [s for s in (*self.running, *self.waiting) if s.cancelled or s.expired(now)]
        for seq in gone:
            (self.running if seq.status is RequestStatus.RUNNING else self.waiting).remove(seq)
            seq.status = RequestStatus.ABORTED
        return gone

    def admit(self) -> list[Sequence]:
        """Waiting sequences join the batch, by `next_to_admit`, while there are places and KV memory for
        their prompts (the first one always joins an empty batch: the engine checked that it fits alone);
        returns those admitted."""
        admitted = []
        while self.waiting and len(self.running) < self.max_batch_seqs:
            index = next_to_admit(self.waiting)
            seq = self.waiting[index]
            if self.running and self.kv_cache_bytes:
                held = seq.cache.nbytes if seq.cache is not None else 0
                needed = self.kv_bytes(seq.pending + seq.computed + 1) - held
                if self.kv_held() + needed > self.kv_cache_bytes:
                    break
            del self.waiting[index]
            if seq.cache is None:
                seq.cache = self.new_cache()
            seq.status = RequestStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def kv_held(self) -> int:
        return sum(s.cache.nbytes for s in self.running if s.cache is not None)

    def schedule(self, now: float) -> StepPlan:
        """The next step: decode tokens first (one each), then prefill chunks (`prefill_order`) while the token
        budget and the decode stall budget last, less any sequence preempted to keep KV within budget."""
        budget = self.max_batch_tokens
        chosen = [(s, 1) for s in self.running if s.pending == 1][:budget]
        budget -= len(chosen)
        if chosen and (room := self.cost.prefill_room(self.max_decode_stall_s)) is not None:
            budget = min(budget, room)
        for seq in prefill_order([s for s in self.running if s.pending > 1], now):
            if budget <= 0:
                break
            take = min(seq.pending, budget)
            chosen.append((seq, take))
            budget -= take
        return self._make_room(StepPlan(chosen))

    def _make_room(self, plan: StepPlan) -> StepPlan:
        """Preempts the latest-admitted sequences while the step's KV growth would pass the budget: each frees
        its cache and waits to be admitted again, then recomputes its prompt and output so far in one prefill,
        so its tokens are those it would have had."""
        if not self.kv_cache_bytes:
            return plan
        while len(plan.chosen) > 1:
            growth = sum(
                self.kv_bytes(seq.computed + n) - seq.cache.nbytes
                for seq, n in plan.chosen
                if seq.computed + n > seq.cache.capacity
            )
            if self.kv_held() + growth <= self.kv_cache_bytes:
                break
            victim = self.running.pop()
            victim.cache, victim.computed, victim.preempted = None, 0, True
            victim.status = RequestStatus.WAITING
            self.waiting.append(victim)
            plan = StepPlan([(seq, n) for seq, n in plan.chosen if seq is not victim], [*plan.preempted, victim])
        return plan

    def finish(self, seq: Sequence, status: RequestStatus = RequestStatus.FINISHED) -> None:
        """`seq` leaves the batch (FINISHED, or ABORTED when it failed); its cache stays with it."""
        self.running.remove(seq)
        seq.status = status
