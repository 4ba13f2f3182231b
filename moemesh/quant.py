"""Weight-only int8 quantization of linear layers: symmetric, one scale per output channel.

`Int8Linear` keeps `weight` as int8 [out, in] and `scales` as float32 [out], with
scale = max|w| / 127 of each row (computed in float32) and q = round(w / scale) in [-127, 127], so the
dequantized weight q * scale is within scale / 2 of the original, element by element. Activations stay
in their dtype (bf16 or fp32); only the weights shrink, to a quarter of fp32 and half of bf16 (plus one
float32 per output channel).

`forward` picks the fastest correct kernel for the input (measured by `python -m bench.quant` on the
2-core AVX-512 machine, see docs/benchmarks.md):
- bf16 / fp16 on CPU, up to `INT8PACK_MAX_ROWS` rows: `aten._weight_int8pack_mm`, which reads the int8
  weight directly, accumulates in fp32 and rounds once (it needs a 2-D, last-dim-contiguous input and
  scales in the input's dtype).
- otherwise (fp32, more rows, other devices): convert the weight to the input's dtype and scale the
  output per channel, `F.linear(x, weight.to(x.dtype)) * scales` (the gpt-fast recipe); int8 values
  are exact in bf16 and fp32, so only the matmul and the final scaling round. (fp16 past the int8pack
  rows multiplies by the dequantized weight instead: its unscaled sums could overflow.)

`quantize_int8(module)` swaps every `nn.Linear` inside a module (an expert, whatever its projections
are called) for an `Int8Linear`; `parameter_bytes(module)` counts the bytes of its parameters and buffers.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

QMAX = 127  # symmetric range [-127, 127]: -128 is never used, so negation is exact

# Up to this many rows (tokens), bf16/fp16 inputs on CPU use `_weight_int8pack_mm`; above, the weight is
# dequantized for oneDNN's bf16 GEMM. int8pack reads half the bytes of a bf16 weight but multiplies in
# fp32 FMAs, ~0.04 ms per row on a 1024 x 2816 projection (2 threads); converting the weight costs a fixed
# 0.08-0.24 ms and then runs at bf16 GEMM speed (~0.012 ms per row): they cross at 12-16 rows.
INT8PACK_MAX_ROWS = 12


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] (any float dtype) -> (int8 [out, in], float32 scales [out]); per output channel."""
    w = weight.detach().to(torch.float32)
    scales = w.abs().amax(dim=1) / QMAX  # [out]
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))  # all-zero rows quantize to 0
    q = torch.round(w / divisor[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scales


def dequantize_weight(weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 [out, in] and scales [out] -> weight [out, in] in `dtype` (scaled in float32, rounded once)."""
    return (weight.to(torch.float32) * scales.to(torch.float32)[:, None]).to(dtype)


def _has_int8pack_mm() -> bool:
    try:
        torch.ops.aten._weight_int8pack_mm  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


_INT8PACK = _has_int8pack_mm()
_INT8PACK_DTYPES = (torch.bfloat16, torch.float16)
_WIDE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)  # fp32's exponent range


class Int8Linear(nn.Module):
    """`nn.Linear` with an int8 weight [out, in] and float32 per-output-channel scales [out]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, bias_dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        has_bias = linear.bias is not None
        out = cls(linear.in_features, linear.out_features, bias=has_bias)
        out.weight, out.scales = quantize_weight(linear.weight)
        if has_bias:
            out.bias = linear.bias.detach().clone()
        return out

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self.weight, self.scales, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, in]
        if _INT8PACK and x.device.type == "cpu" and x.dtype in _INT8PACK_DTYPES and x2.shape[0] <= INT8PACK_MAX_ROWS:
            out = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight, self.scales.to(x.dtype))
        elif x.dtype in _WIDE_DTYPES:  # int8 values are exact in these; only the matmul and the scaling round
            out = F.linear(x2, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        else:  # fp16 and others: unscaled int8 sums (up to 127 x |x| x in) could overflow before the scaling
            out = F.linear(x2, self.dequantized(x.dtype))
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(module: nn.Module) -> nn.Module:
    """Replaces every `nn.Linear` inside `module` by an `Int8Linear`, in place, and returns `module`.

    A Linear reached under several names becomes one shared Int8Linear. If `module` is itself an
    `nn.Linear` it cannot be replaced in place: its `Int8Linear` is returned instead.
    """
    return replace_linears(module, Int8Linear.from_linear)


def replace_linears(module: nn.Module, convert: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    """Replaces every `nn.Linear` inside `module` by `convert(linear)`, in place (one replacement for a Linear
    reached under several names), and returns `module`; a `module` that is itself a Linear is returned converted."""
    if isinstance(module, nn.Linear):
        return convert(module)
    done: dict[int, nn.Module] = {}
    targets = [
        (parent, name, child)
        for parent in module.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    for parent, name, child in targets:
        if id(child) not in done:
            done[id(child)] = convert(child)
        setattr(parent, name, done[id(child)])
    return module


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer of `module` (numel x element size), and of the weights that
    modules hold packed outside them (`packed_bytes`: `moemesh.quant_linear.W8A8Linear`)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    packed = sum(getattr(m, "packed_bytes", 0) for m in module.modules())
    return sum(t.numel() * t.element_size() for t in tensors.values()) + packed
