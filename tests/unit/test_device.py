"""`--device`: resolving auto/cpu/cuda/cuda:N, failing at start on a CUDA device torch cannot see, `moemesh up`
passing it to every service."""

from pathlib import Path

import pytest
import torch

from moemesh import cli, hardware, launcher
from moemesh.errors import ConfigError
from tests.helpers import RecordingCluster

pytestmark = pytest.mark.timeout(30)

NO_CUDA = "device: cuda requested, but torch .* sees no CUDA device; use cpu"


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_auto_is_the_cpu_without_cuda(no_cuda):
    assert hardware.resolve_device("auto") == torch.device("cpu")
    assert hardware.resolve_device("cpu") == torch.device("cpu")


def test_auto_is_the_first_gpu_with_cuda(one_gpu):
    assert hardware.resolve_device("auto") == torch.device("cuda", 0)
    assert hardware.resolve_device("cuda") == torch.device("cuda", 0)
    assert hardware.resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"device: cuda:1 requested, but torch sees 1 CUDA device\(s\)"):
        hardware.resolve_device("cuda:1")


@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_cuda_fails_clearly(no_cuda, name):
    with pytest.raises(ConfigError, match=NO_CUDA.replace("cuda", name, 1)):
        hardware.resolve_device(name)


def test_a_garbage_name_fails_clearly():
    with pytest.raises(ConfigError, match=r"device: 'gpu' is not a device: expected auto, cpu, cuda or cuda:N"):
        hardware.resolve_device("gpu")


@pytest.mark.parametrize(
    ("capability", "expected"), [((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16), ((7, 5), torch.float32)]
)
def test_auto_dtype_on_cuda_follows_the_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    cuda = torch.device("cuda", 0)
    assert hardware.auto_compute_dtype(torch.bfloat16, cuda) == expected
    assert hardware.auto_compute_dtype(torch.float32, cuda) == torch.float32


@pytest.mark.parametrize("service", ["gateway", "router", "expert"])
def test_a_service_asked_for_cuda_without_it_exits_2_before_loading(no_cuda, capsys, service):
    assert cli.main([service, "--model", "/nonexistent", "--device", "cuda"]) == 2
    assert f"moemesh {service}: device: cuda requested" in capsys.readouterr().err


def test_a_bad_setting_exits_2_naming_it(capsys):
    assert cli.main(["router", "--model", "/m", "--device", "tpu"]) == 2
    expected = "moemesh router: device: 'tpu' is not a device: expected auto, cpu, cuda or cuda:N"
    assert expected in capsys.readouterr().err


def test_up_checks_the_device_before_starting_anything(no_cuda, capsys):
    assert cli.main(["up", "--model", "/nonexistent", "--device", "cuda:0"]) == 2
    assert "moemesh up: device: cuda:0 requested" in capsys.readouterr().err


def test_up_passes_the_device_to_every_service(tmp_path):
    recorder = RecordingCluster()
    spec = launcher.ClusterSpec(Path("/m"), experts=2, routers=2, redis_url="redis://127.0.0.1:1/0", device="cuda:1")
    launcher._start(recorder, spec, tmp_path)
    assert sorted(recorder.argvs) == ["expert-0.0", "expert-1.0", "gateway", "router-0", "router-1"]
    for argv in recorder.argvs.values():
        assert argv[argv.index("--device") + 1] == "cuda:1"
