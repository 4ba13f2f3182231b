"""The input filter: normalization, word and regex rules, PII redaction, control characters, the rules file."""

import json

import grpc
import pytest

from moemesh.errors import ConfigError, InvalidArgument
from services.gateway.content import pii
from services.gateway.content.config import load_controls
from services.gateway.content.input_filter import InputFilter
from services.gateway.content.normalize import view
from services.gateway.content.rules import regex_rule, words_rule

pytestmark = pytest.mark.timeout(30)

# Text no rule below matches: it must come through byte for byte.
PLAIN = (
    "你好，世界 😀🎉 naïve café — «quotes» \"double\" 'single'\n"
    "def f(x):\n\treturn x ** 2  # code, tabs and newlines\n"
    "ＦＵＬＬ width, Ελληνικά, русский, עברית, 🇫🇷 👩‍💻"
)


def blocked(*words: str, level: str = "exact") -> InputFilter:
    return InputFilter([words_rule("no-refunds", list(words), level, "block", "")])


@pytest.mark.parametrize(
    ("level", "text", "expected"),
    [
        ("normalized", "ＲＥ\u200bFUND\u00ad now", "refund now"),  # fullwidth, zero-width space, soft hyphen
        ("normalized", "ﬁne 𝐫𝐞𝐟𝐮𝐧𝐝 ①", "fine refund 1"),  # ligature, mathematical bold, circled digit
        ("normalized", "cafe\u0301 STRASSE Straße", "café strasse strasse"),  # composed, case-folded
        ("collapsed", "rèfünd", "refund"),  # diacritics
        ("collapsed", "rеfund ѕсаm", "refund scam"),  # Cyrillic look-alikes
        ("collapsed", "ρεfυnd", "pefund"),  # Greek look-alikes (rho reads p)
        ("collapsed", "give me a r e f u n d!", "give me arefund!"),  # a spaced-out run joins
        ("collapsed", "r.e.f.u.n.d and r-e-f", "refund and ref"),
        ("collapsed", "I am a b", "i am a b"),  # two single letters are no run
    ],
)
def test_views(level, text, expected):
    assert view(text, level).text == expected


def test_view_maps_back_to_the_original_text():
    text = "xx ＲＥ\u200bFUND yy r e f u n d"
    seen = view(text, "collapsed")
    for start in (seen.text.index("refund"), seen.text.rindex("refund")):
        begin, end = seen.original(start, start + 6)
        assert view(text[begin:end], "collapsed").text == "refund"
    assert text[slice(*seen.original(0, 2))] == "xx"


@pytest.mark.parametrize(
    ("text", "level", "hit"),
    [
        ("I want a REFUND now", "exact", True),  # case-insensitive
        ("refunds and refundable are other words", "exact", False),  # whole words only
        ("prefund", "exact", False),
        ("ＲＥＦＵＮＤ", "exact", False),
        ("ＲＥＦＵＮＤ", "normalized", True),
        ("re\u200bfund", "normalized", True),
        ("r e f u n d", "normalized", False),
        ("r e f u n d", "collapsed", True),
        ("give me a r e f u n d", "collapsed", True),  # the run is "arefund", every letter a word start
        ("rеfund", "collapsed", True),  # Cyrillic е
        ("réfund", "collapsed", True),
        ("a r e f u n d s", "collapsed", True),
        ("the refund-policy", "collapsed", True),
        ("a perfect fund", "collapsed", False),
    ],
)
def test_word_rules(text, level, hit):
    if hit:
        with pytest.raises(InvalidArgument):
            blocked("refund", level=level).apply("prompt", text)
    else:
        assert blocked("refund", level=level).apply("prompt", text) == text


def test_a_refusal_names_the_field_and_rule_never_the_text():
    with pytest.raises(InvalidArgument) as info:
        blocked("secret plan").apply("messages[2].content", "here is the Secret  Plan, word for word")
    message = str(info.value)
    assert message == "messages[2].content: refused by content rule 'no-refunds'"
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "secret" not in message.lower()


def test_phrases_allow_up_to_three_separators():
    rule = blocked("credit card")
    for text in ("credit card", "Credit-Card", "credit , card"):
        with pytest.raises(InvalidArgument):
            rule.apply("prompt", text)
    assert rule.apply("prompt", "credit     card") == "credit     card"


def test_redact_rules_replace_every_match_in_the_original_text():
    rules = [
        words_rule("refund", ["refund"], "collapsed", "redact", "[topic]"),
        regex_rule("api-key", r"sk-[A-Za-z0-9]{8,}", "exact", "redact", "[key]", 0),
    ]
    text = "Ｒｅｆｕｎｄ?\tkey sk-abcdef123456, or a r e f u n d; not refunds"
    assert InputFilter(rules).apply("prompt", text) == "[topic]?\tkey [key], or a [topic]; not refunds"


def test_regex_rules_block_at_their_level():
    rule = regex_rule("ssn", r"\b\d{3}-\d{2}-\d{4}\b", "normalized", "block", "", 0)
    with pytest.raises(InvalidArgument, match="'ssn'"):
        InputFilter([rule]).apply("prompt", "mine is １２３-４５-６７８９")  # fullwidth digits
    assert InputFilter([rule]).apply("prompt", "order 123-45-67890") == "order 123-45-67890"


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\r", "\x7f", "\x85", "\x9b"])
def test_control_characters_are_refused(char):
    with pytest.raises(InvalidArgument) as info:
        InputFilter().apply("prompt", f"hello {char}world")
    assert str(info.value) == (
        f"prompt: control character U+{ord(char):04X} at offset 6 is not allowed (only tab and newline are)"
    )


