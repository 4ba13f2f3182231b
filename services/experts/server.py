"""`moemesh expert`: bind the port (health NOT_SERVING), load the shard, then serve it (SERVING)."""

from moemesh import faults, tracing
from moemesh.checkpoint import Checkpoint
from moemesh.compute_report import module_kernels, weights_format
from moemesh.compute_threads import in_passing_thread
from moemesh.registry import Registration, advertised_address
from moemesh.rpc import Service
from moemesh.settings import ExpertSettings
from moemesh.telemetry import serve_metrics
from moemesh.v1 import expert_pb2_grpc
from services.experts.servicer import ExpertServicer
from services.experts.shard import ExpertShard


def create_service(settings: ExpertSettings, load: bool = True) -> tuple[Service, ExpertServicer]:
    """The service and its servicer; the shard is loaded now, or with `load=False` by `load_shard` later."""
    device = settings.torch_device()
    ckpt = Checkpoint(settings.model)
    dtype = settings.compute_dtype(ckpt.config.checkpoint_dtype, device)
    credentials = settings.tls().server_credentials(require_client_auth=True)
    service = Service(
        "expert", settings.host, settings.port, credentials=credentials, interceptors=faults.expert_interceptors()
    )
    servicer = ExpertServicer(None, device, dtype, settings.wire_torch_dtype(dtype))
    expert_pb2_grpc.add_ExpertServicer_to_server(servicer, service.server)
    if load:
        load_shard(settings, servicer)
    return service, servicer


def load_shard(settings: ExpertSettings, servicer: ExpertServicer) -> None:
    faults.delay_load()
    ckpt = Checkpoint(settings.model)
    # In a passing thread: the handler threads that compute hold the process's only OpenMP pool
    # (`moemesh.compute_threads`)
    shard = in_passing_thread(
        lambda: ExpertShard.load(ckpt, settings.shard, servicer.compute_dtype, servicer.device, settings.quantize)
    )
    servicer.set_shard(shard)


def announce_compute(settings: ExpertSettings, ckpt: Checkpoint, servicer: ExpertServicer) -> None:
    dtype, device = servicer.compute_dtype, servicer.device
    experts = servicer.shard.run.experts.values()
    kernels = {"experts": module_kernels(experts, dtype, device)}
    stored = ckpt.quant.describe() if ckpt.quantized else None
    weights = weights_format(ckpt.config.checkpoint_dtype, dtype, settings.quantize, stored, experts)
    settings.compute_report("expert", ckpt.config.checkpoint_dtype, weights, kernels).announce()


def serve(settings: ExpertSettings) -> None:
    settings.configure_compute()
    tracing.setup("moemesh-expert")
    service, servicer = create_service(settings, load=False)
    serve_metrics("expert", settings.host, settings.metrics_port)
    # Health checks are answered (NOT_SERVING) while the shard loads; SERVING and the ready line once loaded.
    service.start(ready=False)
    print(f"expert loading shard {settings.shard} on {service.address}", flush=True)
    load_shard(settings, servicer)
    shard = servicer.shard
    announce_compute(settings, Checkpoint(settings.model), servicer)
    service.ready()
    registration = None
    if settings.registry:
        info = {"fingerprint": shard.fingerprint, "layers": shard.layers}
        client = settings.tls().redis(settings.registry, socket_timeout=2)
        registration = Registration(client, settings.advertise or advertised_address(settings.host, service.port), info)
        registration.start()
    service.serve_until_signal(settings.grace_s, before_drain=registration.stop if registration else None)
