"""The client's typed results and requests: plain dataclasses made from (and into) the Gateway's protobuf
messages, so that callers never handle generated code."""

from dataclasses import dataclass, field
from typing import Self

from moemesh.v1 import gateway_pb2


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    #: Prompt tokens whose KV cache was reused (a Chat session's earlier turns) instead of recomputed.
    cached_tokens: int = 0


@dataclass(frozen=True)
class Chunk:
    """One streamed message: the tokens and text new since the previous one. `finish_reason` ("length",
    "stop", "eos", "filtered") and `usage` are set on the last; `session_id` on every Chat chunk."""

    text: str
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""
    usage: Usage | None = None
    session_id: str = ""

    @classmethod
    def from_pb(cls, response: gateway_pb2.GenerateResponse) -> Self:
        usage = response.usage if response.HasField("usage") else None
        return cls(
            text=response.text,
            token_ids=list(response.token_ids),
            logprobs=list(response.logprobs),
            finish_reason=response.finish_reason,
            usage=None if usage is None else Usage(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens),
            session_id=response.session_id,
        )


@dataclass(frozen=True)
class Completion(Chunk):
    """A whole reply: `Client.generate`, or the chunks of a stream joined (`Completion.join`)."""

    @classmethod
    def join(cls, chunks: list[Chunk]) -> Self:
        last = chunks[-1] if chunks else Chunk("", [])
        return cls(
            text="".join(c.text for c in chunks),
            token_ids=[t for c in chunks for t in c.token_ids],
            logprobs=[p for c in chunks for p in c.logprobs],
            finish_reason=last.finish_reason,
            usage=last.usage,
            session_id=last.session_id,
        )


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user" or "assistant"
    content: str

    def to_pb(self) -> gateway_pb2.Message:
        return gateway_pb2.Message(role=self.role, content=self.content)


@dataclass(frozen=True)
class Session:
    session_id: str
    messages: list[Message]
    token_count: int
    turns: int
    created_unix_ms: int
    updated_unix_ms: int
    ttl_seconds: int

    @classmethod
    def from_pb(cls, session: gateway_pb2.Session) -> Self:
        return cls(
            session_id=session.session_id,
            messages=[Message(m.role, m.content) for m in session.messages],
            token_count=session.token_count,
            turns=session.turns,
            created_unix_ms=session.created_unix_ms,
            updated_unix_ms=session.updated_unix_ms,
            ttl_seconds=session.ttl_seconds,
        )


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    model_type: str
    vocab_size: int
    num_layers: int
    num_experts: int
    experts_per_token: int
    max_context_length: int

    @classmethod
    def from_pb(cls, info: gateway_pb2.ModelInfo) -> Self:
        return cls(**{name: getattr(info, name) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Sampling:
    """Decoding controls; None leaves a field to the server's default (see SamplingParams in gateway.proto)."""

    max_new_tokens: int | None = None
    temperature: float | None = None  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    return_logprobs: bool = False
    ignore_eos: bool = False

    def to_pb(self) -> gateway_pb2.SamplingParams:
        optional = {
            name: getattr(self, name)
            for name in ("max_new_tokens", "temperature", "top_p", "top_k", "seed")
            if getattr(self, name) is not None
        }
        return gateway_pb2.SamplingParams(
            **optional, stop=list(self.stop), return_logprobs=self.return_logprobs, ignore_eos=self.ignore_eos
        )


def generate_request(prompt: str | list[int], sampling: Sampling | None, priority: int) -> gateway_pb2.GenerateRequest:
    """A text prompt, or token ids (used as they are)."""
    request = gateway_pb2.GenerateRequest(sampling=(sampling or Sampling()).to_pb(), priority=priority)
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids[:] = prompt
    return request


def chat_request(
    messages: str | Message | list[Message], session_id: str, sampling: Sampling | None, priority: int
) -> gateway_pb2.ChatRequest:
    """`messages`: this turn's new messages; a plain string is one user message."""
    if isinstance(messages, str):
        messages = Message("user", messages)
    if isinstance(messages, Message):
        messages = [messages]
    return gateway_pb2.ChatRequest(
        session_id=session_id,
        messages=[m.to_pb() for m in messages],
        sampling=(sampling or Sampling()).to_pb(),
        priority=priority,
    )
