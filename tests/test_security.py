"""API keys, session ownership, per-key quotas and the public port's hard limits, on in-process gateways
(port 0) with a real redis-server."""

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.rpc import CHANNEL_OPTIONS
from moemesh.settings import GatewaySettings
from moemesh.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.keys import KeyFile, parse_fields
from services.gateway.server import create_service

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

P = gateway_pb2.SamplingParams
PROMPT = [101, 2024, 3301, 77, 15, 901]


@contextmanager
def gateway(model: Path, **settings) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    service, engine = create_service(GatewaySettings(model=model, dtype="float32", **settings))
    engine.start()
    service.start()
    channel = grpc.insecure_channel(service.address, options=CHANNEL_OPTIONS)
    stub = gateway_pb2_grpc.GatewayStub(channel)
    stub.channel = channel  # for the health checks
    try:
        yield stub
    finally:
        channel.close()
        service.server.stop(0)
        engine.stop()


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


def generate(stub, secret: str | None, max_new_tokens: int = 2, **fields) -> list[int]:
    request = gateway_pb2.GenerateRequest(sampling=P(max_new_tokens=max_new_tokens), **fields)
    if not request.prompt:
        request.prompt_token_ids[:] = PROMPT
    return list(stub.Generate(request, timeout=60, metadata=bearer(secret) if secret else None).token_ids)


def chat(stub, secret: str, session_id: str = "", text: str = "Where is my order?") -> str:
    request = gateway_pb2.ChatRequest(
        session_id=session_id, messages=[gateway_pb2.Message(role="user", content=text)], sampling=P(max_new_tokens=3)
    )
    return list(stub.Chat(request, timeout=60, metadata=bearer(secret)))[-1].session_id


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


@pytest.fixture
def keys(tmp_path) -> tuple[KeyFile, dict[str, str]]:
    """A key file with keys `alice` and `bob` (no limits); their secrets by id."""
    store = KeyFile(tmp_path / "keys")
    return store, {name: store.add(parse_fields(name, [])) for name in ("alice", "bob")}


def test_keys_none_wrong_right_revoked(mixtral_dir, keys):
    store, secrets = keys
    with gateway(mixtral_dir, api_keys=str(store.path)) as stub:
        assert code_of(lambda: generate(stub, None)) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: generate(stub, "mm_wrong")) == grpc.StatusCode.UNAUTHENTICATED
        assert len(generate(stub, secrets["alice"])) == 2
        health = health_pb2_grpc.HealthStub(stub.channel)  # health stays open without a key
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        )
        assert store.revoke("alice")
        deadline = time.monotonic() + 5
        while True:  # the file is read again within a second
            try:
                generate(stub, secrets["alice"])
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in exc.details()
                break
            assert time.monotonic() < deadline, "a revoked key still works"
            time.sleep(0.2)
        assert len(generate(stub, secrets["bob"])) == 2


def test_sessions_belong_to_the_key_that_made_them(mixtral_dir, keys, redis_server):
    store, secrets = keys
    alice, bob = secrets["alice"], secrets["bob"]
    with gateway(mixtral_dir, api_keys=str(store.path), redis=redis_server.url) as stub:
        session = chat(stub, alice)
        get = gateway_pb2.GetSessionRequest(session_id=session)
        delete = gateway_pb2.DeleteSessionRequest(session_id=session)
        for call in (
            lambda: stub.GetSession(get, timeout=10, metadata=bearer(bob)),
            lambda: chat(stub, bob, session),
            lambda: stub.DeleteSession(delete, timeout=10, metadata=bearer(bob)),
            lambda: stub.GetSession(
                gateway_pb2.GetSessionRequest(session_id="f" * 32), timeout=10, metadata=bearer(alice)
            ),
        ):
            assert code_of(call) == grpc.StatusCode.NOT_FOUND  # foreign and unknown look the same
        assert stub.GetSession(get, timeout=10, metadata=bearer(alice)).turns == 1
        assert stub.DeleteSession(delete, timeout=10, metadata=bearer(alice)).deleted
        assert (
            code_of(lambda: stub.DeleteSession(delete, timeout=10, metadata=bearer(alice))) == grpc.StatusCode.NOT_FOUND
        )
        for bad in ("../etc/passwd", "x" * 65, "a b"):
            with pytest.raises(grpc.RpcError) as info:
                stub.GetSession(gateway_pb2.GetSessionRequest(session_id=bad), timeout=10, metadata=bearer(alice))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "session_id" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            generate(stub, alice, session_id=session)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "use Chat" in info.value.details()


def retry_after_ms(exc: grpc.RpcError) -> int:
    return int(dict(exc.trailing_metadata())["retry-after-ms"])


