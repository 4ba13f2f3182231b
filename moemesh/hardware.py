"""What the machine this process runs on can do, so that defaults fit it: the device, the compute dtype and
torch's threads.

bf16 matmuls are fast only where the CPU computes in bf16 natively (AVX512_BF16 or AMX on x86, the BF16
extension on Arm); elsewhere torch converts every operand and a bf16 matmul runs several times slower than
fp32 (17 against 93 GFLOP/s at 128 rows on an AVX2-only EPYC). The cores a service may use are its CPU
affinity bounded by its cgroup's CPU quota (a container's `--cpus`, a pod's CPU limit), which torch's own
default ignores. `--device auto` takes the first CUDA device torch sees, else the CPU; on CUDA, bf16 is native
from compute capability 8.0 (Ampere) on.
"""

import functools
import math
import os
import platform
import re
from pathlib import Path

import torch

from moemesh.errors import ConfigError

_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 (AVX-512, AMX), aarch64 ("Features: ... bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The first CPU's flags (x86 `flags`, Arm `Features`) from /proc/cpuinfo; empty where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return bool(cpu_flags() & _BF16_FLAGS)


_DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(name: str) -> str:
    """`name` when it is auto, cpu, cuda or cuda:N; else ValueError saying what is expected."""
    if not _DEVICE_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a device: expected auto, cpu, cuda or cuda:N")
    return name


def resolve_device(name: str) -> torch.device:
    """The device `--device name` means (`auto`: the first CUDA device when torch sees one, else the CPU); a
    CUDA device torch cannot see is a ConfigError, raised at start."""
    try:
        check_device_name(name)
    except ValueError as exc:
        raise ConfigError(f"device: {exc}") from None
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device: {name} requested, but {torch_build()} sees no CUDA device; use cpu (or auto)")
    device = torch.device(name)
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device: {name} requested, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def torch_build() -> str:
    """torch's version and what it was built for: `torch 2.13.0+cpu (a CPU-only build)`."""
    return f"torch {torch.__version__} ({f'CUDA {torch.version.cuda}' if torch.version.cuda else 'a CPU-only build'})"


def auto_compute_dtype(checkpoint_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """`--dtype auto`: fp32 checkpoints compute in fp32; half-precision ones in bf16 where the device has
    native bf16 (a CPU with AVX512_BF16/AMX/Arm BF16, a CUDA GPU of compute capability 8.0+), else in fp32
    (on such a CPU several times faster, and exact), from fp16 weights where fbgemm has its kernels
    (`moemesh.packed.HalfLinear`)."""
    if checkpoint_dtype == torch.float32:
        return checkpoint_dtype
    return torch.bfloat16 if native_bf16(device) else torch.float32


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by its cgroup's CPU quota (rounded up)."""
    cores = _affinity()
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def describe_cores() -> str:
    """How `available_cores` came out: `2 (CPU affinity 2, no cgroup CPU quota)`."""
    affinity = _affinity()
    quota = _cgroup_quota()
    limit = f"cgroup CPU quota {quota:g}" if quota else "no cgroup CPU quota"
    return f"{available_cores()} (CPU affinity {affinity}, {limit})"


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the cgroup's quota allows (cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us`); None: no quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 else None


def available_memory_bytes(device: torch.device) -> int:
    """Memory this process can still take on `device`: a GPU's free memory; on the CPU the system's
    MemAvailable, capped by its cgroup's limit."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit, used = (Path("/sys/fs/cgroup") / name for name in ("memory.max", "memory.current"))
        if (text := limit.read_text().strip()) != "max":
            available = min(available or 2**62, int(text) - int(used.read_text()))
    except (OSError, ValueError):
        pass
    return max(available, 0)
