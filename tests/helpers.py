"""Test helpers: tiny random checkpoints made with `transformers`, and `moemesh up` in a subprocess."""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import torch

from moemesh import launcher
from moemesh.demo_model import write_tokenizer
from moemesh.rpc import CHANNEL_OPTIONS
from moemesh.tls import PLAINTEXT, Tls, open_channel
from moemesh.v1 import gateway_pb2_grpc

DEEPSEEK_VOCAB = 129280
CPU = torch.device("cpu")


def make_mixtral(path: Path, *, seed: int = 0, tokenizer: bool = False, **overrides) -> Path:
    """A tiny random Mixtral written by `save_pretrained` (fp32, per-expert tensors on disk).

    With `tokenizer`: the real DeepSeek tokenizer (vocab 129280) and a DeepSeek-format chat template.
    """
    from transformers import MixtralConfig, MixtralForCausalLM

    params = dict(
        vocab_size=DEEPSEEK_VOCAB if tokenizer else 512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        eos_token_id=None,
        bos_token_id=None,
    )
    params.update(overrides)
    torch.manual_seed(seed)
    MixtralForCausalLM(MixtralConfig(**params)).save_pretrained(path)
    if tokenizer:
        write_tokenizer(path)
    return path


def hf_greedy(
    model_dir: Path, prompt: list[int], steps: int, device: torch.device = CPU
) -> tuple[list[int], list[torch.Tensor]]:
    """`transformers` greedy tokens and the logits [V] before each of them (in host memory), run in fp32 on
    `device`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    out = model.generate(
        torch.tensor([prompt], device=device), max_new_tokens=steps, do_sample=False, output_logits=True,
        return_dict_in_generate=True, pad_token_id=0,
    )  # fmt: skip
    return out.sequences[0, len(prompt) :].tolist(), [step[0].cpu() for step in out.logits]


class OutputProcess:
    """A command whose stdout and stderr `lines` collects, as it prints them; `env`: its environment (default:
    this process's). With `new_session`, it leads a process group of its own."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, new_session: bool = False):
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, bufsize=1, start_new_session=new_session, env=env,
            preexec_fn=launcher.die_with_parent,  # a killed test run leaves no `moemesh up` behind
        )  # fmt: skip
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout_s: float = 240, after: int = 0) -> re.Match:
        """The first line matching `pattern` among `lines[after:]` (`after=len(lines)`: only new ones)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for line in self.lines[after:]:
                    if match := regex.search(line):
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines[-60:]))
                self._changed.wait(min(left, 1.0))


def session_alive(sid: int) -> bool:
    """Whether any process is left in session `sid` (`pgrep -s`)."""
    return subprocess.run(["pgrep", "-s", str(sid)], capture_output=True).returncode == 0


class UpProcess(OutputProcess):
    """`moemesh up` in a session of its own; `lines` collects everything it prints, `log_dir` holds its services'
    logs until `stop`."""

    def __init__(self, model_dir: Path, *args: str, env: dict[str, str] | None = None):
        self.log_dir = Path(tempfile.mkdtemp(prefix="moemesh-up-logs-"))  # its services' log files
        argv = [sys.executable, "-m", "moemesh.cli", "up", "--model", str(model_dir), "--port", "0",
                "--log-dir", str(self.log_dir), *args]  # fmt: skip
        super().__init__(argv, env, new_session=True)

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM; the exit code, once `lines` holds everything it and its children printed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout_s)
        self._reader.join(timeout_s)
        shutil.rmtree(self.log_dir, ignore_errors=True)
        return code

    def session_alive(self) -> bool:
        """Whether a process of its session is left: `up` leads it, and its children (each in a process group
        of its own) stay in it."""
        return session_alive(self.proc.pid)


class Cluster:
    """A running `moemesh up` with the addresses of its services; with `--tls`, `ca` is the CA it printed and
    `channel` a TLS channel verifying the gateway against it."""

    def __init__(self, model_dir: Path, *args: str, env: dict[str, str] | None = None):
        self.model_dir = model_dir
        self.up = UpProcess(model_dir, *args, env=env)
        self.address = self.up.wait_for(r"^gateway listening on (\S+)").group(1)
        self.experts = self._ready_addresses("expert")  # by shard.replica
        self.routers = self._ready_addresses("router")  # none with `--routers 0`
        self.router = self.routers[0] if self.routers else None
        self.metrics = self.up.wait_for(r"gateway metrics on (\S+)").group(1)
        self.router_metrics = (
            self.up.wait_for(r"^\[router-0\] router metrics on (\S+)").group(1) if self.routers else None
        )
        redis_line = [m for line in self.up.lines if (m := re.match(r"^\[redis\] ready on (\S+)", line))]
        self.redis = redis_line[0].group(1) if redis_line else None
        ca_line = [m for line in self.up.lines if (m := re.match(r"^TLS CA certificate at (\S+)$", line))]
        self.ca = Path(ca_line[0].group(1)) if ca_line else None
        self.channel = open_channel(self.address, Tls.load(ca=self.ca).channel_credentials(), CHANNEL_OPTIONS)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    def _ready_addresses(self, role: str) -> list[str]:
        """The first ready address of each `[<role>-<index>]` child, by index (`expert-1.0`: shard 1, replica 0)."""
        first: dict[tuple[int, ...], str] = {}
        for line in self.up.lines:
            if match := re.match(rf"^\[{role}-([\d.]+)\] ready on (\S+)", line):
                first.setdefault(tuple(map(int, match.group(1).split("."))), match.group(2))
        return [first[index] for index in sorted(first)]

    def child_pids(self, pattern: str) -> list[int]:
        """The children of `moemesh up` whose command line matches `pattern`."""
        out = subprocess.run(
            ["ps", "-ww", "-o", "pid=,args=", "--ppid", str(self.up.proc.pid)], capture_output=True, text=True
        )
        return [int(pid) for pid, args in (line.split(maxsplit=1) for line in out.stdout.splitlines())
                if re.search(pattern, args)]  # fmt: skip

    def expert_pids(self) -> dict[str, int]:
        """Expert replica processes by their `--shard` spec and order: {"0/2#0": pid, ...}."""
        out = subprocess.run(
            ["ps", "-ww", "-o", "pid=,args=", "--ppid", str(self.up.proc.pid)], capture_output=True, text=True
        )
        pids: dict[str, int] = {}
        for line in out.stdout.splitlines():
            pid, args = line.split(maxsplit=1)
            if match := re.search(r" expert .*--shard (\S+)", args):
                n = sum(1 for k in pids if k.startswith(match.group(1)))
                pids[f"{match.group(1)}#{n}"] = int(pid)
        return pids

    def metric(self, name: str) -> float:
        """The gateway's `name`, summed over its labels' series."""
        import urllib.request

        text = urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10).read().decode()
        values = re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
        assert values, f"metric {name} not exported"
        return sum(map(float, values))

    def close(self) -> None:
        self.channel.close()
        self.up.stop()


def stepwise_logits(
    model_dir: Path,
    routed_factory,
    prompt: list[int],
    steps: int,
    device: torch.device = CPU,
    dtype: torch.dtype = torch.float32,
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding with our dense model in `dtype` on `device` and the routed experts
    `routed_factory(ckpt)`; logits [V] of every step, in host memory."""
    from moemesh.checkpoint import Checkpoint
    from moemesh.model import DenseModel, KVCache, SequenceSlice, StepBatch

    ckpt = Checkpoint(model_dir)
    dense = DenseModel.from_checkpoint(ckpt, dtype, device)
    routed = routed_factory(ckpt)
    cache = KVCache(ckpt.config, dtype, device)
    ids, tokens, logits = prompt, [], []
    for _ in range(steps):
        n = len(ids)
        batch = StepBatch(
            torch.tensor(ids, device=device), torch.arange(cache.length, cache.length + n, device=device),
            [SequenceSlice(0, n, cache)], torch.tensor([n - 1], device=device),
        )  # fmt: skip
        step_logits = dense([batch], routed)[0].cpu()
        cache.length += n
        logits.append(step_logits)
        tokens.append(int(step_logits.argmax()))
        ids = [tokens[-1]]
    return tokens, logits


