"""What `--quantize` costs in fidelity and saves in bytes, on the benchmark model, in one process.

For each of `none`, `int8` and `int4` (weights made smaller at load: the experts and, with the gateway's
`--quantize`, attention, MLPs and LM head), in fp32 compute with the default kernels (`--quantized-kernels fast`):

- bytes of the experts of shard 0 of 2 (as `moemesh expert --shard 0/2` holds them), against the checkpoint's
  bf16 bytes of the same experts;
- greedy agreement with the fp32 model: the share of positions whose top-1 token is the fp32 model's, each step
  fed the fp32 model's own greedy token (teacher forcing, so one early flip does not count every later step);
- the mean and largest |log-prob| drift of the fp32 model's token at each position.

Prompts are customer-service questions through the checkpoint's tokenizer (random token ids without one). On
the random benchmark model the next-token distributions are nearly flat, so top-1 agreement says little there;
`--model models/demo-bot` measures the trained demo bot, whose distributions are peaked.

    .venv/bin/python -m bench.quant_fidelity [--model DIR] [--prompts 4] [--steps 32] [--markdown]
"""

import argparse
from pathlib import Path

import torch

from bench.common import command_line, cpu_description, load_average, table
from bench.model import BENCH_DIR
from moemesh.checkpoint import Checkpoint
from moemesh.model import DenseModel, KVCache, SequenceSlice, StepBatch
from services.experts.shard import ExpertShard
from services.gateway.experts import local_experts
from services.gateway.text import TextCodec

CPU = torch.device("cpu")
QUESTIONS = [
    "Hi! I'd like a refund for my headphones, they stopped working.",
    "Where is my parcel? It is late and the tracking has not moved.",
    "How do I return a jacket that does not fit?",
    "Can I change the delivery address of my order?",
    "My card was charged twice for the same order, what can I do?",
    "Do you ship to Canada, and how long does it take?",
]


def run(ckpt: Checkpoint, quantize: str, prompts: list[list[int]], forced: list[list[int]] | None, steps: int):
    """Per prompt: (greedy tokens, log-softmax rows [steps, V]); fed `forced` tokens when given."""
    dense = DenseModel.from_checkpoint(ckpt, torch.float32, CPU, quantize)
    routed = local_experts(ckpt, torch.float32, CPU, quantize)
    out = []
    with torch.inference_mode():
        for p, prompt in enumerate(prompts):
            cache = KVCache(ckpt.config, torch.float32, CPU)
            ids, tokens, rows = prompt, [], []
            for step in range(steps):
                n = len(ids)
                batch = StepBatch(
                    torch.tensor(ids), torch.arange(cache.length, cache.length + n), [SequenceSlice(0, n, cache)],
                    torch.tensor([n - 1]),
                )  # fmt: skip
                logprobs = dense([batch], routed)[0].float().log_softmax(-1)
                cache.length += n
                rows.append(logprobs)
                tokens.append(int(logprobs.argmax()))
                ids = [forced[p][step] if forced else tokens[-1]]
            out.append((tokens, torch.stack(rows)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=BENCH_DIR)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(command_line("bench.quant_fidelity"))
    print(f"CPU: {cpu_description()}; torch {torch.__version__}; {load_average()}")
    ckpt = Checkpoint(args.model)
    vocab = ckpt.config.vocab_size
    codec = TextCodec.from_dir(args.model)
    if codec is not None:
        prompts = [codec.encode(QUESTIONS[p % len(QUESTIONS)]) for p in range(args.prompts)]
    else:
        prompts = [[(97 * p + 31 * i + 7) % vocab for i in range(24 + 8 * p)] for p in range(args.prompts)]
    reference = run(ckpt, "none", prompts, None, args.steps)
    forced = [tokens for tokens, _ in reference]
    bf16 = ExpertShard.load(ckpt, "0/2", torch.bfloat16, CPU).parameter_bytes
    rows = []
    for quantize in ("none", "int8", "int4", "w8a8"):
        shard = ExpertShard.load(ckpt, "0/2", torch.float32, CPU, quantize).parameter_bytes
        results = reference if quantize == "none" else run(ckpt, quantize, prompts, forced, args.steps)
        agree, drift = [], []
        for (ref_tokens, _), (_, rows_q) in zip(reference, results, strict=True):
            agree += [int(rows_q[i].argmax()) == t for i, t in enumerate(ref_tokens)]
        for (ref_tokens, ref_rows), (_, rows_q) in zip(reference, results, strict=True):
            index = torch.tensor(ref_tokens)[:, None]
            drift += (rows_q.gather(1, index) - ref_rows.gather(1, index)).abs().flatten().tolist()
        rows.append([
            quantize, f"{shard / 1e6:.1f}", f"{shard / bf16:.3f}", f"{100 * sum(agree) / len(agree):.1f}%",
            f"{sum(drift) / len(drift):.4f}", f"{max(drift):.4f}",
        ])  # fmt: skip
    print(f"\n{args.prompts} prompts x {args.steps} steps, fp32 compute, teacher-forced on the fp32 model's tokens")
    header = [
        "--quantize",
        "shard 0/2 experts MB",
        "x bf16 bytes",
        "top-1 agreement",
        "mean abs dlogp",
        "max abs dlogp",
    ]
    table(header, rows, args.markdown)


if __name__ == "__main__":
    main()
