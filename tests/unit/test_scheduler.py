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


def test_step_cost_fits_fixed_per_decode_and_per_token_times():
    cost = StepCost()
    assert cost.prefill_room(0.25) is None  # nothing measured yet: no cap
    for decodes, prefill in [(16, 0), (16, 200), (8, 0), (0, 512), (16, 64), (4, 300)] * 3:
        cost.observe(decodes, prefill, 0.040 + 0.001 * decodes + 0.0002 * prefill)
    assert cost.estimate() == pytest.approx((0.040, 0.001, 0.0002))
    # A step of 512 prompt tokens took 142 ms: as a ratio, 0.28 ms a token, and a budget of 100 ms would
    # take 360 tokens; at the fitted 0.2 ms a token it takes the 500 that fit.
    assert cost.prefill_room(0.1) == pytest.approx(500, abs=1)
    assert cost.prefill_room(0.001) == MIN_PREFILL_CHUNK  # prefill always moves
    assert cost.prefill_room(0) is None  # budget off


def test_step_cost_with_a_constant_number_of_decodes_folds_them_into_the_fixed_time():
    cost = StepCost()
    for prefill in (0, 100, 300, 0, 50):
        cost.observe(8, prefill, 0.050 + 0.0005 * prefill)
    assert cost.prefill_room(0.05) == pytest.approx(100, abs=1)


def test_step_cost_needs_prefill_of_more_than_one_size():
    cost = StepCost()
    for decodes in (1, 2, 3, 4):
        cost.observe(decodes, 0, 0.01 * decodes)
    assert cost.prefill_room(0.25) is None
