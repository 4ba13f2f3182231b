"""Multi-turn sessions in Redis: any gateway continues any session, reusing its KV cache, never changing the output."""

import time
from typing import NamedTuple

import grpc
import pytest

from moemesh.settings import GatewaySettings
from moemesh.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.chat_template import ChatTemplate
from services.gateway.requests import GenerationRequest, SamplingConfig, merge
from services.gateway.server import build_engine
from tests.helpers import Cluster, GatewayProcess

pytestmark = pytest.mark.integration

NEW_TOKENS = 10
SYSTEM = "You are a helpful customer-service agent for a bicycle shop. " * 12  # ~150 tokens: several KV chunks


@pytest.fixture(scope="module")
def gateways(mixtral_dir, redis_server):
    """Gateway A from `moemesh up` and gateway B, a second replica on the same router and Redis."""
    cluster = Cluster(mixtral_dir, "--experts", "2", "--dtype", "float32", "--redis", redis_server.url)
    second = GatewayProcess(mixtral_dir, cluster.router, redis_server.url)
    yield Gateways(cluster.stub, second.stub, cluster.router)
    second.close()
    cluster.close()


class Gateways(NamedTuple):
    a: gateway_pb2_grpc.GatewayStub
    b: gateway_pb2_grpc.GatewayStub
    router: str


@pytest.fixture(scope="module")
def recompute(mixtral_dir):
    """Greedy reply to a whole conversation, recomputed from scratch in one process."""
    engine, _ = build_engine(GatewaySettings(model=mixtral_dir, dtype="float32"))
    engine.start()
    template = ChatTemplate.from_dir(mixtral_dir)

    def reply(messages: list[dict[str, str]]) -> list[int]:
        prompt = engine.text.encode(template.render(messages, add_generation_prompt=True))
        seq = engine.submit(GenerationRequest(prompt, SamplingConfig(max_new_tokens=NEW_TOKENS)))
        return merge(list(seq.outputs())).token_ids

    yield reply
    engine.stop()


def chat(stub, session_id: str, *messages: tuple[str, str], max_new_tokens: int = NEW_TOKENS, timeout: float = 60):
    request = gateway_pb2.ChatRequest(
        session_id=session_id,
        messages=[gateway_pb2.Message(role=r, content=c) for r, c in messages],
        sampling=gateway_pb2.SamplingParams(max_new_tokens=max_new_tokens),
    )
    parts = list(stub.Chat(request, timeout=timeout))
    assert len({p.session_id for p in parts}) == 1 and parts[0].session_id
    return parts[0].session_id, "".join(p.text for p in parts), [t for p in parts for t in p.token_ids], parts[-1]


def first_turn(stub) -> tuple[str, list[dict[str, str]]]:
    session, text, _, last = chat(stub, "", ("system", SYSTEM), ("user", "My bike's chain keeps slipping."))
    assert last.usage.cached_tokens == 0 and last.usage.prompt_tokens >= 128  # at least 2 chunks of 64
    history = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "My bike's chain keeps slipping."},
        {"role": "assistant", "content": text},
    ]
    return session, history


def chunk_key(session: str, chunk: int) -> str:
    return f"moemesh:session:{session}:kv:{chunk}"


