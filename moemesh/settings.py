"""One typed settings object per service, read from flags and `MOEMESH_*` environment variables.

Flags are generated from the fields (`max_batch_tokens` -> `--max-batch-tokens`); a flag given on the
command line wins over the environment, which wins over the default.
"""

import argparse
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

import torch
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from moemesh import hardware
from moemesh.codec import parse_dtype
from moemesh.compute_report import ComputeReport, dtype_choice, threads_reason
from moemesh.quant_linear import POLICY
from moemesh.tls import Tls

ComputeDType = Literal["auto", "float32", "bfloat16"]
WireDType = Literal["auto", "float32", "bfloat16", "float16"]
Quantize = Literal["none", "int8", "int4", "w8a8"]


# The expert services' and the gateway's `--quantize`.
QUANTIZE_FIELD = Field(
    "none",
    description="make the checkpoint's float weights smaller at load (an expert service: its experts; a gateway: "
    "attention, dense and shared MLPs, LM head, and experts it holds): int8 weight-only per output channel, int4 "
    "weight-only round-to-nearest by groups of 128, w8a8 int8 weights per channel with int8 activations "
    "quantized at each call (CPU only); weights a quantized checkpoint stores quantized are served as stored",
)


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MOEMESH_", extra="forbid")

    model: Path = Field(description="Hugging Face checkpoint directory")
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(0, description="port to bind; 0 picks a free one (printed on the ready line)")
    device: str = Field(
        "auto",
        description="where weights, KV cache and compute live: auto (the first CUDA device if torch sees one, "
        "else the CPU), cpu, cuda or cuda:N",
    )
    dtype: ComputeDType = Field(
        "auto",
        description="compute dtype; auto: the checkpoint's, but fp32 for a bf16/fp16 checkpoint on a device "
        "without native bf16 (a CPU without AVX512_BF16/AMX, a GPU before compute capability 8.0)",
    )
    wire_dtype: WireDType = Field("auto", description="dtype of tensors between services; auto: the compute dtype")
    threads: int = Field(
        0,
        description="torch intra-op threads; 0: the cores this process may use (its CPU "
        "affinity capped by its cgroup's CPU quota)",
    )
    retain_freed_memory: bool = Field(
        True,
        description="fix glibc malloc's mmap and trim thresholds, so that large buffers freed by one step or call "
        "are reused by the next instead of mapped and faulted in again (moemesh.allocator); false: the C "
        "library's defaults. MALLOC_*_ or GLIBC_TUNABLES malloc settings in the environment win either way",
    )
    quantized_kernels: Literal["fast", "exact"] = Field(
        "fast",
        description="fast: 4-bit weights run the int4pack kernel where it fits, its inputs rounded to bf16 when "
        "the compute dtype is fp32 (as llama.cpp rounds them to 8 bits); exact: in fp32 compute they are "
        "dequantized at each call instead (slower; a float model of the dequantized weights to fp32 rounding)",
    )
    grace_s: float = Field(10.0, description="seconds to finish in-flight work on SIGTERM")
    metrics_port: int = Field(-1, description="Prometheus metrics HTTP port; -1: off, 0: a free port")
    tls_cert: Path | None = Field(
        None,
        description="PEM certificate this service serves its port with (TLS) and presents to the services and "
        "Redis it calls; unset: plaintext port",
    )
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    tls_ca: Path | None = Field(
        None,
        description="PEM CA of the internal services; set: mutual TLS between gateway, routers and experts (each "
        "verifies the other's certificate against it), and the CA a rediss:// Redis is verified against",
    )

    internal: ClassVar[bool] = False  # routers and experts: a TLS port of theirs requires client certificates

    @field_validator("device")
    @classmethod
    def _device_name(cls, name: str) -> str:
        return hardware.check_device_name(name)

    @model_validator(mode="after")
    def _tls_files_go_together(self) -> "ServiceSettings":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key: set both or neither")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("tls_ca turns on mutual TLS, which needs tls_cert and tls_key too")
        if self.internal and self.tls_cert is not None and self.tls_ca is None:
            raise ValueError("tls_cert needs tls_ca: routers and experts serve mutual TLS only")
        return self

    def tls(self) -> Tls:
        """The TLS files, read (a missing one fails here, at start)."""
        return Tls.load(self.tls_cert, self.tls_key, self.tls_ca)

    def torch_device(self) -> torch.device:
        """The device (a CUDA one torch cannot see fails here, at start)."""
        return hardware.resolve_device(self.device)

    def compute_dtype(self, checkpoint_dtype: torch.dtype, device: torch.device) -> torch.dtype:
        return dtype_choice(self.dtype, checkpoint_dtype, device)[0]

    def compute_report(
        self, role: str, checkpoint_dtype: torch.dtype, weights: str, kernels: dict[str, str]
    ) -> ComputeReport:
        """What this service computes with and why (`moemesh.compute_report`), for `weights` held in memory."""
        device = self.torch_device()
        dtype, dtype_reason = dtype_choice(self.dtype, checkpoint_dtype, device)
        return ComputeReport(
            role, device, dtype, dtype_reason, weights, torch.get_num_threads(), threads_reason(self.threads), kernels
        )

    def configure_compute(self) -> None:
        """The process's torch threads and the trade its quantized layers may make (before any weight loads)."""
        torch.set_num_threads(self.threads or hardware.available_cores())
        POLICY.exact = self.quantized_kernels == "exact"

    def wire_torch_dtype(self, compute: torch.dtype) -> torch.dtype:
        return compute if self.wire_dtype == "auto" else parse_dtype(self.wire_dtype)


