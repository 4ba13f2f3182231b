"""The public Gateway servicer: converts messages, delegates to the engine, streams results."""

import time
from collections.abc import Iterator

import grpc

from moemesh.config import ModelConfig
from moemesh.errors import Unavailable
from moemesh.rpc import map_errors
from moemesh.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway import requests
from services.gateway.chat import Conversations
from services.gateway.content.input_filter import InputFilter
from services.gateway.engine import Engine, Sequence

ANONYMOUS = "anonymous"  # the owner of every session until API keys exist


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(
        self,
        engine: Engine,
        conversations: Conversations | None,
        limits: requests.Limits,
        cfg: ModelConfig,
        model_name: str,
        input_filter: InputFilter,
    ):
        self.engine, self.conversations, self.limits = engine, conversations, limits
        self.input_filter = input_filter
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
    def Generate(self, request: gateway_pb2.GenerateRequest, context: grpc.ServicerContext):
        seq = self._submit(request, context)
        return requests.merge(list(seq.outputs())).to_pb()

    @map_errors
    def GenerateStream(self, request, context: grpc.ServicerContext) -> Iterator[gateway_pb2.GenerateResponse]:
        seq = self._submit(request, context)
        for output in seq.outputs():
            yield output.to_pb()

    @map_errors
    def GetModelInfo(self, request, context) -> gateway_pb2.ModelInfo:
        return self.info

    @map_errors
    def Chat(self, request: gateway_pb2.ChatRequest, context) -> Iterator[gateway_pb2.GenerateResponse]:
        turn = self._sessions().turn(
            request.session_id, list(request.messages), request.sampling, ANONYMOUS, context.add_callback,
            client_deadline(context), allow_system=True,
        )  # fmt: skip
        for output in turn:
            yield output.to_pb()

    @map_errors
    def GetSession(self, request: gateway_pb2.GetSessionRequest, context) -> gateway_pb2.Session:
        return self._sessions().get(request.session_id, ANONYMOUS)

    @map_errors
    def DeleteSession(self, request: gateway_pb2.DeleteSessionRequest, context) -> gateway_pb2.DeleteSessionResponse:
        return gateway_pb2.DeleteSessionResponse(deleted=self._sessions().delete(request.session_id, ANONYMOUS))

    def _sessions(self) -> Conversations:
        if self.conversations is None:
            raise Unavailable("sessions need Redis: start the gateway with --redis URL")
        return self.conversations

    def _submit(self, request: gateway_pb2.GenerateRequest, context: grpc.ServicerContext) -> Sequence:
        if request.prompt and not request.prompt_token_ids:  # token ids are taken as they are
            request.prompt = self.input_filter.apply("prompt", request.prompt)
        seq = self.engine.submit(
            requests.from_pb(request, self.engine.text, self.limits), None, client_deadline(context)
        )
        context.add_callback(lambda: self.engine.cancel(seq))  # the client went away: leave the batch
        return seq


def client_deadline(context: grpc.ServicerContext) -> float | None:
    """The client's deadline as time.monotonic(), which the engine's internal calls inherit."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
