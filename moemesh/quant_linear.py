"""Linear layers over quantized weights kept at their stored width, and their place in a model.

`IntLinear` holds an `IntWeight` (a float32 scale and zero per row and group) and `Float8Linear` a
`Float8Weight`. One layout of the codes is kept, chosen at load for the device (`python -m bench.quant_kernels`,
docs/benchmarks.md):

- 4-bit codes on the CPU, groups of 32-256 columns, rows a multiple of 16: `_weight_int4pack_mm_for_cpu`'s
  own layout (made once by `_convert_weight_to_int4pack_for_cpu`; it dequantizes (code - 8) x scale + zero',
  so zero' = (8 - zero) x scale). The kernel takes bf16 or fp16 inputs at speed; fp32 inputs are rounded to
  bf16 for it and its output widened back (in fp32 it runs many times slower), the way llama.cpp rounds
  activations to 8 bits for its 4-bit dot products, unless `POLICY.exact` (`--quantized-kernels exact`) asks
  for the exact path below. At a few rows it reads its weights faster than fp32 or bf16 weights, but its time
  grows with the rows (`python -m bench.quant_kernels`, docs/benchmarks.md): from the row count where it
  loses (`gemm_rows`, measured at load for each shape), the weight is read back from that layout into the
  compute dtype and multiplied by a dense GEMM;
- otherwise (8-bit codes, other group sizes, CUDA): codes one or two to a byte, the weight dequantized into
  the input's dtype at each call, then `F.linear`: exact (fp32 compute agrees with a float model of the
  dequantized weights to fp32 rounding) but paying a pass over the whole weight per call.

`install_quantized` swaps a model's `nn.Linear`s for these where the state dict holds quantized weights, fusing
the projections a module computes as one (q, k, v; gate, up) when their formats allow.
"""

import functools
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.errors import ConfigError
from moemesh.hardware import cpu_flags
from moemesh.quant import quantize_int8, replace_linears
from moemesh.quant_formats import Float8Weight, IntWeight, QuantizedWeight, concatenate

INT4PACK_GROUPS = (32, 64, 128, 256)
RTN_GROUP = 128  # `--quantize int4`: the group size, where the input splits into whole groups
INT4PACK_DTYPES = (torch.bfloat16, torch.float16)  # what the kernel takes at speed; other inputs are cast to bf16


@dataclass
class KernelPolicy:
    """What the process's quantized layers may trade for speed (`ServiceSettings.quantized_kernels`)."""

    exact: bool = False  # fp32 compute: 4-bit weights dequantized per call, never on bf16-rounded inputs


POLICY = KernelPolicy()


@contextmanager
def exact_kernels() -> Iterator[None]:
    """Layers made inside use the exact paths (tests that compare fp32 compute with a float reference)."""
    before, POLICY.exact = POLICY.exact, True
    try:
        yield
    finally:
        POLICY.exact = before


def int4pack_fits(weight: IntWeight, device: torch.device) -> bool:
    out, inp = weight.shape
    return (
        weight.bits == 4 and device.type == "cpu" and weight.group_size in INT4PACK_GROUPS
        and inp % weight.group_size == 0 and out % 16 == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    )  # fmt: skip


INT4PACK_ROWS = 64  # `_convert_weight_to_int4pack_for_cpu` packs rows in blocks of 64 (AVX-512) or 32 (else)


@functools.cache
def int4pack_order(columns: int) -> torch.Tensor:
    """Where each code of 64 rows x `columns` sits in the int4pack layout: nibble j of the layout (byte j // 2, low
    nibble first) holds code `order[j]` of the row-major block. Learnt from the packing op itself, 4 bits of every
    code's index at a time, since the layout differs between CPU kinds (blocks of 64 rows on AVX-512, 32 on AVX2);
    returned inverted, to gather the row-major codes from the layout's nibbles."""
    index = torch.arange(INT4PACK_ROWS * columns).view(INT4PACK_ROWS, columns)
    found = torch.zeros(INT4PACK_ROWS * columns, dtype=torch.int64)
    for shift in range(0, index.numel().bit_length(), 4):
        probe = ((index >> shift) & 0xF).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 2).view(-1)
        found |= torch.stack((packed & 0xF, packed >> 4), dim=-1).view(-1).long() << shift
    return torch.argsort(found)


NEVER = sys.maxsize
PROBE_ROWS = (16, 32, 64, 128, 256, 512)
_GEMM_ROWS: dict[tuple[int, int, int, torch.dtype], int] = {}  # by (out, in, group size, compute dtype)


def gemm_rows(layer: "IntLinear", dtype: torch.dtype) -> int:
    """The fewest rows from which dequantizing an int4pack layer once and a dense GEMM beat the int4pack kernel
    (which computes row by row: ~linear in rows), measured on the first layer of each shape and dtype."""
    key = (layer.out_features, layer.in_features, layer.group_size, dtype)
    if key not in _GEMM_ROWS:
        _GEMM_ROWS[key] = next((rows for rows in PROBE_ROWS if _gemm_wins(layer, dtype, rows)), NEVER)
    return _GEMM_ROWS[key]