def test_rate_limit_is_shared_by_two_gateways_and_recovers(mixtral_dir, tmp_path, redis_server):
    store = KeyFile(tmp_path / "keys")
    secret = store.add(parse_fields("limited", ["requests_per_minute=20"]))
    settings = dict(api_keys=str(store.path), redis=redis_server.url)
    with gateway(mixtral_dir, **settings) as a, gateway(mixtral_dir, **settings) as b:
        for i in range(20):  # the bucket holds 20 requests, whichever gateway takes them
            generate(a if i % 2 else b, secret, 1)
        with pytest.raises(grpc.RpcError) as info:
            generate(a, secret, 1)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "20 requests per minute" in info.value.details() and "retry in" in info.value.details()
        wait_ms = retry_after_ms(info.value)
        assert 0 < wait_ms <= 3000  # one request refills in 3 s
        time.sleep(wait_ms / 1000)  # exactly what the server asked for
        assert len(generate(b, secret, 1)) == 1


def test_token_budget_goes_into_debt_and_refuses_with_the_wait(mixtral_dir, tmp_path, redis_server):
    store = KeyFile(tmp_path / "keys")
    secret = store.add(parse_fields("tokens", ["tokens_per_minute=120"]))
    with gateway(mixtral_dir, api_keys=str(store.path), redis=redis_server.url) as stub:
        for _ in range(5):  # each is admitted while the bucket is not in debt, then charged what it used
            try:
                generate(stub, secret, 100)
            except grpc.RpcError as exc:
                refused = exc
                break
        else:
            pytest.fail("5 requests of ~106 tokens fit a budget of 120 per minute")
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "120 tokens per minute" in refused.details()
        assert 0 < retry_after_ms(refused) <= 60_000  # at most the debt of one request, at 2 tokens/s


def test_session_and_stream_caps(mixtral_dir, tmp_path, redis_server):
    store = KeyFile(tmp_path / "keys")
    secret = store.add(parse_fields("capped", ["max_sessions=2", "max_streams=1"]))
    with gateway(mixtral_dir, api_keys=str(store.path), redis=redis_server.url) as stub:
        first, _ = chat(stub, secret), chat(stub, secret)
        with pytest.raises(grpc.RpcError) as info:
            chat(stub, secret)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 live sessions" in info.value.details()
        stub.DeleteSession(gateway_pb2.DeleteSessionRequest(session_id=first), timeout=10, metadata=bearer(secret))
        chat(stub, secret)
        request = gateway_pb2.GenerateRequest(prompt_token_ids=PROMPT, sampling=P(max_new_tokens=200))
        stream = stub.GenerateStream(request, timeout=60, metadata=bearer(secret))
        next(stream)  # open
        with pytest.raises(grpc.RpcError) as info:
            generate(stub, secret)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_streams" in info.value.details()
        assert sum(len(r.token_ids) for r in stream) > 0
        assert len(generate(stub, secret)) == 2


INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
LIMIT_REFUSALS = [
    ("prompt over max_request_bytes", dict(prompt="x" * 5_000_000), EXHAUSTED, "larger than max"),
    ("prompt over max_prompt_chars", dict(prompt="hello " * 20_000), INVALID, "limit of 100000"),
    ("9 stop strings", dict(prompt="hi", sampling=P(stop=["a"] * 9)), INVALID, "limit of 8"),
    ("a long stop string", dict(prompt="hi", sampling=P(stop=["a" * 129])), INVALID, "limit of 128"),
    ("infinite temperature", dict(prompt="hi", sampling=P(temperature=float("inf"))), INVALID, "[0, 2]"),
    ("temperature over the maximum", dict(prompt="hi", sampling=P(temperature=2.5)), INVALID, "[0, 2]"),
]  # fmt: skip
CHAT_REFUSALS = [
    ("65 messages", [gateway_pb2.Message(role="user", content="hi")] * 65, "limit of 64"),
    ("a long message", [gateway_pb2.Message(role="user", content="y" * 32_001)], "limit of 32000"),
]


def test_each_limit_is_refused_while_a_stream_goes_on(mixtral_dir, redis_server):
    with gateway(mixtral_dir, redis=redis_server.url, max_prompt_chars=100_000) as stub:
        expected = generate(stub, None, 120)
        request = gateway_pb2.GenerateRequest(prompt_token_ids=PROMPT, sampling=P(max_new_tokens=120))
        with ThreadPoolExecutor(1) as pool:
            ongoing = pool.submit(lambda: [t for r in stub.GenerateStream(request, timeout=120) for t in r.token_ids])
            for name, fields, code, message in LIMIT_REFUSALS:
                with pytest.raises(grpc.RpcError) as info:
                    stub.Generate(gateway_pb2.GenerateRequest(**fields), timeout=30)
                assert (info.value.code(), name) == (code, name)
                assert message in info.value.details(), (name, info.value.details())
            for name, messages, message in CHAT_REFUSALS:
                with pytest.raises(grpc.RpcError) as info:
                    list(stub.Chat(gateway_pb2.ChatRequest(messages=messages), timeout=30))
                assert (info.value.code(), name) == (grpc.StatusCode.INVALID_ARGUMENT, name)
                assert message in info.value.details() and "messages" in info.value.details()
            assert ongoing.result() == expected