@pytest.mark.parametrize("damage", ["none", "evict first chunk", "garble second chunk", "drop metadata"])
def test_second_turn_on_another_gateway_equals_full_recompute(gateways, recompute, redis_server, damage):
    a, b, _ = gateways
    session, history = first_turn(a)
    r = redis_server.client()
    if damage == "evict first chunk":
        r.delete(chunk_key(session, 0))
    elif damage == "garble second chunk":
        data = bytearray(r.get(chunk_key(session, 1)))
        data[100] ^= 0xFF
        r.set(chunk_key(session, 1), bytes(data))
    elif damage == "drop metadata":
        r.delete(chunk_key(session, 1) + ":meta")

    _, _, tokens, last = chat(b, session, ("user", "What should I check first?"))
    assert tokens == recompute(history + [{"role": "user", "content": "What should I check first?"}])
    cached = last.usage.cached_tokens
    # turn 1's prompt is a prefix of turn 2's: all its whole chunks are reusable unless damaged
    expected = {"none": 128, "evict first chunk": 0, "garble second chunk": 64, "drop metadata": 64}[damage]
    assert cached == expected if damage != "none" else cached >= expected
    info = b.GetSession(gateway_pb2.GetSessionRequest(session_id=session), timeout=10)
    assert info.turns == 2 and [m.role for m in info.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert info.token_count > cached and 0 < info.ttl_seconds <= 3600


def test_concurrent_turns_on_one_session(gateways):
    a, b, _ = gateways
    session, _ = first_turn(a)
    long_turn = a.Chat(
        gateway_pb2.ChatRequest(
            session_id=session,
            messages=[gateway_pb2.Message(role="user", content="Tell me everything.")],
            sampling=gateway_pb2.SamplingParams(max_new_tokens=200),
        ),
        timeout=120,
    )
    next(long_turn)
    with pytest.raises(grpc.RpcError) as info:
        chat(b, session, ("user", "Hello?"))
    assert info.value.code() == grpc.StatusCode.ABORTED
    assert "turn in progress" in info.value.details()
    assert sum(len(p.token_ids) for p in long_turn) == 199
    chat(b, session, ("user", "Hello again."))
    assert b.GetSession(gateway_pb2.GetSessionRequest(session_id=session), timeout=10).turns == 3


def test_cancelled_turn_leaves_the_session_as_it_was(gateways):
    a, b, _ = gateways
    session, _ = first_turn(a)
    stream = a.Chat(
        gateway_pb2.ChatRequest(
            session_id=session,
            messages=[gateway_pb2.Message(role="user", content="Go on.")],
            sampling=gateway_pb2.SamplingParams(max_new_tokens=200),
        ),
        timeout=120,
    )
    next(stream)
    stream.cancel()
    deadline = time.monotonic() + 10
    while True:  # the lock goes once the cancelled turn has unwound
        try:
            chat(b, session, ("user", "Still there?"))
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.ABORTED and time.monotonic() < deadline
            time.sleep(0.2)
    info = b.GetSession(gateway_pb2.GetSessionRequest(session_id=session), timeout=10)
    assert info.turns == 2 and info.messages[3].content == "Still there?"


def test_delete_and_unknown_sessions(gateways, redis_server):
    a, b, _ = gateways
    session, _ = first_turn(a)
    assert redis_server.client().keys(f"moemesh:session:{session}*")
    assert b.DeleteSession(gateway_pb2.DeleteSessionRequest(session_id=session), timeout=10).deleted
    assert not redis_server.client().keys(f"moemesh:session:{session}*")
    for call in (
        lambda: a.DeleteSession(gateway_pb2.DeleteSessionRequest(session_id=session), timeout=10),
        lambda: a.GetSession(gateway_pb2.GetSessionRequest(session_id=session), timeout=10),
        lambda: chat(a, session, ("user", "Hi")),
        lambda: chat(b, "no-such-session", ("user", "Hi")),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no session" in info.value.details()


@pytest.mark.parametrize(
    ("messages", "message"),
    [((), "messages: empty"), ((("robot", "hi"),), "messages[0].role: 'robot' is not one of system, user, assistant")],
)
def test_bad_chat_requests(gateways, messages, message):
    with pytest.raises(grpc.RpcError) as info:
        chat(gateways[0], "", *messages)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_sessions_expire_after_their_ttl(mixtral_dir, gateways, redis_server):
    replica = GatewayProcess(mixtral_dir, gateways.router, redis_server.url, "--session-ttl-s", "2")
    try:
        session, _ = first_turn(replica.stub)
        assert replica.stub.GetSession(gateway_pb2.GetSessionRequest(session_id=session), timeout=10).turns == 1
        time.sleep(3)
        with pytest.raises(grpc.RpcError) as info:
            replica.stub.GetSession(gateway_pb2.GetSessionRequest(session_id=session), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert not redis_server.client().keys(f"moemesh:session:{session}*")
    finally:
        replica.close()


def test_redis_restart_loses_no_session(gateways, redis_server, recompute):
    """Redis killed mid-conversation: Generate goes on, Chat is UNAVAILABLE, then resumes with the history (AOF)."""
    a, b, _ = gateways
    session, history = first_turn(a)
    redis_server.kill()
    try:
        plain = a.Generate(
            gateway_pb2.GenerateRequest(prompt="Hello", sampling=gateway_pb2.SamplingParams(max_new_tokens=3)),
            timeout=30,
        )
        assert len(plain.token_ids) == 3
        with pytest.raises(grpc.RpcError) as info:
            chat(b, session, ("user", "Are you there?"))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "session store unavailable" in info.value.details()
    finally:
        redis_server.start()
    _, _, tokens, last = chat(b, session, ("user", "Are you there?"))
    assert tokens == recompute(history + [{"role": "user", "content": "Are you there?"}])
    assert last.usage.cached_tokens > 0
