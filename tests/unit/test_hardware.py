"""Defaults that fit the CPU: the compute dtype for `--dtype auto`, and the cores a service may use."""

import os

import pytest
import torch

from moemesh import hardware
from moemesh.settings import ExpertSettings

pytestmark = pytest.mark.timeout(30)

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("flags", "checkpoint", "expected"),
    [
        ({"avx2", "fma"}, torch.bfloat16, torch.float32),  # AVX2 only: bf16 matmuls are emulated, slow
        ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16, torch.bfloat16),
        ({"avx2", "amx_bf16", "amx_tile"}, torch.float16, torch.bfloat16),
        ({"fp", "asimd", "bf16"}, torch.bfloat16, torch.bfloat16),  # Arm's Features line
        ({"avx2"}, torch.float16, torch.float32),
        ({"avx512_bf16"}, torch.float32, torch.float32),
    ],
)
def test_auto_dtype_follows_the_cpus_native_bf16(monkeypatch, flags, checkpoint, expected):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    assert hardware.auto_compute_dtype(checkpoint, CPU) == expected
    settings = ExpertSettings(model="m")
    assert settings.compute_dtype(checkpoint, CPU) == expected
    assert ExpertSettings(model="m", dtype="bfloat16").compute_dtype(checkpoint, CPU) == torch.bfloat16


def test_cgroup_quota_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert hardware._cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert hardware._cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert hardware._cgroup_quota(tmp_path) == 0.5
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert hardware._cgroup_quota(tmp_path) is None
    assert hardware._cgroup_quota(tmp_path / "missing") is None


def test_available_cores_is_the_affinity_capped_by_the_quota(monkeypatch):
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.setattr(hardware, "_cgroup_quota", lambda: None)
    assert hardware.available_cores() == affinity
    monkeypatch.setattr(hardware, "_cgroup_quota", lambda: 0.5)
    assert hardware.available_cores() == 1  # a fraction of a core still runs one thread
    monkeypatch.setattr(hardware, "_cgroup_quota", lambda: affinity + 8.0)
    assert hardware.available_cores() == affinity


def test_a_service_sets_torch_threads_from_its_cores(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(hardware, "available_cores", lambda: 1)
    try:
        ExpertSettings(model="m").configure_compute()
        assert torch.get_num_threads() == 1
        ExpertSettings(model="m", threads=2).configure_compute()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
