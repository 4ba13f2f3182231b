"""Tiny quantized checkpoints in the exact formats users download, and their reference float weights.

`quantize_checkpoint(src, dst, fmt)` rewrites a float checkpoint's linears (attention, experts, shared experts,
dense MLPs; never the gates, embeddings or LM head, as the tools leave them) in one format, with its
`quantization_config`, and writes `reference/`: the same model with each quantized weight dequantized by code
independent of moemesh's: for compressed-tensors the library's own `unpack_from_int32` (its packer writes the
checkpoint too), for GPTQ and AWQ gptqmodel's torch dequantization (`TorchQuantLinear.dequantize_weight`, AWQ's
`unpack_awq` + `reverse_awq_order`) transcribed, for fp8 `transformers`' own loading of the fp8 checkpoint.
The codes are round-to-nearest, min-max per group: the formats, not the quantizer, are under test.
"""

import json
import re
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# Attention, routed and shared experts, dense MLPs: what GPTQ, AWQ and llm-compressor quantize in an MoE.
QUANTIZED = re.compile(
    r"\.(self_attn\.\w+_proj\w*|experts\.\d+\.(w[123]|\w+_proj)|mlp\.\w+_proj|shared_experts?\.\w+_proj)\.weight$"
)
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


@dataclass(frozen=True)
class Format:
    method: str  # gptq, gptq_v2, awq, ct-pack, ct-int8, ct-fp8-channel, ct-fp8-block, fp8-block
    bits: int = 4
    group_size: int = 32
    sym: bool = False
    desc_act: bool = False

    @property
    def name(self) -> str:
        act = "-act" if self.desc_act else ""
        return f"{self.method}-{self.bits}b-g{self.group_size}-{'sym' if self.sym else 'asym'}{act}"


