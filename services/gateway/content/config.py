"""The content rules file (`GatewaySettings.input_filter`): YAML or JSON with an `input` and an `output` section.

Every mistake in it is a ConfigError naming the file and the entry, at start, so a gateway never serves
with rules other than the ones written.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moemesh.errors import ConfigError
from services.gateway.content import pii
from services.gateway.content.input_filter import InputFilter
from services.gateway.content.normalize import Level
from services.gateway.content.output_guard import OutputGuard
from services.gateway.content.rules import Rule, regex_rule, words_rule

REDACTED = "[redacted]"
_RULE_KEYS = {"id", "kind", "words", "pattern", "normalize", "collapse", "action", "replacement", "max_length"}


@dataclass(frozen=True)
class ContentControls:
    input: InputFilter
    output: OutputGuard | None  # None: no output rules


def load_controls(path: Path | None) -> ContentControls:
    """The controls a rules file configures; without one, only control characters are refused."""
    if path is None:
        return ContentControls(InputFilter(), None)
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"content rules {path}: {exc}") from None
    try:
        return _controls(data or {})
    except _Bad as exc:
        raise ConfigError(f"content rules {path}: {exc}") from None


class _Bad(Exception):
    """A mistake in the file, with the path of the entry it is in."""


def _controls(data: Any) -> ContentControls:
    _check_keys(data, {"input", "output"}, "the file")
    section = data.get("input") or {}
    _check_keys(section, {"rules", "pii"}, "input")
    kinds = section.get("pii") or []
    if not isinstance(kinds, list) or any(k not in pii.KINDS for k in kinds):
        raise _Bad(f"input.pii: {kinds!r} must be a list of {', '.join(pii.KINDS)}")
    input_filter = InputFilter(_rules(section.get("rules"), "input"), kinds)
    section = data.get("output") or {}
    _check_keys(section, {"rules"}, "output")
    output = _rules(section.get("rules"), "output")
    return ContentControls(input_filter, OutputGuard(output) if output else None)


def _rules(entries: Any, section: str) -> list[Rule]:
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise _Bad(f"{section}.rules: must be a list")
    rules = [_rule(entry, section, f"{section}.rules[{i}]") for i, entry in enumerate(entries)]
    ids = [r.id for r in rules]
    if duplicates := sorted({i for i in ids if ids.count(i) > 1}):
        raise _Bad(f"{section}.rules: rule ids {duplicates} are used more than once")
    return rules


def _rule(entry: Any, section: str, where: str) -> Rule:
    _check_keys(entry, _RULE_KEYS, where)
    rule_id = entry.get("id")
    if not isinstance(rule_id, str) or not rule_id:
        raise _Bad(f"{where}.id: a rule needs a non-empty string id")
    normalize, collapse = _flag(entry, "normalize", where), _flag(entry, "collapse", where)
    level: Level = "collapsed" if collapse else "normalized" if normalize else "exact"
    action = entry.get("action", "block")
    allowed = ("block",) if section == "output" else ("block", "redact")
    if action not in allowed:
        raise _Bad(f"{where}.action: {action!r} is not one of {', '.join(allowed)}")
    replacement = entry.get("replacement", REDACTED)
    if not isinstance(replacement, str) or ("replacement" in entry and action != "redact"):
        raise _Bad(f"{where}.replacement: a string, for redact rules only")
    kind = entry.get("kind")
    if kind == "words":
        words = entry.get("words")
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise _Bad(f"{where}.words: a list of non-empty strings")
        if "pattern" in entry or "max_length" in entry:
            raise _Bad(f"{where}: words rules take no pattern or max_length")
        try:
            return words_rule(rule_id, words, level, action, replacement)
        except ValueError as exc:
            raise _Bad(f"{where}.{exc}") from None
    if kind == "regex":
        return _regex(entry, rule_id, level, action, replacement, section, where)
    raise _Bad(f"{where}.kind: {kind!r} is not one of words, regex")


def _regex(entry: dict, rule_id: str, level: Level, action: str, replacement: str, section: str, where: str) -> Rule:
    pattern = entry.get("pattern")
    if not isinstance(pattern, str) or not pattern:
        raise _Bad(f"{where}.pattern: a non-empty regular expression")
    if "words" in entry:
        raise _Bad(f"{where}: regex rules take no words")
    max_length = entry.get("max_length", 0)
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 0:
        raise _Bad(f"{where}.max_length: a number of characters >= 1")
    if section == "output" and max_length < 1:
        raise _Bad(
            f"{where}.max_length: output regex rules need the most characters a match (lookaround included) "
            "spans, which is how much text the stream holds back"
        )
    try:
        return regex_rule(rule_id, pattern, level, action, replacement, max_length)
    except re.error as exc:
        raise _Bad(f"{where}.pattern: {exc}") from None


def _flag(entry: dict, key: str, where: str) -> bool:
    value = entry.get(key, False)
    if not isinstance(value, bool):
        raise _Bad(f"{where}.{key}: true or false")
    return value


def _check_keys(entry: Any, allowed: set[str], where: str) -> None:
    if not isinstance(entry, dict):
        raise _Bad(f"{where}: must be a mapping")
    if unknown := sorted(set(entry) - allowed):
        raise _Bad(f"{where}: unknown keys {unknown}; allowed: {', '.join(sorted(allowed))}")
