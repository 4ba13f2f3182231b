"""`moemesh router`: hold the gates, keep a live table of expert replicas, serve."""

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moemesh import tracing
from moemesh.checkpoint import Checkpoint
from moemesh.compute_report import linear_kernel, weights_format
from moemesh.errors import CheckpointError
from moemesh.model import load_gates
from moemesh.moe import RoutedMoE
from moemesh.rpc import Service
from moemesh.settings import RouterSettings
from moemesh.telemetry import serve_metrics
from moemesh.tls import Tls
from moemesh.v1 import router_pb2_grpc
from services.router.dispatch import RemoteExperts
from services.router.placement import Discovery, Placement
from services.router.servicer import RouterServicer

CONNECT_TIMEOUT_S = 5.0  # one attempt to reach a replica; a replica not up yet is retried


@dataclass(frozen=True)
class ExpertServices:
    """Where a model's expert replicas are found and how they are called: what a router needs besides the gates."""

    registry: str | None  # Redis URL the replicas announce themselves in
    static: list[str]  # addresses of replicas that do not announce themselves
    start_timeout_s: float  # how long to wait at start for every expert to have a replica
    call_timeout_s: float  # deadline of one MoE layer's expert calls, resends included
    hedge_floor_s: float  # least time an expert call gets before it is hedged to another replica


def remote_moe(
    ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, wire: torch.dtype, services: ExpertServices, tls: Tls
) -> RoutedMoE:
    """The gates, and the expert services behind them: a router's work, in a router or in a gateway that routes
    itself. Returns once every (layer, expert) has a replica."""
    cfg = ckpt.config
    placement = Placement(
        cfg.moe_layers, cfg.num_experts, ckpt.fingerprint, CONNECT_TIMEOUT_S, services.hedge_floor_s,
        tls.channel_credentials(),
    )  # fmt: skip
    discovery = None
    if services.registry:
        discovery = Discovery(placement, tls.redis(services.registry, socket_timeout=2), services.static)
        discovery.start()
    wait_for_coverage(placement, services.static, services.start_timeout_s)
    executor = RemoteExperts(placement, dtype, wire, services.call_timeout_s, discovery)
    return RoutedMoE(load_gates(ckpt, dtype, device), executor, cfg.num_experts)


def create_service(settings: RouterSettings) -> Service:
    tls = settings.tls()
    device = settings.torch_device()
    ckpt = Checkpoint(settings.model)
    cfg = ckpt.config
    dtype = settings.compute_dtype(cfg.checkpoint_dtype, device)
    wire = settings.wire_torch_dtype(dtype)
    static = settings.experts + (read_placement_file(settings.placement_file) if settings.placement_file else [])
    services = ExpertServices(
        settings.registry, static, settings.start_timeout_s, settings.call_timeout_s, settings.hedge_floor_s
    )
    moe = remote_moe(ckpt, device, dtype, wire, services, tls)
    credentials = tls.server_credentials(require_client_auth=True)
    service = Service("router", settings.host, settings.port, credentials=credentials)
    servicer = RouterServicer(moe, cfg.hidden_size, device, dtype, wire)
    router_pb2_grpc.add_RouterServicer_to_server(servicer, service.server)
    return service


def read_placement_file(path: Path) -> list[str]:
    """Expert addresses for setups without a registry: one host:port per line, `#` starts a comment."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise CheckpointError(f"placement_file: cannot read {path} ({exc.strerror})") from None
    return [address for line in lines if (address := line.split("#", 1)[0].strip())]


def wait_for_coverage(placement: Placement, static: list[str], timeout_s: float) -> None:
    """Blocks until every (layer, expert) has a replica, connecting to the static addresses as they
    come up; fails naming the first (layer, expert) without one."""
    deadline = time.monotonic() + timeout_s
    while True:
        for address in static:
            placement.add(address)
        missing = placement.missing()
        if not missing:
            return
        if time.monotonic() > deadline:
            layer, expert = missing[0]
            raise CheckpointError(f"no expert service holds layer {layer} expert {expert} ({len(missing)} missing)")
        time.sleep(0.2)


def serve(settings: RouterSettings) -> None:
    settings.configure_compute()
    tracing.setup("moemesh-router")
    service = create_service(settings)
    checkpoint_dtype = Checkpoint(settings.model).config.checkpoint_dtype
    dtype = settings.compute_dtype(checkpoint_dtype, settings.torch_device())
    kernels = {"gates": linear_kernel(dtype, settings.torch_device())}
    settings.compute_report("router", checkpoint_dtype, weights_format(checkpoint_dtype, dtype), kernels).announce()
    serve_metrics("router", settings.host, settings.metrics_port)
    service.start()
    service.serve_until_signal(settings.grace_s)
