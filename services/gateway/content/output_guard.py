"""The output guard: output rules over generated text as it streams, matches across token boundaries included.

Each step it reads only the text not yet sent (plus a few characters before it, for word boundaries and
combining marks) and holds back the end of it: as many characters of each normalization level's view as
the longest rule at that level can span (`Rule.reach`). A match can therefore never have begun in text
already sent. A match that touches the end of the text so far is not decided yet (a word may go on, a
regex may still grow), so it waits for more text, or for the end of the generation.
"""

from collections.abc import Sequence

from services.gateway.content.normalize import Level, views
from services.gateway.content.rules import Rule

# Source characters before the unsent text that each scan also reads.
CONTEXT = 8


class OutputGuard:
    def __init__(self, rules: Sequence[Rule]):
        self.by_level: dict[Level, list[Rule]] = {}
        for rule in rules:
            self.by_level.setdefault(rule.level, []).append(rule)
        self.reach = {level: max(r.reach for r in group) for level, group in self.by_level.items()}

    def scan(self, text: str, sent: int, end: int, final: bool) -> tuple[int, Rule | None]:
        """Looks at `text[sent:end]`, the text not sent yet; `final`: no text will follow `end`.

        Returns (how far the text may be sent, None), or (where the first match begins, its rule), where
        the stream ends.
        """
        start = max(0, sent - CONTEXT)
        window = text[start:end]
        safe, first, rule = end, end, None
        seen_at = views(window, self.by_level)
        for level, rules in self.by_level.items():
            seen = seen_at[level]
            pos = seen.index(sent - start)
            for candidate in rules:
                for span in candidate.matches(seen, pos):
                    if not final and span[1] >= len(seen.text):
                        break  # may still change with the next text
                    begin = start + seen.original(*span)[0]
                    if begin < first:
                        first, rule = begin, candidate
                    break
            if not final:
                held = max(0, len(seen.text) - self.reach[level])
                safe = min(safe, start + seen.source_offset(held, len(window)))
        if rule is not None:
            return max(first, sent), rule
        return max(safe, sent), None
