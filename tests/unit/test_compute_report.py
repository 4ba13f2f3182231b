"""What a service says it computes with: the dtype `auto` picks and why, the line, the metric's labels."""

import pytest
import torch
from prometheus_client import REGISTRY

from moemesh import compute_report, hardware
from moemesh.compute_report import ComputeReport, dtype_choice, weights_format
from moemesh.model import MLP
from moemesh.packed import half_weights_supported, pack_linears

pytestmark = pytest.mark.timeout(30)
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("flags", "checkpoint", "dtype", "reason"),
    [
        ({"avx2"}, torch.bfloat16, torch.float32, "bfloat16 checkpoint, CPU has no native bf16: fp32 compute"),
        ({"avx512_bf16"}, torch.bfloat16, torch.bfloat16, "bfloat16 checkpoint, CPU has native bf16: bf16 compute"),
        ({"amx_bf16"}, torch.float16, torch.bfloat16, "float16 checkpoint, CPU has native bf16: bf16 compute"),
        ({"avx512_bf16"}, torch.float32, torch.float32, "float32 checkpoint"),
    ],
)  # fmt: skip
def test_auto_dtype_and_its_reason_follow_the_cpu(monkeypatch, flags, checkpoint, dtype, reason):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    assert dtype_choice("auto", checkpoint, CPU) == (dtype, reason)


def test_an_explicit_dtype_is_its_own_reason(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2"}))
    assert dtype_choice("bfloat16", torch.bfloat16, CPU) == (torch.bfloat16, "--dtype bfloat16")


def test_weights_name_what_memory_holds():
    assert weights_format(torch.bfloat16, torch.bfloat16) == "bfloat16"
    assert weights_format(torch.bfloat16, torch.float32) == "float32 (checkpoint bfloat16)"
    assert weights_format(torch.bfloat16, torch.float32, "int8").startswith("int8 per output channel")


@pytest.mark.skipif(not half_weights_supported(torch.bfloat16, torch.float32, CPU), reason="no fbgemm fp16 kernels")
def test_half_weights_are_named_with_their_kernel():
    mlp = pack_linears(MLP(16, 32), torch.bfloat16)
    assert weights_format(torch.bfloat16, torch.float32, modules=[mlp]) == (
        "float16 linears, the rest bfloat16 or float32 (checkpoint bfloat16)"
    )
    assert compute_report.module_kernels([mlp], torch.float32, CPU) == (
        "fbgemm fp16 weights, widened to fp32 in the kernel"
    )


def test_kernels_follow_dtype_and_format(monkeypatch):
    monkeypatch.setattr(compute_report, "packing_supported", lambda dtype, device: dtype == torch.bfloat16)
    assert compute_report.linear_kernel(torch.bfloat16, CPU) == "oneDNN bf16, weights prepacked"
    assert "fp32" in compute_report.linear_kernel(torch.float32, CPU)
    assert compute_report.int8_kernel(torch.bfloat16, CPU).startswith("_weight_int8pack_mm")
    assert compute_report.int8_kernel(torch.float32, CPU).startswith("int8 weight widened to float32")
    assert "decode queries in fp32" in compute_report.attention_kernel(torch.bfloat16, CPU)
    assert "decode" not in compute_report.attention_kernel(torch.float32, CPU)


def test_announce_prints_one_line_and_exports_the_labels(capsys):
    report = ComputeReport(
        "expert", CPU, torch.float32, "bfloat16 checkpoint, CPU has no native bf16: fp32 compute",
        "float32 (checkpoint bfloat16)", 3, "--threads 3", {"experts": "MKL sgemm fp32", "lm head": "x"},
    )  # fmt: skip
    report.announce()
    line = capsys.readouterr().out.strip()
    assert line == (
        "expert compute: device cpu, dtype float32 (bfloat16 checkpoint, CPU has no native bf16: fp32 compute), "
        "weights float32 (checkpoint bfloat16), threads 3 (--threads 3); kernels: experts: MKL sgemm fp32; lm head: x"
    )
    labels = {"device": "cpu", "dtype": "float32", "threads": "3", "kernel_experts": "MKL sgemm fp32",
              "kernel_lm_head": "x", "weights": "float32 (checkpoint bfloat16)"}  # fmt: skip
    assert REGISTRY.get_sample_value("moemesh_compute_info", report.labels()) == 1.0
    assert labels.items() <= report.labels().items()


def test_settings_report_the_threads_they_set(tmp_path, monkeypatch):
    from moemesh.settings import ExpertSettings

    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(hardware, "available_cores", lambda: 2)
    threads = torch.get_num_threads()
    try:
        settings = ExpertSettings(model=tmp_path)
        settings.configure_compute()
        report = settings.compute_report("expert", torch.bfloat16, "float32", {})
    finally:
        torch.set_num_threads(threads)
    assert (report.threads, report.dtype) == (2, torch.float32)
    assert report.threads_reason.startswith("the cores this process may use: 2 (CPU affinity")
