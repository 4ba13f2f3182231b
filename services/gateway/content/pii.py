"""PII redaction: e-mail addresses, payment card numbers and phone numbers become `[email]`, `[card]`, `[phone]`.

What counts:
- email: `local@domain.tld`.
- card: 13-19 digits, optionally grouped by single spaces or hyphens, that pass the Luhn check.
- phone: 10-15 digits (8-15 after a leading `+country code`), optionally grouped by spaces, dots,
  hyphens and a parenthesized area code; dotted quads (IPv4 addresses) are not phone numbers.
Cards are looked for before phones, so a card number is never redacted as `[phone]`.
"""

import re
from typing import Literal

Kind = Literal["email", "card", "phone"]
KINDS: tuple[Kind, ...] = ("email", "card", "phone")

_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}(?![\w-])")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?!\d)")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,5}(?!\w)")
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
# A cheap test that rules cards and phones out for most texts: both have a run of 8 or more digits and
# separators that begins with a digit.
_NUMBERISH = re.compile(r"\d[\d ().+-]{6,}")


def luhn(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    return "[card]" if luhn(re.sub(r"\D", "", match.group())) else match.group()


def _phone(match: re.Match[str]) -> str:
    text = match.group()
    digits = sum(c.isdigit() for c in text)
    least = 8 if text.startswith("+") else 10
    if not least <= digits <= 15 or _IPV4.fullmatch(text):
        return text
    return "[phone]"


def redact(text: str, kinds: tuple[Kind, ...]) -> str:
    """`text` with the PII of `kinds` replaced: e-mail addresses, then cards, then phones."""
    if "email" in kinds and "@" in text:
        text = _EMAIL.sub("[email]", text)
    if ("card" in kinds or "phone" in kinds) and _NUMBERISH.search(text):
        if "card" in kinds:
            text = _CARD.sub(_card, text)
        if "phone" in kinds:
            text = _PHONE.sub(_phone, text)
    return text
