"""The `moemesh` command: `up` (a whole cluster), each service alone, a client, development certificates, the
demo model."""

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from moemesh.errors import ConfigError, MoemeshError

if TYPE_CHECKING:
    from moemesh.plan import Plan

# Settings class (in moemesh.settings) and module of each service. moemesh.settings imports torch (seconds), so
# it is imported only for a service's command: the clients (`chat`, `generate`) start at once.
SERVICES = {
    "gateway": ("GatewaySettings", "services.gateway.server"),
    "router": ("RouterSettings", "services.router.server"),
    "expert": ("ExpertSettings", "services.experts.server"),
}


def _at_least(least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    return parse


_positive = _at_least(1)


def settings_class(service: str) -> type:
    from moemesh import settings as settings_mod

    return getattr(settings_mod, SERVICES[service][0])


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """`command`: the one being run (argv's first word), whose flags alone are needed; None: every command's."""
    parser = argparse.ArgumentParser(prog="moemesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start gateway, router, expert shards and redis-server on loopback")
    up.add_argument("--model", type=Path, help="checkpoint directory (default: the shipped demo bot)")
    up.add_argument("--experts", type=_positive, default=2, help="expert shards")
    up.add_argument("--replicas", type=_positive, default=1, help="replicas of each shard")
    up.add_argument(
        "--routers",
        type=_at_least(0),
        default=1,
        help="routers (the gateway fails over between them); 0: the gateway gates and calls the expert shards "
        "itself, one hop per MoE layer instead of two",
    )
    up.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads of each service (default 0: all cores for the gateway, cores / expert replicas else)",
    )
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=50051, help="gateway port (0: a free one)")
    up.add_argument("--redis", help="Redis URL (default: start a redis-server)")
    up.add_argument("--device", default="auto", help="every service's device: auto, cpu, cuda or cuda:N")
    up.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    up.add_argument("--wire-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    up.add_argument(
        "--quantized-kernels",
        default="fast",
        choices=["fast", "exact"],
        help="4-bit weights in fp32 compute: fast (int4pack on bf16-rounded inputs) or exact (dequantized per call)",
    )
    up.add_argument(
        "--quantize",
        default="none",
        choices=["none", "int8", "int4", "w8a8"],
        help="float weights made smaller at load: the experts', and the gateway's attention, MLPs and LM head",
    )
    up.add_argument(
        "--log-dir",
        type=Path,
        metavar="DIR",
        help="write each service's log (request log included) to DIR/<service>.log; the terminal shows only ready "
        "lines, what each service computes with, warnings and errors (default: a new folder under "
        "$XDG_STATE_HOME/moemesh/logs or ~/.local/state/moemesh/logs)",
    )
    up.add_argument("--tls", action="store_true", help="TLS on the gateway's port, mutual TLS inside, TLS to Redis")
    up.add_argument(
        "--certs", type=Path, metavar="DIR", help="with --tls: the certificates in DIR (made there if it has none)"
    )

    for name in SERVICES:
        service = sub.add_parser(name, help=f"run the {name} service alone")
        if command in (None, name):
            from moemesh.settings import add_flags

            add_flags(service, settings_class(name))

    gen = sub.add_parser("generate", help="send one request to a gateway and stream the reply")
    gen.add_argument("prompt")
    gen.add_argument("--address", default="127.0.0.1:50051")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--tls-ca", type=Path, help="connect with TLS, verifying the gateway against this PEM CA")
    _add_api_key(gen)

    chat = sub.add_parser("chat", help="talk to a gateway: multi-turn, streamed (reads stdin lines when piped)")
    chat.add_argument("--address", default="127.0.0.1:50051")
    chat.add_argument("--max-new-tokens", type=_positive, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--system", default="", help="system prompt of each new session")
    chat.add_argument("--session", default="", help="continue this session")
    chat.add_argument("--tls-ca", type=Path, help="connect with TLS, verifying the gateway against this PEM CA")
    _add_api_key(chat)

    probe = sub.add_parser("health", help="ask a service's grpc.health.v1 for its status (exit 0: SERVING)")
    probe.add_argument("address", help="host:port of a gateway, router or expert")
    probe.add_argument("--service", default="", help="health service name ('': liveness; moemesh.v1.Gateway)")
    probe.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    probe.add_argument("--tls-ca", type=Path, help="connect with TLS, verifying the service against this PEM CA")
    probe.add_argument("--tls-cert", type=Path, help="client certificate (routers and experts serve mutual TLS)")
    probe.add_argument("--tls-key", type=Path, help="private key of --tls-cert")

    certs = sub.add_parser("certs", help="write a development CA and a certificate for every service into DIR")
    certs.add_argument("dir", type=Path, help="created if missing; existing certificates are never overwritten")
    certs.add_argument(
        "--san", action="append", default=[], help="another DNS name or IP address of the services (repeatable)"
    )

    inspect = sub.add_parser("inspect", help="describe a checkpoint and the bytes each of N expert shards would hold")
    inspect.add_argument("model", type=Path)
    inspect.add_argument("--shards", type=int, default=2)
    inspect.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])

    plan = sub.add_parser("plan", help="balance experts over pools from a router's measured load (EPLB-style)")
    plan.add_argument("model", type=Path)
    plan.add_argument("--metrics", required=True, help="the router's metrics address, host:port")
    plan.add_argument("--pools", type=int, default=2, help="expert services (pools)")
    plan.add_argument("--slots", type=int, help="experts per pool (default: experts / pools + 1)")
    plan.add_argument("--registry", default="redis://127.0.0.1:6379/0", help="printed in the commands")
    plan.add_argument(
        "--format", default="text", choices=["text", "kustomize"], help="kustomize: write the pools as an overlay"
    )
    plan.add_argument("--out", type=Path, help="with --format kustomize: the overlay's directory")
    plan.add_argument("--k8s", type=Path, default=Path("deploy/k8s"), help="the manifests (base/ and pool/) it patches")
    plan.add_argument("--pool-prefix", default="plan", help="pools are named <prefix>0, <prefix>1, ...")
    plan.add_argument("--min-replicas", type=_positive, default=1, help="replicas of each pool (autoscaler minimum)")
    plan.add_argument("--max-replicas", type=_positive, default=4, help="autoscaler maximum of each pool")

    keys = sub.add_parser("keys", help="manage the gateway's API keys (a key file, or Redis)")
    keys.add_argument("action", choices=["add", "list", "revoke"])
    keys.add_argument("id", nargs="?", help="the key's id (add, revoke)")
    keys.add_argument("limits", nargs="*", help="add: field=value limits (requests_per_minute=60 allow_system=true)")
    where = keys.add_mutually_exclusive_group(required=True)
    where.add_argument("--file", type=Path, help="key file (what the gateway's --api-keys names)")
    where.add_argument("--redis", help="Redis URL (for a gateway with --api-keys redis)")

    demo = sub.add_parser("build-demo-model", help="write the random bench checkpoint")
    demo.add_argument("--out", type=Path)
    return parser


