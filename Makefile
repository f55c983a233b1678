# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PY := .venv/bin/python

.PHONY: setup demo test bench lint clean
setup:
	@bash tools/setup.sh

demo: setup
	$(PY) train.py --preset=demo

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) -m benchmarks.run_cpu

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf runs data/sample .pytest_cache
