"""What a service computes with, and why: one line at start and the labels of `moemesh_compute_info`.

`--dtype auto`, `--threads 0` and the kernels behind each layer kind are chosen from the hardware
(`moemesh.hardware`); a newcomer on a CPU without native bf16 should see at once that a bf16 checkpoint runs in
fp32, and an operator should see it on a dashboard. The kernel names are those of the code paths taken for that
dtype, device and weight format (`moemesh.packed`, `moemesh.quant`, `moemesh.model.attend`).
"""

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from prometheus_client import Info
from torch import nn

from moemesh import hardware
from moemesh.codec import parse_dtype
from moemesh.packed import HalfLinear, PackedLinear, packing_supported
from moemesh.quant import INT8PACK_MAX_ROWS, Int8Linear
from moemesh.quant_linear import Float8Linear, IntLinear, W8A8Linear


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


COMPUTE_INFO = Info("moemesh_compute", "What this service computes with: device, dtype, weights, kernels, threads")


@dataclass(frozen=True)
class ComputeReport:
    role: str  # gateway, router or expert
    device: torch.device
    dtype: torch.dtype
    dtype_reason: str
    weights: str  # the weights' format in memory
    threads: int
    threads_reason: str
    kernels: dict[str, str] = field(default_factory=dict)  # layer kind -> kernel

    def line(self) -> str:
        """`<role> compute: ...`, the line a service prints at start (and `moemesh up` shows)."""
        kernels = "; ".join(f"{kind}: {kernel}" for kind, kernel in self.kernels.items())
        return (
            f"{self.role} compute: device {self.device}, dtype {dtype_name(self.dtype)} ({self.dtype_reason}), "
            f"weights {self.weights}, threads {self.threads} ({self.threads_reason}); kernels: {kernels}"
        )

    def labels(self) -> dict[str, str]:
        labels = {
            "device": str(self.device), "dtype": dtype_name(self.dtype), "dtype_reason": self.dtype_reason,
            "weights": self.weights, "threads": str(self.threads), "threads_reason": self.threads_reason,
        }  # fmt: skip
        return labels | {f"kernel_{kind.replace(' ', '_')}": kernel for kind, kernel in self.kernels.items()}

    def announce(self) -> None:
        """Prints the line and exports the labels as `moemesh_compute_info`."""
        COMPUTE_INFO.info(self.labels())
        print(self.line(), flush=True)


def dtype_choice(requested: str, checkpoint_dtype: torch.dtype, device: torch.device) -> tuple[torch.dtype, str]:
    """The compute dtype `--dtype requested` means, and why (`auto`: `hardware.auto_compute_dtype`)."""
    if requested != "auto":
        return parse_dtype(requested), f"--dtype {requested}"
    chosen = hardware.auto_compute_dtype(checkpoint_dtype, device)
    checkpoint = dtype_name(checkpoint_dtype)
    if checkpoint_dtype == torch.float32:
        return chosen, "float32 checkpoint"
    where = "GPU" if device.type == "cuda" else "CPU"
    if chosen == torch.bfloat16:
        return chosen, f"{checkpoint} checkpoint, {where} has native bf16: bf16 compute"
    return chosen, f"{checkpoint} checkpoint, {where} has no native bf16: fp32 compute"


def threads_reason(requested: int) -> str:
    if requested:
        return f"--threads {requested}"
    return f"the cores this process may use: {hardware.describe_cores()}"


def linear_kernel(dtype: torch.dtype, device: torch.device) -> str:
    """The matmul behind a float linear layer of this dtype on this device."""
    if device.type == "cuda":
        return f"cuBLAS {dtype_name(dtype)}"
    if packing_supported(dtype, device):
        return "oneDNN bf16, weights prepacked"
    if dtype == torch.float32:
        return "MKL sgemm fp32" if torch.backends.mkl.is_available() else "torch fp32 GEMM"
    return f"torch {dtype_name(dtype)} GEMM"


def int8_kernel(dtype: torch.dtype, device: torch.device) -> str:
    """The matmul behind `moemesh.quant.Int8Linear` for inputs of this dtype."""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return f"_weight_int8pack_mm up to {INT8PACK_MAX_ROWS} rows, int8 weight widened to {dtype_name(dtype)} above"
    return f"int8 weight widened to {dtype_name(dtype)}, scaled per output channel"


def module_kernels(modules: Iterable[nn.Module], dtype: torch.dtype, device: torch.device) -> str:
    """The kernels of the linear layers inside `modules`, as loaded (float, packed, int8, int4, fp8), each once."""
    seen: dict[str, None] = {}
    for root in modules:
        for module in root.modules():
            if isinstance(module, nn.Linear | PackedLinear):
                seen[linear_kernel(dtype, device)] = None
            elif isinstance(module, HalfLinear):
                seen["fbgemm fp16 weights, widened to fp32 in the kernel"] = None
            elif isinstance(module, Int8Linear):
                seen[int8_kernel(dtype, device)] = None
            elif isinstance(module, IntLinear):
                how = f"dequantized to {dtype_name(dtype)}"
                if module.kernel == "int4pack":
                    how = "int4pack" + ("" if module.kernel_dtype == dtype else " on bf16-rounded inputs")
                seen[f"int{module.bits} by groups of {module.group_size}, {how}"] = None
            elif isinstance(module, W8A8Linear):
                seen[f"w8a8 dynamic ({torch.backends.quantized.engine}), int8 inputs per tensor"] = None
            elif isinstance(module, Float8Linear):
                seen[f"fp8 e4m3 blocks {module.block[0]}x{module.block[1]}, dequantized to {dtype_name(dtype)}"] = None
    return ", ".join(seen) or "none"


def attention_kernel(dtype: torch.dtype, device: torch.device) -> str:
    if device.type == "cpu" and dtype != torch.float32:
        return f"scaled_dot_product_attention {dtype_name(dtype)} (decode queries in fp32)"
    return f"scaled_dot_product_attention {dtype_name(dtype)}"


QUANTIZED_AT_LOAD = {"int8": "int8 per output channel", "int4": "int4 by groups", "w8a8": "int8 per channel, W8A8"}


def weights_format(
    checkpoint_dtype: torch.dtype,
    dtype: torch.dtype,
    quantize: str = "none",
    stored: str | None = None,
    modules: Iterable[nn.Module] = (),
) -> str:
    """The weights' format in memory: a quantized checkpoint's (`stored`, its `QuantFormat.describe()`) kept as
    stored, float weights in `dtype`, in fp16 where `modules` hold `HalfLinear`s, or quantized at load
    (`quantize`)."""
    checkpoint = dtype_name(checkpoint_dtype)
    if quantize in QUANTIZED_AT_LOAD:
        held = f"{QUANTIZED_AT_LOAD[quantize]} (quantized at load)"
    elif any(isinstance(module, HalfLinear) for root in modules for module in root.modules()):
        held = f"float16 linears, the rest {checkpoint} or {dtype_name(dtype)}"
    else:
        held = dtype_name(dtype)
    floats = held if held == checkpoint else f"{held} (checkpoint {checkpoint})"
    return floats if stored is None else f"{stored} as stored, the rest {floats}"
