"""Quantized checkpoints as users download them: `quantization_config` read, each linear's stored tensors decoded.

A checkpoint whose `config.json` has a `quantization_config` stores some linear weights `<prefix>.weight` as
other tensors. Which linears are quantized comes from the tensors themselves (a `qweight`, a `weight_packed`, an
fp8 `weight`), so `modules_to_not_convert`, `ignore` and per-module overrides need no parsing of their own; bit
width and group size come from the shapes too, checked against the config. Every format decodes to one of two
forms, whatever its packing:

- `IntWeight`: integer codes in [0, 2^bits) with a scale and a zero point per output row and input group,
  w = (code - zero) * scale, the input columns in `order` (GPTQ's act-order `g_idx`, sorted so that each group's
  columns are contiguous);
- `Float8Weight`: float8_e4m3fn values with one scale per block of rows and columns (DeepSeek-V3's 128 x 128,
  a row (per channel), or the whole tensor).

Formats (the names `transformers` reads): `gptq` (4 and 8 bits, any group size, `desc_act`, `sym`,
`checkpoint_format` `gptq` (zeros stored minus one) or `gptq_v2`), `awq` (`version` `gemm`, 4 bits),
`compressed-tensors` (`pack-quantized` and `int-quantized` integer weights by group or channel, symmetric or
not; `float-quantized` fp8 by tensor, channel or block; activations dynamic or none) and `fp8` (e4m3 weights with
`weight_block_size` and `weight_scale_inv`). Anything else is refused at start, naming the field and its value.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moemesh.errors import CheckpointError

Shape = tuple[int, ...]
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # AWQ packs the 8 columns of a word as [0, 2, 4, 6, 1, 3, 5, 7]
FLOAT8 = "F8_E4M3"
Headers = dict[str, tuple[str, Shape]]  # stored tensor name -> (safetensors dtype, shape)
Getter = Callable[[str], torch.Tensor]  # a stored tensor by name (KeyError where absent)


@dataclass
class IntWeight:
    codes: torch.Tensor  # uint8 [out, in]: codes in [0, 2^bits), the input columns in `order`
    scales: torch.Tensor  # float32 [out, groups]
    zeros: torch.Tensor  # float32 [out, groups], in code units
    bits: int
    group_size: int
    order: torch.Tensor | None = None  # int64 [in]: column j of `codes` is input feature order[j]; None: natural

    @property
    def shape(self) -> Shape:
        return tuple(self.codes.shape)

    def to(self, device: torch.device) -> "IntWeight":
        order = None if self.order is None else self.order.to(device)
        return IntWeight(self.codes.to(device), self.scales.to(device), self.zeros.to(device), self.bits,
                         self.group_size, order)  # fmt: skip

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out, in], input columns in their natural order."""
        g, inp = self.group_size, self.codes.shape[1]
        zeros, scales = (t.repeat_interleave(g, 1)[:, :inp] for t in (self.zeros, self.scales))  # last group: shorter
        w = (self.codes.float() - zeros) * scales
        if self.order is not None:
            w = torch.empty_like(w).index_copy_(1, self.order, w)
        return w.to(dtype)


@dataclass
class Float8Weight:
    weight: torch.Tensor  # float8_e4m3fn [out, in]
    scales: torch.Tensor  # float32 [ceil(out / block[0]), ceil(in / block[1])]
    block: tuple[int, int]

    @property
    def shape(self) -> Shape:
        return tuple(self.weight.shape)

    def to(self, device: torch.device) -> "Float8Weight":
        return Float8Weight(self.weight.to(device), self.scales.to(device), self.block)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, inp = self.weight.shape
        scales = self.scales.repeat_interleave(self.block[0], 0)[:out].repeat_interleave(self.block[1], 1)[:, :inp]
        return (self.weight.float() * scales).to(dtype)


QuantizedWeight = IntWeight | Float8Weight


