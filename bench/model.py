"""The benchmark model: the random Mixtral every speed figure is compared on, built reproducibly.

hidden 1024, intermediate 2816, 8 layers, 16 experts top-2, 16 heads, 4 KV heads, vocab 32,000, bf16,
`transformers`' initialization from seed 0: about 1.2 B parameters, 2.4 GB of safetensors. Its tokenizer is
the demo bot's byte-level BPE (1,184 tokens; the ids above it decode to nothing): benches send token ids,
and llama.cpp's converter pads the GGUF vocabulary to the model's.

    .venv/bin/python -m bench.model [--out DIR]     # then: python -m bench.compare --model DIR
"""

import argparse
import shutil
import sys
from pathlib import Path

import torch

from moemesh.demo_model import bot_dir

BENCH_DIR = Path.home() / ".cache" / "moemesh" / "bench-mixtral-1.2b"
SHAPE = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_local_experts": 16,
    "num_experts_per_tok": 2,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 32_000,
    "max_position_embeddings": 4096,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build(out: Path = BENCH_DIR, shape: dict[str, int] = SHAPE, seed: int = 0) -> Path:
    """Writes the checkpoint to `out` (replacing what is there) and returns it; `shape` overrides are for tests."""
    from tokenizers import Tokenizer
    from transformers import MixtralConfig, MixtralForCausalLM

    tokenizer = Tokenizer.from_file(str(bot_dir() / "tokenizer.json"))
    eos = tokenizer.token_to_id("<|end|>")
    config = MixtralConfig(**shape, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).to(torch.bfloat16).eval()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(bot_dir() / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def ensure(out: Path = BENCH_DIR) -> Path:
    """The benchmark checkpoint, built on first use (a minute or two and 5 GB of memory on 2 cores)."""
    return out if (out / "config.json").exists() else build(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BENCH_DIR, help=f"checkpoint directory (default {BENCH_DIR})")
    args = parser.parse_args(argv)
    out = build(args.out)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"benchmark model: {out} ({size / 1e9:.2f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