def _add_api_key(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-key", default=os.environ.get("MOEMESH_API_KEY"), help="API key (default: $MOEMESH_API_KEY)"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser(argv[0] if argv else None).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except MoemeshError as exc:
        print(f"moemesh {args.command}: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "up":
        from moemesh import demo_model, hardware
        from moemesh.launcher import ClusterSpec, up

        if args.certs and not args.tls:
            raise ConfigError("--certs needs --tls")
        hardware.resolve_device(args.device)  # a device the services could not use fails before any starts
        return up(
            ClusterSpec(
                model=args.model or demo_model.bot_dir(), experts=args.experts, replicas=args.replicas,
                routers=args.routers, threads=args.threads, host=args.host, port=args.port, redis_url=args.redis,
                device=args.device, dtype=args.dtype, wire_dtype=args.wire_dtype, quantize=args.quantize,
                quantized_kernels=args.quantized_kernels, tls=args.tls,
                certs=args.certs, log_dir=args.log_dir,
            )
        )  # fmt: skip
    if args.command in SERVICES:
        from pydantic import ValidationError

        from moemesh.allocator import retain_freed_memory
        from moemesh.settings import describe, from_flags

        try:
            settings = from_flags(settings_class(args.command), args)
        except ValidationError as exc:
            raise ConfigError(describe(exc)) from None
        if settings.retain_freed_memory:
            retain_freed_memory()
        importlib.import_module(SERVICES[args.command][1]).serve(settings)
        return 0
    if args.command == "generate":
        from moemesh.client.generate_cmd import stream_generate

        return stream_generate(
            args.address, args.prompt, args.max_new_tokens, args.temperature, args.tls_ca, args.api_key
        )
    if args.command == "chat":
        from moemesh.client.chat_cmd import ChatOptions, run_chat

        return run_chat(
            ChatOptions(
                args.address, args.api_key, args.tls_ca, args.max_new_tokens, args.temperature, args.system,
                args.session,
            )
        )  # fmt: skip
    if args.command == "health":
        from moemesh.probe import run_health

        return run_health(args.address, args.service, args.timeout, args.tls_ca, args.tls_cert, args.tls_key)
    if args.command == "certs":
        from moemesh import certs

        files = certs.make(args.dir, args.san)
        print(f"CA certificate {files.ca}\ncertificate {files.cert}\nprivate key {files.key}")
        return 0
    if args.command == "inspect":
        from moemesh.checkpoint import Checkpoint
        from moemesh.codec import parse_dtype
        from moemesh.inspect import report

        ckpt = Checkpoint(args.model)
        dtype = ckpt.config.checkpoint_dtype if args.dtype == "auto" else parse_dtype(args.dtype)
        print(report(ckpt, args.shards, dtype))
        return 0
    if args.command == "plan":
        import urllib.request

        from moemesh.families import load_config
        from moemesh.plan import balance, load_from_metrics, report

        if (args.format == "kustomize") != (args.out is not None):
            raise ConfigError("--out goes with --format kustomize, and it needs one")
        cfg = load_config(args.model)
        text = urllib.request.urlopen(f"http://{args.metrics}/metrics", timeout=10).read().decode()
        slots = args.slots or cfg.num_experts // args.pools + 1
        plan = balance(load_from_metrics(text), cfg.num_experts, args.pools, slots)
        print(report(plan, args.model, args.registry))
        if args.format == "kustomize":
            _write_plan_overlay(plan, args)
        return 0
    if args.command == "keys":
        keys_cli = importlib.import_module("services.gateway.keys_cli")  # the gateway's key stores, as services run
        return keys_cli.run_keys(args.action, args.id, args.limits, args.file, args.redis)
    if args.command == "build-demo-model":
        from moemesh import demo_model

        print(demo_model.build(args.out or demo_model.DEMO_DIR))
        return 0
    raise AssertionError(args.command)


def _write_plan_overlay(plan: "Plan", args: argparse.Namespace) -> None:
    from moemesh.checkpoint import Checkpoint
    from moemesh.kustomize import write_overlay
    from moemesh.plan import kustomize_pools

    ckpt = Checkpoint(args.model)
    pools = kustomize_pools(
        plan, ckpt.tensors, ckpt.config.checkpoint_dtype, args.pool_prefix, args.min_replicas, args.max_replicas
    )
    for path in write_overlay(args.out, pools, args.k8s / "base", args.k8s / "pool"):
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
