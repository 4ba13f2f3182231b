"""The demo bot's byte-level BPE tokenizer and chat format, trained on its corpus.

Turns are `<|role|>content<|end|>`; `<|end|>` is also the EOS token, so generation stops at the end of
the assistant's turn. Because every turn starts and ends with a control token, a conversation's
encoding is the concatenation of its turns' encodings, which lets training mask all but the replies.
"""

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moemesh.demo_bot.corpus import Message

END = "<|end|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = [END, *(f"<|{role}|>" for role in ROLES)]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)


def turn_text(message: Message) -> str:
    """One turn as the chat template renders it."""
    return f"<|{message['role']}|>{message['content']}{END}"


def train(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def save(tokenizer: Tokenizer, out: Path) -> None:
    """tokenizer.json and a tokenizer_config.json that `transformers` and the gateway both read."""
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": END,
        "pad_token": END,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
