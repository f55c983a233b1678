"""Benchmarks: `python -m benchmarks.<name> --help`. A run writes its JSON record under `--out` (default
runs/benchmarks/); benchmarks/results/ holds the project's reference records (see benchmarks/common.py)."""
