"""Multi-turn sessions: time to first token of turn 2 with the KV cache from Redis vs a full recompute.

One cluster, `moemesh up --port 0 --experts N` (redis-server, N expert shards, router, gateway A), plus a
second gateway replica B, `moemesh gateway --model DIR --router ROUTER --redis URL --port 0`, on the same
router and Redis. For each of `--sessions` conversations (plus one warm-up that is not counted):

1. turn 1 on gateway A: a new session whose first Chat request carries a long system message and a user
   message (about `--history-tokens` tokens with the reply), greedy, `--max-new-tokens`;
2. cached: turn 2 of that session on gateway B, which has never seen it, so the session's KV cache
   comes from Redis and only the tokens past the cached prefix are prefilled;
3. recompute: a new session on gateway B whose single Chat request carries the whole conversation
   (system, user 1, assistant reply 1 as turn 1 returned it, user 2), so nothing is cached.

Steps 2 and 3 alternate their order from one conversation to the next. TTFT is measured in this process
from calling `Chat` to the first response that carries token ids. Both sides must give the same greedy
tokens. Every conversation has its own text (its number opens the system message), so no two sessions
share a prefix. Reports per side the median and min TTFT, the ratio cached/recompute, and the Redis
bytes per session token: the sum of `MEMORY USAGE` over the session's keys (`moemesh:session:{id}*`)
divided by `GetSession(...).token_count`, next to the bytes per token of the model's KV cache
(layers x 2 tensors x kv heads x head dim x element size). At the end gateway B and the cluster are
stopped with SIGTERM and the bench checks that no process of theirs is left.

    .venv/bin/python -m bench.sessions [--model DIR] [--sessions 7] [--history-tokens 1000]
        [--max-new-tokens 16] [--experts 2] [--markdown]
"""

import argparse
import os
import random
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import ServiceProcess, command_line, load_average, table

REQUEST_TIMEOUT_S = 900
TEXT_SEED = 20240607

USER_1 = (
    "Hello! I bought a commuter bike from you last spring. Since last week the chain skips under load, "
    "there is a clicking noise from the rear wheel and the brakes squeal in the rain. What should I do?"
)
USER_2 = "Thanks. Which of these should I check first, and can I do it myself at home?"

# Material for the long system message: a shop's policies, varied so that the text tokenizes like prose.
_SUBJECTS = ["Repairs", "Returns", "Warranty claims", "Fittings", "Rentals", "Trade-ins", "Deliveries",
             "Service plans", "Spare parts", "E-bike batteries", "Wheel builds", "Safety checks"]  # fmt: skip
_RULES = [
    "are booked online or at the counter, and the customer gets a written estimate before any work starts",
    "need the original receipt or the order number, and the bike must be clean and ridden less than 100 km",
    "cover frames for five years and components for two, except tyres, tubes, chains and brake pads",
    "take about forty minutes; bring your usual shoes and pedals, and tell us about any knee or back pain",
    "start at 25 euros a day, with a helmet and a lock included, and a deposit of 200 euros per bike",
    "are valued from the model year, the condition of the drivetrain and the service history we can see",
    "within 15 km are free for orders over 300 euros; otherwise we charge a flat fee of 19 euros",
    "include two full services a year, free adjustments and a 10 percent discount on parts and labour",
    "for older models are ordered from the maker and usually arrive within five to ten working days",
    "must be stored half charged in a dry room above 5 degrees, and are checked for free once a year",
    "are trued and tensioned by hand; we recheck the spoke tension after the first 200 km for free",
    "cover brakes, tyres, lights, the headset and every bolt, and the customer signs the checklist",
]
_ADVICE = [
    "Always ask which bike the customer rides and how old it is.",
    "Never promise a repair date before a mechanic has seen the bike.",
    "Explain costs in euros, including tax, and mention cheaper options when there are any.",
    "If the customer describes a safety problem, tell them to stop riding until it is checked.",
    "Keep answers short and friendly, and end by asking whether anything else is unclear.",
    "Offer a booking link when a visit to the workshop is the best next step.",
]


