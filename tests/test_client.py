"""The Python client (`moemesh.client`) against real processes: the `moemesh up` cluster (streams, chat,
deadlines, the asyncio client under 32 streams) and a gateway process on a fixed port with API keys and Redis
(a rate-limit refusal retried after its `retry-after-ms`; a killed gateway restarted while calls retry)."""

import asyncio
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from moemesh.client import (
    NO_RETRY,
    AsyncClient,
    Client,
    Completion,
    DeadlineExceeded,
    InvalidArgument,
    Message,
    NotFound,
    ResourceExhausted,
    RetryPolicy,
    Unauthenticated,
)
from services.gateway.keys import KeyFile, parse_fields
from tests.helpers import ServiceProcess

pytestmark = pytest.mark.integration

PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def client(cluster) -> Client:
    with Client(cluster.address, timeout_s=60) as c:
        yield c


@pytest.mark.timeout(120)
def test_stream_chunks_join_to_the_whole_completion(client):
    whole = client.generate(PROMPT, max_new_tokens=8)
    chunks = list(client.generate_stream(PROMPT, max_new_tokens=8))
    assert len(chunks) > 1 and all(c.usage is None for c in chunks[:-1])
    joined = Completion.join(chunks)
    assert joined.token_ids == whole.token_ids and len(whole.token_ids) == 8
    assert joined.text == whole.text and joined.finish_reason == whole.finish_reason == "length"
    assert joined.usage == whole.usage and whole.usage.prompt_tokens == len(PROMPT)
    assert client.model_info().max_context_length > 0


@pytest.mark.timeout(120)
def test_chat_session_get_and_delete(client):
    first = client.chat("Where is my order?", max_new_tokens=4)
    reply = first.completion()
    assert first.session_id and reply.session_id == first.session_id and len(reply.token_ids) == 4
    second = client.chat(Message("user", "And now?"), session_id=first.session_id, max_new_tokens=4)
    assert second.completion().usage.cached_tokens > 0  # the first turn's KV came from Redis
    session = client.get_session(first.session_id)
    assert session.turns == 2 and [m.role for m in session.messages] == ["user", "assistant"] * 2
    assert session.messages[1].content == reply.text
    client.delete_session(first.session_id)
    with pytest.raises(NotFound) as info:
        client.get_session(first.session_id)
    assert info.value.code.name == "NOT_FOUND"
    with pytest.raises(InvalidArgument, match="session_id"):
        client.get_session("../etc")


@pytest.mark.timeout(120)
def test_a_deadline_is_raised_as_deadline_exceeded_and_not_retried(client):
    began = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        list(client.generate_stream(PROMPT, max_new_tokens=400, timeout_s=0.5))
    with pytest.raises(DeadlineExceeded):
        client.generate(PROMPT, max_new_tokens=400, timeout_s=0.5)
    assert time.monotonic() - began < 5


@pytest.mark.timeout(120)
def test_async_client_under_32_concurrent_streams(cluster, client):
    expected = client.generate(PROMPT, max_new_tokens=6).token_ids

    async def main() -> tuple[list[list[int]], str]:
        async with AsyncClient(cluster.address, timeout_s=90) as aclient:

            async def one() -> list[int]:
                return [t async for chunk in aclient.generate_stream(PROMPT, max_new_tokens=6) for t in chunk.token_ids]

            streams = await asyncio.gather(*(one() for _ in range(32)))
            chat = aclient.chat("Hello", max_new_tokens=3)
            await chat.completion()
            session = await aclient.get_session(chat.session_id)
            await aclient.delete_session(chat.session_id)
            return streams, session.session_id

    streams, session_id = asyncio.run(main())
    assert streams == [expected] * 32 and session_id


# A gateway process of its own on a fixed port (experts in-process), with API keys and Redis.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FixedGateway:
    """`moemesh gateway` on one port, which can be killed and started again on that port."""

    def __init__(self, model_dir: Path, *args: str):
        self.model_dir, self.args, self.port = model_dir, args, free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        self.process = ServiceProcess("gateway", self.model_dir, *self.args, "--port", str(self.port))
        assert self.process.address == self.address

    def kill(self) -> None:
        os.kill(self.process.proc.pid, signal.SIGKILL)
        self.process.proc.wait(30)


@pytest.fixture(scope="module")
def keyed_gateway(mixtral_dir, redis_server, tmp_path_factory):
    """The gateway and the secrets of its keys: `open` (no limits) and `limited` (20 requests a minute)."""
    store = KeyFile(tmp_path_factory.mktemp("keys") / "keys")
    secrets = {name: store.add(parse_fields(name, limits)) for name, limits in
               (("open", []), ("limited", ["requests_per_minute=20"]))}  # fmt: skip
    gateway = FixedGateway(mixtral_dir, "--api-keys", str(store.path), "--redis", redis_server.url)
    yield gateway, secrets
    gateway.process.close()


@pytest.mark.timeout(120)
def test_resource_exhausted_is_retried_after_the_servers_retry_after(keyed_gateway):
    gateway, secrets = keyed_gateway
    with pytest.raises(Unauthenticated):
        with Client(gateway.address, retry=NO_RETRY) as anonymous:
            anonymous.generate(PROMPT, max_new_tokens=1)
    once = Client(gateway.address, api_key=secrets["limited"], retry=NO_RETRY)
    # Backoffs far shorter than the refill (3 s a request): only waiting for retry-after-ms can succeed.
    quick = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.02)
    retrying = Client(gateway.address, api_key=secrets["limited"], retry=quick, timeout_s=30)
    try:
        for _ in range(20):  # the bucket holds 20 requests
            once.generate(PROMPT, max_new_tokens=1)
        with pytest.raises(ResourceExhausted) as info:
            once.generate(PROMPT, max_new_tokens=1)
        wait_s = info.value.retry_after_s
        assert wait_s is not None and 0 < wait_s <= 3
        began = time.monotonic()
        assert len(retrying.generate(PROMPT, max_new_tokens=1).token_ids) == 1
        assert time.monotonic() - began >= wait_s * 0.8
    finally:
        once.close()
        retrying.close()


@pytest.mark.timeout(150)
def test_calls_retry_through_a_killed_and_restarted_gateway(keyed_gateway):
    gateway, secrets = keyed_gateway
    patient = RetryPolicy(max_attempts=200, initial_backoff_s=0.1, max_backoff_s=0.5)
    with Client(gateway.address, api_key=secrets["open"], retry=patient, timeout_s=90) as client:
        expected = client.generate(PROMPT, max_new_tokens=5).token_ids
        gateway.kill()
        results: dict[str, list[int]] = {}
        calls = {
            "unary": lambda: client.generate(PROMPT, max_new_tokens=5).token_ids,
            "stream": lambda: [t for c in client.generate_stream(PROMPT, max_new_tokens=5) for t in c.token_ids],
        }
        threads = [threading.Thread(target=lambda n=n, f=f: results.update({n: f()})) for n, f in calls.items()]
        for t in threads:
            t.start()
        time.sleep(1.0)  # both calls are failing with UNAVAILABLE and retrying meanwhile
        assert not results
        gateway.start()
        for t in threads:
            t.join(90)
        assert results == {"unary": expected, "stream": expected}