def _gemm_wins(layer: "IntLinear", dtype: torch.dtype, rows: int) -> bool:
    x = torch.randn(rows, layer.in_features, dtype=dtype)
    with torch.inference_mode():
        packed = _best_s(lambda: layer.int4pack_mm(x))
        dense = _best_s(lambda: F.linear(x, layer.int4pack_dequantized(dtype)))
    return dense < packed


def _best_s(run: Callable[[], object], repeats: int = 3) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


class IntLinear(nn.Module):
    """y = x W^T (+ b) over integer codes; `kernel` is `int4pack` or `dequantize` (see the module's doc)."""

    def __init__(self, weight: IntWeight, dtype: torch.dtype, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bits, self.group_size = weight.bits, weight.group_size
        self.bias = bias
        self.register_buffer("order", weight.order, persistent=False)
        device = weight.codes.device
        if int4pack_fits(weight, device) and (dtype in INT4PACK_DTYPES or not POLICY.exact):
            self.kernel = "int4pack"
            self.kernel_dtype = dtype if dtype in INT4PACK_DTYPES else torch.bfloat16
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.codes.to(torch.int32), 2)
            scale_and_zero = torch.stack((weight.scales, (8 - weight.zeros) * weight.scales), dim=-1)  # [out, G, 2]
            self.register_buffer("packed", packed, persistent=False)
            self.register_buffer(
                "scale_and_zero", scale_and_zero.transpose(0, 1).contiguous().to(self.kernel_dtype), persistent=False
            )
            self.gemm_rows = gemm_rows(self, dtype) if self.out_features % INT4PACK_ROWS == 0 else NEVER
            return
        self.kernel = "dequantize"
        codes = weight.codes
        self.nibbles = self.bits == 4 and self.in_features % 2 == 0  # two codes to a byte, the low nibble first
        if self.nibbles:
            codes = codes.view(self.out_features, -1, 2)
            codes = codes[..., 0] | (codes[..., 1] << 4)
        self.register_buffer("codes", codes.contiguous(), persistent=False)
        self.register_buffer("scales", weight.scales, persistent=False)
        self.register_buffer("zeros", weight.zeros, persistent=False)

    def int4pack_dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in `dtype` read back from the int4pack layout (rows a multiple of 64), whose order
        depends on the CPU's vector width (`int4pack_order`)."""
        n, k, g = self.out_features, self.in_features, self.group_size
        v = self.packed.view(n // INT4PACK_ROWS, -1)
        nibbles = torch.stack((v & 0xF, v >> 4), dim=-1).view(n // INT4PACK_ROWS, -1)
        codes = nibbles.index_select(1, int4pack_order(k)).view(n, k)
        scale, zero = self.scale_and_zero.to(dtype).unbind(-1)  # [groups, out] each
        w = codes.to(dtype).view(n, k // g, g).sub_(8)
        return w.mul_(scale.T[..., None]).add_(zero.T[..., None]).view(n, k)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in `dtype`, columns in the codes' order (`order`); one pass of in-place ops."""
        out, inp, g = self.out_features, self.in_features, self.group_size
        codes = self.codes
        if self.nibbles:
            unpacked = torch.empty(out, inp // 2, 2, dtype=torch.uint8, device=codes.device)
            torch.bitwise_and(codes, 0xF, out=unpacked[..., 0])
            torch.bitwise_right_shift(codes, 4, out=unpacked[..., 1])
            codes = unpacked
        groups = self.scales.shape[1]
        w = codes.reshape(out, -1).to(dtype)
        if groups * g != inp:  # a last, shorter group
            return (w - self.zeros.to(dtype).repeat_interleave(g, 1)[:, :inp]) * self.scales.to(
                dtype
            ).repeat_interleave(g, 1)[:, :inp]
        w = w.view(out, groups, g)
        return w.sub_(self.zeros.to(dtype)[..., None]).mul_(self.scales.to(dtype)[..., None]).view(out, inp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.order is not None:
            x2 = x2.index_select(1, self.order)
        if self.kernel == "int4pack" and x2.shape[0] < self.gemm_rows:
            out = self.int4pack_mm(x2).to(x.dtype)
        elif self.kernel == "int4pack":  # enough rows that dequantizing once and a dense GEMM win
            out = F.linear(x2, self.int4pack_dequantized(x.dtype))
        else:
            out = F.linear(x2, self.dequantized(x.dtype))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*lead, self.out_features)

    def int4pack_mm(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2.to(self.kernel_dtype).contiguous(), self.packed, self.group_size, self.scale_and_zero
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, kernel={self.kernel}"
        )


class Float8Linear(nn.Module):
    """y = x W^T (+ b) over float8_e4m3fn weights with block scales, dequantized at each call."""

    def __init__(self, weight: Float8Weight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.block = weight.block
        self.bias = bias
        self.register_buffer("weight", weight.weight, persistent=False)
        self.register_buffer("scales", weight.scales, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = Float8Weight(self.weight, self.scales, self.block).dequantize(x.dtype)
        out = F.linear(x, w)
        return out if self.bias is None else out + self.bias.to(out.dtype)


def rtn_int4(weight: torch.Tensor, group_size: int = RTN_GROUP) -> IntWeight:
    """Round-to-nearest 4-bit codes of a float weight [out, in], min-max per group (asymmetric, as llama.cpp's
    Q4_1): groups of `group_size` columns, or of 64 or 32 where the input does not split into those, else a row."""
    out, inp = weight.shape
    group = next((g for g in (group_size, 64, 32) if inp % g == 0), inp)
    w = weight.detach().float().view(out, inp // group, group)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scales = (hi - lo) / 15
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero group: codes all `zero`
    zeros = torch.round(-lo / scales)
    codes = torch.clamp(torch.round(w / scales[..., None]) + zeros[..., None], 0, 15)
    return IntWeight(codes.view(out, inp).to(torch.uint8), scales, zeros, 4, group)


def quantize_int4(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Every `nn.Linear` of `module` as an `IntLinear` of its `rtn_int4` codes (`--quantize int4`)."""
    return replace_linears(module, lambda linear: IntLinear(rtn_int4(linear.weight), dtype, linear.bias))


class W8A8Linear(nn.Module):
    """int8 weights (per output channel) times int8 activations quantized at each call (per tensor, dynamic),
    accumulated in int32: `torch.ao`'s dynamic quantized linear, the one place moemesh uses that deprecated API.

    Its engine (process-wide) is oneDNN where the CPU has VNNI or AMX int8, where it was the faster of the two
    from 32 rows on, else fbgemm (`python -m bench.quant_kernels`, docs/benchmarks.md). Inputs of another dtype
    are computed in fp32 and the output returned in theirs."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        from torch.ao.nn.quantized import dynamic

        if linear.weight.device.type != "cpu":
            raise ConfigError(f"quantize: w8a8 runs on the CPU only, not {linear.weight.device}")
        torch.backends.quantized.engine = w8a8_engine()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12)
        qweight = torch.quantize_per_channel(
            weight, scales.double(), torch.zeros(self.out_features, dtype=torch.long), 0, torch.qint8
        )
        self.inner = dynamic.Linear(self.in_features, self.out_features, bias_=linear.bias is not None)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.inner.set_weight_bias(qweight, bias)
        self.packed_bytes = self.out_features * self.in_features + 8 * self.out_features  # codes, scale and zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.float()).to(x.dtype)


def w8a8_engine() -> str:
    engines = torch.backends.quantized.supported_engines
    if "onednn" in engines and cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return "onednn"
    return "fbgemm" if "fbgemm" in engines else engines[0]


def quantize_linears(module: nn.Module, method: str, dtype: torch.dtype) -> nn.Module:
    """`--quantize`: every float `nn.Linear` of `module` made int8 (per output channel), int4 (`rtn_int4`) or
    W8A8 (`W8A8Linear`, CPU only)."""
    if method == "int8":
        return quantize_int8(module)
    if method == "int4":
        return quantize_int4(module, dtype)
    if method == "w8a8":
        return replace_linears(module, W8A8Linear)
    raise ValueError(f"quantize: {method!r} is not a method (int8, int4, w8a8)")


def quantized_linear(weight: QuantizedWeight, dtype: torch.dtype, bias: torch.Tensor | None = None) -> nn.Module:
    if isinstance(weight, IntWeight):
        return IntLinear(weight, dtype, bias)
    return Float8Linear(weight, bias)


def install_quantized(model: nn.Module, state: dict[str, torch.Tensor | QuantizedWeight], dtype: torch.dtype) -> None:
    """Takes the quantized weights out of `state` (keyed `<module path>.weight`) and puts a quantized linear in
    place of each one's `nn.Linear` (a bias stays in `state`, for `load_state_dict`). Projections that a module
    computes as one (its `FUSED`: fused name -> parts) are concatenated when they are all quantized alike;
    otherwise their weights are dequantized to `dtype`, for the module's float fusion."""
    for path, module in model.named_modules():
        for fused, parts in getattr(module, "FUSED", {}).items():
            prefix = f"{path}." if path else ""
            names = [f"{prefix}{part}.weight" for part in parts]
            if not all(name in state for name in names):
                continue
            weights = [state[name] for name in names]
            if not any(isinstance(w, IntWeight | Float8Weight) for w in weights):
                continue
            quantized = [w for w in weights if isinstance(w, IntWeight | Float8Weight)]
            joined = concatenate(quantized) if len(quantized) == len(weights) else None
            for name in names:
                del state[name]
            if joined is None:
                for name, w in zip(names, weights):
                    state[name] = w if isinstance(w, torch.Tensor) else w.dequantize(dtype)
            else:
                state[f"{prefix}{fused}.weight"] = joined
    for name in [n for n, v in state.items() if isinstance(v, IntWeight | Float8Weight)]:
        parent_path, _, child = name.removesuffix(".weight").rpartition(".")
        parent = model.get_submodule(parent_path)
        old = getattr(parent, child)
        setattr(parent, child, quantized_linear(state.pop(name), dtype, old.bias))
