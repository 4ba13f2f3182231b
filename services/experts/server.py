"""`moemesh expert`: load a shard and serve it."""

import signal

import torch

from moemesh import tracing
from moemesh.checkpoint import Checkpoint
from moemesh.registry import Registration
from moemesh.rpc import Service
from moemesh.settings import ExpertSettings
from moemesh.v1 import expert_pb2_grpc
from services.experts.servicer import ExpertServicer
from services.experts.shard import ExpertShard


def create_service(settings: ExpertSettings) -> tuple[Service, ExpertServicer]:
    ckpt = Checkpoint(settings.model)
    dtype = settings.compute_dtype(ckpt.config.checkpoint_dtype)
    shard = ExpertShard.load(ckpt, settings.shard, dtype, settings.quantize)
    credentials = settings.tls().server_credentials(require_client_auth=True)
    service = Service("expert", settings.host, settings.port, credentials=credentials)
    servicer = ExpertServicer(shard, dtype, settings.wire_torch_dtype(dtype), settings.fault_slowdown)
    expert_pb2_grpc.add_ExpertServicer_to_server(servicer, service.server)
    return service, servicer


def serve(settings: ExpertSettings) -> None:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    tracing.setup("moemesh-expert")
    service, servicer = create_service(settings)
    shard = servicer.shard
    if settings.fault_slowdown != 1.0:
        signal.signal(signal.SIGUSR1, lambda *_: servicer.toggle_slowdown())
    service.start()
    registration = None
    if settings.registry:
        info = {"fingerprint": shard.fingerprint, "layers": shard.layers}
        client = settings.tls().redis(settings.registry, socket_timeout=2)
        registration = Registration(client, settings.advertise or service.address, info)
        registration.start()
    service.serve_until_signal(settings.grace_s, before_drain=registration.stop if registration else None)
