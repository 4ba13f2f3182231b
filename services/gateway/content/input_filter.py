"""The input filter: what clients send as text (Generate `prompt`, Chat message contents) before it is
tokenized or stored.

In order: control characters are refused, the input rules block or redact, then PII is redacted. A
refusal is INVALID_ARGUMENT naming the field and the rule, never the text that matched.
"""

import re
from collections.abc import Sequence

from moemesh.errors import InvalidArgument
from services.gateway.content import pii
from services.gateway.content.normalize import Level, View, view, views
from services.gateway.content.rules import Rule

# C0 and C1 control characters and DEL, except tab and newline.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class InputFilter:
    def __init__(self, rules: Sequence[Rule] = (), pii_kinds: Sequence[pii.Kind] = ()):
        self.rules, self.pii_kinds = tuple(rules), tuple(pii_kinds)
        self.levels = {rule.level for rule in self.rules}

    def apply(self, field: str, text: str) -> str:
        """`text` as the model and the session store get it; `field` names it in errors (`prompt`)."""
        if control := _CONTROL.search(text):
            raise InvalidArgument(
                f"{field}: control character U+{ord(control.group()):04X} at offset {control.start()} "
                "is not allowed (only tab and newline are)"
            )
        seen_at: dict[Level, View] = {}  # built without positions, until a redaction needs them
        for rule in self.rules:
            if not seen_at:
                seen_at = views(text, self.levels, positioned=False)
            seen = seen_at[rule.level]
            spans = rule.matches(seen)
            if not spans:
                continue
            if rule.action == "block":
                raise InvalidArgument(f"{field}: refused by content rule {rule.id!r}")
            if not seen.positioned:
                seen = view(text, rule.level)
                spans = rule.matches(seen)
            for start, end in reversed(spans):
                begin, stop = seen.original(start, end)
                text = text[:begin] + rule.replacement + text[stop:]
            seen_at = {}
        return pii.redact(text, self.pii_kinds)
