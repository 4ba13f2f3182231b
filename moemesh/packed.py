"""Linear layers whose weights are packed once, at load, for the CPU kernel that reads them fastest.

A decode step is a chain of small-batch matmuls that must stream their weights at memory speed, so the layout
and width of a weight in memory set the step's time:

- bf16 compute on a CPU with native bf16 (AVX512-bf16 / AMX): `PackedLinear`, the weight reordered once into
  oneDNN's blocked layout (`mkldnn._reorder_linear_weight`, what `torch.compile` does for frozen CPU linears).
  `F.linear` hands oneDNN the plain [out, in] weight at every call; the packed one is read faster with bit for
  bit the same output (`python -m bench.micro`, docs/benchmarks.md).
- fp32 compute of a half-precision (bf16 or fp16) checkpoint, which `--dtype auto` chooses on a CPU without
  native bf16: `HalfLinear`, the weight held as fp16 in fbgemm's packed layout and widened to fp32 inside the
  kernel, which sums in fp32, as llama.cpp computes f16 weights. The weight stays at the checkpoint's width
  instead of doubling, and the kernel, reading half the bytes, is faster than fp32 `F.linear` at the batch
  sizes of decode and prefill (`python -m bench.quant_kernels`, docs/benchmarks.md). bf16 -> fp16 is exact for
  magnitudes 2^-14 to 65504 (fp16 has more mantissa bits) and within 2^-25 below; a weight beyond fp16's range
  stays fp32.

Elsewhere (fp32 checkpoints, whose packed MKL kernel would sum in another order; CPUs without these kernels),
`pack_linears` leaves the module as it is.
"""

import torch
from torch import nn

FP16_MAX = torch.finfo(torch.float16).max


def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def half_weights_supported(stored: torch.dtype, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether float linears of a `stored`-dtype checkpoint computed in `dtype` hold fp16 weights (`HalfLinear`)."""
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and stored in (torch.bfloat16, torch.float16)
        and "fbgemm" in torch.backends.quantized.supported_engines
    )


class PackedLinear(nn.Module):
    """`nn.Linear` over a oneDNN-packed weight; inputs of any leading shape, in the weight's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        """weight [out, in], bias [out] or None, as `nn.Linear` holds them."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class HalfLinear(nn.Module):
    """`nn.Linear` in fp32 over an fp16 weight in fbgemm's packed layout (CPU); inputs of any leading shape."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        """weight [out, in] and bias [out] or None, as `nn.Linear` holds them, each within fp16's range."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        bias = None if bias is None else bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        out = torch.ops.quantized.linear_dynamic_fp16(rows, self.packed)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights fp16"


def pack_linears(module: nn.Module, stored: torch.dtype) -> nn.Module:
    """Swaps every `nn.Linear` inside `module` (and `module` itself) for a `PackedLinear` or `HalfLinear` where
    its weight's dtype and device support one (`stored`: the checkpoint's dtype); returns the module, or its
    replacement."""
    if type(module) is nn.Linear:
        weight = module.weight
        if packing_supported(weight.dtype, weight.device):
            return PackedLinear(weight, module.bias)
        if half_weights_supported(stored, weight.dtype, weight.device) and _fits_fp16(module):
            return HalfLinear(weight, module.bias)
        return module
    for name, child in module.named_children():
        packed = pack_linears(child, stored)
        if packed is not child:
            setattr(module, name, packed)
    return module


def _fits_fp16(linear: nn.Linear) -> bool:
    return all(p.abs().max() <= FP16_MAX for p in linear.parameters())
