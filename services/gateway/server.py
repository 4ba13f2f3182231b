"""`moemesh gateway`: load the dense model, connect the routed experts, serve the public API."""

from dataclasses import replace
from pathlib import Path

import redis
from grpc_reflection.v1alpha import reflection
from redis.backoff import NoBackoff
from redis.retry import Retry

from moemesh import faults, hardware, ports, tracing
from moemesh.checkpoint import Checkpoint
from moemesh.compute_report import attention_kernel, module_kernels, weights_format
from moemesh.compute_threads import in_passing_thread
from moemesh.errors import ConfigError
from moemesh.model import DenseModel
from moemesh.rpc import Service
from moemesh.settings import GatewaySettings
from moemesh.telemetry import serve_metrics
from moemesh.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.chat import Conversations
from services.gateway.chat_template import ChatTemplate, eos_token_ids
from services.gateway.content.config import ContentControls, load_controls
from services.gateway.engine import Engine, EngineConfig
from services.gateway.experts import ExpertBackend, connect_experts
from services.gateway.health import Readiness
from services.gateway.keys import Authenticator, KeyFile, KeyStore, RedisKeys
from services.gateway.kv_store import KVStore, load_client
from services.gateway.quotas import Quotas
from services.gateway.request_trace import ServerSpans
from services.gateway.requests import Limits
from services.gateway.servicer import GatewayServicer
from services.gateway.sessions import SessionStore
from services.gateway.text import TextCodec

GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
KV_SHARE_OF_FREE_MEMORY = 0.4  # the default KV budget: this share of the memory free when the gateway starts
HEALTH_THREADS = 32  # server threads beyond the Gateway calls' limit: health checks and reflection always get one


def build_engine(settings: GatewaySettings, controls: ContentControls | None = None) -> tuple[Engine, Checkpoint]:
    """The engine over the dense model and the experts the settings name (`connect_experts`), with the output
    rules of `controls` (default: those of `settings.input_filter`). Weights are loaded in passing threads, so
    that the engine's is the one thread with an OpenMP pool (`moemesh.compute_threads`)."""
    controls = controls or load_controls(settings.input_filter)
    device = settings.torch_device()
    ckpt = Checkpoint(settings.model)
    cfg = ckpt.config
    dtype = settings.compute_dtype(cfg.checkpoint_dtype, device)
    experts = connect_experts(settings, ckpt, device, dtype)
    config = EngineConfig(
        max_batch_seqs=settings.max_batch_seqs,
        max_batch_tokens=settings.max_batch_tokens,
        max_waiting=settings.max_waiting,
        max_decode_stall_s=settings.max_decode_stall_ms / 1000,
        kv_cache_bytes=settings.kv_cache_bytes
        or int(KV_SHARE_OF_FREE_MEMORY * hardware.available_memory_bytes(device)),
        micro_batches=settings.micro_batches,
        micro_batch_min_tokens=settings.micro_batch_min_tokens,
        one_thread_step_tokens=settings.one_thread_step_tokens if experts.is_remote else 0,
    )
    text = TextCodec.from_dir(settings.model)
    eos_ids = eos_token_ids(settings.model, text.tokenizer) if text else cfg.eos_token_ids
    dense = in_passing_thread(lambda: DenseModel.from_checkpoint(ckpt, dtype, device, settings.quantize))
    engine = Engine(dense, experts, config, text, eos_ids, controls.output)
    return engine, ckpt


def experts_of(engine: Engine) -> ExpertBackend:
    """The backend `build_engine` gave the engine."""
    assert isinstance(engine.routed, ExpertBackend)
    return engine.routed


def redis_client(settings: GatewaySettings) -> redis.Redis | None:
    """The client of sessions, keys and quotas (connections open lazily, and reopen)."""
    if not settings.redis:
        return None
    # One immediate retry (a connection Redis dropped); waiting for Redis to come back is up to the
    # callers (a finished turn's save retries), so a hung Redis costs a call seconds, not a minute.
    return settings.tls().redis(settings.redis, socket_timeout=5, socket_connect_timeout=2, retry=Retry(NoBackoff(), 1))


