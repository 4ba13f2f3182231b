"""The blocking client."""

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from moemesh.client.base import ClientBase
from moemesh.client.retry import Attempts
from moemesh.client.types import (
    Chunk,
    Completion,
    Message,
    ModelInfo,
    Sampling,
    Session,
    chat_request,
    generate_request,
)
from moemesh.errors import from_rpc_error
from moemesh.tls import open_channel
from moemesh.v1 import gateway_pb2, gateway_pb2_grpc


class Stream:
    """The chunks of a streamed reply, as they come; `session_id` is the Chat session's once the first chunk
    arrived. Leaving it unfinished (`close()`, or dropping it) cancels the call."""

    def __init__(self, chunks: Iterator[Chunk]):
        self._chunks = chunks
        self.session_id = ""

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> Chunk:
        chunk = next(self._chunks)
        self.session_id = chunk.session_id or self.session_id
        return chunk

    def completion(self) -> Completion:
        """The rest of the stream, joined."""
        return Completion.join(list(self))

    def close(self) -> None:
        self._chunks.close()


class Client(ClientBase):
    """A blocking client of the Gateway service; every error is a `moemesh.client.MoemeshError` subclass
    carrying the gRPC code. Use it as a context manager, or `close()` it."""

    def __init__(self, address: str = "127.0.0.1:50051", **settings: Any):
        super().__init__(address, **settings)
        self._channel = open_channel(address, self._credentials, self._options)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def generate(
        self, prompt: str | list[int], *, priority: int = 0, timeout_s: float | None = None, **sampling: Any
    ) -> Completion:
        """The whole completion of a text prompt (or of token ids)."""
        response = self._unary(self._stub.Generate, generate_request(prompt, Sampling(**sampling), priority), timeout_s)
        return Completion.from_pb(response)

    def generate_stream(
        self, prompt: str | list[int], *, priority: int = 0, timeout_s: float | None = None, **sampling: Any
    ) -> Stream:
        """The completion, streamed: each chunk holds the tokens of one engine step."""
        request = generate_request(prompt, Sampling(**sampling), priority)
        return Stream(self._stream(self._stub.GenerateStream, request, timeout_s))

    def chat(
        self,
        messages: str | Message | list[Message],
        *,
        session_id: str = "",
        priority: int = 0,
        timeout_s: float | None = None,
        **sampling: Any,
    ) -> Stream:
        """One turn of a conversation, streamed: `messages` (a string: one user message) are appended to the
        session `session_id` (empty: a new one, whose id is the stream's `session_id`)."""
        request = chat_request(messages, session_id, Sampling(**sampling), priority)
        return Stream(self._stream(self._stub.Chat, request, timeout_s))

    def get_session(self, session_id: str, *, timeout_s: float | None = None) -> Session:
        """A session's history; NotFound when unknown, expired or another API key's."""
        request = gateway_pb2.GetSessionRequest(session_id=session_id)
        return Session.from_pb(self._unary(self._stub.GetSession, request, timeout_s))

    def delete_session(self, session_id: str, *, timeout_s: float | None = None) -> None:
        """Removes a session; NotFound when unknown, expired or another API key's."""
        self._unary(self._stub.DeleteSession, gateway_pb2.DeleteSessionRequest(session_id=session_id), timeout_s)

    def model_info(self, *, timeout_s: float | None = None) -> ModelInfo:
        return ModelInfo.from_pb(self._unary(self._stub.GetModelInfo, gateway_pb2.GetModelInfoRequest(), timeout_s))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _unary(self, method: Callable, request: Any, timeout_s: float | None) -> Any:
        attempts = self._attempts(timeout_s)
        while True:
            try:
                return method(request, timeout=attempts.timeout(), metadata=self.connection.metadata())
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
            _wait_or_raise(attempts, error)

    def _stream(self, method: Callable, request: Any, timeout_s: float | None) -> Iterator[Chunk]:
        """Retried like unary calls while nothing has been yielded; after that an error is raised as it is,
        since the caller already holds part of the reply."""
        attempts = self._attempts(timeout_s)
        while True:
            call = method(request, timeout=attempts.timeout(), metadata=self.connection.metadata())
            yielded = False
            try:
                for response in call:
                    yielded = True
                    yield Chunk.from_pb(response)
                return
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
            finally:
                call.cancel()  # the consumer stopped early (no-op once the call is over)
            if yielded:
                raise error
            _wait_or_raise(attempts, error)


def _wait_or_raise(attempts: Attempts, error: Exception) -> None:
    delay = attempts.wait_before_retry(error)
    if delay is None:
        raise error
    time.sleep(delay)
