"""Admission by priority, shortest-remaining-prefill-first with aging, the learned step cost, and the `Scheduler`'s
plans, driven with sequences and no model."""

from dataclasses import dataclass

import pytest
import torch

from moemesh.errors import ResourceExhausted
from services.gateway.requests import GenerationRequest, SamplingConfig
from services.gateway.scheduler import (
    AGING_TOKENS_PER_S,
    MIN_PREFILL_CHUNK,
    Scheduler,
    StepCost,
    next_to_admit,
    prefill_order,
)
from services.gateway.sequence import RequestStatus, Sequence
from services.gateway.text import TextStream

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


BYTES_PER_POSITION = 100


@dataclass
class FakeCache:
    """What the scheduler reads of a KV cache: its bytes and the positions they hold."""

    capacity: int = 0

    @property
    def nbytes(self) -> int:
        return self.capacity * BYTES_PER_POSITION


def sequence(prompt_tokens: int, priority: int = 0) -> Sequence:
    request = GenerationRequest(list(range(1, prompt_tokens + 1)), SamplingConfig(max_new_tokens=8), priority)
    return Sequence(request, TextStream(None, ()), None, None, torch.device("cpu"))


def scheduler(**limits) -> Scheduler:
    settings = dict(max_batch_seqs=8, max_batch_tokens=512, max_waiting=8, max_decode_stall_s=0.0, kv_cache_bytes=0)
    return Scheduler(**(settings | limits), kv_bytes=lambda n: n * BYTES_PER_POSITION, new_cache=FakeCache)


def decoding(seq: Sequence) -> Sequence:
    """As if its prompt were read and one token sampled: it decodes one token per step."""
    seq.computed, seq.output_ids = len(seq.prompt_ids), [5]
    seq.cache.capacity = seq.computed
    return seq


def test_prefill_beside_decodes_is_capped_by_the_inter_token_budget():
    s = scheduler(max_decode_stall_s=0.1)
    first, long_, short = sequence(3), sequence(300), sequence(40)
    for seq in (first, long_, short):
        s.add(seq)
    assert s.admit() == [first, long_, short] and all(q.status is RequestStatus.RUNNING for q in s.running)
    decoding(first)
    for decodes, prefill in ((1, 0), (1, 100), (2, 50), (0, 200)):  # as if measured: 19 ms + 1 ms each
        s.cost.observe(decodes, prefill, 0.019 + 0.001 * (decodes + prefill))
    plan = s.schedule(now=0.0)
    assert plan.chosen[0] == (first, 1)  # decodes first
    chosen = dict(plan.chosen)
    assert chosen[short] == 40  # the shorter prompt goes first, whatever the arrival order
    assert chosen[long_] == 100 - 40  # 100 prefill tokens x 1 ms = the 100 ms budget on top of the decodes
    s.cost = StepCost()  # nothing measured: only max_batch_tokens caps the step
    assert s.schedule(now=0.0).num_tokens == 1 + 300 + 40


def test_admission_stops_at_the_kv_budget_and_at_the_batch_size():
    s = scheduler(max_batch_seqs=2, kv_cache_bytes=150 * BYTES_PER_POSITION)
    a, b, c = sequence(100), sequence(100), sequence(10)
    s.add(a)
    assert s.admit() == [a]  # an empty batch always takes one
    a.cache.capacity = 100  # its prompt's keys and values
    s.add(b), s.add(c)
    assert s.admit() == []  # b's prompt would pass the KV budget; c waits behind it (first come, first served)
    assert [q.status for q in (a, b, c)] == [RequestStatus.RUNNING, RequestStatus.WAITING, RequestStatus.WAITING]
    s.kv_cache_bytes = 0
    assert s.admit() == [b] and len(s.running) == 2  # now only max_batch_seqs holds c back


def test_a_full_queue_is_refused():
    s = scheduler(max_waiting=1)
    s.add(sequence(5))
    with pytest.raises(ResourceExhausted, match="waiting queue is full"):
        s.add(sequence(5))


def test_kv_growth_preempts_the_latest_admitted_which_waits_to_recompute():
    s = scheduler(kv_cache_bytes=61 * BYTES_PER_POSITION)
    early, late = sequence(30), sequence(30)
    for seq in (early, late):
        s.add(seq)
    s.admit()
    decoding(early), decoding(late)  # 60 positions held; the step needs 62
    plan = s.schedule(now=0.0)
    assert plan.chosen == [(early, 1)] and plan.preempted == [late]
    assert late.status is RequestStatus.WAITING and late.cache is None and late.computed == 0 and late.preempted
    assert s.waiting == [late] and s.running == [early]


def test_cancelled_and_expired_sequences_leave_aborted():
    s = scheduler()
    cancelled, expired, kept = sequence(5), sequence(5), sequence(5)
    for seq in (cancelled, expired, kept):
        s.add(seq)
    s.admit()
    cancelled.cancel()
    expired.deadline = 1.0
    assert s.drop_finished_by_client(now=2.0) == [cancelled, expired]
    assert cancelled.status is expired.status is RequestStatus.ABORTED and s.running == [kept]
