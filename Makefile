# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PY := .venv/bin/python

.PHONY: setup demo test bench tune lint clean
setup:
	@bash tools/setup.sh

# resume=auto: a second `make demo` continues an interrupted demo, or shows a complete one's results (train.py
# refuses a fresh run in a folder that holds a run); `make clean` or `rm -rf runs/demo` to train it again
demo: setup
	$(PY) train.py --preset=demo --run.resume=auto

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) -m benchmarks.run_cpu

# which backend and workers feed the model on your data here: make tune DATA=/data/imagenet/train [ARGS="--model.arch=resnet18"]
tune: setup
	$(PY) -m benchmarks.tune $(DATA) $(ARGS)

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf runs data/sample .pytest_cache
