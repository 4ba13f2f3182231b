"""Who runs next: admission by priority, prefill shortest-first with aging, chunks that keep decodes flowing.

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
from collections.abc import Sequence as Seq
from typing import Protocol

import numpy as np

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
