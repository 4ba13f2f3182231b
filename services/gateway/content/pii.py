"""PII redaction: e-mail addresses, payment card numbers and phone numbers become `[email]`, `[card]`, `[phone]`.

What counts:
- email: `local@domain.tld`.
- card: 13-19 digits, optionally grouped by single spaces or hyphens, that pass the Luhn check.
- phone: 10-15 digits (8-15 after a leading `+country code`), optionally grouped by spaces, dots,
  hyphens and a parenthesized area code; dotted quads (IPv4 addresses) are not phone numbers.
Cards are looked for before phones, so a card number is never redacted as `[phone]`.
"""

import re
from collections.abc import Callable
from typing import Literal

Kind = Literal["email", "card", "phone"]
KINDS: tuple[Kind, ...] = ("email", "card", "phone")

_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}(?![\w-])")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?!\d)")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,5}(?!\w)")
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")


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


_REDACTORS: dict[Kind, tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = {
    "email": (_EMAIL, lambda _: "[email]"),
    "card": (_CARD, _card),
    "phone": (_PHONE, _phone),
}


def redact(text: str, kinds: tuple[Kind, ...]) -> str:
    """`text` with the PII of `kinds` replaced, in the order of KINDS."""
    for kind in KINDS:
        if kind in kinds:
            pattern, replace = _REDACTORS[kind]
            text = pattern.sub(replace, text)
    return text