class ExpertSettings(ServiceSettings):
    internal: ClassVar[bool] = True

    quantize: Quantize = QUANTIZE_FIELD
    shard: str = Field("0/1", description="i/N: hold the i-th of N contiguous slices of every layer's experts")
    registry: str | None = Field(None, description="Redis URL to announce this replica in (heartbeat TTL)")
    advertise: str | None = Field(
        None,
        description="address routers reach this replica at; default host:port, or with host 0.0.0.0 the IP that "
        "this machine's host name resolves to (a container's own)",
    )


class RouterSettings(ServiceSettings):
    internal: ClassVar[bool] = True

    experts: list[str] = Field([], description="comma-separated static expert service addresses (host:port)")
    placement_file: Path | None = Field(None, description="static expert addresses, one per line (# comments)")
    registry: str | None = Field(None, description="Redis URL where expert replicas announce themselves")
    call_timeout_s: float = Field(30.0, description="deadline of one MoE layer's expert calls, resends included")
    start_timeout_s: float = Field(300.0, description="how long to wait at start for every expert to have a replica")
    hedge_floor_s: float = Field(
        0.25, description="least time an expert call gets before it is hedged to another replica (budget: 3 x p99)"
    )


class GatewaySettings(ServiceSettings):
    quantize: Quantize = QUANTIZE_FIELD
    router: str | None = Field(
        None,
        description="router addresses, comma-separated (failover in order); unset: this gateway routes itself, to "
        "the expert services of `registry`, or without one to experts in this process",
    )
    registry: str | None = Field(
        None,
        description="Redis URL where expert replicas announce themselves, for a gateway without routers: it gates "
        "and calls the expert services itself, one hop per MoE layer instead of two",
    )
    redis: str | None = Field(None, description="Redis URL for sessions")
    max_batch_seqs: int = Field(64, description="most sequences in one engine step")
    max_batch_tokens: int = Field(512, description="token budget of one engine step (chunked prefill)")
    max_decode_stall_ms: float = Field(
        250.0,
        description="stall budget: while sequences decode, a step's prefill chunk is capped so that it is estimated "
        "(from measured step times) to add at most this long to the step; 0: only max_batch_tokens caps it",
    )
    micro_batches: int = Field(
        1,
        ge=1,
        description="a step's sequences run as up to this many micro-batches in ping-pong, so that one's attention "
        "overlaps another's expert calls (with routers); each reads the experts' weights again (docs/benchmarks.md)",
    )
    micro_batch_min_tokens: int = Field(8, ge=1, description="fewest tokens of a micro-batch; smaller steps run whole")
    one_thread_step_tokens: int = Field(
        64,
        ge=0,
        description="with the experts in other processes (router or registry), a step of at most this many tokens "
        "computes on one torch thread: the gateway waits at every MoE layer, its other OpenMP threads fall asleep "
        "then, and waking them costs more than they compute in a small step (docs/benchmarks.md); 0: never",
    )
    max_waiting: int = Field(1024, description="most requests queued for admission; beyond: RESOURCE_EXHAUSTED")
    kv_cache_bytes: int = Field(
        0,
        description="KV cache memory of the running sequences: admission waits for room, a sequence that outgrows "
        "it is preempted (recomputed later); 0: 0.4 x the memory available at start (cgroup-aware; on CUDA the "
        "GPU's free memory)",
    )
    default_max_new_tokens: int = Field(64, description="max_new_tokens when a request leaves it unset")
    max_new_tokens_limit: int = Field(4096, description="largest max_new_tokens a request may ask for")
    max_context: int = Field(0, description="longest prompt + completion; 0: the model's max_position_embeddings")
    router_timeout_s: float = Field(
        60.0,
        description="deadline of one router call (with registry: of one MoE layer's expert calls), and how long "
        "start waits for a router to answer (with registry: for every expert to have a replica)",
    )
    hedge_floor_s: float = Field(
        1.0,
        description="least time a router call (with registry: an expert call) gets before it is hedged to another "
        "router (replica) (budget: 3 x p99)",
    )
    max_concurrent_requests: int = Field(
        256, description="most Gateway calls at once, beyond: RESOURCE_EXHAUSTED (health checks keep threads apart)"
    )
    max_request_bytes: int = Field(4 * 1024 * 1024, description="largest request message the public port accepts")
    max_prompt_chars: int = Field(200_000, description="longest text prompt, in characters, before tokenization")
    max_stop_strings: int = Field(8, description="most stop strings in one request")
    max_stop_chars: int = Field(128, description="longest stop string, in characters")
    max_temperature: float = Field(2.0, description="largest sampling temperature a request may ask for")
    max_chat_messages: int = Field(64, description="most messages in one Chat request")
    max_message_chars: int = Field(32_000, description="longest content of one chat message, in characters")
    api_keys: str | None = Field(
        None, description="API keys: a key file (see `moemesh keys`), or `redis` for the keys in --redis; unset: none"
    )
    session_ttl_s: int = Field(3600, description="seconds a session lives after its last use")
    max_session_turns: int = Field(256, description="most turns in one session")
    max_session_tokens: int = Field(0, description="most tokens in one session; 0: the context length")
    kv_chunk_tokens: int = Field(64, description="tokens per KV-cache chunk stored in Redis")
    session_lock_ttl_s: float = Field(
        6.0, description="expiry of a session's turn lock, renewed while the turn runs (frees a crashed gateway's)"
    )
    system_prompt: str = Field(
        "", description="the deployment's system prompt, first in every chat (before a client's); empty: none"
    )
    input_filter: Path | None = Field(
        None, description="content rules file (YAML or JSON): input rules, PII redaction and output rules"
    )

    @model_validator(mode="after")
    def _one_way_to_the_experts(self) -> "GatewaySettings":
        if self.router and self.registry:
            raise ValueError("router and registry: set one (registry: this gateway calls the expert services itself)")
        return self


def add_flags(parser: argparse.ArgumentParser, settings_cls: type[BaseSettings]) -> None:
    for name, field in settings_cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else None
        parser.add_argument(flag, dest=name, default=None, choices=choices, help=field.description)


def describe(exc: ValidationError) -> str:
    """The problems of settings that failed validation, each after the setting it is about (for the CLI)."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


def from_flags(settings_cls: type[BaseSettings], args: argparse.Namespace) -> Any:
    """Settings from the flags that were given, the environment, then the defaults."""
    given = {name: getattr(args, name) for name in settings_cls.model_fields if getattr(args, name, None) is not None}
    for name, value in given.items():
        if get_origin(settings_cls.model_fields[name].annotation) is list:
            given[name] = [part for part in value.split(",") if part]
    return settings_cls(**given)