class RedisServer:
    """A real redis-server with AOF (fsync always) in its own directory; can be killed and restarted."""

    def __init__(self, directory: Path):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)


class ServiceProcess:
    """One more service (`moemesh gateway|router|expert`) beside a running cluster, fp32, port 0; `faults`: its
    `MOEMESH_FAULTS` (`moemesh.faults`)."""

    def __init__(self, role: str, model_dir: Path, *args: str, faults: str = ""):
        argv = [sys.executable, "-m", "moemesh.cli", role, "--model", str(model_dir), "--port", "0",
                "--dtype", "float32", *args]  # fmt: skip
        env = {"OMP_WAIT_POLICY": "PASSIVE"} | dict(os.environ)  # as `moemesh up` runs its services
        if faults:
            env["MOEMESH_FAULTS"] = faults
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
        )  # fmt: skip
        for line in self.proc.stdout:
            if match := re.match(rf"^{role} listening on (\S+)", line):
                self.address = match.group(1)
                break
        else:
            raise AssertionError(f"{role} exited with {self.proc.wait()}")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(30)


class GatewayProcess(ServiceProcess):
    """A gateway replica in front of an existing router (or routers) and Redis."""

    def __init__(self, model_dir: Path, router: str, redis_url: str, *args: str):
        super().__init__("gateway", model_dir, "--router", router, "--redis", redis_url, *args)
        self.channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        super().close()


class ExpertProcess(ServiceProcess):
    """An expert replica announcing itself in the registry."""

    def __init__(self, model_dir: Path, shard: str, registry: str, *args: str, faults: str = ""):
        super().__init__("expert", model_dir, "--shard", shard, "--registry", registry, *args, faults=faults)

    def served(self) -> int:
        from moemesh.v1 import expert_pb2, expert_pb2_grpc

        with grpc.insecure_channel(self.address) as channel:
            info = expert_pb2_grpc.ExpertStub(channel).Describe(expert_pb2.DescribeExpertRequest(), timeout=10)
        return info.requests_served


class RouterProcess(ServiceProcess):
    """A router that finds the expert replicas in the registry."""

    def __init__(self, model_dir: Path, registry: str, *args: str):
        super().__init__("router", model_dir, "--registry", registry, *args)


class RecordingCluster:
    """A stand-in `launcher.Cluster` that records the command line of each service it would start."""

    tls = PLAINTEXT

    def __init__(self):
        self.argvs: dict[str, list[str]] = {}

    def spawn(self, service: launcher.Service) -> SimpleNamespace:
        self.argvs[service.name] = service.argv
        return SimpleNamespace(address="127.0.0.1:1")

    def wait_ready(self, service, child) -> None:
        pass

    def start(self, service: launcher.Service) -> SimpleNamespace:
        return self.spawn(service)
