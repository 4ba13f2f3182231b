"""Chat turns through Redis trouble, on an in-process engine and a real redis-server: a finished turn's save
retries across a restart, a turn that cannot be saved still gives its whole reply, KV loading never fails."""

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest
import redis

from moemesh.checkpoint import Checkpoint
from moemesh.errors import Aborted, Unavailable
from moemesh.settings import GatewaySettings
from moemesh.v1 import gateway_pb2
from services.gateway.chat import Conversations
from services.gateway.chat_template import ChatTemplate
from services.gateway.kv_store import load_client
from services.gateway.requests import GenerationRequest, Limits, SamplingConfig, StepOutput, merge
from services.gateway.server import build_engine, conversations
from services.gateway.sessions import SessionStore, lock_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

NEW_TOKENS = 6
CHUNK = 4  # tokens per KV chunk: the first turn's ~150 tokens make ~40 chunks, 5 batches of 8
FIRST = [("system", "You are a helpful agent for a bicycle shop. " * 12), ("user", "My chain keeps slipping.")]
SECOND = ("user", "What should I check first?")
NOT_SAVED = "the reply is complete but the turn was not saved"


@pytest.fixture(scope="module")
def settings(mixtral_dir, redis_server) -> GatewaySettings:
    return GatewaySettings(model=mixtral_dir, dtype="float32", redis=redis_server.url, kv_chunk_tokens=CHUNK)


@pytest.fixture(scope="module")
def engine(settings):
    e, _ = build_engine(settings)
    e.start()
    yield e
    e.stop()


@pytest.fixture
def conv(settings, engine) -> Conversations:
    """A fresh `Conversations` (a test may patch its stores) on the shared engine, wired as the server wires it."""
    ckpt = Checkpoint(settings.model)
    limits = Limits(
        vocab_size=ckpt.config.vocab_size,
        max_context=ckpt.config.max_position_embeddings,
        default_max_new_tokens=8,
        max_new_tokens_limit=64,
    )
    return conversations(settings, engine, ckpt, limits)


@pytest.fixture(scope="module")
def recompute(engine, mixtral_dir):
    """The greedy reply to a whole conversation, computed from scratch."""
    template = ChatTemplate.from_dir(mixtral_dir)

    def reply(messages: list[tuple[str, str]]) -> list[int]:
        prompt = engine.text.encode(template.render(as_dicts(messages), add_generation_prompt=True))
        seq = engine.submit(GenerationRequest(prompt, SamplingConfig(max_new_tokens=NEW_TOKENS)))
        return merge(list(seq.outputs())).token_ids

    return reply


def as_dicts(messages: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in messages]


def turn(conv: Conversations, session_id: str, *messages: tuple[str, str]) -> Iterator[StepOutput]:
    pb = [gateway_pb2.Message(role=r, content=c) for r, c in messages]
    return conv.turn(session_id, pb, gateway_pb2.SamplingParams(max_new_tokens=NEW_TOKENS), "me", lambda _: None)


def first_turn(conv: Conversations) -> tuple[str, list[tuple[str, str]]]:
    """A new session's first turn; returns its id and the history so far."""
    one = merge(list(turn(conv, "", *FIRST)))
    return one.session_id, [*FIRST, ("assistant", one.text)]


def pull(got: list[StepOutput], outputs: Iterator[StepOutput], after_first: Callable[[], object]) -> None:
    """Collects a turn's outputs into `got` (which keeps them if the turn raises), calling `after_first()`
    once the first has come."""
    got.append(next(outputs))
    after_first()
    for output in outputs:
        got.append(output)


def test_a_finished_turn_is_saved_across_a_redis_restart(conv, redis_server, recompute):
    session, history = first_turn(conv)
    restart = threading.Timer(1.0, redis_server.start)

    def kill_and_restart_in_a_second():
        redis_server.kill()
        restart.start()

    outputs: list[StepOutput] = []
    try:
        pull(outputs, turn(conv, session, SECOND), kill_and_restart_in_a_second)
    finally:
        restart.join()
    assert outputs[-1].finish_reason and merge(outputs).token_ids == recompute([*history, SECOND])
    assert conv.store.load(session, "me").turns == 2
    third = merge(list(turn(conv, session, ("user", "Thanks."))))
    assert third.cached_tokens >= outputs[-1].prompt_tokens - CHUNK  # the second turn's KV chunks were saved too


