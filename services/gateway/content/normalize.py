"""What content rules match against: the text as it is, or a normalized or collapsed view of it.

A view keeps, for each of its characters, where in the original text it came from, so that a match in
the view can be redacted in the original, and so that the output guard can hold back the original text
behind the view's last characters.

Levels:

- `exact`: the text as it is.
- `normalized`: NFKC (fullwidth forms, ligatures, mathematical letters, circled digits to their plain
  forms), case-folded, with default-ignorable code points removed (zero-width spaces and joiners, soft
  hyphens, bidi controls, variation selectors, tag characters): "ＲＥ\u200bFUND" reads "refund".
- `collapsed`: normalized, then diacritics removed ("rèfünd"), Cyrillic and Greek look-alikes mapped to
  the Latin letters they imitate ("rеfund" with a Cyrillic "е"), and runs of three or more single
  letters separated by spaces or punctuation joined ("r e f u n d", "r.e.f.u.n.d"). Every letter of such
  a run begins a word, so word rules find their words anywhere inside it ("a r e f u n d").
"""

import re
import unicodedata
from bisect import bisect_left
from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

Level = Literal["exact", "normalized", "collapsed"]

# Unicode's Default_Ignorable_Code_Point set: characters that render as nothing.
_IGNORABLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f"
    "\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)
# Combining diacritical marks left over once NFKC has composed what it can ("q̃").
_MARKS = re.compile("[\u0300-\u036f\u0483-\u0489\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]")
# Three or more single letters, each separated from the next by 1-3 spaces or punctuation marks.
_RUN = re.compile(r"(?<!\w)[^\W\d_](?:[^\w\n]{1,3}[^\W\d_](?!\w)){2,}")
_LETTER = re.compile(r"[^\W\d_]")
_SMALL_CHUNK = 8  # characters normalized one by one rather than halved further

# Look-alikes (after case folding) of Latin letters, from the Cyrillic, Greek and IPA blocks.
HOMOGLYPHS = {
    "а": "a", "в": "b", "с": "c", "е": "e", "һ": "h", "і": "i", "ј": "j", "к": "k", "м": "m", "н": "h",
    "о": "o", "р": "p", "ѕ": "s", "т": "t", "у": "y", "х": "x", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ү": "y",
    "ӏ": "l", "α": "a", "β": "b", "γ": "y", "ε": "e", "η": "n", "ι": "i", "κ": "k", "μ": "u", "ν": "v",
    "ο": "o", "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ɑ": "a", "ɡ": "g", "ı": "i", "ɩ": "i",
}  # fmt: skip
# Latin, Greek and Cyrillic letters with diacritics, and the look-alikes above: one character each.
_FOLD_RANGES = ((0x00C0, 0x0250), (0x0370, 0x0530), (0x1E00, 0x2000))


def _fold_table() -> dict[int, str]:
    table = {}
    for low, high in _FOLD_RANGES:
        for code in range(low, high):
            base = "".join(c for c in unicodedata.normalize("NFKD", chr(code)) if not unicodedata.combining(c))
            if len(base) == 1:
                base = HOMOGLYPHS.get(base, base)
                if base != chr(code):
                    table[code] = base
    table.update({ord(k): v for k, v in HOMOGLYPHS.items()})
    return table


_FOLD = _fold_table()
# The characters _FOLD maps, to replace only those (a dict lookup for every character costs more).
_FOLDABLE = re.compile("[" + "".join(re.escape(chr(code)) for code in sorted(_FOLD)) + "]")


@dataclass(slots=True)
class View:
    """`text` as rules see it. Character i came from `source[starts[i]:ends[i]]` (None: from `source[i]`),
    unless not `positioned` (built without positions, which only a redaction needs); `runs` are the spans
    of joined single-letter runs (collapsed level)."""

    text: str
    starts: list[int] | None = None
    ends: list[int] | None = None
    runs: tuple[tuple[int, int], ...] = ()
    positioned: bool = True

    def original(self, start: int, end: int) -> tuple[int, int]:
        """The span of the source behind `text[start:end]` (start < end)."""
        assert self.positioned, "a view built without positions"
        if self.starts is None:
            return start, end
        return self.starts[start], self.ends[end - 1]

    def source_offset(self, index: int, source_length: int) -> int:
        """Where in the source the view's character `index` begins (`source_length` past the end)."""
        if index >= len(self.text):
            return source_length
        return index if self.starts is None else self.starts[index]

    def index(self, offset: int) -> int:
        """The first view character that begins at or after source `offset`."""
        return offset if self.starts is None else bisect_left(self.starts, offset)


