"""Generation requests as the engine sees them, converted from and to the public messages.

All request validation happens here, so every bad field is reported as INVALID_ARGUMENT with the
field's name and the limit it broke.
"""

import math
import re
from dataclasses import dataclass, field, fields

from moemesh.config import ModelConfig
from moemesh.errors import InvalidArgument
from moemesh.settings import GatewaySettings
from moemesh.v1 import gateway_pb2
from services.gateway.text import TextCodec


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What one request may ask for: the model's (vocabulary, context) and the deployment's hard limits, whose
    names are those of `GatewaySettings`."""

    vocab_size: int
    max_context: int
    default_max_new_tokens: int
    max_new_tokens_limit: int
    max_prompt_chars: int = 200_000
    max_stop_strings: int = 8
    max_stop_chars: int = 128
    max_temperature: float = 2.0
    max_chat_messages: int = 64
    max_message_chars: int = 32_000

    @classmethod
    def from_settings(cls, settings: GatewaySettings, cfg: ModelConfig) -> "Limits":
        """The model's limits, and the settings' fields of the same names (`max_context` 0: the model's)."""
        shared = {f.name for f in fields(cls)} - {"vocab_size", "max_context"}
        return cls(
            vocab_size=cfg.vocab_size,
            max_context=settings.max_context or cfg.max_position_embeddings,
            **{name: getattr(settings, name) for name in shared},
        )


SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    return_logprobs: bool = False
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    sampling: SamplingConfig
    priority: int = 0  # lower values are admitted and prefilled first


@dataclass
class StepOutput:
    """What one engine step produced for one sequence; the last one carries `finish_reason`."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    session_id: str = ""

    def to_pb(self) -> gateway_pb2.GenerateResponse:
        msg = gateway_pb2.GenerateResponse(
            text=self.text, token_ids=self.token_ids, logprobs=self.logprobs, finish_reason=self.finish_reason
        )
        msg.session_id = self.session_id
        if self.finish_reason:
            msg.usage.prompt_tokens = self.prompt_tokens
            msg.usage.completion_tokens = self.completion_tokens
            msg.usage.cached_tokens = self.cached_tokens
        return msg


def merge(outputs: list[StepOutput]) -> StepOutput:
    last = outputs[-1]
    return StepOutput(
        token_ids=[t for o in outputs for t in o.token_ids],
        logprobs=[p for o in outputs for p in o.logprobs],
        text="".join(o.text for o in outputs),
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        cached_tokens=last.cached_tokens,
        session_id=last.session_id,
    )


def from_pb(msg: gateway_pb2.GenerateRequest, text: TextCodec | None, limits: Limits) -> GenerationRequest:
    if msg.session_id:
        raise InvalidArgument("session_id: Generate keeps no session; use Chat for multi-turn conversations")
    return with_sampling(_prompt_from_pb(msg, text, limits), msg.sampling, text, limits, msg.priority)


def check_session_id(session_id: str) -> None:
    """Session ids are what `Chat` hands out: 1-64 letters, digits, `-` or `_`."""
    if not SESSION_ID.fullmatch(session_id):
        raise InvalidArgument("session_id: must be 1-64 characters of A-Z, a-z, 0-9, '-' or '_'")


def check_chat_messages(messages, limits: Limits) -> None:
    """The size limits of one Chat request's messages."""
    if len(messages) > limits.max_chat_messages:
        raise InvalidArgument(f"messages: {len(messages)} messages, over the limit of {limits.max_chat_messages}")
    for i, m in enumerate(messages):
        if len(m.content) > limits.max_message_chars:
            raise InvalidArgument(
                f"messages[{i}].content: {len(m.content)} characters, over the limit of {limits.max_message_chars}"
            )


def _prompt_from_pb(msg: gateway_pb2.GenerateRequest, text: TextCodec | None, limits: Limits) -> list[int]:
    if msg.prompt_token_ids:
        prompt_ids = list(msg.prompt_token_ids)
        for i, token in enumerate(prompt_ids):
            if not 0 <= token < limits.vocab_size:
                raise InvalidArgument(
                    f"prompt_token_ids[{i}]: {token} is outside the vocabulary [0, {limits.vocab_size})"
                )
    elif msg.prompt:
        if len(msg.prompt) > limits.max_prompt_chars:
            raise InvalidArgument(f"prompt: {len(msg.prompt)} characters, over the limit of {limits.max_prompt_chars}")
        if text is None:
            raise InvalidArgument("prompt: this model has no tokenizer.json; send prompt_token_ids instead")
        prompt_ids = text.encode_data(msg.prompt)  # control-token text in a prompt stays text
    else:
        raise InvalidArgument("prompt: empty; set prompt or prompt_token_ids")
    return prompt_ids


def with_sampling(
    prompt_ids: list[int], msg: gateway_pb2.SamplingParams, text: TextCodec | None, limits: Limits, priority: int = 0
) -> GenerationRequest:
    """The request for a tokenized prompt, its sampling checked against the limits and the context left."""
    room = limits.max_context - len(prompt_ids)
    if room < 1:
        raise InvalidArgument(
            f"prompt: {len(prompt_ids)} tokens leave no room in the context length {limits.max_context}"
        )
    sampling = _sampling_from_pb(msg, text, limits, room)
    total = len(prompt_ids) + sampling.max_new_tokens
    if total > limits.max_context:
        raise InvalidArgument(
            f"sampling.max_new_tokens: prompt ({len(prompt_ids)} tokens) + max_new_tokens "
            f"({sampling.max_new_tokens}) = {total} exceeds the context length {limits.max_context}"
        )
    return GenerationRequest(prompt_ids, sampling, priority)


def _sampling_from_pb(
    msg: gateway_pb2.SamplingParams, text: TextCodec | None, limits: Limits, room: int
) -> SamplingConfig:
    """`room`: context positions left after the prompt; an unset max_new_tokens is capped by it."""
    max_new = msg.max_new_tokens if msg.HasField("max_new_tokens") else min(limits.default_max_new_tokens, room)
    if not 1 <= max_new <= limits.max_new_tokens_limit:
        raise InvalidArgument(f"sampling.max_new_tokens: {max_new} is outside [1, {limits.max_new_tokens_limit}]")
    temperature = msg.temperature if msg.HasField("temperature") else 0.0
    if not 0 <= temperature <= limits.max_temperature:  # also refuses nan and inf
        raise InvalidArgument(
            f"sampling.temperature: {temperature} is outside [0, {limits.max_temperature:g}] (0 is greedy)"
        )
    top_p = msg.top_p if msg.HasField("top_p") else 1.0
    if math.isnan(top_p) or not 0.0 < top_p <= 1.0:
        raise InvalidArgument(f"sampling.top_p: {top_p} is outside (0, 1]")
    top_k = msg.top_k if msg.HasField("top_k") else 0
    if top_k > limits.vocab_size:
        raise InvalidArgument(f"sampling.top_k: {top_k} exceeds the vocabulary size {limits.vocab_size}")
    stop = tuple(msg.stop)
    if stop and text is None:
        raise InvalidArgument("sampling.stop: this model has no tokenizer.json, so stop strings cannot match")
    if any(not s for s in stop):
        raise InvalidArgument("sampling.stop: stop strings must not be empty")
    if len(stop) > limits.max_stop_strings:
        raise InvalidArgument(f"sampling.stop: {len(stop)} stop strings, over the limit of {limits.max_stop_strings}")
    if (longest := max(map(len, stop), default=0)) > limits.max_stop_chars:
        raise InvalidArgument(
            f"sampling.stop: a stop string of {longest} characters, over the limit of {limits.max_stop_chars}"
        )
    return SamplingConfig(
        max_new_tokens=max_new,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=stop,
        return_logprobs=msg.return_logprobs,
        ignore_eos=msg.ignore_eos,
    )
