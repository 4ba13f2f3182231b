"""Chaos soak: `moemesh up` with two replicas of each expert shard and two routers serves 32 clients in a
closed loop while a seeded fault injector kills -9, SIGSTOPs and restarts experts, routers and Redis.

Every Generate must return the tokens an undisturbed cluster gives for its prompt (greedy); every chat
turn must, once it succeeds (a turn may be refused with UNAVAILABLE or ABORTED while Redis is down, and
is then retried), reply as the undisturbed cluster did, and no saved turn may be lost. No process may
outlive the cluster.

`MOEMESH_CHAOS_S` (default 75) sets how long faults are injected, `MOEMESH_CHAOS_SEED` (default 1) the
schedule, and `MOEMESH_CHAOS_REPORT` a file to append a summary to (`make soak` runs 30 minutes).
"""

import os
import random
import re
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import redis

from moemesh.v1 import expert_pb2, expert_pb2_grpc, gateway_pb2
from tests.helpers import Cluster

pytestmark = pytest.mark.integration

SOAK_S = float(os.environ.get("MOEMESH_CHAOS_S", "75"))
SEED = int(os.environ.get("MOEMESH_CHAOS_SEED", "1"))
REPORT = os.environ.get("MOEMESH_CHAOS_REPORT")

NEW_TOKENS = 12
GENERATE_CLIENTS = 28
CHAT_CLIENTS = 4
TURN_RETRY_S = 60  # how long a chat turn may keep being refused (Redis restarting) before it counts as lost
PROMPTS = [[(17 * i + 3 * j) % 120000 + 40 for j in range(3 + i % 9)] for i in range(GENERATE_CLIENTS)]
SCRIPTS = [
    [f"Order {1000 + i} has not arrived.", "It was shipped last week.", "Can I get a refund instead?"]
    for i in range(CHAT_CLIENTS)
]
RETRYABLE_CHAT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED}


def generate(stub, prompt: list[int]) -> list[int]:
    request = gateway_pb2.GenerateRequest(
        prompt_token_ids=prompt, sampling=gateway_pb2.SamplingParams(max_new_tokens=NEW_TOKENS)
    )
    return [t for r in stub.GenerateStream(request, timeout=120) for t in r.token_ids]


def chat_turn(stub, session_id: str, text: str) -> tuple[str, list[int]]:
    request = gateway_pb2.ChatRequest(
        session_id=session_id,
        messages=[gateway_pb2.Message(role="user", content=text)],
        sampling=gateway_pb2.SamplingParams(max_new_tokens=NEW_TOKENS),
    )
    parts = list(stub.Chat(request, timeout=120))
    return parts[0].session_id, [t for p in parts for t in p.token_ids]


def conversation(stub, script: list[str], stop: threading.Event | None = None) -> tuple[str, list[list[int]]]:
    """Runs the script's turns in one new session, retrying refused turns; returns the session and replies."""
    session, replies = "", []
    for text in script:
        give_up = time.monotonic() + TURN_RETRY_S
        while True:
            try:
                session, reply = chat_turn(stub, session, text)
                break
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE_CHAT or time.monotonic() > give_up:
                    raise
                time.sleep(0.2)  # back off before the retry
        replies.append(reply)
    return session, replies


def saved_turns(stub, session: str) -> int:
    give_up = time.monotonic() + TURN_RETRY_S
    while True:
        try:
            return stub.GetSession(gateway_pb2.GetSessionRequest(session_id=session), timeout=30).turns
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > give_up:
                raise
            time.sleep(0.2)


