"""EPLB-style planning: replicate the hottest experts and balance the pools."""

import pytest

from moemesh.errors import InvalidArgument
from moemesh.plan import balance, load_from_metrics


def test_skewed_load_is_balanced():
    load = {e: 1.0 for e in range(8)} | {0: 20.0, 1: 10.0}  # experts 0 and 1 are hot, both in shard 0/2
    plan = balance(load, num_experts=8, pools=2, slots=5)
    assert plan.before > 1.7
    assert plan.after < plan.before and plan.after < 1.1
    assert sorted({e for pool in plan.pools for e in pool}) == list(range(8))  # every expert somewhere
    assert all(len(pool) <= 5 and len(pool) == len(set(pool)) for pool in plan.pools)
    assert all(0 in pool for pool in plan.pools)  # the hottest expert is replicated into both pools


def test_uniform_load_stays_balanced():
    plan = balance({e: 5.0 for e in range(16)}, num_experts=16, pools=4, slots=4)
    assert plan.before == pytest.approx(1.0) and plan.after == pytest.approx(1.0)


def test_not_enough_slots():
    with pytest.raises(InvalidArgument, match="cannot hold 8 experts"):
        balance({}, num_experts=8, pools=2, slots=3)


def test_load_from_router_metrics():
    text = (
        "# TYPE moemesh_router_expert_tokens_total counter\n"
        'moemesh_router_expert_tokens_total{expert="0",layer="0"} 5.0\n'
        'moemesh_router_expert_tokens_total{expert="0",layer="1"} 7.0\n'
        'moemesh_router_expert_tokens_total{expert="3",layer="1"} 2.0\n'
        'moemesh_router_expert_tokens_created{expert="3",layer="1"} 1.7e9\n'
    )
    assert load_from_metrics(text) == {0: 12.0, 3: 2.0}
