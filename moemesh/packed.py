"""Linear layers whose weights are packed once, at load, in oneDNN's blocked layout (CPU, bf16).

A decode step is a chain of small-batch matmuls that must stream their weights at memory speed. `F.linear`
hands oneDNN the plain [out, in] bf16 weight at every call; a weight reordered once into the blocked layout
oneDNN's kernels read (`mkldnn._reorder_linear_weight`, what `torch.compile` does for frozen CPU linears) is
read faster, with bit for bit the same output. On the 2-core AVX512-bf16 machine, an expert's 1024 -> 5632
projection, weights out of cache, took 0.56 against 0.72 ms at one row and 1.07 against 1.56 ms at 32
(`python -m bench.micro`, docs/benchmarks.md).

Packing applies where oneDNN has native bf16 kernels (AVX512-bf16 / AMX CPUs). Elsewhere, or for fp32 (whose
packed MKL kernel sums in another order, so fp32 results would change), `pack_linears` leaves the module as
it is.
"""

import torch
from torch import nn


def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
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


def pack_linears(module: nn.Module) -> nn.Module:
    """Swaps every `nn.Linear` inside `module` (and `module` itself) for a `PackedLinear` where
    `packing_supported` for its weight; returns the module, or its replacement."""
    if type(module) is nn.Linear:
        weight = module.weight
        return PackedLinear(weight, module.bias) if packing_supported(weight.dtype, weight.device) else module
    for name, child in module.named_children():
        packed = pack_linears(child)
        if packed is not child:
            setattr(module, name, packed)
    return module
