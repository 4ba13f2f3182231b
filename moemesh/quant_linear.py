"""Linear layers over quantized weights kept at their stored width, and their place in a model.

`IntLinear` holds an `IntWeight` (4-bit codes two to a byte, 8-bit codes one to a byte, a float32 scale and zero
per row and group) and `Float8Linear` a `Float8Weight`. The kernel is chosen once, at load, for the compute
dtype and device:

- 4-bit codes, bf16 or fp16 compute on the CPU, groups of 32-256 columns: `_weight_int4pack_mm_for_cpu`, which
  reads the packed int4 weight directly (its layout made once by `_convert_weight_to_int4pack_for_cpu`; its
  dequantization is (code - 8) x scale + zero', so zero' = (8 - zero) x scale);
- everything else: the weight dequantized at each call into the input's dtype, then `F.linear` (the exact
  reference path: fp32 compute agrees with a float model of the dequantized weights to fp32 rounding).

`install_quantized` swaps a model's `nn.Linear`s for these where the state dict holds quantized weights, fusing
the projections a module computes as one (q, k, v; gate, up) when their formats allow.
"""

import torch
import torch.nn.functional as F
from torch import nn

from moemesh.quant import replace_linears
from moemesh.quant_formats import Float8Weight, IntWeight, QuantizedWeight, concatenate

INT4PACK_GROUPS = (32, 64, 128, 256)
RTN_GROUP = 128  # `--quantize int4`: the group size, where the input splits into whole groups
INT4PACK_DTYPES = (torch.bfloat16, torch.float16)


def int4pack_fits(weight: IntWeight, dtype: torch.dtype, device: torch.device) -> bool:
    out, inp = weight.shape
    return (
        weight.bits == 4 and device.type == "cpu" and dtype in INT4PACK_DTYPES
        and weight.group_size in INT4PACK_GROUPS and inp % weight.group_size == 0
        and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    )  # fmt: skip


class IntLinear(nn.Module):
    """y = x W^T (+ b) over integer codes; `kernel` is `int4pack` or `dequantize` (see the module's doc)."""

    def __init__(self, weight: IntWeight, dtype: torch.dtype, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bits, self.group_size = weight.bits, weight.group_size
        self.bias = bias
        self.register_buffer("order", weight.order, persistent=False)
        device = weight.codes.device
        if int4pack_fits(weight, dtype, device):
            self.kernel = "int4pack"
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.codes.to(torch.int32), 2)
            scale_and_zero = torch.stack((weight.scales, (8 - weight.zeros) * weight.scales), dim=-1)  # [out, G, 2]
            self.register_buffer("packed", packed, persistent=False)
            self.register_buffer("scale_and_zero", scale_and_zero.transpose(0, 1).contiguous().to(dtype), False)
            return
        self.kernel = "dequantize"
        codes = weight.codes
        if self.bits == 4:  # two codes to a byte: the low nibble first
            codes = codes.view(self.out_features, -1, 2)
            codes = codes[..., 0] | (codes[..., 1] << 4)
        self.register_buffer("codes", codes.contiguous(), persistent=False)
        self.register_buffer("scales", weight.scales, persistent=False)
        self.register_buffer("zeros", weight.zeros, persistent=False)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in `dtype`, columns in the codes' order (`order`)."""
        codes = self.codes
        if self.bits == 4:
            codes = torch.stack((codes & 0xF, codes >> 4), dim=-1).view(self.out_features, -1)
        g = self.group_size
        w = (codes.to(dtype) - self.zeros.to(dtype).repeat_interleave(g, 1)[:, : self.in_features]) * (
            self.scales.to(dtype).repeat_interleave(g, 1)[:, : self.in_features]
        )
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.order is not None:
            x2 = x2.index_select(1, self.order)
        if self.kernel == "int4pack":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.contiguous(), self.packed, self.group_size, self.scale_and_zero
            )
        else:
            out = F.linear(x2, self.dequantized(x.dtype))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*lead, self.out_features)

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
        self.kernel = "dequantize"
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
