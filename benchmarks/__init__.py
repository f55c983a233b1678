"""Benchmarks: `python -m benchmarks.<name> --help`. Results go to benchmarks/results/ (see benchmarks/common.py)."""
