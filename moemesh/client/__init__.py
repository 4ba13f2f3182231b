"""Python client of the moemesh Gateway: `Client` (blocking) and `AsyncClient` (asyncio).

    from moemesh.client import Client

    with Client("127.0.0.1:50051", api_key="mm_...") as client:
        print(client.generate("Hello", max_new_tokens=16).text)
        stream = client.chat("Where is my order?")
        for chunk in stream:
            print(chunk.text, end="", flush=True)
        print(client.get_session(stream.session_id).turns)

Results are dataclasses (`Completion`, `Chunk`, `Session`, `ModelInfo`); errors are `MoemeshError` subclasses
with the gRPC `code` (`ResourceExhausted.retry_after_s` when the gateway said how long to wait). Calls are
retried on UNAVAILABLE and RESOURCE_EXHAUSTED (`RetryPolicy`), streams only before their first chunk.
"""

from moemesh.client.aio import AsyncClient, AsyncStream
from moemesh.client.retry import NO_RETRY, RetryPolicy
from moemesh.client.sync import Client, Stream
from moemesh.client.types import Chunk, Completion, Message, ModelInfo, Sampling, Session, Usage
from moemesh.errors import (
    Aborted,
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    MoemeshError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "Aborted",
    "AsyncClient",
    "AsyncStream",
    "Cancelled",
    "Chunk",
    "Client",
    "Completion",
    "DeadlineExceeded",
    "InvalidArgument",
    "Message",
    "ModelInfo",
    "MoemeshError",
    "NO_RETRY",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "Sampling",
    "Session",
    "Stream",
    "Unauthenticated",
    "Unavailable",
    "Usage",
]
