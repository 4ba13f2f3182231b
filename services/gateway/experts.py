"""Where the gateway's routed experts are: the one place that chooses, from the settings, among

- **local**: every routed expert in the gateway's own process (no `--router`, no `--registry`);
- **routers**: `--router` addresses; each MoE layer's hidden states go to a router (`RouterClient`), which gates
  them and calls the expert services;
- **self-routed**: `--registry` without a router; the gateway computes the gates itself and calls the expert
  services announced in Redis (`remote_moe`, the router's own code).

The rest of the gateway asks the `ExpertBackend` (remote or not, what to probe for readiness, how to describe it)
instead of testing the settings again.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from moemesh.checkpoint import Checkpoint
from moemesh.compute_report import module_kernels
from moemesh.compute_threads import in_passing_thread
from moemesh.model import RoutedExperts, load_experts, load_gates
from moemesh.moe import LocalExperts, RoutedMoE
from moemesh.settings import GatewaySettings
from services.gateway.router_client import RouterClient
from services.router.server import ExpertServices, remote_moe

Mode = Literal["local", "routers", "self-routed"]


@dataclass
class ExpertBackend:
    """The routed experts of an MoE layer (`RoutedExperts`), and what the gateway needs to know about them."""

    mode: Mode
    routed: RoutedExperts
    routers: list[str] = field(default_factory=list)  # what readiness probes; empty: nothing to probe

    @property
    def is_remote(self) -> bool:
        return self.mode != "local"

    def submit(self, layer: int, hidden: torch.Tensor, deadline: float | None) -> Callable[[], torch.Tensor]:
        return self.routed.submit(layer, hidden, deadline)

    def describe(self, dtype: torch.dtype, device: torch.device) -> str:
        """The experts' line of the gateway's compute report."""
        if self.mode == "routers":
            return f"the routers at {','.join(self.routers)}"
        if self.mode == "self-routed":
            return "the expert services of the registry, called by this gateway"
        assert isinstance(self.routed, RoutedMoE) and isinstance(self.routed.executor, LocalExperts)
        return f"in this process: {module_kernels(self.routed.executor.experts.values(), dtype, device)}"

    def close(self) -> None:
        close = getattr(self.routed, "close", None)
        if close is not None:
            close()


def connect_experts(
    settings: GatewaySettings, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype
) -> ExpertBackend:
    """The experts `settings` name (waiting for a router to accept connections, or loading local weights in a
    passing thread, so that the engine's is the one thread with an OpenMP pool: `moemesh.compute_threads`)."""
    if settings.router:
        routers = settings.router.split(",")
        credentials = settings.tls().channel_credentials()
        RouterClient.wait_ready(routers, settings.router_timeout_s, credentials)
        client = RouterClient(
            routers, device, dtype, settings.wire_torch_dtype(dtype), settings.router_timeout_s,
            settings.hedge_floor_s, credentials,
        )  # fmt: skip
        return ExpertBackend("routers", client, routers)
    if settings.registry:
        return ExpertBackend("self-routed", in_passing_thread(lambda: registry_experts(settings, ckpt, device, dtype)))
    return ExpertBackend("local", in_passing_thread(lambda: local_experts(ckpt, dtype, device, settings.quantize)))


def registry_experts(
    settings: GatewaySettings, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype
) -> RoutedMoE:
    """The gates, and the expert services announced in `settings.registry`, called by this gateway itself."""
    services = ExpertServices(
        settings.registry, [], settings.router_timeout_s, settings.router_timeout_s, settings.hedge_floor_s
    )
    return remote_moe(ckpt, device, dtype, settings.wire_torch_dtype(dtype), services, settings.tls())


def local_experts(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, quantize: str = "none") -> RoutedMoE:
    """Every routed expert, in this process (a gateway without a router)."""
    cfg = ckpt.config
    pairs = [(layer, e) for layer in cfg.moe_layers for e in range(cfg.num_experts)]
    experts = LocalExperts(load_experts(ckpt, pairs, dtype, device, quantize))
    return RoutedMoE(load_gates(ckpt, dtype, device), experts, cfg.num_experts)