# ---------------------------------------------------------------------------------------------------
# Workload


def system_message(index: int, template, tokenizer, turn1_tokens: int) -> str:
    """Conversation `index`'s system message, grown until turn 1's rendered prompt has `turn1_tokens` tokens."""
    rng = random.Random(TEXT_SEED * 1_000_003 + index)
    lines = [f"Conversation {index}. You are the customer-service assistant of Velo & Co., a bicycle shop."]
    while True:
        if rng.random() < 0.25:
            lines.append(rng.choice(_ADVICE))
        else:
            lines.append(f"{rng.choice(_SUBJECTS)} {rng.choice(_RULES)} (policy {rng.randrange(100, 999)}).")
        text = "\n".join(lines)
        if prompt_tokens(template, tokenizer, [("system", text), ("user", USER_1)]) >= turn1_tokens:
            return text


def prompt_tokens(template, tokenizer, messages: list[tuple[str, str]]) -> int:
    rendered = template.render([{"role": r, "content": c} for r, c in messages], add_generation_prompt=True)
    return len(tokenizer.encode(rendered, add_special_tokens=False).ids)


# ---------------------------------------------------------------------------------------------------
# Processes: `moemesh up` and gateway B, each in a new session so that all they start can be found


# ---------------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Turn:
    session_id: str
    text: str
    token_ids: list[int]
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int
    finish_reason: str


@dataclass
class Conversation:
    index: int
    order: str  # which side ran first
    turn1: Turn
    cached: Turn
    recompute: Turn
    token_count: int  # GetSession after turn 2 (cached side)
    redis_bytes: int  # MEMORY USAGE summed over that session's keys
    redis_keys: int
    recompute_token_count: int = 0
    recompute_redis_bytes: int = 0
    breakdown: dict[str, int] = field(default_factory=dict)

    @property
    def same(self) -> bool:
        return self.cached.token_ids == self.recompute.token_ids


def chat(stub, session_id: str, messages: list[tuple[str, str]], max_new: int) -> Turn:
    from moemesh.v1 import gateway_pb2

    request = gateway_pb2.ChatRequest(
        session_id=session_id,
        messages=[gateway_pb2.Message(role=r, content=c) for r, c in messages],
        sampling=gateway_pb2.SamplingParams(max_new_tokens=max_new, temperature=0.0),
    )
    t0 = time.perf_counter()
    ttft, parts = None, []
    for msg in stub.Chat(request, timeout=REQUEST_TIMEOUT_S):
        if msg.token_ids and ttft is None:
            ttft = time.perf_counter() - t0
        parts.append(msg)
    last = parts[-1]
    return Turn(
        session_id=parts[0].session_id,
        text="".join(p.text for p in parts),
        token_ids=[t for p in parts for t in p.token_ids],
        ttft_s=ttft,
        prompt_tokens=last.usage.prompt_tokens,
        cached_tokens=last.usage.cached_tokens,
        finish_reason=last.finish_reason,
    )


def session_memory(client, session_id: str) -> tuple[int, int, dict[str, int]]:
    """(bytes, keys, details) of `MEMORY USAGE` over the session's keys; details: bytes by kind, plus the
    raw length of the KV chunks (`kv raw`, STRLEN), their count (`chunks`) and one MGET of them (`mget us`)."""
    total, count = 0, 0
    kinds = {"kv data": 0, "kv meta": 0, "session": 0, "other": 0, "kv raw": 0, "chunks": 0}
    data_keys = []
    for key in client.scan_iter(match=f"moemesh:session:{session_id}*", count=1000):
        size = client.memory_usage(key, samples=0) or 0
        name = key.decode()
        kind = (
            "kv meta" if name.endswith(":meta") else
            "kv data" if ":kv:" in name else
            "session" if name == f"moemesh:session:{session_id}" else "other"
        )  # fmt: skip
        if kind == "kv data":
            kinds["kv raw"] += client.strlen(key)
            kinds["chunks"] += 1
            data_keys.append(key)
        kinds[kind] += size
        total, count = total + size, count + 1
    t0 = time.perf_counter()
    client.mget(data_keys)
    kinds["mget us"] = int(1e6 * (time.perf_counter() - t0))
    return total, count, kinds