def conversations(
    settings: GatewaySettings,
    engine: Engine,
    ckpt: Checkpoint,
    limits: Limits,
    controls: ContentControls | None = None,
    client: redis.Redis | None = None,
) -> Conversations | None:
    """Sessions in Redis, when a Redis URL is configured (through `client`, or a client of their own), with
    the input filter of `controls` (default: that of `settings.input_filter`)."""
    client = client or redis_client(settings)
    if client is None:
        return None
    controls = controls or load_controls(settings.input_filter)
    loads = load_client(settings.redis, settings.tls())
    cfg = ckpt.config
    tag = f"{ckpt.fingerprint}:{str(engine.dtype).removeprefix('torch.')}"
    windows = {cfg.window(layer) for layer in range(cfg.num_layers)}
    window = None if None in windows else max(windows)  # a layer without a window sees every position
    return Conversations(
        engine,
        store=SessionStore(client, settings.session_ttl_s, settings.session_lock_ttl_s),
        kv=KVStore(client, loads, tag, settings.kv_chunk_tokens, settings.session_ttl_s, window),
        template=ChatTemplate.from_dir(settings.model),
        limits=limits,
        max_turns=settings.max_session_turns,
        max_tokens=settings.max_session_tokens or limits.max_context,
        input_filter=controls.input,
        system_prompt=settings.system_prompt,
    )


def key_store(settings: GatewaySettings, client: redis.Redis | None) -> KeyStore | None:
    """Where API keys are looked up: `--api-keys redis` (the session Redis) or a key file; None: no keys."""
    if settings.api_keys is None:
        return None
    if settings.api_keys == "redis":
        if client is None:
            raise ConfigError("api_keys: `redis` needs --redis URL")
        return RedisKeys(client)
    store = KeyFile(Path(settings.api_keys))
    store.lookup("")  # reads the file now, so a missing or malformed one fails the start
    return store


def create_service(settings: GatewaySettings) -> tuple[Service, Engine]:
    controls = load_controls(settings.input_filter)
    engine, ckpt = build_engine(settings, controls)
    cfg = ckpt.config
    limits = Limits.from_settings(settings, cfg)
    # The public port: TLS once there is a certificate; clients need none of their own.
    service = Service(
        "gateway", settings.host, settings.port, workers=settings.max_concurrent_requests + HEALTH_THREADS,
        credentials=settings.tls().server_credentials(require_client_auth=False),
        max_receive_bytes=settings.max_request_bytes,
        interceptors=[ServerSpans(f"/{GATEWAY_SERVICE}/")] if tracing.enabled() else None,
    )  # fmt: skip
    client = redis_client(settings)
    servicer = GatewayServicer(
        engine,
        conversations=conversations(settings, engine, ckpt, limits, controls, client),
        limits=limits,
        cfg=cfg,
        model_name=ckpt.dir.name,
        input_filter=controls.input,
        auth=Authenticator(key_store(settings, client)),
        quotas=Quotas(client, settings.session_ttl_s),
        max_concurrent=settings.max_concurrent_requests,
    )
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, service.server)
    names = (
        GATEWAY_SERVICE,
        "grpc.health.v1.Health",
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, service.server)
    # Readiness (health service moemesh.v1.Gateway): engine thread alive, a router answering.
    readiness = Readiness(
        service.health, engine, experts_of(engine).routers,
        settings.tls().channel_credentials(),
    )  # fmt: skip
    faults.arm_engine(engine)
    service.run_beside(readiness)
    return service, engine


def announce_compute(settings: GatewaySettings, engine: Engine, ckpt: Checkpoint) -> None:
    dtype, device, model = engine.dtype, engine.device, engine.model
    attention = [layer.self_attn for layer in model.layers]
    dense = [part for layer in model.layers for part in (layer.mlp, layer.shared, layer.shared_gate) if part]
    kernels = {
        "attention": f"{attention_kernel(dtype, device)}; projections {module_kernels(attention, dtype, device)}",
        "dense": module_kernels(dense, dtype, device),
        "lm head": module_kernels([model.lm_head], dtype, device),
        "experts": experts_of(engine).describe(dtype, device),
    }
    stored = ckpt.quant.describe() if ckpt.quantized else None
    weights = weights_format(ckpt.config.checkpoint_dtype, dtype, settings.quantize, stored, [model])
    report = settings.compute_report("gateway", ckpt.config.checkpoint_dtype, weights, kernels)
    if settings.one_thread_step_tokens and experts_of(engine).is_remote:
        report = replace(report, threads_reason=f"{report.threads_reason}; steps of at most "
                         f"{settings.one_thread_step_tokens} tokens on 1, the experts being remote")  # fmt: skip
    report.announce()


def serve(settings: GatewaySettings) -> None:
    settings.configure_compute()
    tracing.setup("moemesh-gateway")
    ports.ensure_free("gateway", settings.host, settings.port)  # before the model loads, not after
    service, engine = create_service(settings)
    announce_compute(settings, engine, Checkpoint(settings.model))
    serve_metrics("gateway", settings.host, settings.metrics_port)
    engine.start()
    service.start()
    service.serve_until_signal(settings.grace_s)
    service.stop_beside()
    engine.stop()
