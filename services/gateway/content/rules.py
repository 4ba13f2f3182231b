"""Content rules: block lists of words and regular expressions, each matched at a normalization level."""

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from services.gateway.content.normalize import Level, View, view

Action = Literal["block", "redact"]
# Words of a phrase ("credit card") match with 1-3 spaces or punctuation marks between them.
PHRASE_GAP = r"\W{1,3}"
PHRASE_GAP_MAX = 3
# Texts from this long are first split into words, and a words rule runs its pattern only when one of its
# entries' first words is among them; for shorter ones the pattern costs less than the split.
PREFILTER_CHARS = 256
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Rule:
    id: str
    level: Level
    pattern: re.Pattern[str]
    # Words rules at the collapsed level: the words without word boundaries, for joined single-letter runs.
    in_runs: re.Pattern[str] | None
    action: Action
    replacement: str
    # The most view characters one match and the context it looks at (a word's next character) can span;
    # the output guard holds back that much text.
    reach: int
    # Words rules: the first word of each entry, case-folded (None: an entry begins with punctuation).
    first_words: frozenset[str] | None = None

    def matches(self, text: View, pos: int = 0) -> list[tuple[int, int]]:
        """The non-overlapping matches in `text.text[pos:]` as view spans, in order."""
        found = []
        if (
            self.first_words is None
            or len(text.text) - pos < PREFILTER_CHARS
            or not self.first_words.isdisjoint(_words(text.text[pos:] if pos else text.text))
        ):
            found = [m.span() for m in self.pattern.finditer(text.text, pos) if m.end() > m.start()]
        if self.in_runs is None or not text.runs:
            return found
        for start, end in text.runs:
            if end > pos:
                runs = self.in_runs.finditer(text.text, max(start, pos), end)
                found += [m.span() for m in runs if m.end() > m.start()]
        disjoint: list[tuple[int, int]] = []
        for span in sorted(found):
            if not disjoint or span[0] >= disjoint[-1][1]:
                disjoint.append(span)
        return disjoint


def words_rule(rule_id: str, words: list[str], level: Level, action: Action, replacement: str) -> Rule:
    """Whole words (or phrases), case-insensitive; the words are normalized as the text is."""
    forms = sorted({tuple(view(w, level).text.split()) for w in words} - {()}, key=lambda f: -len(" ".join(f)))
    if not forms:
        raise ValueError("words: no words to match")
    alternatives = _trie_pattern([" ".join(form) for form in forms])
    pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE if level == "exact" else 0)
    in_runs = None
    if level == "collapsed":
        in_runs = re.compile("|".join(re.escape("".join(form)) for form in forms))
    reach = max(sum(map(len, form)) + PHRASE_GAP_MAX * (len(form) - 1) for form in forms) + 1
    firsts = [_WORD.match(form[0]) for form in forms]
    first_words = frozenset(_fold(m.group()) for m in firsts) if all(firsts) else None
    return Rule(rule_id, level, pattern, in_runs, action, replacement, reach, first_words)


def regex_rule(rule_id: str, pattern: str, level: Level, action: Action, replacement: str, max_length: int) -> Rule:
    """A regular expression over the view of the text at `level`; `max_length` bounds what a match and its
    lookaround span (0: unbounded, input rules only)."""
    return Rule(rule_id, level, re.compile(pattern), None, action, replacement, max_length)


@lru_cache(maxsize=16)
def _words(text: str) -> frozenset[str]:
    """The words of `text`, case-folded; cached, since the rules of a level (and the levels of ASCII text) share
    one text."""
    return frozenset(_WORD.findall(_fold(text)))


def _fold(text: str) -> str:
    """Case folding that also equates what `re.IGNORECASE` equates: dotless and dotted I with i."""
    if "ı" in text or "İ" in text:
        text = text.replace("ı", "i").replace("İ", "i")
    return text.casefold()


def _trie_pattern(entries: list[str]) -> str:
    """An alternation of `entries` (spaces standing for PHRASE_GAP) with common prefixes factored out, which
    Python's regex engine tries several times faster than a flat list; longer entries are tried first."""
    trie: dict = {}
    for entry in entries:
        node = trie
        for char in entry:
            node = node.setdefault(char, {})
        node[""] = {}

    def pattern(node: dict) -> str:
        branches = [(PHRASE_GAP if c == " " else re.escape(c)) + pattern(child) for c, child in node.items() if c]
        if not branches:
            return ""
        group = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        if "" in node:  # an entry ends here: the longer ones first
            return f"(?:{group})?"
        return group

    return pattern(trie)