def run(model: Path, experts: int, num_sessions: int, history_tokens: int, max_new: int) -> list[Conversation]:
    import grpc
    import redis
    from tokenizers import Tokenizer

    from moemesh.rpc import CHANNEL_OPTIONS
    from moemesh.v1 import gateway_pb2, gateway_pb2_grpc
    from services.gateway.chat_template import ChatTemplate

    template = ChatTemplate.from_dir(model)
    if template is None:
        raise SystemExit(f"{model} has no chat template; sessions need one")
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    turn1_tokens = history_tokens - max_new

    up = ServiceProcess(
        "moemesh up",
        [sys.executable, "-m", "moemesh.cli", "up", "--model", str(model), "--port", "0", "--experts", str(experts)],
    )
    gateway_b: ServiceProcess | None = None
    channels = []
    try:
        redis_url = up.wait_for(r"^\[redis\] ready on (\S+)").group(1)
        router = up.wait_for(r"^\[router-0\] ready on (\S+)").group(1)
        address_a = up.wait_for(r"^gateway listening on (\S+)").group(1)
        # Gateway B: another replica, as an operator would start it. OMP_WAIT_POLICY=PASSIVE as `moemesh up`
        # sets for its children, so B's OpenMP threads do not spin on the cores the router and experts need.
        argv_b = [sys.executable, "-m", "moemesh.cli", "gateway", "--model", str(model), "--router", router,
                  "--redis", redis_url, "--port", "0"]  # fmt: skip
        gateway_b = ServiceProcess("gateway B", argv_b, {"OMP_WAIT_POLICY": "PASSIVE"} | dict(os.environ))
        address_b = gateway_b.wait_for(r"^gateway listening on (\S+)").group(1)
        print(f"  cluster up: redis {redis_url}, router {router}, gateway A {address_a}, gateway B {address_b}")
        print(f"  gateway B: {shlex.join(['moemesh', *argv_b[3:]])}", flush=True)
        stubs = []
        for address in (address_a, address_b):
            channels.append(grpc.insecure_channel(address, options=CHANNEL_OPTIONS))
            stubs.append(gateway_pb2_grpc.GatewayStub(channels[-1]))
        a, b = stubs
        store = redis.Redis.from_url(redis_url)

        results = []
        for index in range(-1, num_sessions):  # -1: warm-up, not counted
            system = system_message(index, template, tokenizer, turn1_tokens)
            first = [("system", system), ("user", USER_1)]
            turn1 = chat(a, "", first, max_new)
            whole = [*first, ("assistant", turn1.text), ("user", USER_2)]
            order = "cached first" if index % 2 == 0 else "recompute first"
            if order == "cached first":
                cached = chat(b, turn1.session_id, [("user", USER_2)], max_new)
                recompute = chat(b, "", whole, max_new)
            else:
                recompute = chat(b, "", whole, max_new)
                cached = chat(b, turn1.session_id, [("user", USER_2)], max_new)
            info = b.GetSession(gateway_pb2.GetSessionRequest(session_id=turn1.session_id), timeout=30)
            info_r = b.GetSession(gateway_pb2.GetSessionRequest(session_id=recompute.session_id), timeout=30)
            nbytes, nkeys, kinds = session_memory(store, turn1.session_id)
            nbytes_r, _, _ = session_memory(store, recompute.session_id)
            conv = Conversation(
                index, order, turn1, cached, recompute, info.token_count, nbytes, nkeys,
                info_r.token_count, nbytes_r, kinds,
            )  # fmt: skip
            label = "warm-up" if index < 0 else f"session {index + 1}/{num_sessions}"
            print(
                f"  {label} ({order}): turn 1 on A {turn1.prompt_tokens} prompt tokens, TTFT "
                f"{1000 * turn1.ttft_s:.0f} ms; turn 2 on B {cached.prompt_tokens} prompt tokens: cached "
                f"{cached.cached_tokens} tokens, TTFT {1000 * cached.ttft_s:.0f} ms; recompute TTFT "
                f"{1000 * recompute.ttft_s:.0f} ms (cached {recompute.cached_tokens}); same tokens: {conv.same}; "
                f"redis {nbytes} B in {nkeys} keys for {info.token_count} tokens; {load_average()}",
                flush=True,
            )
            if not conv.same:
                print(f"    cached:    {cached.token_ids}\n    recompute: {recompute.token_ids}", flush=True)
            if cached.prompt_tokens != recompute.prompt_tokens:
                print(f"    prompt tokens differ: {cached.prompt_tokens} vs {recompute.prompt_tokens}", flush=True)
            if index >= 0:
                results.append(conv)
        return results
    finally:
        for channel in channels:
            channel.close()
        if gateway_b is not None:
            print(f"  {gateway_b.stop_line()}", flush=True)
        print(f"  {up.stop_line()}", flush=True)


