"""Multi-turn conversations: a session's history in Redis, its KV cache reused on any gateway replica."""

import time
from collections.abc import Callable, Iterator

from moemesh import tracing
from moemesh.errors import Aborted, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, Unavailable
from moemesh.model import KVCache
from moemesh.v1 import gateway_pb2
from services.gateway import metrics, requests
from services.gateway.chat_encoding import ChatEncoder
from services.gateway.chat_template import ChatTemplate
from services.gateway.content.input_filter import InputFilter
from services.gateway.engine import Engine
from services.gateway.kv_store import KVStore
from services.gateway.requests import StepOutput
from services.gateway.sessions import SessionState, SessionStore, TurnLock

ROLES = ("system", "user", "assistant")
# Pauses between the attempts to save a finished turn while Redis is unreachable: 4 attempts over ~3 s.
SAVE_PAUSES_S = (0.25, 0.75, 2.0)


class Conversations:
    def __init__(
        self,
        engine: Engine,
        *,
        store: SessionStore,
        kv: KVStore,
        template: ChatTemplate | None,
        limits: requests.Limits,
        max_turns: int,
        max_tokens: int,
        input_filter: InputFilter | None = None,
        system_prompt: str = "",
    ):
        """`system_prompt`: the deployment's, first in every rendered conversation (not stored in sessions)."""
        self.engine, self.store, self.kv, self.template, self.limits = engine, store, kv, template, limits
        self.encoder = ChatEncoder(template, engine.text) if template and engine.text else None
        self.max_turns, self.max_tokens = max_turns, max_tokens
        self.input_filter = input_filter or InputFilter()
        self.system_prompt = system_prompt

    def turn(
        self,
        session_id: str,
        messages: list[gateway_pb2.Message],
        sampling: gateway_pb2.SamplingParams,
        owner: str,
        on_cancel: Callable[[Callable[[], None]], object],
        deadline: float | None = None,
        *,
        allow_system: bool = True,
        priority: int = 0,
    ) -> Iterator[StepOutput]:
        """Streams the reply to `messages`; the session is saved only when the turn completes.

        The messages' contents pass the input filter first: the session stores them as filtered. If the
        finished turn cannot be saved, the client still gets the whole reply, then the error.
        `allow_system`: whether the caller may send system messages; `priority`: the engine's (lower first).
        """
        if self.encoder is None:
            raise InvalidArgument("messages: this model has no chat template; use Generate")
        new_messages = _check_messages(messages, allow_system)
        for i, message in enumerate(new_messages):
            message["content"] = self.input_filter.apply(f"messages[{i}].content", message["content"])
        new_session = not session_id
        session_id = session_id or self.store.new_id()
        with self.store.turn_lock(session_id) as lock:
            with tracing.span("session.load"):
                state = SessionState(session_id, owner) if new_session else self.store.load(session_id, owner)
            if state.turns >= self.max_turns:
                raise ResourceExhausted(
                    f"session_id: session {session_id!r} reached its limit of {self.max_turns} turns"
                )
            history = state.messages + new_messages
            prompt = self.encoder.encode(self._with_system_prompt(history), add_generation_prompt=True)
            if len(prompt) > self.max_tokens:
                raise ResourceExhausted(
                    f"session_id: the conversation is {len(prompt)} tokens, over the session limit of {self.max_tokens}"
                )
            request = requests.with_sampling(prompt, sampling, self.engine.text, self.limits, priority)
            cache = self.engine.new_cache(request)
            with tracing.span("session.kv_load") as span:
                cached = self.kv.load(session_id, prompt, state.token_ids, cache)
                if span is not None:
                    span.set_attribute("moemesh.cached_tokens", cached)
            metrics.SESSION_KV_HIT_TOKENS.inc(cached)
            metrics.SESSION_KV_MISS_TOKENS.inc(len(prompt) - cached)
            seq = self.engine.submit(request, cache, deadline)
            on_cancel(lambda: self.engine.cancel(seq))
            reply = []
            for output in seq.outputs():
                output.session_id = session_id
                reply.append(output.text)
                if output.finish_reason:
                    state.messages = history + [{"role": "assistant", "content": "".join(reply)}]
                    state.token_ids = prompt + seq.output_ids
                    state.turns += 1
                    try:
                        with tracing.span("session.store"):
                            self._save_turn(lock, state, seq.cache, cached)
                    except (Unavailable, Aborted) as exc:
                        yield output
                        raise type(exc)(
                            f"the reply is complete but the turn was not saved ({exc}); "
                            "the next turn continues from the last saved turn"
                        ) from None
                yield output

    def _with_system_prompt(self, history: list[dict[str, str]]) -> list[dict[str, str]]:
        """The deployment's system prompt first; a client's leading system message joins it (after a blank
        line), since many templates take only one system message, at the start."""
        if not self.system_prompt:
            return history
        if history and history[0]["role"] == "system":
            return [{"role": "system", "content": f"{self.system_prompt}\n\n{history[0]['content']}"}, *history[1:]]
        return [{"role": "system", "content": self.system_prompt}, *history]

    def _save_turn(self, lock: TurnLock, state: SessionState, cache: KVCache, cached: int) -> None:
        """Saves the KV chunks, then the session, retrying while Redis is unreachable.

        The chunks are only a cache: when they cannot be written but the session can, the turn is
        saved without them (the next turn recomputes what it misses). A lost lock is final.
        """
        kv_saved = False
        for pause in (*SAVE_PAUSES_S, None):
            try:
                kv_saved = kv_saved or self._save_kv(state, cache, cached)
                self.store.save(state, lock)
                return
            except Unavailable:
                if pause is None:
                    raise
                time.sleep(pause)

    def _save_kv(self, state: SessionState, cache: KVCache, cached: int) -> bool:
        try:
            self.kv.save(state.id, cache, state.token_ids, cached)
            return True
        except Unavailable:
            return False

    def get(self, session_id: str, owner: str) -> gateway_pb2.Session:
        state = self.store.load(session_id, owner)
        return gateway_pb2.Session(
            session_id=state.id,
            messages=[gateway_pb2.Message(role=m["role"], content=m["content"]) for m in state.messages],
            token_count=len(state.token_ids),
            turns=state.turns,
            created_unix_ms=state.created_ms,
            updated_unix_ms=state.updated_ms,
            ttl_seconds=self.store.ttl(session_id),
        )

    def delete(self, session_id: str, owner: str) -> bool:
        try:
            state = self.store.load(session_id, owner)
        except NotFound:
            return False
        with self.store.turn_lock(session_id):
            self.store.delete(state, self.kv.keys(session_id, len(state.token_ids)))
        return True


def _check_messages(messages: list[gateway_pb2.Message], allow_system: bool) -> list[dict[str, str]]:
    if not messages:
        raise InvalidArgument("messages: empty; send at least one message")
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role: {m.role!r} is not one of {', '.join(ROLES)}")
        if m.role == "system" and not allow_system:
            raise PermissionDenied(f"messages[{i}].role: this client may not send system messages")
    return [{"role": m.role, "content": m.content} for m in messages]
