"""Trains the demo bot on CPU: `python -m moemesh.demo_bot.train` (`make demo-model`).

A `transformers` Qwen2-MoE (8 routed experts, top-2, a gated shared expert) learns the generated corpus,
with the loss on the assistant's turns only. Seeds fix the corpus, the tokenizer, the initial weights and
the batch order, so a rerun with the same versions and thread count should give the same checkpoint. It
is saved with `save_pretrained` (safetensors, bf16), then reloaded to print its held-out score.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from moemesh.demo_bot import corpus, heldout
from moemesh.demo_bot import tokenizer as bot_tokenizer
from moemesh.demo_bot.corpus import Message

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "models" / "demo-bot"
MAX_TOKENS = 256
IGNORE = -100  # label of tokens the loss skips


def model_config(vocab_size: int, end_id: int) -> "Qwen2MoeConfig":  # noqa: F821
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=96, shared_expert_intermediate_size=192, norm_topk_prob=False,
        max_position_embeddings=512, tie_word_embeddings=False, router_aux_loss_coef=0.01,
        bos_token_id=None, eos_token_id=end_id, pad_token_id=end_id,
    )  # fmt: skip


def encode(dialogue: list[Message], tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and labels: the assistant's words and its `<|end|>` are learnt, the rest is context."""
    ids: list[int] = []
    labels: list[int] = []
    for message in dialogue:
        turn = tokenizer.encode(bot_tokenizer.turn_text(message), add_special_tokens=False).ids
        ids += turn
        labels += [IGNORE] + turn[1:] if message["role"] == "assistant" else [IGNORE] * len(turn)
    return ids[:MAX_TOKENS], labels[:MAX_TOKENS]


def batches(examples: list[tuple[list[int], list[int]]], size: int, steps: int, pad: int, seed: int):
    """`steps` batches of dialogues of similar length (little padding), in a seeded order that changes
    each pass over the data; right-padded to their longest."""
    generator = torch.Generator().manual_seed(seed)
    pending: list[list[int]] = []
    for _ in range(steps):
        if not pending:
            order = torch.randperm(len(examples), generator=generator).tolist()
            order.sort(key=lambda i: len(examples[i][0]))
            pending = [order[i : i + size] for i in range(0, len(order) - size + 1, size)]
            pending = [pending[i] for i in torch.randperm(len(pending), generator=generator).tolist()]
        chosen = [examples[i] for i in pending.pop()]
        width = max(len(ids) for ids, _ in chosen)
        ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in chosen])
        labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in chosen])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chosen])
        yield ids, labels, mask


def train(out: Path, steps: int, dialogues: int, batch_size: int, lr: float, vocab_size: int, seed: int) -> None:
    from transformers import GenerationConfig, Qwen2MoeForCausalLM

    data = list(corpus.dialogues(dialogues, seed))
    texts = ["".join(bot_tokenizer.turn_text(m) for m in d) for d in data]
    tokenizer = bot_tokenizer.train(texts, vocab_size)
    end_id = tokenizer.token_to_id(bot_tokenizer.END)
    examples = [encode(d, tokenizer) for d in data]
    assert all(tokenizer.encode(t).ids[:MAX_TOKENS] == ids for t, (ids, _) in zip(texts[:100], examples))

    torch.manual_seed(seed)
    config = model_config(tokenizer.get_vocab_size(), end_id)
    model = Qwen2MoeForCausalLM(config).train()
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters; {len(examples)} dialogues", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    start = time.monotonic()
    for step, (ids, labels, mask) in enumerate(batches(examples, batch_size, steps, end_id, seed), 1):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == steps:
            print(f"step {step}/{steps} loss {loss.item():.4f} {time.monotonic() - start:.0f}s", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    GenerationConfig(eos_token_id=end_id, pad_token_id=end_id, do_sample=False, max_new_tokens=64).save_pretrained(out)
    bot_tokenizer.save(tokenizer, out)
    (out / "training.json").write_text(
        json.dumps(
            dict(steps=steps, dialogues=dialogues, batch_size=batch_size, lr=lr, vocab_size=vocab_size, seed=seed,
                 seconds=round(time.monotonic() - start), torch=torch.__version__),
            indent=2,
        ) + "\n"
    )  # fmt: skip


def reply(model, tokenizer, messages: list[Message], max_new_tokens: int = 64) -> str:
    """The greedy reply of a `transformers` model to a conversation."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)


def report(out: Path) -> int:
    """Prints the saved checkpoint's replies to the held-out questions; returns how many were on topic."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    passed = 0
    for question, keywords in heldout.HELD_OUT:
        answer = reply(model, tokenizer, [{"role": "user", "content": question}])
        passed += (ok := heldout.on_topic(answer, keywords))
        print(f"{'ok ' if ok else 'BAD'} {question!r} -> {answer!r}")
    first, second, keywords = heldout.TWO_TURNS
    messages = [{"role": "user", "content": first}]
    messages.append({"role": "assistant", "content": reply(model, tokenizer, messages)})
    messages.append({"role": "user", "content": second})
    answer = reply(model, tokenizer, messages)
    print(f"two turns: {messages[1]['content']!r} / {second!r} -> {answer!r}")
    print(f"held-out: {passed}/{len(heldout.HELD_OUT)} on topic")
    return passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--steps", type=int, default=450)
    parser.add_argument("--dialogues", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the default suits a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train(args.out, args.steps, args.dialogues, args.batch_size, args.lr, args.vocab_size, args.seed)
    report(args.out)


if __name__ == "__main__":
    main()
