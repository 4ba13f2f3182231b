"""The requests the benchmarks send: deterministic token-id prompts, each with its own output length.

Prompts are token ids drawn from a generator seeded by the request's index, so every run and every side
(moemesh, llama.cpp, transformers) sends the same ids, with no tokenizer in the way.

- **fixed** (`fixed_requests`): prompts of 8-200 tokens (`PROMPT_LENGTHS`, cycled), the same output
  length for all; sent by c client streams in a closed loop.
- **mixed** (`mixed_requests`): prompt and output lengths drawn uniformly from ranges (default 16-256 and
  16-128 tokens), all sent at once: a burst of unequal requests, where a static batch pads to the longest.
"""

import random
from dataclasses import dataclass

PROMPT_LENGTHS = (16, 96, 8, 200, 48, 128, 24, 64)  # fixed request i gets PROMPT_LENGTHS[i % 8] tokens
PROMPT_SEED = 20240601
LENGTH_SEED = 12  # the mixed workload's prompt and output lengths
FIRST_TOKEN_ID = 1000  # prompts avoid the low ids (special tokens of the DeepSeek vocabulary)
WARMUP_INDEX = -1
WARMUP_PROMPT_TOKENS = 32
WARMUP_NEW_TOKENS = 16
MIXED_PROMPT_TOKENS = (16, 256)
MIXED_NEW_TOKENS = (16, 128)


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_new: int  # exactly this many tokens are generated (EOS ignored or absent)


def prompt(index: int, vocab_size: int, length: int | None = None) -> list[int]:
    """The prompt of request `index` (the warm-up is index -1): same ids on every run and side. Its length
    is `length`, else the fixed workload's (`PROMPT_LENGTHS`)."""
    rng = random.Random(PROMPT_SEED * 1_000_003 + index)
    if length is None:
        length = WARMUP_PROMPT_TOKENS if index == WARMUP_INDEX else PROMPT_LENGTHS[index % len(PROMPT_LENGTHS)]
    return [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(length)]


def warmup_request(vocab_size: int) -> Request:
    return Request(prompt(WARMUP_INDEX, vocab_size), WARMUP_NEW_TOKENS)


def fixed_requests(num_requests: int, vocab_size: int, max_new: int) -> list[Request]:
    return [Request(prompt(i, vocab_size), max_new) for i in range(num_requests)]


def mixed_requests(
    num_requests: int,
    vocab_size: int,
    prompt_tokens: tuple[int, int] = MIXED_PROMPT_TOKENS,
    new_tokens: tuple[int, int] = MIXED_NEW_TOKENS,
) -> list[Request]:
    """Prompt and output lengths uniform in the inclusive ranges, drawn from a fixed seed."""
    rng = random.Random(LENGTH_SEED)
    lengths = [(rng.randint(*prompt_tokens), rng.randint(*new_tokens)) for _ in range(num_requests)]
    return [Request(prompt(i, vocab_size, length), new) for i, (length, new) in enumerate(lengths)]


def describe(requests: list[Request]) -> str:
    """'N requests, prompts of a-b tokens (mean m), a-b new tokens (mean m)', for a bench's header."""

    def span(values: list[int]) -> str:
        low, high = min(values), max(values)
        return str(low) if low == high else f"{low}-{high} (mean {sum(values) / len(values):.0f})"

    prompts, outputs = [len(r.prompt) for r in requests], [r.max_new for r in requests]
    return f"{len(requests)} requests, prompts of {span(prompts)} tokens, {span(outputs)} new tokens"