def concatenate(parts: list[QuantizedWeight]) -> QuantizedWeight | None:
    """The parts stacked along the output rows (q, k and v; gate and up), or None where they do not share a
    format, bit width, group size, column order and (fp8) a block that the rows fill."""
    first = parts[0]
    if isinstance(first, IntWeight):
        same = all(
            isinstance(p, IntWeight) and (p.bits, p.group_size) == (first.bits, first.group_size)
            and (p.order is None) == (first.order is None)
            and (p.order is None or torch.equal(p.order, first.order))
            for p in parts
        )  # fmt: skip
        if not same:
            return None
        cat = [torch.cat([getattr(p, name) for p in parts]) for name in ("codes", "scales", "zeros")]
        return IntWeight(*cat, first.bits, first.group_size, first.order)
    rows = first.block[0]
    if not all(isinstance(p, Float8Weight) and p.block == first.block for p in parts) or any(
        p.weight.shape[0] % rows for p in parts[:-1]
    ):
        return None
    return Float8Weight(torch.cat([p.weight for p in parts]), torch.cat([p.scales for p in parts]), first.block)


def unpack_int32(words: torch.Tensor, bits: int, dim: int, count: int) -> torch.Tensor:
    """Codes packed 32 // bits to an int32 word along `dim`, the first in the lowest bits -> int32 codes."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    moved = words.movedim(dim, -1)
    codes = (moved[..., None] >> shifts) & ((1 << bits) - 1)  # arithmetic shift, then masked: sign bits gone
    codes = codes.reshape(*moved.shape[:-1], moved.shape[-1] * per_word)[..., :count]
    return codes.movedim(-1, dim)


class QuantFormat:
    """How one quantization method stores a linear `<prefix>.weight` of shape [out, in]."""

    def describe(self) -> str:
        """The format in a few words, for the line a service prints at start: `gptq 4-bit, groups of 128`."""
        raise NotImplementedError

    def stores(self, prefix: str, headers: Headers) -> bool:
        """Whether the checkpoint stores this linear quantized."""
        raise NotImplementedError

    def tensors(self, prefix: str, out: int, inp: int, headers: Headers) -> dict[str, Shape]:
        """The stored tensors of a quantized linear and their shapes (checked against the checkpoint's)."""
        raise NotImplementedError

    def decode(self, get: Getter, prefix: str, out: int, inp: int) -> QuantizedWeight:
        """The weight, from `get(name)` of its stored tensors (KeyError for an optional one that is absent)."""
        raise NotImplementedError


def _groups(inp: int, group_size: int) -> int:
    return 1 if group_size in (-1, 0) else -(-inp // group_size)


def _group_size(prefix: str, inp: int, groups: int, configured: int) -> int:
    """The columns of each group of a linear whose scales have `groups` columns: the configured size where it
    gives that many groups (the last one may be shorter), else the one size that splits the input evenly."""
    if configured > 0 and _groups(inp, configured) == groups:
        return configured
    if inp % groups == 0:
        return inp // groups
    raise CheckpointError(f"{prefix}: {groups} groups of scales do not split its {inp} input columns")


def _optional(get: Callable[[str], torch.Tensor], name: str) -> torch.Tensor | None:
    try:
        return get(name)
    except KeyError:
        return None


def _check_bits(field: str, bits: Any, allowed: tuple[int, ...]) -> int:
    if bits not in allowed:
        raise CheckpointError(f"quantization_config.{field}: {bits!r} is not supported (supported: {allowed})")
    return bits


def _order(g_idx: torch.Tensor, group_size: int, groups: int) -> torch.Tensor | None:
    """The column order that makes each group's columns contiguous; None where they already are."""
    g_idx = g_idx.long()
    if torch.equal(g_idx, torch.arange(g_idx.numel()) // group_size):
        return None
    counts = torch.bincount(g_idx, minlength=groups)
    if counts.numel() != groups or bool((counts[:-1] != group_size).any()):
        raise CheckpointError(f"g_idx: groups of {counts.tolist()} columns, expected {group_size} each")
    return torch.argsort(g_idx, stable=True)


class GPTQ(QuantFormat):
    """`qweight` int32 [in * bits / 32, out] (codes packed along the input), `qzeros` int32 [groups, out * bits /
    32], `scales` [groups, out], `g_idx` int32 [in]; `gptq` checkpoints store each zero minus one."""

    def __init__(self, config: dict[str, Any]):
        self.bits = _check_bits("bits", config.get("bits", 4), (4, 8))
        self.group_size = int(config.get("group_size", 128))
        fmt = config.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise CheckpointError(f"quantization_config.checkpoint_format: {fmt!r} is not supported (gptq, gptq_v2)")
        if config.get("pack_dtype", "int32") != "int32":
            raise CheckpointError(f"quantization_config.pack_dtype: {config['pack_dtype']!r} is not supported (int32)")
        self.zero_offset = 1 if fmt == "gptq" else 0

    def describe(self) -> str:
        groups = "per row" if self.group_size <= 0 else f"groups of {self.group_size}"
        return f"gptq {self.bits}-bit, {groups}"

    def stores(self, prefix: str, headers: Headers) -> bool:
        return f"{prefix}.qweight" in headers

    def _bits(self, prefix: str, inp: int, headers) -> int:
        """Per-module bit widths (gptqmodel's `dynamic`) show in the shapes."""
        rows = headers[f"{prefix}.qweight"][1][0]
        return _check_bits("bits", rows * 32 // inp, (4, 8)) if rows * 32 % inp == 0 else self.bits

    def tensors(self, prefix: str, out: int, inp: int, headers: Headers) -> dict[str, Shape]:
        bits = self._bits(prefix, inp, headers)
        groups = headers.get(f"{prefix}.scales", ("", (0, 0)))[1][0] or _groups(inp, self.group_size)
        shapes = {
            f"{prefix}.qweight": (inp * bits // 32, out),
            f"{prefix}.qzeros": (groups, out * bits // 32),
            f"{prefix}.scales": (groups, out),
        }
        if f"{prefix}.g_idx" in headers:
            shapes[f"{prefix}.g_idx"] = (inp,)
        return shapes

    def decode(self, get: Getter, prefix: str, out: int, inp: int) -> QuantizedWeight:
        qweight, qzeros, scales = get(f"{prefix}.qweight"), get(f"{prefix}.qzeros"), get(f"{prefix}.scales").float()
        bits = 32 * qweight.shape[0] // inp
        groups = scales.shape[0]
        group_size = _group_size(prefix, inp, groups, self.group_size)
        codes = unpack_int32(qweight, bits, 0, inp)  # [in, out]
        zeros = unpack_int32(qzeros, bits, 1, out) + self.zero_offset  # [groups, out]
        g_idx = _optional(get, f"{prefix}.g_idx")
        order = None if g_idx is None else _order(g_idx, group_size, groups)
        codes = codes.T
        if order is not None:
            codes = codes[:, order]
        return IntWeight(codes.to(torch.uint8).contiguous(), scales.T.contiguous(), zeros.T.float().contiguous(),
                         bits, group_size, order)  # fmt: skip


class AWQ(QuantFormat):
    """GEMM packing: `qweight` int32 [in, out / 8] and `qzeros` int32 [groups, out / 8], the 8 codes of a word
    interleaved; `scales` [groups, out]."""

    def __init__(self, config: dict[str, Any]):
        _check_bits("bits", config.get("bits", config.get("w_bit", 4)), (4,))
        self.group_size = int(config.get("group_size", config.get("q_group_size", 128)))
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise CheckpointError(f"quantization_config.version: {version!r} is not supported (gemm)")
        if not config.get("zero_point", True):
            raise CheckpointError("quantization_config.zero_point: false is not supported (true)")

    def describe(self) -> str:
        return f"awq 4-bit, groups of {self.group_size}"

    def stores(self, prefix: str, headers: Headers) -> bool:
        return f"{prefix}.qweight" in headers

    def tensors(self, prefix: str, out: int, inp: int, headers: Headers) -> dict[str, Shape]:
        groups = _groups(inp, self.group_size)
        return {f"{prefix}.qweight": (inp, out // 8), f"{prefix}.qzeros": (groups, out // 8),
                f"{prefix}.scales": (groups, out)}  # fmt: skip

    def decode(self, get: Getter, prefix: str, out: int, inp: int) -> QuantizedWeight:
        def columns(words: torch.Tensor) -> torch.Tensor:
            codes = unpack_int32(words, 4, 1, out)
            return codes.view(codes.shape[0], -1, 8)[..., AWQ_REVERSE_ORDER].reshape(codes.shape)

        scales = get(f"{prefix}.scales").float()
        codes, zeros = columns(get(f"{prefix}.qweight")), columns(get(f"{prefix}.qzeros"))
        group_size = _group_size(prefix, inp, scales.shape[0], self.group_size)
        return IntWeight(codes.T.to(torch.uint8).contiguous(), scales.T.contiguous(), zeros.T.float().contiguous(),
                         4, group_size)  # fmt: skip


class Fp8Block(QuantFormat):
    """`weight` float8_e4m3fn [out, in] and `weight_scale_inv` float32 per block of `weight_block_size`."""

    def __init__(self, config: dict[str, Any]):
        fmt = config.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise CheckpointError(f"quantization_config.fmt: {fmt!r} is not supported (e4m3)")
        scheme = config.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise CheckpointError(f"quantization_config.activation_scheme: {scheme!r} is not supported (dynamic)")
        block = config.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2):
            raise CheckpointError(f"quantization_config.weight_block_size: {block!r} is not supported ([rows, cols])")
        self.block = (int(block[0]), int(block[1]))

    def describe(self) -> str:
        return f"fp8 e4m3, blocks of {self.block[0]}x{self.block[1]}"

    def stores(self, prefix: str, headers: Headers) -> bool:
        return headers.get(f"{prefix}.weight", ("",))[0] == FLOAT8

    def tensors(self, prefix: str, out: int, inp: int, headers: Headers) -> dict[str, Shape]:
        rows, cols = self.block
        return {f"{prefix}.weight": (out, inp), f"{prefix}.weight_scale_inv": (-(-out // rows), -(-inp // cols))}

    def decode(self, get: Getter, prefix: str, out: int, inp: int) -> QuantizedWeight:
        return Float8Weight(get(f"{prefix}.weight"), get(f"{prefix}.weight_scale_inv").float(), self.block)


class CompressedTensors(QuantFormat):
    """llm-compressor's formats: `pack-quantized` (`weight_packed` int32 [out, in * bits / 32], signed codes
    offset by 2^(bits-1); `weight_zero_point` packed along the rows when asymmetric), `int-quantized` (`weight`
    int8), `float-quantized` (`weight` float8_e4m3fn); `weight_scale` per group, channel, block or tensor;
    `weight_g_idx` with act-order."""

    FORMATS = ("pack-quantized", "int-quantized", "float-quantized")

    def __init__(self, config: dict[str, Any]):
        groups = config.get("config_groups") or {}
        if len(groups) != 1:
            raise CheckpointError(f"quantization_config.config_groups: {len(groups)} groups (supported: one)")
        name, group = next(iter(groups.items()))
        self.format = group.get("format") or config.get("format")
        if self.format not in self.FORMATS:
            raise CheckpointError(f"quantization_config.format: {self.format!r} is not supported {self.FORMATS}")
        weights = group.get("weights") or {}
        where = f"quantization_config.config_groups.{name}.weights"
        kind = weights.get("type", "int")
        if kind not in ("int", "float"):
            raise CheckpointError(f"{where}.type: {kind!r} is not supported (int, float)")
        self.bits = _check_bits(f"config_groups.{name}.weights.num_bits", weights.get("num_bits"), (4, 8))
        self.strategy = weights.get("strategy", "tensor")
        allowed = ("group", "channel", "tensor", "block") if kind == "float" else ("group", "channel")
        if self.strategy not in allowed:
            raise CheckpointError(f"{where}.strategy: {self.strategy!r} is not supported {allowed}")
        self.group_size = int(weights.get("group_size") or 0)
        if self.strategy == "group" and self.group_size <= 0:
            raise CheckpointError(f"{where}.group_size: {weights.get('group_size')!r} is not a group size")
        block = weights.get("block_structure")
        if self.strategy == "block" and not (isinstance(block, list) and len(block) == 2 and min(block) > 0):
            raise CheckpointError(f"{where}.block_structure: {block!r} is not supported ([rows, cols])")
        self.block = (int(block[0]), int(block[1])) if self.strategy == "block" else (0, 0)
        if kind == "float" and not weights.get("symmetric", True):
            raise CheckpointError(f"{where}.symmetric: false is not supported for float weights")
        if weights.get("dynamic"):
            raise CheckpointError(f"{where}.dynamic: true is not supported (weights are stored quantized)")
        for field in ("input_activations", "output_activations"):
            acts = group.get(field)
            if acts and not acts.get("dynamic"):
                raise CheckpointError(
                    f"quantization_config.config_groups.{name}.{field}: static scales are not supported (dynamic)"
                )

    def describe(self) -> str:
        kind = "fp8 e4m3" if self.format == "float-quantized" else f"{self.bits}-bit"
        return f"compressed-tensors {self.format} {kind}, by {self.strategy}"

    def stores(self, prefix: str, headers: Headers) -> bool:
        if self.format == "pack-quantized":
            return f"{prefix}.weight_packed" in headers
        dtype = headers.get(f"{prefix}.weight", ("",))[0]
        return f"{prefix}.weight_scale" in headers and dtype in ("I8", FLOAT8)

    def _scale_shape(self, out: int, inp: int) -> Shape:
        if self.strategy == "group":
            return (out, _groups(inp, self.group_size))
        if self.strategy == "channel":
            return (out, 1)
        if self.strategy == "block":
            return (-(-out // self.block[0]), -(-inp // self.block[1]))
        return (1,)

    def tensors(self, prefix: str, out: int, inp: int, headers: Headers) -> dict[str, Shape]:
        shapes = {f"{prefix}.weight_scale": self._scale_shape(out, inp)}
        if self.strategy == "tensor" and headers.get(f"{prefix}.weight_scale", ("", ()))[1] == ():
            shapes[f"{prefix}.weight_scale"] = ()
        if self.format == "pack-quantized":
            shapes[f"{prefix}.weight_packed"] = (out, -(-inp * self.bits // 32))
            shapes[f"{prefix}.weight_shape"] = (2,)
        else:
            shapes[f"{prefix}.weight"] = (out, inp)
        if f"{prefix}.weight_zero_point" in headers:
            rows = -(-out * self.bits // 32) if self.format == "pack-quantized" else out
            shapes[f"{prefix}.weight_zero_point"] = (rows, shapes[f"{prefix}.weight_scale"][1])
        if f"{prefix}.weight_g_idx" in headers:
            shapes[f"{prefix}.weight_g_idx"] = (inp,)
        return shapes

    def decode(self, get: Getter, prefix: str, out: int, inp: int) -> QuantizedWeight:
        scale = get(f"{prefix}.weight_scale").float()
        if self.format == "float-quantized":
            weight = get(f"{prefix}.weight")
            if self.strategy == "tensor":
                return Float8Weight(weight, scale.reshape(1, 1), (out, inp))
            if self.strategy == "block":
                return Float8Weight(weight, scale, self.block)
            groups = scale.shape[1]  # channel: one group a row
            return Float8Weight(weight, scale, (1, _group_size(prefix, inp, groups, self.group_size)))
        offset = 1 << (self.bits - 1)
        if self.format == "pack-quantized":
            codes = unpack_int32(get(f"{prefix}.weight_packed"), self.bits, 1, inp)  # offset already
        else:
            codes = get(f"{prefix}.weight").to(torch.int32) + offset
        zeros = torch.full_like(scale, float(offset))
        zero_point = _optional(get, f"{prefix}.weight_zero_point")
        if zero_point is not None:
            if self.format == "pack-quantized":
                zero_point = unpack_int32(zero_point, self.bits, 0, out) - offset
            zeros = zero_point.float() + offset
        group_size = _group_size(prefix, inp, scale.shape[1], self.group_size)
        g_idx = _optional(get, f"{prefix}.weight_g_idx")
        order = None if g_idx is None else _order(g_idx, group_size, scale.shape[1])
        if order is not None:
            codes = codes[:, order]
        return IntWeight(codes.to(torch.uint8).contiguous(), scale.contiguous(), zeros.contiguous(), self.bits,
                         group_size, order)  # fmt: skip


FORMATS: dict[str, Callable[[dict[str, Any]], QuantFormat]] = {
    "gptq": GPTQ,
    "awq": AWQ,
    "fp8": Fp8Block,
    "compressed-tensors": CompressedTensors,
}


def quant_format(config: dict[str, Any]) -> QuantFormat | None:
    """The format of a checkpoint's `config.json` (None: not quantized); an unsupported one is a CheckpointError
    naming the field and its value."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method not in FORMATS:
        raise CheckpointError(f"quantization_config.quant_method: {method!r} is not supported ({', '.join(FORMATS)})")
    return FORMATS[method](qc)