def _codes(w: torch.Tensor, bits: int, sym: bool, g_idx: torch.Tensor):
    """Min-max round-to-nearest codes [out, in] in [0, 2^bits), scales and integer zeros [out, groups] (scales
    rounded to fp16, as stored), the columns of group g being those with g_idx == g."""
    maxq = (1 << bits) - 1
    groups = int(g_idx.max()) + 1
    scales = torch.empty(w.shape[0], groups)
    zeros = torch.empty(w.shape[0], groups)
    for g in range(groups):
        cols = w[:, g_idx == g]
        lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
        if sym:
            scale = torch.maximum(-lo, hi) * 2 / maxq
            zero = torch.full_like(scale, (maxq + 1) // 2)
        else:
            scale = (hi - lo) / maxq
            zero = torch.round(-lo / scale)
        scales[:, g] = scale.half().float()
        zeros[:, g] = zero
    codes = torch.clamp(torch.round(w / scales[:, g_idx]) + zeros[:, g_idx], 0, maxq).to(torch.int64)
    return codes, scales, zeros.to(torch.int64)


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int [rows, cols] -> int32 [rows * bits / 32, cols], 32 / bits consecutive rows to a word (GPTQ qweight)."""
    per = 32 // bits
    words = torch.zeros(values.shape[0] // per, values.shape[1], dtype=torch.int64)
    for i in range(per):
        words |= (values[i::per] & ((1 << bits) - 1)) << (bits * i)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_columns(values: torch.Tensor, bits: int, order: list[int] | None = None) -> torch.Tensor:
    per = 32 // bits
    grouped = values.view(values.shape[0], -1, per)
    if order is not None:
        grouped = grouped[..., order]
    words = torch.zeros(grouped.shape[:2], dtype=torch.int64)
    for i in range(per):
        words |= (grouped[..., i] & ((1 << bits) - 1)) << (bits * i)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def gptq_reference(qweight, qzeros, scales, g_idx, bits: int, v1: bool) -> torch.Tensor:
    """gptqmodel's TorchQuantLinear.dequantize_weight (wf shifts, gather by g_idx) -> weight [out, in]."""
    wf = torch.arange(0, 32, bits, dtype=torch.int32)
    maxq = (1 << bits) - 1
    zeros = torch.bitwise_right_shift(qzeros.unsqueeze(2).expand(-1, -1, 32 // bits), wf.unsqueeze(0))
    zeros = torch.bitwise_and(zeros, maxq).reshape(qzeros.shape[0], -1)
    if v1:
        zeros = zeros + 1
    weight = torch.bitwise_and(
        torch.bitwise_right_shift(qweight.unsqueeze(1).expand(-1, 32 // bits, -1), wf.unsqueeze(-1)), maxq
    )
    weight = weight.reshape(weight.shape[0] * weight.shape[1], weight.shape[2])
    g = g_idx.long()
    return (scales.float()[g] * (weight - zeros[g])).T


def awq_reference(qweight, qzeros, scales, group_size: int) -> torch.Tensor:
    """gptqmodel's unpack_awq + reverse_awq_order, then (w - z) * s -> weight [out, in]."""
    shifts = torch.arange(0, 32, 4)
    iweight = (torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :])).view(qweight.shape[0], -1) & 15
    izeros = (torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :])).view(qzeros.shape[0], -1) & 15
    reverse = torch.arange(iweight.shape[-1]).view(-1, 8)[:, AWQ_REVERSE_ORDER].view(-1)
    iweight, izeros = iweight[:, reverse], izeros[:, reverse]
    w = (iweight - izeros.repeat_interleave(group_size, 0)) * scales.float().repeat_interleave(group_size, 0)
    return w.T


def _input_seed(name: str) -> int:
    """One seed for the linears that read the same input (q, k, v; gate and up): GPTQ's act-order sorts the
    columns by the input's Hessian, which they share."""
    return zlib.crc32(re.sub(r"\.(w[13]|[qkv]_proj|gate_proj|up_proj)\.weight$", ".input", name).encode())


def _gptq(name: str, w: torch.Tensor, fmt: Format, out: dict) -> torch.Tensor:
    prefix, inp = name.removesuffix(".weight"), w.shape[1]
    group = fmt.group_size if fmt.group_size > 0 else inp  # -1: one group a row
    g_idx = torch.arange(inp) // group
    if fmt.desc_act:  # act-order: the groups are of columns in another order, the same for linears of one input
        perm = torch.randperm(inp, generator=torch.Generator().manual_seed(_input_seed(name)))
        g_idx = torch.empty_like(g_idx).index_copy_(0, perm, torch.arange(inp) // group)
    codes, scales, zeros = _codes(w, fmt.bits, fmt.sym, g_idx)
    v1 = fmt.method == "gptq"
    out[f"{prefix}.qweight"] = _pack_rows(codes.T, fmt.bits)
    out[f"{prefix}.qzeros"] = _pack_columns((zeros - 1 if v1 else zeros).T, fmt.bits)
    out[f"{prefix}.scales"] = scales.T.half().contiguous()
    out[f"{prefix}.g_idx"] = g_idx.to(torch.int32)
    return gptq_reference(out[f"{prefix}.qweight"], out[f"{prefix}.qzeros"], out[f"{prefix}.scales"],
                          out[f"{prefix}.g_idx"], fmt.bits, v1)  # fmt: skip


def _awq(name: str, w: torch.Tensor, fmt: Format, out: dict) -> torch.Tensor:
    prefix = name.removesuffix(".weight")
    g_idx = torch.arange(w.shape[1]) // fmt.group_size
    codes, scales, zeros = _codes(w, 4, False, g_idx)
    out[f"{prefix}.qweight"] = _pack_columns(codes.T.contiguous(), 4, AWQ_ORDER)
    out[f"{prefix}.qzeros"] = _pack_columns(zeros.T.contiguous(), 4, AWQ_ORDER)
    out[f"{prefix}.scales"] = scales.T.half().contiguous()
    return awq_reference(out[f"{prefix}.qweight"], out[f"{prefix}.qzeros"], out[f"{prefix}.scales"], fmt.group_size)


def _ct_int(name: str, w: torch.Tensor, fmt: Format, out: dict) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    prefix, (rows, inp) = name.removesuffix(".weight"), w.shape
    group = fmt.group_size if fmt.group_size > 0 else inp
    codes, scales, zeros = _codes(w, fmt.bits, fmt.sym, torch.arange(inp) // group)
    offset = 1 << (fmt.bits - 1)
    signed, zero_point = (codes - offset).to(torch.int8), (zeros - offset).to(torch.int8)
    out[f"{prefix}.weight_scale"] = scales.to(torch.bfloat16)
    if fmt.method == "ct-pack":
        out[f"{prefix}.weight_packed"] = pack_to_int32(signed, fmt.bits)
        out[f"{prefix}.weight_shape"] = torch.tensor([rows, inp])
        if not fmt.sym:
            out[f"{prefix}.weight_zero_point"] = pack_to_int32(zero_point, fmt.bits, packed_dim=0)
        q = unpack_from_int32(out[f"{prefix}.weight_packed"], fmt.bits, torch.Size([rows, inp]))
        zp = 0 if fmt.sym else unpack_from_int32(
            out[f"{prefix}.weight_zero_point"], fmt.bits, zero_point.shape, packed_dim=0
        )  # fmt: skip
    else:
        out[f"{prefix}.weight"] = q = signed
        zp = 0
        if not fmt.sym:
            out[f"{prefix}.weight_zero_point"] = zp = zero_point
    zp = zp if isinstance(zp, int) else zp.float().repeat_interleave(group, 1)
    return (q.float() - zp) * out[f"{prefix}.weight_scale"].float().repeat_interleave(group, 1)


def _fp8(name: str, w: torch.Tensor, fmt: Format, out: dict) -> torch.Tensor:
    prefix, (rows, inp) = name.removesuffix(".weight"), w.shape
    if fmt.method == "ct-fp8-channel":
        scale = w.abs().amax(1, keepdim=True) / 448
        out[f"{prefix}.weight"] = (w / scale).to(torch.float8_e4m3fn)
        out[f"{prefix}.weight_scale"] = scale.to(torch.bfloat16)
        return out[f"{prefix}.weight"].float() * out[f"{prefix}.weight_scale"].float()
    b = fmt.group_size
    blocks = w.view(rows // b, b, inp // b, b).abs().amax((1, 3)) / 448  # [rows / b, in / b]
    expanded = blocks.repeat_interleave(b, 0).repeat_interleave(b, 1)
    out[f"{prefix}.weight"] = (w / expanded).to(torch.float8_e4m3fn)
    out[f"{prefix}.weight_scale_inv" if fmt.method == "fp8-block" else f"{prefix}.weight_scale"] = blocks
    return out[f"{prefix}.weight"].float() * expanded


def _fits(shape: torch.Size, fmt: Format) -> bool:
    """Whether the tools would quantize a linear of this shape (they leave a layer whose input does not split
    into whole groups, or blocks, in float)."""
    rows, inp = shape
    if fmt.method in ("fp8-block", "ct-fp8-block"):
        return rows % fmt.group_size == 0 and inp % fmt.group_size == 0
    if fmt.method in ("awq", "gptq", "gptq_v2") and rows % (32 // fmt.bits):  # zeros packed along the rows
        return False
    return fmt.group_size <= 0 or inp % fmt.group_size == 0


def _config(fmt: Format) -> dict:
    if fmt.method in ("gptq", "gptq_v2"):
        return {"quant_method": "gptq", "bits": fmt.bits, "group_size": fmt.group_size, "desc_act": fmt.desc_act,
                "sym": fmt.sym, "checkpoint_format": fmt.method, "pack_dtype": "int32"}  # fmt: skip
    if fmt.method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": fmt.group_size, "zero_point": True, "version": "gemm"}
    if fmt.method == "fp8-block":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [fmt.group_size, fmt.group_size]}  # fmt: skip
    ct = {"ct-pack": "pack-quantized", "ct-int8": "int-quantized"}.get(fmt.method, "float-quantized")
    kind = "float" if ct == "float-quantized" else "int"
    strategy = {"ct-fp8-channel": "channel", "ct-fp8-block": "block"}.get(
        fmt.method, "group" if fmt.group_size > 0 else "channel"
    )
    weights = {"num_bits": 8 if kind == "float" else fmt.bits, "type": kind, "symmetric": fmt.sym or kind == "float",
               "strategy": strategy, "dynamic": False, "observer": "minmax"}  # fmt: skip
    if strategy == "group":
        weights["group_size"] = fmt.group_size
    if strategy == "block":
        weights["block_structure"] = [fmt.group_size, fmt.group_size]
    activations = {"num_bits": 8, "type": kind, "symmetric": True, "strategy": "token", "dynamic": True}
    group = {"targets": ["Linear"], "weights": weights, "format": ct,
             "input_activations": activations if kind == "float" else None}  # fmt: skip
    return {"quant_method": "compressed-tensors", "format": ct, "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": ["lm_head", "re:.*block_sparse_moe.gate$"]}  # fmt: skip


def _copy_side_files(src: Path, dst: Path) -> None:
    """Config, tokenizer and the like: every file but the weights."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)


def quantize_checkpoint(src: Path, dst: Path, fmt: Format) -> Path:
    """`dst` (and `dst/reference`, the float model of the dequantized weights) from the float checkpoint `src`."""
    _copy_side_files(src, dst)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors |= load_file(f)
    stored, reference = {}, {}
    for name, w in sorted(tensors.items()):
        if not QUANTIZED.search(name) or not _fits(w.shape, fmt):
            stored[name] = reference[name] = w
            continue
        w = w.float()
        if fmt.method in ("gptq", "gptq_v2"):
            reference[name] = _gptq(name, w, fmt, stored)
        elif fmt.method == "awq":
            reference[name] = _awq(name, w, fmt, stored)
        elif fmt.method in ("ct-pack", "ct-int8"):
            reference[name] = _ct_int(name, w, fmt, stored)
        else:
            reference[name] = _fp8(name, w, fmt, stored)
    save_file({k: v.contiguous() for k, v in stored.items()}, dst / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config | {"quantization_config": _config(fmt)}, indent=2))
    ref = dst / "reference"
    _copy_side_files(src, ref)
    save_file({k: v.float().contiguous() for k, v in reference.items()}, ref / "model.safetensors")
    return dst
