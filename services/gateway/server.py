"""`moemesh gateway`: load the dense model, connect the routed experts, serve the public API."""

import torch
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from moemesh.checkpoint import Checkpoint
from moemesh.model import DenseModel, RoutedExperts, load_experts, load_gates
from moemesh.moe import LocalExperts, RoutedMoE
from moemesh.rpc import Service
from moemesh.settings import GatewaySettings
from moemesh.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.chat_template import eos_token_ids
from services.gateway.engine import Engine, EngineConfig
from services.gateway.requests import Limits
from services.gateway.router_client import RouterClient
from services.gateway.servicer import GatewayServicer
from services.gateway.text import TextCodec


def build_engine(settings: GatewaySettings) -> tuple[Engine, Checkpoint]:
    """The engine over the dense model, with the experts behind the router or, without one, in-process."""
    ckpt = Checkpoint(settings.model)
    cfg = ckpt.config
    dtype = settings.compute_dtype(cfg.checkpoint_dtype)
    routed: RoutedExperts
    if settings.router:
        RouterClient.wait_ready(settings.router, settings.router_timeout_s)
        routed = RouterClient(settings.router, dtype, settings.wire_torch_dtype(dtype), settings.router_timeout_s)
    else:
        pairs = [(layer, e) for layer in cfg.moe_layers for e in range(cfg.num_experts)]
        routed = RoutedMoE(load_gates(ckpt, dtype), LocalExperts(load_experts(ckpt, pairs, dtype)), cfg.num_experts)
    config = EngineConfig(settings.max_batch_seqs, settings.max_batch_tokens, settings.max_waiting)
    text = TextCodec.from_dir(settings.model)
    eos_ids = eos_token_ids(settings.model, text.tokenizer) if text else cfg.eos_token_ids
    engine = Engine(DenseModel.from_checkpoint(ckpt, dtype), routed, config, text, eos_ids)
    return engine, ckpt


def create_service(settings: GatewaySettings) -> tuple[Service, Engine]:
    engine, ckpt = build_engine(settings)
    cfg = ckpt.config
    limits = Limits(
        vocab_size=cfg.vocab_size,
        max_context=settings.max_context or cfg.max_position_embeddings,
        default_max_new_tokens=settings.default_max_new_tokens,
        max_new_tokens_limit=settings.max_new_tokens_limit,
    )
    service = Service("gateway", settings.host, settings.port, workers=settings.workers)
    servicer = GatewayServicer(engine, limits, cfg, ckpt.dir.name)
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, service.server)
    names = (
        gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name,
        "grpc.health.v1.Health",
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, service.server)
    return service, engine


def serve(settings: GatewaySettings) -> None:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    service, engine = create_service(settings)
    if settings.metrics_port >= 0:
        server, _ = start_http_server(settings.metrics_port, addr=settings.host)
        print(f"gateway metrics on {settings.host}:{server.server_port}", flush=True)
    engine.start()
    service.start()
    service.serve_until_signal(settings.grace_s)
    engine.stop()