def view(text: str, level: Level, positioned: bool = True) -> View:
    """`text` at `level`; without `positioned`, text that NFKC changes is normalized whole, in C, instead of
    piece by piece."""
    return views(text, (level,), positioned)[level]


def views(text: str, levels: Collection[Level], positioned: bool = True) -> dict[Level, View]:
    """`text` at each of `levels`, normalizing once for both the normalized and the collapsed level."""
    found: dict[Level, View] = {}
    if "exact" in levels:
        found["exact"] = View(text)
    if "normalized" in levels or "collapsed" in levels:
        normalized = _normalized(text, positioned)
        if "normalized" in levels:
            found["normalized"] = normalized
        if "collapsed" in levels:
            found["collapsed"] = _collapsed(normalized)
    return found


def _stable(text: str) -> bool:
    """True when normalizing `text` only case-folds it, one character to one."""
    return (
        unicodedata.is_normalized("NFKC", text)
        and _IGNORABLE.search(text) is None
        and len(text.casefold()) == len(text)
    )


def _normalized(text: str, positioned: bool) -> View:
    if text.isascii():
        return View(text.lower())
    if _stable(text):
        return View(text.casefold())
    if not positioned:
        return View(_IGNORABLE.sub("", unicodedata.normalize("NFKC", text).casefold()), positioned=False)
    chars: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    _normalize_chunk(text, 0, len(text), chars, starts, ends)
    return View("".join(chars), starts, ends)


def _normalize_chunk(text: str, start: int, end: int, chars: list[str], starts: list[int], ends: list[int]) -> None:
    """Normalizes `text[start:end]`, halving it until the parts that only need case folding show (a few
    fullwidth commas in a long run of CJK cost a few halvings, not a Python step per character)."""
    chunk = text[start:end]
    if _stable(chunk):
        chars.append(chunk.casefold())
        starts.extend(range(start, end))
        ends.extend(range(start + 1, end + 1))
        return
    middle = (start + end) // 2
    while middle < end and unicodedata.combining(text[middle]):  # never split a character from its marks
        middle += 1
    if end - start > _SMALL_CHUNK and middle < end:
        _normalize_chunk(text, start, middle, chars, starts, ends)
        _normalize_chunk(text, middle, end, chars, starts, ends)
        return
    i = start
    while i < end:  # one character with the combining marks that follow it, which NFKC may compose
        j = i + 1
        while j < end and unicodedata.combining(text[j]):
            j += 1
        out = _cluster_form(text[i:j])
        chars.append(out)
        starts.extend([i] * len(out))
        ends.extend([j] * len(out))
        i = j


@lru_cache(maxsize=4096)
def _cluster_form(cluster: str) -> str:
    """A character with its combining marks, normalized (cached: texts reuse few distinct characters)."""
    return _IGNORABLE.sub("", unicodedata.normalize("NFKC", cluster).casefold())


def _collapsed(normalized: View) -> View:
    text = normalized.text
    keep = None
    if not text.isascii():
        text = _FOLDABLE.sub(lambda m: _FOLD[ord(m.group())], text)
        if _MARKS.search(text):
            keep = [i for i, c in enumerate(text) if not _MARKS.match(c)]
    runs_found = list(_RUN.finditer(text if keep is None else "".join(text[i] for i in keep)))
    if keep is None and not runs_found:
        return View(text, normalized.starts, normalized.ends, positioned=normalized.positioned)
    if keep is None:
        keep = list(range(len(text)))
    runs = []
    if runs_found:  # keep only the letters of each run
        kept, done = [], 0
        for run in runs_found:
            kept.extend(keep[done : run.start()])
            first = len(kept)
            kept.extend(keep[run.start() + m.start()] for m in _LETTER.finditer(run.group()))
            runs.append((first, len(kept)))
            done = run.end()
        keep = kept + keep[done:]
    text = "".join(text[i] for i in keep)
    if not normalized.positioned:
        return View(text, runs=tuple(runs), positioned=False)
    starts = keep if normalized.starts is None else [normalized.starts[i] for i in keep]
    ends = [i + 1 for i in keep] if normalized.ends is None else [normalized.ends[i] for i in keep]
    return View(text, starts, ends, tuple(runs))