def test_health_checks_answer_during_200_open_streams(mixtral_dir):
    with gateway(mixtral_dir, max_concurrent_requests=200) as stub:
        request = gateway_pb2.GenerateRequest(prompt_token_ids=PROMPT, sampling=P(max_new_tokens=300))
        streams = [stub.GenerateStream(request, timeout=120) for _ in range(200)]
        try:
            deadline = time.monotonic() + 60
            while True:  # every stream holds one of the gateway's 200 call slots
                try:
                    stub.GetModelInfo(gateway_pb2.GetModelInfoRequest(), timeout=10)
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit of 200 calls" in exc.details():
                        break
                assert time.monotonic() < deadline, "200 open streams never filled the gateway"
                time.sleep(0.1)
            health = health_pb2_grpc.HealthStub(stub.channel)
            began = time.monotonic()
            with ThreadPoolExecutor(50) as pool:
                answers = list(
                    pool.map(lambda _: health.Check(health_pb2.HealthCheckRequest(), timeout=10).status, range(100))
                )
            assert answers == [health_pb2.HealthCheckResponse.SERVING] * 100
            print(f"100 health checks during 200 open streams: {time.monotonic() - began:.2f} s")
        finally:
            for s in streams:
                s.cancel()


def test_a_finished_stream_frees_its_slot(mixtral_dir):
    with gateway(mixtral_dir, max_concurrent_requests=2) as stub:
        results = []
        threads = [threading.Thread(target=lambda: results.append(generate(stub, None, 4))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 2 and len(generate(stub, None)) == 2


def test_keys_command_adds_lists_and_revokes(tmp_path):
    import subprocess
    import sys

    def keys(*args: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "moemesh.cli", "keys", *args, "--file", str(tmp_path / "keys")]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    added = keys("add", "svc", "requests_per_minute=5", "allow_system=true")
    assert added.returncode == 0 and added.stdout.startswith("mm_")
    secret = added.stdout.strip()
    assert secret not in (tmp_path / "keys").read_text()  # only its hash is stored
    assert (tmp_path / "keys").stat().st_mode & 0o077 == 0
    assert keys("list").stdout.strip() == "svc requests_per_minute=5 allow_system=true"
    assert keys("add", "svc").returncode != 0  # ids are unique
    bad = keys("add", "other", "requests_per_minute=lots")
    assert bad.returncode != 0 and "needs a whole number" in bad.stderr and "Traceback" not in bad.stderr
    assert keys("revoke", "svc").returncode == 0 and keys("list").stdout == ""


def test_only_keys_that_allow_it_send_system_messages(mixtral_dir, tmp_path, redis_server):
    store = KeyFile(tmp_path / "keys")
    plain, trusted = store.add(parse_fields("plain", [])), store.add(parse_fields("trusted", ["allow_system=true"]))
    messages = [gateway_pb2.Message(role="system", content="Be terse."), gateway_pb2.Message(role="user", content="Hi")]
    request = gateway_pb2.ChatRequest(messages=messages, sampling=P(max_new_tokens=2))
    with gateway(mixtral_dir, api_keys=str(store.path), redis=redis_server.url) as stub:
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Chat(request, timeout=60, metadata=bearer(plain)))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "messages[0]" in info.value.details()
        assert list(stub.Chat(request, timeout=60, metadata=bearer(trusted)))[-1].finish_reason


@pytest.mark.timeout(120)
def test_only_keys_that_allow_it_ask_for_priority_ahead_of_the_default(mixtral_dir, tmp_path, redis_server):
    store = KeyFile(tmp_path / "keys")
    plain, trusted = store.add(parse_fields("plain", [])), store.add(parse_fields("vip", ["allow_priority=true"]))
    chat_request = gateway_pb2.ChatRequest(
        messages=[gateway_pb2.Message(role="user", content="Hi")], sampling=P(max_new_tokens=2), priority=-1
    )
    with gateway(mixtral_dir, api_keys=str(store.path), redis=redis_server.url) as stub:
        assert code_of(lambda: generate(stub, plain, priority=-1)) == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Chat(chat_request, timeout=60, metadata=bearer(plain)))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "priority" in info.value.details()
        assert generate(stub, plain, priority=3)  # behind the default: anyone may
        assert generate(stub, trusted, priority=-1)
        assert list(stub.Chat(chat_request, timeout=60, metadata=bearer(trusted)))[-1].finish_reason
