"""Benchmarks of cnnlab (not tests), kept beside the package rather than inside the installed one.
Run from the repository root: `python -m benchmarks --help`."""
