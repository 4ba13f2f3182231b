"""Choosing replicas and hedged calls (`moemesh.peers`), against fake peers whose answers the test controls;
and per-call statuses on a real expert service's stream."""

import threading
import time
from collections import Counter
from concurrent import futures

import grpc
import pytest
import torch

from moemesh import codec
from moemesh.errors import DeadlineExceeded, InvalidArgument, PeerUnreachable, Unavailable
from moemesh.peers import Attempt, Chooser, HedgedCall, Peer
from moemesh.rpc import StreamClient
from moemesh.settings import ExpertSettings
from moemesh.v1 import expert_pb2, expert_pb2_grpc
from services.experts.server import create_service
from tests.helpers import make_mixtral

pytestmark = pytest.mark.timeout(60)


class FakeClient:
    """A peer's stream whose calls the test answers by hand (or at once, with `answer`)."""

    def __init__(self, target: str, answer=None, delay_s: float = 0.0):
        self.target, self.answer, self.delay_s = target, answer, delay_s
        self.calls: list[tuple[object, futures.Future]] = []

    def submit(self, request) -> futures.Future:
        future: futures.Future = futures.Future()
        self.calls.append((request, future))
        if self.answer is not None:
            outcome = self.answer(request)
            resolve = future.set_exception if isinstance(outcome, Exception) else future.set_result
            if self.delay_s:
                threading.Timer(self.delay_s, resolve, [outcome]).start()
            else:
                resolve(outcome)
        return future


def peer(name: str, answer=None, delay_s: float = 0.0, floor_s: float = 0.05) -> Peer:
    return Peer(FakeClient(name, answer, delay_s), floor_s, initial_budget_s=floor_s)


def one_part_call(peers: list[Peer], timeout_s: float = 5.0) -> HedgedCall:
    """A one-part call over `peers`; the chooser is seeded, so that its 1-in-100 exploration of a random idle
    peer never decides which peer a test's first call goes to."""
    chooser = Chooser(seed=0)

    def send(parts: list[int], tried: dict[int, set[Peer]]) -> list[Attempt]:
        left = [p for p in peers if p not in tried[0]]
        if not left:
            raise Unavailable("none left")
        chosen = chooser.choose(left)
        tried[0].add(chosen)
        return [chosen.call(f"request to {chosen.address}", 1, parts)]

    return HedgedCall(1, send, time.monotonic() + timeout_s, "test call")


def chosen_first(fast: Peer, slow: Peer) -> None:
    """Makes `fast` look 100x faster than `slow`, so that `one_part_call` sends its first try to `fast`."""
    fast.latency.observe(0.0001, 1)
    slow.latency.observe(0.01, 1)


def answer_of(call: HedgedCall):
    return [response for _, response, _ in call.answers()]


def test_a_failed_peer_is_resent_to_another_and_then_avoided():
    dead = peer("dead", lambda r: PeerUnreachable("stream ended"))
    alive = peer("alive", lambda r: f"answer to {r}")
    chosen_first(dead, alive)
    assert answer_of(one_part_call([dead, alive])) == ["answer to request to alive"]
    assert not dead.healthy(time.monotonic()) and dead.outstanding == 0
    answer_of(one_part_call([dead, alive]))
    assert len(dead.client.calls) == 1, "a peer that just failed got another call"


def test_a_hung_peer_is_hedged_and_the_first_answer_wins():
    hung = peer("hung")  # never answers
    alive = peer("alive", lambda r: "answer")
    chosen_first(hung, alive)
    began = time.monotonic()
    assert answer_of(one_part_call([hung, alive])) == ["answer"]
    assert 0.05 <= time.monotonic() - began < 1.0  # waited for the hung peer's budget, then hedged
    assert hung.outstanding == 1, "an unanswered call counts as outstanding until it is answered"
    hung.client.calls[0][1].set_result("late")  # answering late is harmless
    assert hung.outstanding == 0


def test_a_slow_only_peer_is_waited_for_not_failed():
    slow = peer("slow", lambda r: "late answer", delay_s=0.3)
    assert answer_of(one_part_call([slow])) == ["late answer"]


def test_every_peer_unreachable_is_tried_again_then_unavailable():
    only = peer("only", lambda r: PeerUnreachable("127.0.0.1:1: stream ended"))
    began = time.monotonic()
    with pytest.raises(Unavailable, match="none left .last failure: 127.0.0.1:1: stream ended"):
        answer_of(one_part_call([only]))
    assert len(only.client.calls) == 4  # the first try and one after each pause
    assert time.monotonic() - began >= 1.7


