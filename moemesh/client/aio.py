"""The asyncio client (grpc.aio): the same calls as `Client`, awaited."""

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio

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
from moemesh.v1 import gateway_pb2, gateway_pb2_grpc


class AsyncStream:
    """The chunks of a streamed reply (`async for`); `session_id` as in `Stream`. `aclose()` cancels."""

    def __init__(self, chunks: AsyncIterator[Chunk]):
        self._chunks = chunks
        self.session_id = ""

    def __aiter__(self) -> "AsyncStream":
        return self

    async def __anext__(self) -> Chunk:
        chunk = await anext(self._chunks)
        self.session_id = chunk.session_id or self.session_id
        return chunk

    async def completion(self) -> Completion:
        """The rest of the stream, joined."""
        return Completion.join([chunk async for chunk in self])

    async def aclose(self) -> None:
        await self._chunks.aclose()


class AsyncClient(ClientBase):
    """An asyncio client of the Gateway service; make it inside the event loop that uses it (`async with
    AsyncClient(...) as client`). Arguments and errors as in `Client`."""

    def __init__(self, address: str = "127.0.0.1:50051", **settings: Any):
        super().__init__(address, **settings)
        if self._credentials is None:
            self._channel = grpc.aio.insecure_channel(address, options=self._options)
        else:
            self._channel = grpc.aio.secure_channel(address, self._credentials, options=self._options)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    async def generate(
        self, prompt: str | list[int], *, priority: int = 0, timeout_s: float | None = None, **sampling: Any
    ) -> Completion:
        request = generate_request(prompt, Sampling(**sampling), priority)
        return Completion.from_pb(await self._unary(self._stub.Generate, request, timeout_s))

    def generate_stream(
        self, prompt: str | list[int], *, priority: int = 0, timeout_s: float | None = None, **sampling: Any
    ) -> AsyncStream:
        request = generate_request(prompt, Sampling(**sampling), priority)
        return AsyncStream(self._stream(self._stub.GenerateStream, request, timeout_s))

    def chat(
        self,
        messages: str | Message | list[Message],
        *,
        session_id: str = "",
        priority: int = 0,
        timeout_s: float | None = None,
        **sampling: Any,
    ) -> AsyncStream:
        request = chat_request(messages, session_id, Sampling(**sampling), priority)
        return AsyncStream(self._stream(self._stub.Chat, request, timeout_s))

    async def get_session(self, session_id: str, *, timeout_s: float | None = None) -> Session:
        request = gateway_pb2.GetSessionRequest(session_id=session_id)
        return Session.from_pb(await self._unary(self._stub.GetSession, request, timeout_s))

    async def delete_session(self, session_id: str, *, timeout_s: float | None = None) -> None:
        request = gateway_pb2.DeleteSessionRequest(session_id=session_id)
        await self._unary(self._stub.DeleteSession, request, timeout_s)

    async def model_info(self, *, timeout_s: float | None = None) -> ModelInfo:
        request = gateway_pb2.GetModelInfoRequest()
        return ModelInfo.from_pb(await self._unary(self._stub.GetModelInfo, request, timeout_s))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _unary(self, method: Callable, request: Any, timeout_s: float | None) -> Any:
        attempts = self._attempts(timeout_s)
        while True:
            try:
                return await method(request, timeout=attempts.timeout(), metadata=self.connection.metadata())
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
            await _wait_or_raise(attempts, error)

    async def _stream(self, method: Callable, request: Any, timeout_s: float | None) -> AsyncIterator[Chunk]:
        """Retried only while nothing has been yielded, as `Client._stream`."""
        attempts = self._attempts(timeout_s)
        while True:
            call = method(request, timeout=attempts.timeout(), metadata=self.connection.metadata())
            yielded = False
            try:
                async for response in call:
                    yielded = True
                    yield Chunk.from_pb(response)
                return
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
            finally:
                call.cancel()
            if yielded:
                raise error
            await _wait_or_raise(attempts, error)


async def _wait_or_raise(attempts: Attempts, error: Exception) -> None:
    delay = attempts.wait_before_retry(error)
    if delay is None:
        raise error
    await asyncio.sleep(delay)
