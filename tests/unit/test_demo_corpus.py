"""The demo bot's corpus is reproducible, never contains the held-out questions, and is tokenized for
training exactly as the gateway's chat template encodes it."""

import re

from moemesh import demo_model
from moemesh.demo_bot import corpus, heldout
from moemesh.demo_bot.tokenizer import turn_text
from moemesh.demo_bot.train import encode
from services.gateway.chat_template import ChatTemplate
from services.gateway.text import TextCodec

TRAINING_DIALOGUES = 20000  # what `make demo-model` generates (train.py's --dialogues default)


def normalized(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def test_the_corpus_is_deterministic():
    assert list(corpus.dialogues(300, seed=7)) == list(corpus.dialogues(300, seed=7))
    assert list(corpus.dialogues(300, seed=7)) != list(corpus.dialogues(300, seed=8))


def test_held_out_questions_are_not_in_the_training_corpus():
    asked = {normalized(m["content"]) for d in corpus.dialogues(TRAINING_DIALOGUES) for m in d if m["role"] == "user"}
    questions = [q for q, _ in heldout.HELD_OUT] + list(heldout.TWO_TURNS[:2])
    assert not [q for q in questions if normalized(q) in asked]
    frames = {normalized(f) for t in corpus.TOPICS for f in t.frames}
    assert not [q for q in questions if normalized(q) in frames]


def test_training_encodes_dialogues_as_the_gateway_renders_them():
    codec = TextCodec.from_dir(demo_model.bot_dir())
    template = ChatTemplate.from_dir(demo_model.bot_dir())
    for dialogue in corpus.dialogues(50, seed=3):
        rendered = template.render(dialogue, add_generation_prompt=False)
        assert rendered == "".join(turn_text(m) for m in dialogue)
        ids, labels = encode(dialogue, codec.tokenizer)
        assert ids == codec.encode(rendered)
        assert codec.decode([t for t in labels if t >= 0]).replace(" ", "") == "".join(
            m["content"] for m in dialogue if m["role"] == "assistant"
        ).replace(" ", "")
