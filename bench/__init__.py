"""Benchmarks that print side-by-side ratios (run from the repo root: `python -m bench.<name>`)."""