def test_a_restarted_peer_is_reached_on_a_later_round():
    outcomes = iter([PeerUnreachable("stream ended"), PeerUnreachable("stream ended"), "answer"])
    restarting = peer("restarting", lambda r: next(outcomes))
    assert answer_of(one_part_call([restarting])) == ["answer"]


def test_an_error_a_peer_answered_with_is_not_resent():
    refusing = peer("refusing", lambda r: Unavailable("no live expert replica holds layer 1 expert 3"))
    other = peer("other", lambda r: "answer")
    chosen_first(refusing, other)
    with pytest.raises(Unavailable, match="layer 1 expert 3"):
        answer_of(one_part_call([refusing, other]))
    assert not other.client.calls and refusing.healthy(time.monotonic())


def test_the_deadline_bounds_the_call():
    with pytest.raises(DeadlineExceeded):
        answer_of(one_part_call([peer("hung", floor_s=5.0)], timeout_s=0.2))


def test_other_errors_are_not_resent():
    bad = peer("bad", lambda r: InvalidArgument("hidden: wrong shape"))
    other = peer("other", lambda r: "answer")
    chosen_first(bad, other)
    with pytest.raises(InvalidArgument):
        answer_of(one_part_call([bad, other]))
    assert not other.client.calls


def picks(peers: list[Peer], n: int = 2000) -> Counter:
    chooser = Chooser(seed=1)
    return Counter(chooser.choose(peers).address for _ in range(n))


def test_equal_peers_share_calls_and_a_slow_one_gets_a_trickle():
    fast = [peer(f"fast{i}") for i in range(2)]
    slow = peer("slow")
    for p in fast:
        p.latency.observe(0.002, 1)
    slow.latency.observe(0.008, 1)  # 4x: weight 1/64 of a fast one
    counts = picks([*fast, slow])
    assert 800 < counts["fast0"] < 1200 and 800 < counts["fast1"] < 1200
    assert 5 < counts["slow"] < 80  # about 1.5%: enough to see it recover


def test_a_peer_with_calls_in_flight_gets_fewer():
    busy, idle = peer("busy"), peer("idle")
    for p in (busy, idle):
        p.latency.observe(0.002, 1)
    for _ in range(3):
        busy.call("request", 1, [0])  # never answered
    assert picks([busy, idle])["idle"] > 1800


def test_a_hung_peer_gets_no_calls_once_its_call_is_old():
    hung, alive = peer("hung"), peer("alive")
    for p in (hung, alive):
        p.latency.observe(0.002, 1)
    hung.call("request", 1, [0])
    hung.in_flight = {f: started - 2.0 for f, started in hung.in_flight.items()}  # unanswered for 2 s
    assert picks([hung, alive])["hung"] == 0


def test_an_unmeasured_peer_is_tried():
    known, new = peer("known"), peer("new")
    known.latency.observe(0.002, 1)
    assert picks([known, new], 100)["new"] > 90


@pytest.fixture(scope="module")
def expert_stream(tmp_path_factory):
    """A real expert service in this process (port 0) and a `StreamClient` to it."""
    model = make_mixtral(tmp_path_factory.mktemp("peers-model"))
    service, _ = create_service(ExpertSettings(model=model, dtype="float32"))
    service.server.start()
    client = StreamClient(service.address, lambda ch: expert_pb2_grpc.ExpertStub(ch).Forward)
    yield client
    client.close()
    service.server.stop(0)


def expert_call(layer: int, expert: int, rows: int) -> expert_pb2.ExpertRequest:
    return expert_pb2.ExpertRequest(
        layer=layer,
        groups=[expert_pb2.ExpertGroup(expert=expert, num_tokens=rows)],
        hidden=codec.to_pb(torch.randn(rows, 64)),
    )


def test_a_failing_call_fails_alone_and_the_stream_stays_open(expert_stream):
    pending = [expert_stream.submit(expert_call(0, 1, 3)) for _ in range(4)]
    bad = expert_stream.submit(expert_call(7, 1, 3))  # not an MoE layer
    pending += [expert_stream.submit(expert_call(1, 2, 2)) for _ in range(4)]
    with pytest.raises(InvalidArgument, match="layer: 7 is not an MoE layer") as info:
        bad.result(timeout=30)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [list(f.result(timeout=30).output.shape) for f in pending] == [[3, 64]] * 4 + [[2, 64]] * 4
    stream = expert_stream._stream
    assert list(expert_stream.submit(expert_call(1, 0, 1)).result(timeout=30).output.shape) == [1, 64]
    assert expert_stream._stream is stream, "the stream was reopened after a per-call error"
