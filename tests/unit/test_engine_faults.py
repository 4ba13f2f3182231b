"""The engine contains failures: an expired request leaves the batch without touching the others, and a
failed step is run once more before its sequences fail."""

import time
from pathlib import Path

import pytest

from moemesh.errors import DeadlineExceeded, Unavailable
from moemesh.settings import GatewaySettings
from services.gateway.server import build_engine
from tests.helpers import make_mixtral
from tests.unit.test_engine import collect, request

pytestmark = pytest.mark.timeout(120)


class FlakyRouted:
    """Wraps the engine's routed experts; the calls whose numbers are in `fail` raise UNAVAILABLE."""

    def __init__(self, inner, fail: set[int] | None = None, fail_all: bool = False):
        self.inner, self.fail, self.fail_all, self.calls = inner, fail or set(), fail_all, 0

    def submit(self, layer, hidden, deadline):
        self.calls += 1
        if self.fail_all or self.calls in self.fail:
            raise Unavailable(f"layer {layer}: injected failure")
        return self.inner.submit(layer, hidden, deadline)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_mixtral(tmp_path_factory.mktemp("faults-model"), initializer_range=0.2)


@pytest.fixture
def engine(model_dir):
    e, _ = build_engine(GatewaySettings(model=model_dir, dtype="float32"))
    e.start()
    yield e
    e.stop()


PROMPT = [5, 17, 99, 3, 250, 41]


def test_a_failed_step_is_run_again_with_the_same_result(engine):
    expected = collect(engine.submit(request(PROMPT, 12))).token_ids
    engine.routed = FlakyRouted(engine.routed, fail={3, 8})  # mid-prefill and mid-decode
    assert collect(engine.submit(request(PROMPT, 12))).token_ids == expected
    assert engine.routed.calls > 8


def test_a_step_that_fails_twice_fails_its_sequences_and_the_engine_goes_on(engine):
    inner = engine.routed
    engine.routed = FlakyRouted(inner, fail_all=True)
    with pytest.raises(Unavailable, match="injected failure"):
        collect(engine.submit(request(PROMPT, 4)))
    assert engine.routed.calls == 2  # the step and its one rerun
    engine.routed = inner
    assert len(collect(engine.submit(request(PROMPT, 4))).token_ids) == 4


def test_an_expired_request_leaves_without_failing_the_others(engine):
    expected = collect(engine.submit(request(PROMPT, 40))).token_ids
    long = engine.submit(request(PROMPT, 40))
    for budget_s in (0.001, 0.005, 0.02):
        short = engine.submit(request([7, 8, 9], 40), deadline=time.monotonic() + budget_s)
        with pytest.raises(DeadlineExceeded):
            collect(short)
    assert collect(long).token_ids == expected


def test_an_expired_request_in_the_queue_never_runs(engine):
    inner = engine.routed
    engine.routed = FlakyRouted(inner)
    seq = engine.submit(request(PROMPT, 4), deadline=time.monotonic() - 1)
    with pytest.raises(DeadlineExceeded):
        collect(seq)
    assert engine.routed.calls == 0
