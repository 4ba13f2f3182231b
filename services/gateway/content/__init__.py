"""Content controls: the input filter (control characters, rules, PII redaction) and the streaming output guard.

The rules file is described in README.md ("Content controls").
"""
