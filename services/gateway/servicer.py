"""The public Gateway servicer: admits each call (concurrency limit, API key, quotas), converts messages,
delegates to the engine or the conversations, streams results."""

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from moemesh.config import ModelConfig
from moemesh.errors import NotFound, ResourceExhausted, Unavailable
from moemesh.rpc import map_errors
from moemesh.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway import requests
from services.gateway.chat import Conversations
from services.gateway.content.input_filter import InputFilter
from services.gateway.engine import Engine
from services.gateway.keys import Authenticator, KeyInfo
from services.gateway.observe import observed, record
from services.gateway.quotas import Quotas
from services.gateway.requests import StepOutput


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(
        self,
        engine: Engine,
        *,
        conversations: Conversations | None,
        limits: requests.Limits,
        cfg: ModelConfig,
        model_name: str,
        input_filter: InputFilter,
        auth: Authenticator,
        quotas: Quotas,
        max_concurrent: int,
    ):
        self.engine, self.conversations, self.limits = engine, conversations, limits
        self.input_filter, self.auth, self.quotas, self.max_concurrent = input_filter, auth, quotas, max_concurrent
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self.info = gateway_pb2.ModelInfo(
            model_name=model_name,
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            num_layers=cfg.num_layers,
            num_experts=cfg.num_experts,
            experts_per_token=cfg.experts_per_token,
            max_context_length=limits.max_context,
        )

    @map_errors
    @observed("Generate")
    def Generate(self, request: gateway_pb2.GenerateRequest, context: grpc.ServicerContext):
        with self._admitted(context) as key:
            return requests.merge(list(self._generate(request, context, key))).to_pb()

    @map_errors
    @observed("GenerateStream")
    def GenerateStream(self, request, context: grpc.ServicerContext) -> Iterator[gateway_pb2.GenerateResponse]:
        with self._admitted(context) as key:
            for output in self._generate(request, context, key):
                yield output.to_pb()

    @map_errors
    @observed("GetModelInfo")
    def GetModelInfo(self, request, context) -> gateway_pb2.ModelInfo:
        with self._admitted(context):
            return self.info

    @map_errors
    @observed("Chat")
    def Chat(self, request: gateway_pb2.ChatRequest, context) -> Iterator[gateway_pb2.GenerateResponse]:
        with self._admitted(context) as key:
            conversations = self._sessions()
            if request.session_id:
                requests.check_session_id(request.session_id)
            else:
                self.quotas.check_new_session(key)
            requests.check_chat_messages(request.messages, self.limits)
            key.check_priority(request.priority)
            self.quotas.admit(key)
            turn = conversations.turn(
                request.session_id, list(request.messages), request.sampling, key.id, context.add_callback,
                client_deadline(context), allow_system=key.allow_system, priority=request.priority,
            )  # fmt: skip
            used = 0
            try:
                for output in turn:
                    record(context).saw(output)  # observe: TTFT and token counts
                    if output.finish_reason:
                        used = output.prompt_tokens + output.completion_tokens
                        self.quotas.session_used(key, output.session_id)
                    yield output.to_pb()
            finally:
                self.quotas.charge(key, used)

    @map_errors
    @observed("GetSession")
    def GetSession(self, request: gateway_pb2.GetSessionRequest, context) -> gateway_pb2.Session:
        with self._admitted(context) as key:
            requests.check_session_id(request.session_id)
            return self._sessions().get(request.session_id, key.id)

    @map_errors
    @observed("DeleteSession")
    def DeleteSession(self, request: gateway_pb2.DeleteSessionRequest, context) -> gateway_pb2.DeleteSessionResponse:
        with self._admitted(context) as key:
            requests.check_session_id(request.session_id)
            if not self._sessions().delete(request.session_id, key.id):
                raise NotFound(f"session_id: no session {request.session_id!r} (unknown, expired or deleted)")
            self.quotas.session_deleted(key, request.session_id)
            return gateway_pb2.DeleteSessionResponse(deleted=True)

    @contextmanager
    def _admitted(self, context: grpc.ServicerContext) -> Iterator[KeyInfo]:
        """Holds one of the gateway's call slots and one of the caller's key's for the whole call.

        Calls beyond `max_concurrent` are refused at once rather than queued, so the threads kept apart
        for health checks are never taken by them."""
        if not self._slots.acquire(blocking=False):
            raise ResourceExhausted(f"the gateway is serving its limit of {self.max_concurrent} calls; retry later")
        try:
            key = self.auth.authenticate(context.invocation_metadata())
            record(context).key_id = key.id  # observe
            with self.quotas.stream(key):
                yield key
        finally:
            self._slots.release()

    def _generate(self, request, context: grpc.ServicerContext, key: KeyInfo) -> Iterator[StepOutput]:
        if request.prompt and not request.prompt_token_ids and len(request.prompt) <= self.limits.max_prompt_chars:
            request.prompt = self.input_filter.apply("prompt", request.prompt)  # token ids are taken as they are
        parsed = requests.from_pb(request, self.engine.text, self.limits)
        key.check_priority(parsed.priority)
        self.quotas.admit(key)
        seq = self.engine.submit(parsed, None, client_deadline(context))
        context.add_callback(lambda: self.engine.cancel(seq))  # the client went away: leave the batch
        try:
            for output in seq.outputs():
                record(context).saw(output)  # observe: TTFT and token counts
                yield output
        finally:
            self.quotas.charge(key, len(seq.prompt_ids) + len(seq.output_ids))

    def _sessions(self) -> Conversations:
        if self.conversations is None:
            raise Unavailable("sessions need Redis: start the gateway with --redis URL")
        return self.conversations


def client_deadline(context: grpc.ServicerContext) -> float | None:
    """The client's deadline as time.monotonic(), which the engine's internal calls inherit."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