def test_text_no_rule_matches_passes_unchanged():
    rules = [
        words_rule("w", ["refund", "credit card"], "collapsed", "redact", "[x]"),
        words_rule("n", ["scam"], "normalized", "block", ""),
        regex_rule("r", r"sk-[a-z]{20}", "exact", "block", "", 0),
    ]
    assert InputFilter(rules, pii.KINDS).apply("prompt", PLAIN) == PLAIN


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail bob.smith+tag@mail.example.co.uk today", "mail [email] today"),
        ("card 4111 1111 1111 1111 or 4111-1111-1111-1111", "card [card] or [card]"),
        ("4111111111111112 fails the Luhn check", "4111111111111112 fails the Luhn check"),
        ("call +1 (555) 123-4567 or 555.123.4567 or +44 20 7946 0958", "call [phone] or [phone] or [phone]"),
        (
            "on 2024-05-17 at 10:30, host 192.168.100.200, 42 items",
            "on 2024-05-17 at 10:30, host 192.168.100.200, 42 items",
        ),
        ("order 12345678901234567890123 is long", "order 12345678901234567890123 is long"),
    ],
)
def test_pii_redaction(text, expected):
    assert pii.redact(text, pii.KINDS) == expected


def test_only_the_configured_pii_kinds_are_redacted():
    text = "bob@example.com 4111111111111111"
    assert pii.redact(text, ("card",)) == "bob@example.com [card]"


def test_rules_file_yaml_and_json(tmp_path):
    yaml_file = tmp_path / "rules.yaml"
    yaml_file.write_text(
        """
input:
  pii: [email]
  rules:
    - id: refunds
      kind: words
      words: [refund]
      collapse: true
      action: redact
      replacement: "[topic]"
    - id: scam
      kind: regex
      pattern: 'scam\\w*'
      normalize: true
output:
  rules:
    - id: leak
      kind: regex
      pattern: 'sk-[a-z]{20}'
      max_length: 23
""",
        encoding="utf-8",
    )
    controls = load_controls(yaml_file)
    assert controls.input.apply("p", "a r e f u n d to bob@example.com") == "a [topic] to [email]"
    with pytest.raises(InvalidArgument, match="'scam'"):
        controls.input.apply("p", "ＳＣＡＭＭＥＲ")
    assert controls.output is not None and controls.output.reach == {"exact": 23}
    json_file = tmp_path / "rules.json"
    json_file.write_text(json.dumps({"output": {"rules": [{"id": "w", "kind": "words", "words": ["darn it"]}]}}))
    controls = load_controls(json_file)
    assert controls.input.apply("p", "darn it") == "darn it"
    assert controls.output.reach == {"exact": 10}  # 6 letters, a gap of up to 3, the next character
    assert load_controls(None).output is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"input": {"rules": [{"id": "a", "kind": "glob"}]}}, "input.rules[0].kind: 'glob' is not one of words, regex"),
        ({"input": {"rules": [{"kind": "words", "words": ["x"]}]}}, "input.rules[0].id"),
        ({"input": {"rules": [{"id": "a", "kind": "words", "words": []}]}}, "input.rules[0].words"),
        ({"input": {"rules": [{"id": "a", "kind": "regex", "pattern": "("}]}}, "input.rules[0].pattern"),
        ({"input": {"rules": [{"id": "a", "kind": "words", "words": ["x"], "colour": 1}]}}, "unknown keys ['colour']"),
        ({"input": {"pii": ["ssn"]}}, "input.pii"),
        ({"output": {"rules": [{"id": "a", "kind": "regex", "pattern": "x+"}]}}, "output.rules[0].max_length"),
        (
            {"output": {"rules": [{"id": "a", "kind": "words", "words": ["x"], "action": "redact"}]}},
            "output.rules[0].action",
        ),
        (
            {
                "input": {
                    "rules": [
                        {"id": "a", "kind": "words", "words": ["x"]},
                        {"id": "a", "kind": "words", "words": ["y"]},
                    ]
                }
            },
            "rule ids ['a'] are used more than once",
        ),
        ({"inputs": {}}, "unknown keys ['inputs']"),
    ],
)
def test_rules_file_mistakes_are_config_errors(tmp_path, content, message):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError) as info:
        load_controls(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_unreadable_rules_file_is_a_config_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("input: [unclosed", encoding="utf-8")
    for path in (tmp_path / "bad.yaml", tmp_path / "missing.yaml"):
        with pytest.raises(ConfigError, match="content rules"):
            load_controls(path)


def test_long_texts_find_the_same_matches_as_short_ones():
    """Long texts take the word prefilter and views without positions; the answer must not change."""
    filler = "Plain words about bicycles and their care. " * 10  # past the prefilter's length
    rules = [
        words_rule("list", ["ref", "refund", "refunds", "credit card", "bıtcoin"], "exact", "block", ""),
        words_rule("folded", ["scam"], "collapsed", "redact", "[x]"),
    ]
    for tail in ("a REFUND", "the refunds", "ref.", "Credit -Card", "BITCOIN", "bitcoin"):
        with pytest.raises(InvalidArgument, match="'list'"):
            InputFilter(rules).apply("prompt", filler + tail)
        with pytest.raises(InvalidArgument, match="'list'"):
            InputFilter(rules).apply("prompt", tail)
    for tail in ("refundable", "prefund", "credit cards"):
        assert InputFilter(rules).apply("prompt", filler + tail) == filler + tail
    text = filler + "ﬁne ＳＣＡＭ, a s c a m, 𝐬𝐜𝐚𝐦! Straße"
    assert InputFilter(rules).apply("prompt", text) == filler + "ﬁne [x], a [x], [x]! Straße"
