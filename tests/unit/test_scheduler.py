"""Admission by priority, shortest-remaining-prefill-first with aging, and the learned step cost."""

from dataclasses import dataclass

import pytest

from services.gateway.scheduler import (
    AGING_TOKENS_PER_S,
    MIN_PREFILL_CHUNK,
    StepCost,
    next_to_admit,
    prefill_order,
)

pytestmark = pytest.mark.timeout(30)


@dataclass
class Req:
    name: str
    pending: int = 100
    priority: int = 0
    submitted_at: float = 0.0


def test_admission_takes_the_lowest_priority_value_then_the_earliest():
    waiting = [Req("a", submitted_at=1), Req("b", priority=5, submitted_at=0), Req("c", submitted_at=2),
               Req("d", priority=-1, submitted_at=3)]  # fmt: skip
    order = []
    while waiting:
        order.append(waiting.pop(next_to_admit(waiting)).name)
    assert order == ["d", "a", "c", "b"]


def test_prefill_goes_shortest_first_and_a_long_wait_catches_up():
    now = 10.0
    short, long_, older_long = (
        Req("short", 20, submitted_at=now),
        Req("long", 500, submitted_at=now),
        Req("older long", 500, submitted_at=now - 2.0),
    )
    assert [r.name for r in prefill_order([long_, short], now)] == ["short", "long"]
    # 2 s of waiting counts as 512 tokens fewer: the older long prompt now goes before the fresh short one.
    assert 2.0 * AGING_TOKENS_PER_S > 500 - 20
    assert [r.name for r in prefill_order([short, long_, older_long], now)] == ["older long", "short", "long"]
    # Priority comes before length.
    urgent = Req("urgent", 1000, priority=-1, submitted_at=now)
    assert prefill_order([short, urgent], now)[0] is urgent


def test_step_cost_learns_the_decode_time_and_the_per_token_prefill_time():
    cost = StepCost()
    assert cost.prefill_room(0.25) is None  # nothing measured yet: no cap
    for _ in range(50):
        cost.observe(decodes=16, prefill_tokens=0, seconds=0.050)
        cost.observe(decodes=16, prefill_tokens=200, seconds=0.050 + 200 * 0.001)
    assert cost.decode_s == pytest.approx(0.050)
    assert cost.per_token_s == pytest.approx(0.001)
    assert cost.prefill_room(0.25) == pytest.approx(200, abs=1)  # 50 ms of decodes + 200 x 1 ms
    assert cost.prefill_room(0.05) == MIN_PREFILL_CHUNK  # prefill always moves
    assert cost.prefill_room(0) is None  # budget off
    cost.observe(decodes=0, prefill_tokens=4, seconds=1.0)  # a tiny chunk: fixed costs, not per-token
    assert cost.per_token_s == pytest.approx(0.001)