def test_a_turn_that_cannot_be_saved_gives_its_reply_then_unavailable(conv, redis_server, recompute):
    session, history = first_turn(conv)
    before = conv.store.load(session, "me")
    got: list[StepOutput] = []
    started = time.monotonic()
    try:
        with pytest.raises(Unavailable) as info:
            pull(got, turn(conv, session, SECOND), redis_server.kill)
    finally:
        redis_server.start()
    assert time.monotonic() - started > 2.9  # retried for 3 s first
    assert NOT_SAVED in str(info.value) and "the next turn continues from the last saved turn" in str(info.value)
    assert got[-1].finish_reason and merge(got).token_ids == recompute([*history, SECOND])
    after = conv.store.load(session, "me")
    assert (after.turns, after.messages, after.token_ids) == (1, before.messages, before.token_ids)


def test_a_turn_that_lost_its_lock_is_not_saved_nor_retried(conv, redis_server, recompute):
    session, history = first_turn(conv)
    other = SessionStore(redis_server.client(), 60, 6.0)
    got: list[StepOutput] = []
    with ExitStack() as held:

        def take_the_lock():  # as if this turn had stalled past the lock's TTL and another gateway took it
            redis_server.client().delete(lock_key(session))
            held.enter_context(other.turn_lock(session))

        started = time.monotonic()
        with pytest.raises(Aborted, match=f"{NOT_SAVED} .*this turn lost its lock"):
            pull(got, turn(conv, session, SECOND), take_the_lock)
        assert time.monotonic() - started < 2.5  # not retried
        assert redis_server.client().exists(lock_key(session))  # the other holder's lock stays
    assert got[-1].finish_reason and merge(got).token_ids == recompute([*history, SECOND])
    assert conv.store.load(session, "me").turns == 1


def test_a_turn_whose_kv_chunks_cannot_be_saved_is_saved_without_them(conv, monkeypatch, recompute):
    def unavailable(*args):
        raise Unavailable("session store unavailable (test)")

    session, history = first_turn(conv)
    monkeypatch.setattr(conv.kv, "save", unavailable)
    two = merge(list(turn(conv, session, SECOND)))
    assert conv.store.load(session, "me").turns == 2
    monkeypatch.undo()
    third = merge(list(turn(conv, session, ("user", "Thanks."))))  # reuses the first turn's chunks only
    assert 0 < third.cached_tokens < two.prompt_tokens
    assert third.token_ids == recompute([*history, SECOND, ("assistant", two.text), ("user", "Thanks.")])


class FlakyLoads:
    """Stands in for the KV store's load client: fails or slows down some MGETs."""

    def __init__(self, client: redis.Redis, fail_call: int = 0, delay_s: float = 0.0):
        self.client, self.fail_call, self.delay_s, self.calls = client, fail_call, delay_s, 0

    def mget(self, keys: list[str]) -> list[bytes | None]:
        self.calls += 1
        if self.calls == self.fail_call:
            raise redis.TimeoutError("Timeout reading from socket")
        time.sleep(self.delay_s)
        return self.client.mget(keys)


@pytest.mark.parametrize(
    ("loads", "budget_s", "cached"),
    [
        (lambda c: FlakyLoads(c, fail_call=2), 2.0, 8 * CHUNK),  # the second batch of 8 chunks fails
        (lambda c: FlakyLoads(c, delay_s=0.5), 1.25, 3 * 8 * CHUNK),  # 3 batches within the budget
        (lambda c: load_client("redis://127.0.0.1:1/0"), 2.0, 0),  # Redis unreachable for loads
    ],
    ids=["a batch fails", "budget runs out", "unreachable"],
)
def test_kv_loading_stops_at_what_arrived_and_equals_a_recompute(conv, recompute, loads, budget_s, cached):
    session, history = first_turn(conv)
    conv.kv.loads, conv.kv.load_budget_s = loads(conv.kv.loads), budget_s
    two = merge(list(turn(conv, session, SECOND)))
    assert two.cached_tokens == cached
    assert two.token_ids == recompute([*history, SECOND])
    assert conv.store.load(session, "me").turns == 2
