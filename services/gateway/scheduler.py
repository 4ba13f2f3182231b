"""Who runs next: admission by priority, prefill shortest-first with aging, chunks that keep decodes flowing.

- Admission: the waiting request with the lowest `priority` value first (vLLM's convention; default 0),
  first come first served among equals.
- Prefill: of the admitted sequences still reading their prompts, the one with the fewest prompt tokens
  left goes first (shortest remaining processing time: short questions are not stuck behind long
  documents), less `AGING_TOKENS_PER_S` for every second since it arrived, so that a long prompt is not
  starved by a stream of short ones.
- Chunk size: while sequences are decoding, a step's prefill tokens are capped so that the step's
  estimated time stays within the inter-token budget (`--max-decode-stall-ms`): each decoding stream
  waits at most that long for its next token, however long the prompts being read beside it. The
  estimate is learned from the steps themselves (`StepCost`), so it fits the machine and the model.
"""

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Protocol

AGING_TOKENS_PER_S = 256.0  # a second of waiting counts as this many prompt tokens fewer
MIN_PREFILL_CHUNK = 16  # prefill always moves by at least this much, whatever the budget says
EWMA = 0.2  # weight of the newest step in the cost estimates


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


@dataclass
class StepCost:
    """A step's time as (decode step time) + (seconds per prefill token) x prefill tokens, learned online."""

    decode_s: float | None = None  # a step of decodes only
    per_token_s: float | None = None  # each prefill token on top

    def observe(self, decodes: int, prefill_tokens: int, seconds: float) -> None:
        if prefill_tokens == 0:
            if decodes:
                self.decode_s = _ewma(self.decode_s, seconds)
            return
        base = self.decode_s if decodes and self.decode_s is not None else 0.0
        if prefill_tokens >= MIN_PREFILL_CHUNK:  # small chunks say more about fixed costs than per-token ones
            self.per_token_s = _ewma(self.per_token_s, max(seconds - base, 0.0) / prefill_tokens)

    def prefill_room(self, budget_s: float) -> int | None:
        """Prefill tokens a step with decodes may take and stay within `budget_s`; None: no limit known."""
        if budget_s <= 0 or self.per_token_s is None or self.per_token_s == 0:
            return None
        spare = budget_s - (self.decode_s or 0.0)
        return max(MIN_PREFILL_CHUNK, int(spare / self.per_token_s))


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA) * old + EWMA * new