class Injector:
    """Seeded faults on `moemesh up`'s children, one at a time, each waited out before the next."""

    def __init__(self, cluster: Cluster, seed: int):
        self.cluster, self.rng = cluster, random.Random(seed)
        self.log: list[str] = []
        self.counts: Counter = Counter()

    def run(self, until: float) -> None:
        faults = [self.kill_expert, self.stop_expert, self.kill_router, self.stop_router, self.kill_redis]
        while time.monotonic() < until:
            fault = self.rng.choice(faults)
            began = time.monotonic()
            what = fault()
            self.counts[fault.__name__] += 1
            self.log.append(f"{began - self.start:6.1f}s {what} (recovered in {time.monotonic() - began:.1f}s)")
            time.sleep(self.rng.uniform(0.5, 2.0))  # calm between faults, as the schedule says

    def _pid(self, pattern: str) -> int:
        return self.rng.choice(sorted(self.cluster.child_pids(pattern)))

    def _ready_lines(self, name: str) -> list[str]:
        return [line for line in self.cluster.up.lines if re.match(rf"^\[{name}\] ready on ", line)]

    def _restarted(self, name: str, pid: int) -> str:
        """Kills `pid` and waits for a new ready line of a child named like `name`; returns its address."""
        seen = len(self.cluster.up.lines)
        os.kill(pid, signal.SIGKILL)
        return self.cluster.up.wait_for(rf"^\[{name}\] ready on (\S+)", timeout_s=120, after=seen).group(1)

    def kill_expert(self) -> str:
        address = self._restarted(r"expert-[\d.]+", self._pid(r" expert "))
        deadline = time.monotonic() + 60
        while served(address) == 0:  # joined the router's table and takes traffic
            assert time.monotonic() < deadline, f"restarted expert {address} got no traffic"
            time.sleep(0.1)
        return f"kill -9 expert, back at {address}"

    def _stop(self, pid: int) -> float:
        pause = self.rng.uniform(1.0, 3.0)
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(pause)  # the fault's length
        finally:
            os.kill(pid, signal.SIGCONT)
        return pause

    def stop_expert(self) -> str:
        return f"SIGSTOP expert for {self._stop(self._pid(r' expert ')):.1f}s"

    def kill_router(self) -> str:
        address = self._restarted(r"router-\d+", self._pid(r" router "))
        return f"kill -9 router, back at {address}"

    def stop_router(self) -> str:
        return f"SIGSTOP router for {self._stop(self._pid(r' router ')):.1f}s"

    def kill_redis(self) -> str:
        url = self._restarted("redis", self._pid(r"redis-server"))
        redis.Redis.from_url(url).ping()
        return f"kill -9 redis, back at {url}"


def served(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        info = expert_pb2_grpc.ExpertStub(channel).Describe(expert_pb2.DescribeExpertRequest(), timeout=10)
    return info.requests_served


@pytest.mark.timeout(SOAK_S + 240)
def test_chaos_soak(mixtral_dir):
    cluster = Cluster(
        mixtral_dir, "--experts", "2", "--replicas", "2", "--routers", "2", "--dtype", "float32"
    )  # fmt: skip
    stub = cluster.stub
    failures: list[str] = []
    done = Counter()
    try:
        with ThreadPoolExecutor(GENERATE_CLIENTS + CHAT_CLIENTS) as workers:
            expected = list(workers.map(lambda p: generate(stub, p), PROMPTS))
            expected_replies = [r for _, r in workers.map(lambda s: conversation(stub, s), SCRIPTS)]
        stop = threading.Event()

        def generate_loop(i: int) -> None:
            while not stop.is_set():
                try:
                    tokens = generate(stub, PROMPTS[i])
                except grpc.RpcError as exc:
                    failures.append(f"generate {i}: {exc.code().name}: {exc.details()}")
                    continue
                if tokens != expected[i]:
                    failures.append(f"generate {i}: tokens {tokens} != {expected[i]}")
                done["generate"] += 1

        def chat_loop(i: int) -> None:
            while not stop.is_set():
                try:
                    session, replies = conversation(stub, SCRIPTS[i])
                    if replies != expected_replies[i]:
                        failures.append(f"chat {i}: replies {replies} != {expected_replies[i]}")
                    if (turns := saved_turns(stub, session)) != len(SCRIPTS[i]):
                        failures.append(f"chat {i}: session {session} has {turns} saved turns of {len(SCRIPTS[i])}")
                except grpc.RpcError as exc:
                    failures.append(f"chat {i}: {exc.code().name}: {exc.details()}")
                    continue
                done["turns"] += len(SCRIPTS[i])

        injector = Injector(cluster, SEED)
        clients = [threading.Thread(target=generate_loop, args=(i,)) for i in range(GENERATE_CLIENTS)]
        clients += [threading.Thread(target=chat_loop, args=(i,)) for i in range(CHAT_CLIENTS)]
        for client in clients:
            client.start()
        injector.start = time.monotonic()
        try:
            injector.run(injector.start + SOAK_S)
        finally:
            stop.set()
            for client in clients:
                client.join(180)
        summary = (
            f"seed {SEED}, {SOAK_S:.0f}s: {done['generate']} generations and {done['turns']} chat turns, "
            f"{len(failures)} failures; faults: {dict(injector.counts)}"
        )
        print(summary, *injector.log, sep="\n")
        if REPORT:
            with Path(REPORT).open("a") as f:
                f.write(f"- {summary}\n")
        assert not failures, "\n".join(failures[:10])
        assert done["generate"] > GENERATE_CLIENTS and done["turns"] > 0
        assert sum(injector.counts.values()) >= 3
    finally:
        cluster.close()
    assert not cluster.up.session_alive(), "a process of the cluster outlived it"