# ---------------------------------------------------------------------------------------------------
# Report


def kv_bytes_per_token(cfg) -> tuple[int, str]:
    """Bytes of the model's KV cache per token, and how they add up."""
    import torch

    size = torch.empty((), dtype=cfg.checkpoint_dtype).element_size()
    if cfg.mla is not None:
        per_layer = cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim
        return cfg.num_layers * per_layer * size, (
            f"{cfg.num_layers} layers x ({cfg.mla.kv_lora_rank} latent + {cfg.mla.qk_rope_head_dim} rope) x {size} B"
        )
    total = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * size
    return total, (
        f"{cfg.num_layers} layers x 2 tensors x {cfg.num_kv_heads} kv heads x {cfg.head_dim} head dim x {size} B"
    )


def report(results: list[Conversation], cfg, markdown: bool) -> None:
    rows = []
    for c in results:
        rows.append([
            str(c.index + 1), c.order, str(c.cached.prompt_tokens), str(c.cached.cached_tokens),
            f"{1000 * c.cached.ttft_s:.0f}", f"{1000 * c.recompute.ttft_s:.0f}",
            f"{c.cached.ttft_s / c.recompute.ttft_s:.2f}", "yes" if c.same else "**NO**",
        ])  # fmt: skip
    print()
    table(["session", "order", "turn-2 prompt tokens", "cached tokens", "TTFT cached ms", "TTFT recompute ms",
            "cached/recompute", "same greedy tokens"], rows, markdown)  # fmt: skip

    cached = [c.cached.ttft_s * 1000 for c in results]
    recompute = [c.recompute.ttft_s * 1000 for c in results]
    summary = [
        ["turn 2 on gateway B, KV cache from Redis", str(len(cached)), f"{statistics.median(cached):.0f}",
         f"{min(cached):.0f}", f"{statistics.median([c.cached.cached_tokens for c in results]):.0f}"],
        ["full recompute on gateway B (new session)", str(len(recompute)), f"{statistics.median(recompute):.0f}",
         f"{min(recompute):.0f}", f"{statistics.median([c.recompute.cached_tokens for c in results]):.0f}"],
    ]  # fmt: skip
    print()
    table(["side", "runs", "median TTFT ms", "min TTFT ms", "cached tokens (median)"], summary, markdown)
    ratio_median = statistics.median(cached) / statistics.median(recompute)
    ratio_min = min(cached) / min(recompute)
    ratios = [c.cached.ttft_s / c.recompute.ttft_s for c in results]
    same = sum(c.same for c in results)
    print(
        f"\nratio cached/recompute: {ratio_median:.3f} (medians), {ratio_min:.3f} (mins), per-session median "
        f"{statistics.median(ratios):.3f}; target < 0.2: {'met' if ratio_median < 0.2 else 'NOT met'}"
    )
    print(f"identical greedy tokens (cached vs recompute): {same}/{len(results)}")

    kv_tok, kv_formula = kv_bytes_per_token(cfg)
    per_token = [c.redis_bytes / c.token_count for c in results]
    per_token_r = [c.recompute_redis_bytes / c.recompute_token_count for c in results]
    tokens = statistics.median([c.token_count for c in results])
    d = {k: statistics.median([c.breakdown[k] for c in results]) for k in results[0].breakdown}
    chunk_tokens = d["kv raw"] / kv_tok / d["chunks"] if d["chunks"] else 0
    print(
        f"\nRedis bytes per session token (MEMORY USAGE over moemesh:session:{{id}}* / GetSession token_count), "
        f"median over {len(results)} sessions after turn 2: {statistics.median(per_token):.0f} B/token "
        f"(range {min(per_token):.0f}-{max(per_token):.0f}; {tokens:.0f} tokens, "
        f"{statistics.median([c.redis_keys for c in results]):.0f} keys)\n"
        f"  by kind (medians): KV chunks {d['kv data']:.0f} B for {d['kv raw']:.0f} B of data "
        f"({d['chunks']:.0f} chunks of {chunk_tokens:.0f} tokens, {d['kv raw'] / d['chunks']:.0f} B each, "
        f"{d['kv data'] / d['chunks']:.0f} B each in Redis: x{d['kv data'] / max(d['kv raw'], 1):.3f}), "
        f"chunk metadata {d['kv meta']:.0f} B, session hash {d['session']:.0f} B"
        + (f", other {d['other']:.0f} B" if d["other"] else "")
        + f"\n  one MGET of the session's KV chunks from this process: {d['mget us'] / 1000:.1f} ms\n"
        f"the recompute sessions (1 turn): {statistics.median(per_token_r):.0f} B/token\n"
        f"model KV cache: {kv_formula} = {kv_tok} B/token; "
        f"Redis/model = {statistics.median(per_token) / kv_tok:.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sessions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint directory with a chat template (default: the demo)")
    parser.add_argument("--sessions", type=int, default=7, help="measured conversations (default 7)")
    parser.add_argument("--history-tokens", type=int, default=1000,
                        help="tokens of the conversation after turn 1: prompt + reply (default 1000)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per turn (default 16)")
    parser.add_argument("--experts", type=int, default=2, help="expert shards of the cluster (default 2)")
    parser.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    args = parser.parse_args(argv)
    if min(args.sessions, args.max_new_tokens, args.experts) < 1 or args.history_tokens <= args.max_new_tokens:
        parser.error("--sessions, --max-new-tokens and --experts must be positive, --history-tokens larger")

    print(f"command: {command_line('bench.sessions')}", flush=True)
    import torch

    from moemesh import demo_model
    from moemesh.families import load_config

    model = (args.model or demo_model.ensure()).resolve()
    cfg = load_config(model)
    print(
        f"model: {model} ({cfg.model_type}, {cfg.checkpoint_dtype}, vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, "
        f"{cfg.num_layers} layers, {cfg.num_kv_heads} kv heads x {cfg.head_dim}, {cfg.num_experts} experts "
        f"top-{cfg.experts_per_token})\n"
        f"workload: {args.sessions} conversations + 1 warm-up; turn 1 (system + user, ~{args.history_tokens} tokens "
        f"with the reply) on gateway A, turn 2 on gateway B, cached and recomputed, alternating; greedy, "
        f"{args.max_new_tokens} new tokens per turn\n"
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads; "
        f"{load_average()}",
        flush=True,
    )
    print(f"cluster: moemesh up --port 0 --experts {args.experts} + gateway B; {load_average()}", flush=True)
    results = run(model, args.experts, args.sessions, args.history_tokens, args.max_new_tokens)
    print(f"done; {load_average()}")
    report(results, cfg, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
