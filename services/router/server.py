"""`moemesh router`: hold the gates, find the expert replicas, serve."""

import torch

from moemesh.checkpoint import Checkpoint
from moemesh.model import load_gates
from moemesh.moe import RoutedMoE
from moemesh.rpc import Service
from moemesh.settings import RouterSettings
from moemesh.v1 import router_pb2_grpc
from services.router.dispatch import RemoteExperts
from services.router.placement import ExpertReplica, Placement
from services.router.servicer import RouterServicer


def create_service(settings: RouterSettings) -> Service:
    ckpt = Checkpoint(settings.model)
    cfg = ckpt.config
    dtype = settings.compute_dtype(cfg.checkpoint_dtype)
    wire = settings.wire_torch_dtype(dtype)
    replicas = [ExpertReplica.connect(a, ckpt.fingerprint, settings.call_timeout_s) for a in settings.experts]
    placement = Placement(replicas, cfg.moe_layers, cfg.num_experts)
    moe = RoutedMoE(
        load_gates(ckpt, dtype), RemoteExperts(placement, dtype, wire, settings.call_timeout_s), cfg.num_experts
    )
    service = Service("router", settings.host, settings.port)
    router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(moe, cfg.hidden_size, dtype, wire), service.server)
    return service


def serve(settings: RouterSettings) -> None:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    service = create_service(settings)
    service.start()
    service.serve_until_signal(settings.grace_s)
