"""The linear kernels of each weight format, side by side in one process, at the benchmark model's shapes.

For an expert's projections (hidden 1024 -> 2816 and back) and the LM head (1024 -> 32,000), at 1 to 128 rows,
ms per call with the weights read from memory (enough copies to fill ~400 MB, cycled), on 2 torch threads:

- fp32: `F.linear` on fp32 weights (an fp32 checkpoint);
- bf16: `F.linear` on bf16 weights in bf16, and prepacked for oneDNN where the CPU has native bf16;
- fp16 weights: `HalfLinear` (fbgemm's packed fp16 weights, widened to fp32 in the kernel: what a bf16 checkpoint
  computed in fp32 holds);
- int8: `Int8Linear` (per output channel; `_weight_int8pack_mm` for bf16 up to 12 rows), and `W8A8Linear` (int8
  activations quantized per call, `torch.ao`'s dynamic linear on the engine `w8a8_engine()` picks);
- int4: `IntLinear` as it loads (`int4pack`, `_weight_int4pack_mm_for_cpu`, on bf16 inputs, or on fp32 inputs
  rounded to bf16; from the row count measured at load, `gemm_rows`, the weight read back for a dense GEMM),
  the int4pack kernel alone, and the exact path (`--quantized-kernels exact`: dequantized to fp32 per call);
- fp8: `Float8Linear` (e4m3 weights, 128 x 128 block scales, dequantized per call).

    .venv/bin/python -m bench.quant_kernels [--markdown] [--rows 1,4,32,128]
"""

import argparse
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from bench.common import command_line, cpu_description, load_average, table
from bench.micro import _median_us
from moemesh.packed import HalfLinear, PackedLinear, half_weights_supported, packing_supported
from moemesh.quant import Int8Linear
from moemesh.quant_formats import Float8Weight
from moemesh.quant_linear import NEVER, Float8Linear, IntLinear, W8A8Linear, exact_kernels, rtn_int4, w8a8_engine

SHAPES = [("expert gate/up", 1024, 2816), ("expert down", 2816, 1024), ("LM head", 1024, 32000)]
BUDGET_BYTES = 400_000_000


def _each(layers: list[Callable], x: torch.Tensor) -> None:
    for layer in layers:
        layer(x)


def _copies(inputs: int, outputs: int, bytes_per_weight: float) -> int:
    return max(2, int(BUDGET_BYTES // (inputs * outputs * bytes_per_weight)))


def _rows(layer: IntLinear) -> str:
    return "never" if layer.gemm_rows == NEVER else f"{layer.gemm_rows} rows"


def kernels(inputs: int, outputs: int) -> dict[str, tuple[list[Callable], torch.dtype]]:
    """Each kernel's layers (enough copies to be read from memory) and the input dtype it takes."""
    w = torch.randn(outputs, inputs) / inputs**0.5
    out: dict[str, tuple[list[Callable], torch.dtype]] = {}
    n = _copies(inputs, outputs, 4)
    fp32 = [w.clone() for _ in range(n)]
    out["fp32 F.linear"] = ([partial(F.linear, weight=c) for c in fp32], torch.float32)
    n = _copies(inputs, outputs, 2)
    bf16 = [w.bfloat16() for _ in range(n)]
    out["bf16 F.linear"] = ([partial(F.linear, weight=c) for c in bf16], torch.bfloat16)
    if packing_supported(torch.bfloat16, torch.device("cpu")):
        out["bf16 prepacked"] = ([PackedLinear(c, None) for c in bf16], torch.bfloat16)
    if half_weights_supported(torch.bfloat16, torch.float32, torch.device("cpu")):
        out["fp16 weights, fp32 x (fbgemm)"] = ([HalfLinear(c.float(), None) for c in bf16], torch.float32)
    del fp32, bf16
    n = _copies(inputs, outputs, 1)
    linear = torch.nn.Linear(inputs, outputs, bias=False)
    linear.weight.data = w
    int8 = [Int8Linear.from_linear(linear) for _ in range(n)]
    out["int8 fp32"] = (int8, torch.float32)
    out["int8 bf16"] = (int8, torch.bfloat16)
    out[f"w8a8 fp32 ({w8a8_engine()})"] = ([W8A8Linear(linear) for _ in range(n)], torch.float32)
    n = _copies(inputs, outputs, 0.5)
    codes = rtn_int4(w)
    packed = [IntLinear(codes, torch.bfloat16) for _ in range(n)]
    loaded = [IntLinear(codes, torch.float32) for _ in range(n)]
    out[f"int4 bf16 (dense GEMM from {_rows(packed[0])})"] = (packed, torch.bfloat16)
    out[f"int4 fp32 (dense GEMM from {_rows(loaded[0])})"] = (loaded, torch.float32)
    out["int4 int4pack kernel alone, bf16"] = ([layer.int4pack_mm for layer in packed], torch.bfloat16)
    with exact_kernels():
        plain = [IntLinear(codes, torch.float32) for _ in range(n)]
    out["int4 exact: dequantized to fp32"] = (plain, torch.float32)
    n = _copies(inputs, outputs, 1)
    scales = torch.rand(-(-outputs // 128), -(-inputs // 128)) / 100
    fp8 = Float8Weight((w / 0.01).to(torch.float8_e4m3fn), scales, (128, 128))
    out["fp8 dequantize fp32"] = ([Float8Linear(fp8) for _ in range(n)], torch.float32)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--rows", default="1,4,32,128")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(command_line("bench.quant_kernels"))
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, {args.threads} threads; load {load_average()}")
    row_counts = [int(r) for r in args.rows.split(",")]
    with torch.inference_mode():
        for name, inputs, outputs in SHAPES:
            rows = []
            for kernel, (layers, dtype) in kernels(inputs, outputs).items():
                times = []
                for m in row_counts:
                    x = torch.randn(m, inputs).to(dtype)
                    times.append(_median_us(partial(_each, layers, x), 3) / len(layers) / 1000)
                rows.append([kernel, *(f"{t:.3f}" for t in times)])
            print(f"\n{name}, {inputs} -> {outputs}, ms per call")
            table(["kernel", *(f"{m} rows" for m in row_counts)], rows, args.markdown)


if __name__ == "__main__":
    main()
